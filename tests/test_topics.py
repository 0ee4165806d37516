"Topic-modeling notebook (07_topics) end to end with papermill at tiny scale, plus the bad-input errors of `anita.topics`."
import json
from pathlib import Path
import pytest
from conftest import execute_notebook

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def topics_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    execute_notebook("07_topics", root, run="t", max_new_tokens=10, n_label_docs=1)
    return root/"t"/"07_topics"

def test_topics_outputs(topics_run):
    import pandas as pd
    from anita.core import read_manifest
    m = read_manifest(topics_run)
    assert m["status"] == "outputs-written"
    r = json.loads((topics_run/"results.json").read_text())
    assert r["n_texts"] == 190
    # measured here: 8 topics, 31 outliers, ARI 0.21, purity 0.58 (5 themes; chance ARI 0, purity ~0.2)
    assert 2 <= r["n_topics"] <= 30 and 0 <= r["n_outliers"] < 190*0.6
    a = r["agreement"]
    assert -1 <= a["ari"] <= 1 and 0 <= a["purity"] <= 1
    assert a["ari"] > 0.05 and a["purity"] > 0.35, a
    t = pd.read_csv(topics_run/"topics.csv")
    assert t["count"].sum() == 190
    assert set(t.topic) - {-1} == set(range(r["n_topics"]))
    lab = t[t.topic != -1]
    assert set(lab.label_source) <= {"llm", "keywords"}
    assert set(r["labels"]) == {str(t) for t in lab.topic}
    assert all(v["raw"].strip() for v in r["labels"].values())   # the LLM really answered for every topic
    assert lab.label.astype(str).str.strip().str.len().gt(0).all()
    assert lab.keywords.astype(str).str.len().gt(0).all()
    d = pd.read_csv(topics_run/"doc_topics.csv")
    assert len(d) == 190 and {"text", "topic", "topic_label"} <= set(d.columns)
    assert (topics_run/"topic_sizes.png").read_bytes()[:4] == b"\x89PNG"
    assert "barchart" in r["figures"]
    for f in r["figures"]:
        assert (topics_run/f"{f}.html").stat().st_size > 1000
    assert (topics_run/"plotly.min.js").exists()
    assert set(r["figures"]) | set(r["figures_skipped"]) == {"barchart", "topics", "documents", "hierarchy", "heatmap", "term_rank"}

def test_topics_bad_inputs(tmp_path):
    import numpy as np
    from anita.topics import load_texts, fit_topics
    with pytest.raises(FileNotFoundError, match="missing.jsonl"): load_texts(tmp_path/"missing.jsonl")
    with pytest.raises(ValueError, match=r"no column 'body' \(columns: id, text, theme\)"): load_texts(None, "body")
    p = tmp_path/"x.csv"; p.write_text("body,other\nciao,1\n,2\n")
    with pytest.raises(ValueError, match=r"x.csv: row 1: column 'body' is empty"): load_texts(p, "body")
    p = tmp_path/"x.xlsx"; p.write_text("?")
    with pytest.raises(ValueError, match="unsupported file type"): load_texts(p)
    rng = np.random.default_rng(0)
    words = "casa mare sole luna gatto cane pane vino treno libro fiore porta tavolo sedia strada monte lago fiume bosco campo".split()
    texts = [f"{words[i]} {words[(i*7) % 20]} {words[(i*13) % 20]}" for i in range(20)]
    with pytest.raises(ValueError, match="all 20 texts are outliers"):
        fit_topics(texts, rng.normal(size=(20, 16)), n_neighbors=3, n_components=2, min_topic_size=10)
    with pytest.raises(ValueError, match="too few"): fit_topics(texts[:4], rng.normal(size=(4, 16)))
    with pytest.raises(ValueError, match="no keywords left"):
        fit_topics(["x1 y2"]*20, rng.normal(size=(20, 16)), n_neighbors=3, n_components=2)

def test_topics_custom_column(tmp_path):
    "Any text column works: the loader reads `corpo` from a CSV."
    import pandas as pd
    from anita.topics import load_texts
    src = [json.loads(l) for l in (ROOT/"anita"/"samples"/"topics_it.jsonl").read_text().splitlines()][:10]
    pd.DataFrame(dict(corpo=[r["text"] for r in src])).to_csv(tmp_path/"c.csv", index=False)
    texts, df = load_texts(tmp_path/"c.csv", "corpo")
    assert texts == [r["text"] for r in src] and list(df.columns) == ["corpo"]
