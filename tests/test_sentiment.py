"Sentiment: FinancialPhraseBank loading and errors, the balanced split, parsing, metrics, and the notebook end to end."
import json, subprocess, sys
from pathlib import Path
import pytest
from anita.sentiment import (LABELS, UNPARSEABLE, load_fpb, balanced_split, parse_sentiment, sentiment_metrics,
                             sentiment_prompt, FPB_FILE, FPB_SAMPLE, REFERENCE)
from anita.core import find_data

ROOT = Path(__file__).resolve().parents[1]

def test_real_data_loads(shared_data):
    df = load_fpb(shared_data/FPB_FILE)
    assert len(df) == 4846
    assert df.label.value_counts().to_dict() == {"neutral": 2879, "positive": 1363, "negative": 604}
    tr, te = balanced_split(df, 300, 300, seed=42)
    assert tr.label.value_counts().to_dict() == {l: 300 for l in LABELS} == te.label.value_counts().to_dict()
    assert not set(tr.text) & set(te.text)
    assert balanced_split(df, 300, 300, seed=42)[1].text.tolist() == te.text.tolist()
    assert balanced_split(df, 300, 300, seed=1)[1].text.tolist() != te.text.tolist()

def test_shipped_sample():
    p = ROOT/"anita"/"samples"/FPB_SAMPLE
    df = load_fpb(p)
    assert len(df) == 60 and df.label.value_counts().to_dict() == {l: 20 for l in LABELS}
    assert find_data("not-there.csv", FPB_SAMPLE) == p.resolve() or find_data("not-there.csv", FPB_SAMPLE).name == FPB_SAMPLE

def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"): load_fpb(tmp_path/"nope.csv")
    f = tmp_path/"fpb.csv"
    f.write_bytes('neutral,"A ."\rpositive,"B ."\rbullish,"C ."\r'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"fpb\.csv: row 3: unknown label 'bullish'"): load_fpb(f)
    f.write_bytes('neutral,"A ."\rpositive,""\r'.encode("latin-1"))
    with pytest.raises(ValueError, match="row 2: empty text"): load_fpb(f)
    f.write_bytes(b'neutral\r')
    with pytest.raises(ValueError, match="row 1: expected 2 fields"): load_fpb(f)

def test_parse_and_unparseable_kept():
    assert [parse_sentiment(a) for a in ["Positive.", "it is NEGATIVE", "neutral / positive", "I think so", ""]] == \
           ["positive", "negative", "neutral", UNPARSEABLE, UNPARSEABLE]
    m = sentiment_metrics(["positive", "negative", "neutral", "neutral"], ["positive", UNPARSEABLE, "neutral", "negative"])
    assert m["n"] == 4 and m["unparseable"] == 1 and m["accuracy"] == 0.5     # the unparseable answer is counted, as wrong
    assert m["columns"][-1] == UNPARSEABLE and sum(map(sum, m["confusion"])) == 4
    assert m["per_class"]["negative"]["recall"] == 0 and m["per_class"]["positive"]["f1"] == 1.0
    assert abs(m["macro_f1"] - (1 + 0 + 2/3)/3) < 1e-9                       # neutral: p=1, r=1/2

def test_prompt_uses_chat_template(embedded_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(embedded_dir)
    p = sentiment_prompt("Sales rose .", tok)
    assert "[Sales rose .]" in p and p.endswith("<|im_start|>assistant\n")
    assert sentiment_prompt("x").endswith("[x] = ")

def test_notebook_zero_shot_and_fine_tuned(tmp_path):
    out = tmp_path/"08_sentiment.ipynb"
    r = subprocess.run([sys.executable, "-m", "papermill", "--cwd", str(ROOT/"nbs"), str(ROOT/"nbs"/"08_sentiment.ipynb"), str(out),
                        "-p", "root", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    d = tmp_path/"nbtest"/"08_sentiment"
    m = json.loads((d/"metrics.json").read_text())
    n = m["n_test"]
    assert n == 3*3 and m["n_train"] == 3*4
    for k in ("zero_shot", "fine_tuned"):
        assert m[k]["n"] == n and sum(map(sum, m[k]["confusion"])) == n       # nothing dropped
        assert 0 <= m[k]["accuracy"] <= 1 and 0 <= m[k]["macro_f1"] <= 1
        assert m[k]["accuracy"] == sum(m[k]["confusion"][i][i] for i in range(3))/n
    assert m["reference"] == REFERENCE and m["reference"]["fine_tuned_accuracy"] == 0.871
    assert m["trainer"]
    assert (d/"confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert (d/"sft"/"merged"/"config.json").exists() and (d/"sft"/"adapter").is_dir()
    import pandas as pd
    preds = pd.read_csv(d/"predictions.csv", keep_default_na=False)
    assert len(preds) == n and set(preds.zero_shot) <= set(LABELS) | {UNPARSEABLE}
    assert "0.871" in (d/"results.md").read_text()
    assert json.loads((d/"manifest.json").read_text())["status"] == "outputs-written"
