"Integration tests of anita.core: atomic writes, manifests, the embedded models and the Llama-3 chat format."
import json, os, subprocess, sys, textwrap, warnings
from pathlib import Path
import pytest
from anita import core
from conftest import SHARED

def test_atomic_write_killed_process_leaves_old_file(tmp_path):
    "A process killed in the middle of a write leaves the previous file intact and readable."
    p = tmp_path/"out.json"
    core.write_json(p, {"ok": 1})
    code = textwrap.dedent(f"""
        import os, signal
        from anita.core import atomic_write
        with atomic_write({str(p)!r}) as f:
            f.write('{{"ok": ')
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", code])
    assert r.returncode == -9
    assert core.read_json(p) == {"ok": 1}

def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"): core.read_json(tmp_path/"missing.json")
    (tmp_path/"bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json"): core.read_json(tmp_path/"bad.json")

def test_manifest_records_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with core.step_manifest(tmp_path, "02_sft", params={"lr": 2e-4}) as outs:
            raise RuntimeError("out of memory")
    m = core.read_manifest(tmp_path)
    assert m["status"] == "failed" and "out of memory" in m["error"] and m["params"] == {"lr": 2e-4}
    assert "transformers" in m["versions"]

def test_llama3_template_matches_official(tiny_llama3_dir, llama3_tokenizer_model):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llama3_dir)
    if (SHARED/"llama3"/"chat_template.jinja").exists():
        assert tok.chat_template == (SHARED/"llama3"/"chat_template.jinja").read_text().strip()
    msgs = [{"role": "system", "content": "Sei ANITA."}, {"role": "user", "content": " Ciao! "},
            {"role": "assistant", "content": "Ciao, come posso aiutarti?"}, {"role": "user", "content": "2+2?"}]
    s = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert s == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSei ANITA.<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\nCiao!<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\nCiao, come posso aiutarti?<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    if llama3_tokenizer_model is None: pytest.skip("real Llama-3 tokenizer.model not present: ids not checked")
    assert ids[:4] == [128000, 128006, 9125, 128007]   # <|begin_of_text|><|start_header_id|>system<|end_header_id|>
    assert tok.decode(ids) == s
    assert tok("Ciao mondo")["input_ids"] == [128000] + tok("Ciao mondo", add_special_tokens=False)["input_ids"]

def test_real_tokenizer_matches_tiktoken(llama3_tokenizer_model):
    "The converted fast tokenizer encodes like tiktoken with Meta's split pattern."
    if llama3_tokenizer_model is None: pytest.skip("real Llama-3 tokenizer.model not present")
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    enc = tiktoken.Encoding("llama3", pat_str=core.LLAMA3_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(llama3_tokenizer_model)),
                            special_tokens={})
    tok = core.llama3_tokenizer(llama3_tokenizer_model)
    for s in ["Ciao, sono ANITA! Rispondo in italiano e in inglese.", "def f(x):\n    return x**2  # 12345",
              "Perché l'aria è più leggera? ÀÉÌÒÙ — «citazione» 😀"]:
        assert tok(s, add_special_tokens=False)["input_ids"] == enc.encode(s)

def test_fallback_tokenizer_when_file_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("ANITA_LLAMA3_TOKENIZER", str(tmp_path/"absent.model"))
    with pytest.warns(UserWarning, match="tokenizer.model not found"):
        tok = core.llama3_tokenizer()
    s = tok.apply_chat_template([{"role": "user", "content": "Ciao"}], tokenize=False, add_generation_prompt=True)
    assert s == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nCiao<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ids = tok(s, add_special_tokens=False)["input_ids"]
    for t in ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]:
        assert tok.convert_tokens_to_ids(t) in ids
    assert tok.decode(ids) == s

def test_tiny_llama3_shape(tiny_llama3_dir):
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(tiny_llama3_dir)
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", None)}  # transformers 5 / 4
    assert cfg.model_type == "llama" and rope["rope_theta"] == 500000.0 and not cfg.tie_word_embeddings
    assert cfg.num_attention_heads > cfg.num_key_value_heads   # grouped-query attention as in Llama-3-8B

def test_embedded_base_generates(embedded_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(embedded_dir); m = AutoModelForCausalLM.from_pretrained(embedded_dir)
    assert 130e6 < sum(p.numel() for p in m.parameters()) < 140e6
    x = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
                                return_tensors="pt", return_dict=True)
    out = m.generate(**x, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, x["input_ids"].shape[1]:])

def test_resolve_model_errors(tmp_path):
    (tmp_path/"empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"): core.resolve_model(str(tmp_path/"empty"))
    assert core.resolve_model("meta-llama/Meta-Llama-3-8B-Instruct") == "meta-llama/Meta-Llama-3-8B-Instruct"
