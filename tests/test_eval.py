"Integration tests of anita.eval: offline lm-eval suites on the embedded model, paper tables, compare, bad input."
import json
import pytest

from anita import eval as ev
from anita.core import read_json, read_manifest, write_json


@pytest.fixture(scope="module")
def step(tmp_path_factory, embedded_dir):
    "One offline evaluation step (embedded SmolLM2 on the local suite), shared by the tests below."
    root = tmp_path_factory.mktemp("runs")
    res = ev.run_eval(run="t", root=root, models={"base": "embedded"}, suite="local", batch_size=16, gen_max_new_tokens=8)
    return root/"t"/"05_eval", res


def test_local_suite_outputs(step):
    d, res = step
    assert read_manifest(d)["status"] == "completed"
    for f in ("results.json", "results.csv", "table.md", "chart.png", "generations.json", "report.json", "lm_eval/base.json"):
        assert (d/f).exists(), f
    r = read_json(d/"results.json")
    m = r["models"]["base"]
    assert set(m["metrics"]) == {"anita_mc_en", "anita_mc_it", "anita_arith"}
    assert set(m["metrics"]["anita_arith"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    assert m["n_docs"] == {"anita_mc_en": 8, "anita_mc_it": 8, "anita_arith": 6}
    # accuracies are means over 8 / 6 items: multiples of 1/8 and 1/6
    for t, n in (("anita_mc_en", 8), ("anita_mc_it", 8)):
        for v in m["metrics"][t].values(): assert abs(v*n - round(v*n)) < 1e-9
    for v in m["metrics"]["anita_arith"].values(): assert abs(v*6 - round(v*6)) < 1e-9
    # the parameters that change the numbers are recorded
    for k in ("num_fewshot", "limit", "batch_size", "apply_chat_template", "system_prompt", "backend"): assert k in r["params"]
    # lm-eval's own output is kept and agrees with ours
    raw = read_json(d/"lm_eval"/"base.json")
    assert raw["results"]["anita_mc_it"]["acc,none"] == m["metrics"]["anita_mc_it"]["acc"]
    gens = read_json(d/"generations.json")
    assert {g["lang"] for g in gens} == {"it", "en"} and all("response" in g for g in gens)
    rows = (d/"results.csv").read_text().splitlines()
    assert rows[0] == "model,task,metric,value" and len(rows) == 1 + 6


def test_table_shows_paper_columns(step):
    d, _ = step
    md = (d/"table.md").read_text()
    head = next(l for l in md.splitlines() if l.startswith("| task"))
    assert "paper: LLaMAntino-3-ANITA-8B-Inst-DPO-ITA" in head and "paper: Meta-Llama-3-8B-Instruct" in head and "| base |" in head
    arc = next(l for l in md.splitlines() if l.startswith("| arc_it | acc_norm"))
    assert "0.5714" in arc and "0.4440" in arc
    assert "anita_mc_it" in md


def test_always_B_scores_gold_fraction(embedded_dir):
    lm = ev.biased_lm(embedded_dir, "B", batch_size=16)
    m = ev.extract_metrics(ev.run_lm_eval(lm, ev.resolve_suite("anita_mc_en,anita_mc_it")))
    assert m["anita_mc_en"]["acc"] == ev.gold_fraction("anita_mc_en", "B") == 3/8
    assert m["anita_mc_it"]["acc"] == ev.gold_fraction("anita_mc_it", "B") == 2/8
    assert m["anita_mc_en"]["acc_norm"] == 3/8  # single-token letters: length normalisation changes nothing


def test_paper_tables():
    pt = ev.paper_table()
    anita = pt[pt.model == ev.ANITA_MODEL]
    it = anita[anita.lang == "it"].set_index("task").value
    assert abs(it.drop("average").mean() - 0.6160) < 5e-5 and it["average"] == 0.6160
    en = anita[anita.lang == "en"].set_index(["task", "metric"]).value
    assert en[("average", "mean")] == 0.7029
    if en.drop(("average", "mean")).notna().all():  # once every Table 1 cell is typed in, its mean must be the paper's
        assert abs(en.drop(("average", "mean")).mean() - 0.7029) < 5e-5
    assert pt.source.str.len().gt(0).all()


def test_real_suite_names_in_registry():
    specs = ev.resolve_suite("paper")
    assert [s["task"] for s in specs] == ["winogrande", "truthfulqa_mc2", "mmlu", "hellaswag", "gsm8k", "arc_challenge",
                                          "m_mmlu_it", "arc_it", "hellaswag_it"]
    assert {s["task"]: s["num_fewshot"] for s in specs}["m_mmlu_it"] == 5


def test_compare_orders_steps(step, tmp_path):
    d, res = step
    for n, acc in (("ita", .4), ("dpo", .3), ("sft", .2)):
        write_json(tmp_path/n/"05_eval"/"results.json",
                   {"models": {n: {"model": f"runs/x/0{2+'sft dpo ita'.split().index(n)}_{n}/merged", "metrics": {"anita_mc_it": {"acc": acc}}}}})
    df = ev.compare([tmp_path/"ita", d.parent, tmp_path/"sft", tmp_path/"dpo"], out_dir=tmp_path)
    assert [c for c in df.columns if not c.startswith("paper")] == ["base", "sft", "dpo", "ita"]
    assert df.loc[("anita_mc_it", "acc"), "dpo"] == .3
    assert (tmp_path/"compare.png").stat().st_size > 1000 and "| base | sft | dpo | ita |" in (tmp_path/"compare.md").read_text()


def test_unknown_task_lists_close_names():
    with pytest.raises(ValueError, match=r"unknown lm-eval task or suite 'hellaswag_itt'.*close names: .*hellaswag_it"):
        ev.resolve_suite("hellaswag_itt")
    with pytest.raises(ValueError, match="m_mmlu_it"):
        ev.resolve_suite("mmlu_it")


def test_model_without_weights(tmp_path):
    (tmp_path/"m").mkdir(); (tmp_path/"m"/"config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"m: model folder has config.json but no weights"):
        ev.make_lm(str(tmp_path/"m"))
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        ev.evaluate(models={"x": str(tmp_path/"nope")}, suite="local")


def test_empty_results_file(tmp_path):
    (tmp_path/"results.json").write_text("")
    with pytest.raises(ValueError, match=r"results.json: results file is empty"):
        ev.compare([tmp_path/"results.json"])
    (tmp_path/"lm.json").write_text("")
    with pytest.raises(ValueError, match=r"lm.json: lm-eval results file is empty"):
        ev.extract_metrics(tmp_path/"lm.json")
    (tmp_path/"r2.json").write_text(json.dumps({"models": {}}))
    with pytest.raises(ValueError, match="r2.json: no `models`"):
        ev.compare([tmp_path/"r2.json"])


def test_vllm_missing_is_clear(monkeypatch):
    monkeypatch.setattr(ev, "_has_vllm", lambda: False)
    with pytest.raises(ImportError, match="backend='vllm' needs the `vllm` package"):
        ev.make_lm("embedded", backend="vllm")
