"anita.models: one loader and one batched generator for the applications (RAG, sentiment, recommendation, chat, serve)."
import pytest
from anita.models import load_model, chat_prompt, generate_batch


@pytest.fixture(scope="module")
def smol(embedded_dir):
    return load_model(embedded_dir)


def test_load_model(smol):
    lm, tok = smol
    assert not lm.training and tok.pad_token is not None


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"): load_model(str(tmp_path/"nope"))


def test_chat_prompt(smol):
    _, tok = smol
    p = chat_prompt(tok, "Ciao!", "Sei un assistente.")
    assert p.index("Sei un assistente.") < p.index("Ciao!") and p.rstrip().endswith("assistant")
    assert "Sei un assistente." not in chat_prompt(tok, "Ciao!")
    class Plain: chat_template = None
    assert chat_prompt(Plain(), "Q", "S") == "S\n\nQ\n\n"


def test_generate_batch_greedy(smol):
    "Greedy answers, one per prompt, are reproducible; sampling options pass through to `generate`."
    lm, tok = smol
    ps = [chat_prompt(tok, q) for q in ("What is the capital of Italy?", "Say hello.", "2+2=")]
    a = generate_batch(lm, tok, ps, batch_size=3, max_new_tokens=6)
    assert len(a) == 3 and all(isinstance(x, str) for x in a) and any(a)
    assert generate_batch(lm, tok, ps, batch_size=3, max_new_tokens=6) == a
    assert len(generate_batch(lm, tok, ps[:1], max_new_tokens=4, do_sample=True, temperature=0.7)) == 1
