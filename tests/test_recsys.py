"Recommendation: MovieLens loading and errors, candidates, the ranking parser, metrics, baselines, and the notebook end to end."
import json, math, random, subprocess, sys
from pathlib import Path
import pytest
from anita.recsys import (load_ml, make_candidates, popularity, parse_ranking, complete_ranking, rank_metrics, expected_random,
                          baseline_metrics, random_ranking, true_rank, ML_FILE, ML_SAMPLE)

ROOT = Path(__file__).resolve().parents[1]
KS = (1, 5, 10)

def test_real_data(shared_data):
    users = load_ml(shared_data/ML_FILE)
    assert len(users) == 943 and all(h and n for h, n in users)
    c = make_candidates(users, 20, seed=42)
    assert all(len(set(x)) == 20 and n in x for x, (_, n) in zip(c, users))
    b = baseline_metrics(users, c, popularity(users), KS, seed=42)
    assert b["popularity"]["hit@10"] > b["random"]["hit@10"]       # popularity carries signal on MovieLens

def test_bad_rows(tmp_path):
    f = tmp_path/"ml.json"
    f.write_text(json.dumps([["Heat | Fargo", "Casino"], [" | ", "Babe"]]))
    with pytest.raises(ValueError, match=r"ml\.json: row 1: empty history"): load_ml(f)
    f.write_text(json.dumps([["Heat", "Casino"], ["Heat", ""]]))
    with pytest.raises(ValueError, match="row 1: empty next movie"): load_ml(f)
    f.write_text(json.dumps([["Heat", "Casino"], "Heat"]))
    with pytest.raises(ValueError, match="row 1: expected"): load_ml(f)
    f.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"): load_ml(f)
    with pytest.raises(FileNotFoundError, match="missing.json"): load_ml(tmp_path/"missing.json")

C = ["Kids", "Kids in the Hall: Brain Candy", "Clockwork Orange, A", "Star Wars", "Terminator 2: Judgment Day",
     "Indiana Jones and the Last Crusade", "Scream 2", "Scream"]

@pytest.mark.parametrize("answer,expected", [
    ("1. Star Wars\n2. Scream\n3. Scream 2", [3, 7, 6]),                               # plain numbering; no Scream/Scream 2 mix-up
    ("Here is the ranking:\n\n1) **Scream 2** (1997) - sequel\n2) Kids", [6, 0]),        # extra text, markdown, years
    ("#1: A Clockwork Orange\n#2 - The Kids in the Hall", [2, 1]),                        # article moved, partial title
    ("- Indiana Jones\n- Terminator 2\n• Star Wars", [5, 4, 3]),                         # bullets, truncated titles
    ("Star Wars, Kids in the Hall: Brain Candy and Kids.", [3, 1, 0]),                  # one line, several titles
    ("1. Star Wars\n2. Jurassic Park\n3. Star Wars\n4. Terminatr 2: Judgement Day", [3, 4]),  # unknown title, repeat, typos
    ("5\n2\n", [4, 1]),                                                                 # candidate numbers
    ("I cannot rank these.", []),
])
def test_parse_ranking(answer, expected):
    assert parse_ranking(answer, C) == expected

def test_complete_ranking_and_metrics():
    assert complete_ranking([4, 1], 6) == [4, 1, 0, 2, 3, 5]
    m = rank_metrics([0, 2, 7, 15], KS)
    assert m["hit@1"] == 0.25 and m["hit@5"] == 0.5 and m["hit@10"] == 0.75
    assert math.isclose(m["ndcg@5"], (1 + 1/math.log2(4))/4) and math.isclose(m["ndcg@10"], (1 + 0.5 + 1/math.log2(9))/4)
    assert true_rank([2, 0, 1], ["a", "b", "c"], "a") == 1

def test_random_baseline_near_k_over_20():
    """Over N user lists the random baseline's Hit@k is a binomial mean: std = sqrt(p(1-p)/N) with p = k/20.
    With N = 40 users x 50 seeds = 2000 lists, 4 std is 0.019 (k=1), 0.039 (k=5), 0.045 (k=10): a correct implementation
    lands outside with probability ~6e-5 per k, while an off-by-one in the rank (p = (k+1)/20) or a leak of the true item
    (p >> k/20) is caught."""
    users = load_ml(ROOT/"anita"/"samples"/ML_SAMPLE)
    ranks = []
    for s in range(50):
        cands, rng = make_candidates(users, 20, seed=s), random.Random(1000 + s)
        ranks += [true_rank(random_ranking(c, rng), c, n) for (_, n), c in zip(users, cands)]
    N = len(ranks); m = rank_metrics(ranks, KS)
    for k in KS:
        p = k/20; tol = 4*math.sqrt(p*(1-p)/N)
        assert abs(m[f"hit@{k}"] - p) < tol, (k, m[f"hit@{k}"], p, tol)
        assert abs(m[f"ndcg@{k}"] - expected_random(k)[f"ndcg@{k}"]) < tol
    assert abs(m["mean_rank"] - 9.5) < 4*math.sqrt((400-1)/12/N)           # uniform rank on 0..19

def test_random_baseline_real_users(shared_data):
    users = load_ml(shared_data/ML_FILE)
    b = baseline_metrics(users, make_candidates(users, 20, seed=42), popularity(users), KS, seed=42)["random"]
    for k in KS:
        p = k/20; assert abs(b[f"hit@{k}"] - p) < 4*math.sqrt(p*(1-p)/len(users)), (k, b)

def test_notebook(tmp_path):
    "Runs on the shipped 40-user sample, as CI without ../shared would."
    out = tmp_path/"09_recsys.ipynb"
    r = subprocess.run([sys.executable, "-m", "papermill", "--cwd", str(ROOT/"nbs"), str(ROOT/"nbs"/"09_recsys.ipynb"), str(out),
                        "-p", "root", str(tmp_path), "-p", "n_users", "2", "-p", "max_new_tokens", "16",
                        "-p", "data_path", str(ROOT/"anita"/"samples"/ML_SAMPLE)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    d = tmp_path/"nbtest"/"09_recsys"
    m = json.loads((d/"metrics.json").read_text())
    for meth in ("llm", "popularity", "random"):
        assert m["users"][meth]["n_users"] == 2
        for k in KS: assert 0 <= m["users"][meth][f"ndcg@{k}"] <= m["users"][meth][f"hit@{k}"] <= 1
    rows = [json.loads(l) for l in (d/"rankings.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["next"] in r["candidates"] and 0 <= r["llm_rank"] < 20 for r in rows)
    # recompute the LLM's Hit@10 from the saved ranks
    assert m["users"]["llm"]["hit@10"] == sum(r["llm_rank"] < 10 for r in rows)/2
    n_all = m["all_users"]["random"]["n_users"]
    assert n_all == 40 and m["data"].endswith(ML_SAMPLE) and abs(m["all_users"]["random"]["hit@10"] - 0.5) < 4*math.sqrt(0.25/n_all)
    assert json.loads((d/"manifest.json").read_text())["status"] == "outputs-written"
