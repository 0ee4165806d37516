"Integration tests of the data step (anita.data) on the shipped samples and local models only."
import json, warnings
from pathlib import Path
import pytest

from anita import data as D
from anita import sources
from anita.core import read_manifest

PRE_IN = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.")
PRE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

@pytest.fixture(scope="module")
def llama(tiny_llama3_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_llama3_dir)

@pytest.fixture(scope="module")
def smol(embedded_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(embedded_dir)

def rows_of(kind): return [json.loads(l) for l in D.sample_path(kind).read_text(encoding="utf-8").splitlines() if l.strip()]

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path

# ---------- samples ----------
def test_samples_real_schemas():
    sft, dpo, ita = rows_of("sft"), rows_of("dpo"), rows_of("ita")
    assert 40 <= len(sft) <= 60 and 40 <= len(dpo) <= 60 and 60 <= len(ita) <= 100
    assert all(set(r) == {"system", "instruction", "input", "output"} for r in sft)
    assert all(set(r) == {"source", "prompt", "question", "chosen", "rejected"} for r in dpo)
    assert all(set(r) == {"text", "timestamp", "url"} for r in ita)
    assert sum("<<human>>:" in r["instruction"] for r in sft) >= 3 and sum(bool(r["system"]) for r in sft) >= 3
    assert sum(bool(r["input"]) for r in sft) >= 5
    assert len({r["source"] for r in dpo}) >= 4 and sum(r["source"] == "toxic-dpo-v0.2" for r in dpo) >= 3
    assert any(len(r["chosen"]) > 3 for r in dpo) and any(r["chosen"][0]["role"] == "system" for r in dpo)
    assert sum(f.stat().st_size for f in map(D.sample_path, ("sft", "dpo", "ita"))) < 200_000

# ---------- SFT ----------
def test_strip_markers():
    assert D.strip_markers("<<human>>: Ciao, come va?") == "Ciao, come va?"
    assert D.strip_markers("  <<assistant>>:\tBene.  ") == "Bene."
    assert D.strip_markers("<<human>>: A <<assistant>>: B") == "A B"
    assert D.strip_markers("niente << da >> togliere") == "niente << da >> togliere"

def test_alpaca_templates_exact():
    assert D.alpaca_prompt("Traduci.", "Ciao") == (PRE_IN + "\n\n### Instruction:\nTraduci.\n\n### Input:\nCiao\n\n### Response:\n")
    assert D.alpaca_prompt("Name a fruit.") == PRE + "\n\n### Instruction:\nName a fruit.\n\n### Response:\n"
    assert D.alpaca_prompt("Name a fruit.", system="Be brief.") == "Be brief.\n\n### Instruction:\nName a fruit.\n\n### Response:\n"

def test_prepare_sft_llama3(llama):
    ds, rep = D.prepare_sft(D.sample_path("sft"), llama, return_report=True)
    assert ds.column_names == ["prompt", "completion"]
    raw = rows_of("sft")
    assert rep["rows_in"] == len(raw) and rep["duplicates"] == 1 and rep["rows_out"] == len(raw) - 1 == len(ds)
    bos = "<|begin_of_text|>"
    for r in ds:
        text = r["prompt"] + r["completion"]
        assert r["prompt"].startswith(bos) and text.count(bos) == 1
        assert r["completion"].endswith("<|eot_id|>") and text.count("<|eot_id|>") == 1
        assert "<<human>>" not in text and "<<assistant>>" not in text
    # one row checked end to end against the exact template
    i = next(i for i, r in enumerate(raw) if r["input"] and not r["system"])
    r = raw[i]
    assert ds[i] == dict(prompt=bos + PRE_IN + f"\n\n### Instruction:\n{r['instruction']}\n\n### Input:\n{r['input']}\n\n### Response:\n",
                         completion=r["output"] + "<|eot_id|>")
    # BOS already in a field is not doubled
    d2 = D.prepare_sft([dict(system="", instruction="Hi", input="", output="Hello")], llama)
    ids = llama(d2[0]["prompt"] + d2[0]["completion"], add_special_tokens=False)["input_ids"]
    assert ids.count(llama.bos_token_id) == 1 and ids[0] == llama.bos_token_id and ids[-1] == llama.convert_tokens_to_ids("<|eot_id|>")

def test_sft_markers_and_system(smol):
    ds = D.prepare_sft([dict(system="Sei un cuoco.", instruction="<<human>>: Una ricetta?", input=None, output="<<assistant>>: Pasta.")], smol)
    assert ds[0] == dict(prompt="Sei un cuoco.\n\n### Instruction:\nUna ricetta?\n\n### Response:\n", completion="Pasta.<|im_end|>")

def test_bos_eot_detection(smol, llama):
    assert (D.bos_string(llama), D.eot_token(llama)) == ("<|begin_of_text|>", "<|eot_id|>")
    # SmolLM2's declared BOS is ChatML's turn opener: no BOS string, <|im_end|> ends a turn
    assert smol.bos_token == "<|im_start|>" and (D.bos_string(smol), D.eot_token(smol)) == ("", "<|im_end|>")

# ---------- bad rows ----------
def test_bad_rows_error_names_row_and_reason(llama, tmp_path):
    good = dict(system="", instruction="Dimmi un numero.", input="", output="Sette.")
    rows = [dict(good, output=f"{i}") for i in range(9)] + [dict(good, instruction=None)]
    f = write_jsonl(tmp_path/"sft.jsonl", rows)
    with pytest.raises(ValueError, match=r"sft\.jsonl: 1 of 10 rows are bad .*row 9: instruction: missing"):
        D.prepare_sft(f, llama)
    ds, rep = D.prepare_sft(f, llama, max_bad_frac=0.2, return_report=True)
    assert len(ds) == 9 and rep["bad"] == {"instruction: missing": 1}
    with pytest.raises(ValueError, match=r"row 1: output: wrong type int"):
        D.prepare_sft([good, dict(good, output=3)], llama)
    with pytest.raises(ValueError, match=r"row 0: output: empty"):
        D.prepare_sft([dict(good, output="  ")], llama, max_bad_frac=1.0)  # all rows bad always stops
    (tmp_path/"broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(ValueError, match="broken.jsonl, line 2"):
        D.prepare_sft(tmp_path/"broken.jsonl", llama)

def test_dpo_bad_messages(llama):
    ok = rows_of("dpo")[0]
    bad = [dict(ok, chosen="not a list"), dict(ok, rejected=[{"role": "user"}]), dict(ok, chosen=ok["chosen"] + [dict(role="user", content="E poi?")])]
    with pytest.raises(ValueError, match=r"row 1: chosen: wrong type str"):
        D.prepare_dpo([ok] + bad, llama, exclude_sources=None)
    ds, rep = D.prepare_dpo([ok] + bad, llama, max_bad_frac=0.9, return_report=True, exclude_sources=None)
    assert len(ds) == 1 and rep["n_bad"] == 3
    assert rep["bad"] == {"chosen: wrong type str": 1, "rejected: fewer than 2 messages": 1,
                          "chosen: last message is not from the assistant": 1}

# ---------- DPO ----------
def test_toxic_excluded_by_real_label(llama):
    raw = rows_of("dpo")
    ntox = sum(r["source"] == "toxic-dpo-v0.2" for r in raw)
    for excl in [("toxic-dpo-v0.2",), ["unalignment/toxic-dpo-v0.2"]]:
        ds, rep = D.prepare_dpo(D.sample_path("dpo"), llama, exclude_sources=excl, return_report=True)
        assert rep["excluded"] == ntox and rep["by_source"]["toxic-dpo-v0.2"] == dict(kept=0, excluded=ntox, bad=0, dropped=ntox)
        assert len(ds) == len(raw) - ntox == sum(v["kept"] for v in rep["by_source"].values())
        assert rep["warnings"] == []
        assert not any("omitted from this sample" in c for c in ds["chosen"])
    kept = D.prepare_dpo(D.sample_path("dpo"), llama, exclude_sources=())
    assert len(kept) == len(raw)

def test_unmatched_exclude_warns(llama):
    with pytest.warns(UserWarning, match="'unalignment/toxic-dpo-v0.3' matched no row"):
        ds, rep = D.prepare_dpo(D.sample_path("dpo"), llama, exclude_sources=["unalignment/toxic-dpo-v0.3"], return_report=True)
    assert rep["excluded"] == 0 and len(rep["warnings"]) == 1

def test_multiturn_split_and_template(llama):
    sys_, u1, a1, u2 = ("system", "Sii breve."), ("user", "Ciao"), ("assistant", "Ciao! Come posso aiutarti?"), ("user", "Che ore sono?")
    turns = [dict(role=r, content=c) for r, c in (sys_, u1, a1, u2)]
    row = dict(source="sharegpt", prompt="Ciao", question="Ciao", chosen=turns + [dict(role="assistant", content=" Non lo so con certezza. ")],
               rejected=turns + [dict(role="assistant", content="Sono le 25.")])
    ds = D.prepare_dpo([row], llama, exclude_sources=None)
    expect = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSii breve.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nCiao<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nCiao! Come posso aiutarti?<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nChe ore sono?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert ds[0] == dict(prompt=expect, chosen="Non lo so con certezza.<|eot_id|>", rejected="Sono le 25.<|eot_id|>")
    # the full chosen conversation equals the chat template's rendering of it
    full = llama.apply_chat_template(row["chosen"], tokenize=False)
    assert ds[0]["prompt"] + ds[0]["chosen"] == full
    # ANITA system prompt only where a pair has none
    from anita.core import ANITA_SYSTEM_PROMPT
    nosys = dict(row, chosen=row["chosen"][1:], rejected=row["rejected"][1:])
    p = D.prepare_dpo([nosys, row], llama, system_prompt=ANITA_SYSTEM_PROMPT, exclude_sources=None)["prompt"]
    assert ANITA_SYSTEM_PROMPT in p[0] and ANITA_SYSTEM_PROMPT not in p[1]
    # prompts that differ are an error naming the row
    bad = dict(row, rejected=[turns[1], dict(role="assistant", content="x")])
    with pytest.raises(ValueError, match=r"row 1: chosen and rejected do not share"):
        D.prepare_dpo([row, bad], llama, exclude_sources=None)

def test_llama3_template_real_tokenizer(llama, llama3_tokenizer_model):
    if llama3_tokenizer_model is None: pytest.skip("../shared/llama3/tokenizer.model not present")
    assert len(llama) == 128256 and llama.convert_tokens_to_ids("<|eot_id|>") == 128009
    ds = D.prepare_dpo(D.sample_path("dpo"), llama)
    p_ids = llama(ds[0]["prompt"], add_special_tokens=False)["input_ids"]
    ids = llama(ds[0]["prompt"] + ds[0]["chosen"], add_special_tokens=False)["input_ids"]
    assert ids[:2] == [128000, 128006] and ids.count(128000) == 1 and ids[-1] == 128009
    assert p_ids[-4:] == [128006, 78191, 128007, 271]  # <|start_header_id|>assistant<|end_header_id|>\n\n
    assert ids[:len(p_ids)] == p_ids  # the prompt tokenizes the same inside the full text

# ---------- Italian ----------
def test_ita_sampling_reproducible(llama, tmp_path):
    a = D.prepare_ita(D.sample_path("ita"), llama, n=25, seed=42)
    b = D.prepare_ita(D.sample_path("ita"), llama, n=25, seed=42)
    c = D.prepare_ita(D.sample_path("ita"), llama, n=25, seed=43)
    assert a["text"] == b["text"] and a["text"] != c["text"] and len(a) == len(c) == 25
    assert all(t.startswith("<|begin_of_text|>") and t.endswith("<|eot_id|>") and t.count("<|begin_of_text|>") == 1 for t in a["text"])
    raw = {r["text"] for r in rows_of("ita")}
    assert all(t[len("<|begin_of_text|>"):-len("<|eot_id|>")] in raw for t in a["text"])
    # a bigger stream: reservoir sampling is uniform-ish and exact per seed
    rows = [dict(text=f"Documento numero {i}.", timestamp="2020-01-01T00:00:00Z", url=f"https://x.it/{i}") for i in range(2000)]
    f = write_jsonl(tmp_path/"big.jsonl", rows)
    s1 = D.prepare_ita(f, llama, n=100, seed=1)["text"]
    assert s1 == D.prepare_ita(f, llama, n=100, seed=1)["text"] and len(set(s1)) == 100
    assert max(int(t.split()[-1].split(".")[0]) for t in s1) > 1000  # not just the head of the stream

def test_ita_bad_rows_and_dups(smol):
    rows = [dict(text="Uno."), dict(text="Uno."), dict(text=""), dict(text=None), dict(text=5)] + [dict(text=f"T{i}") for i in range(95)]
    ds, rep = D.prepare_ita(rows, smol, n=1000, return_report=True)
    assert rep["bad"] == {"text: empty": 1, "text: missing": 1, "text: wrong type int": 1} and rep["duplicates"] == 1
    assert len(ds) == 96 and ds[0]["text"] == "Uno.<|im_end|>"
    with pytest.raises(ValueError, match=r"row 2: text: empty"):
        D.prepare_ita(rows[:5], smol, n=10)

def test_mc4_it_files():
    fs = D.mc4_it_files("small")
    assert len(fs) == 250 and fs[0] == "hf://datasets/gsarti/clean_mc4_it/clean-mc4-it/c4-it.tfrecord-00000-of-01024.json.gz"
    assert len(D.mc4_it_files("tiny", max_files=3)) == 3
    with pytest.raises(ValueError, match="config='huge'"): D.mc4_it_files("huge")

# ---------- loaders, decontamination ----------
@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "dir"])
def test_local_formats(fmt, tmp_path, smol):
    import pandas as pd
    df = pd.DataFrame(rows_of("sft")[:6])
    p = tmp_path/f"sft.{fmt}"
    if fmt == "jsonl": df.to_json(p, orient="records", lines=True, force_ascii=False)
    elif fmt == "json": df.to_json(p, orient="records", force_ascii=False)
    elif fmt == "parquet": df.to_parquet(p)
    elif fmt == "csv": df.to_csv(p, index=False)
    else: p.mkdir(); df.iloc[:3].to_parquet(p/"a.parquet"); df.iloc[3:].to_parquet(p/"b.parquet")
    assert len(sources.load_source(p)) == 6
    ds = D.prepare_sft(p, smol, max_bad_frac=0)
    assert len(ds) == 6 and ds[0]["completion"] == D.strip_markers(df.output[0]) + "<|im_end|>"

def test_missing_source(smol):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"): D.prepare_sft("./nope.jsonl", smol)

def test_decontamination(smol):
    raw = rows_of("sft")
    evals = [raw[8]["input"]]  # shares long n-grams with one training row
    ds, rep = D.prepare_sft(D.sample_path("sft"), smol, decontaminate=evals, return_report=True)
    assert rep["contaminated"] == 1 and len(ds) == len(raw) - 1 - 1
    _, rep = D.prepare_sft(D.sample_path("sft"), smol, decontaminate=[" ".join(raw[8]["input"].split()[:8])], return_report=True)
    assert rep["contaminated"] == 0  # fewer than 13 words: no 13-gram

# ---------- the step ----------
def test_run_data_step(tmp_path, smol):
    from datasets import load_from_disk
    rep = D.run_data_step(run="t", root=tmp_path, model="embedded", n_ita=30, seed=3)
    step = tmp_path/"t"/"01_data"
    assert {p.name for p in step.iterdir()} == {"sft", "dpo", "ita", "report.json", "token_lengths.png", "manifest.json"}
    m = read_manifest(step)
    assert m["status"] == "outputs-written" and sorted(m["outputs"]) == ["dpo", "ita", "report.json", "sft", "token_lengths.png"]
    on_disk = json.loads((step/"report.json").read_text())
    assert on_disk["ita"]["rows_out"] == 30 == len(load_from_disk(str(step/"ita")))
    assert on_disk["sft"]["token_lengths"]["count"] == len(load_from_disk(str(step/"sft"))) and on_disk["sft"]["token_lengths"]["p50"] > 20
    assert sources.data_report(load_from_disk(str(step/"dpo")))["by_source"] == rep["dpo"]["by_source"]

def test_step_atomic_on_failure(tmp_path, monkeypatch):
    from datasets import Dataset
    D.run_data_step(run="t", root=tmp_path, n_ita=10)
    step = tmp_path/"t"/"01_data"
    before = (step/"dpo"/"dataset_info.json").read_bytes()
    real = Dataset.save_to_disk
    def flaky(self, path, *a, **k):
        if "prompt" in self.column_names and "chosen" in self.column_names:
            (Path(path)/"data-00000-of-00001.arrow").write_bytes(b"half")  # a partial write, then a crash
            raise OSError("disk full")
        return real(self, path, *a, **k)
    monkeypatch.setattr(Dataset, "save_to_disk", flaky)
    with pytest.raises(OSError, match="disk full"):
        D.run_data_step(run="t", root=tmp_path, n_ita=12, exclude_sources=())
    assert read_manifest(step)["status"] == "failed" and "disk full" in read_manifest(step)["error"]
    assert (step/"dpo"/"dataset_info.json").read_bytes() == before  # the old complete dataset is untouched
    assert not any(p.name.startswith(".") for p in step.iterdir())  # no temp folders left
    # a first run that fails leaves no dpo/ at all
    with pytest.raises(OSError): D.run_data_step(run="u", root=tmp_path, n_ita=12)
    assert not (tmp_path/"u"/"01_data"/"dpo").exists()
    assert not any(p.name.startswith(".") for p in (tmp_path/"u"/"01_data").iterdir())

def test_empty_source(smol, tmp_path):
    with pytest.raises(ValueError, match="empty.jsonl: no rows"): D.prepare_sft(write_jsonl(tmp_path/"empty.jsonl", []), smol)

def test_hub_code_paths(monkeypatch, smol):
    "The Hub branches call `load_dataset` as documented (no network: `load_dataset` is replaced)."
    import datasets
    calls = []
    def fake(path, *a, **k):
        calls.append((path, k))
        if path == "json": return [dict(text=f"Testo numero {i}.", timestamp="", url="") for i in range(10)]
        return [dict(system="", instruction="Ciao", input="", output="Salve")]
    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert D.prepare_sft(D.SFT_HUB, smol)["completion"] == ["Salve<|im_end|>"]
    assert calls[-1] == (D.SFT_HUB, dict(split="train", streaming=False))
    ds, rep = D.prepare_ita(D.ITA_HUB, smol, n=5, max_files=2, return_report=True)
    path, k = calls[-1]
    assert path == "json" and k["streaming"] is True and k["data_files"] == D.mc4_it_files("tiny")[:2]
    assert not k.get("trust_remote_code") and len(ds) == 5 and rep["dataset"] == "gsarti/clean_mc4_it:tiny/train"

def test_bad_encoding_names_file_and_line(tmp_path, smol):
    "Issue 12, item 9: a file that is not UTF-8 is an error naming the file and the line, for JSON lines and CSV."
    p = tmp_path/"sft.jsonl"
    p.write_bytes(b'{"instruction": "Ciao", "input": "", "output": "Salve"}\n' +
                  '{"instruction": "Perché?", "input": "", "output": "Così"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"sft.jsonl, line 2: not UTF-8 text \(byte 0xe9\)"): D.prepare_sft(p, smol)
    c = tmp_path/"sft.csv"; c.write_bytes("instruction,input,output\nCiao,,Salve\nPerché?,,Così\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"sft.csv, line 3: not UTF-8 text"): sources.load_source(c)

def test_missing_relative_path_is_not_a_hub_id(tmp_path, monkeypatch, smol):
    "Issue 12, item 9: `data/sft.jsonl` that is not there is 'no such file', never a Hub id to retry."
    import datasets
    def hub(*a, **k): raise AssertionError(f"went to the Hub for {a}")
    monkeypatch.setattr(datasets, "load_dataset", hub)
    monkeypatch.chdir(tmp_path); (tmp_path/"data").mkdir()
    for src in ("data/sft.jsonl", "data/sft.parquet"):
        with pytest.raises(FileNotFoundError, match=rf"{src}: no such data file or folder \(looked in {tmp_path}\)"):
            D.prepare_sft(src, smol)
