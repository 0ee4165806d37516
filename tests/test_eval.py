"Integration tests of anita.eval: offline lm-eval suites on the embedded model, paper tables, compare, bad input."
import csv, json, shutil
from pathlib import Path
import pytest

from anita import eval as ev, eval_harness
from anita import eval_harness, eval_paper
from anita.core import read_json, read_manifest, write_json


@pytest.fixture(scope="module")
def step(tmp_path_factory, embedded_dir):
    "One offline evaluation step (embedded SmolLM2 on the local suite), shared by the tests below."
    root = tmp_path_factory.mktemp("runs")
    res = ev.run_eval(run="t", root=root, models={"base": "embedded"}, suite="local", batch_size=16, gen_max_new_tokens=8)
    return root/"t"/"05_eval", res


def test_local_suite_outputs(step):
    d, res = step
    assert read_manifest(d)["status"] == "outputs-written"
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
    for c in ("| base |", "paper: LLaMAntino-3-ANITA-8B-Inst-DPO-ITA", "paper: Meta-Llama-3-8B-Instruct", "paper: Mistral-Ita-7b",
              "paper: LLaMAntino-2-70b-hf-UltraChat-ITA", "paper: Llama-3-8b-Ita", "leaderboard: Meta-Llama-3-8B-Instruct"):
        assert c in head, c
    cols = [c.strip() for c in head.strip("|").split("|")]
    cell = lambda row, col: next(l for l in md.splitlines() if l.startswith(row)).strip("|").split("|")[cols.index(col)].strip()
    assert cell("| arc_it | acc_norm", "paper: LLaMAntino-3-ANITA-8B-Inst-DPO-ITA") == "0.5714"
    assert cell("| arc_it | acc_norm", "leaderboard: Meta-Llama-3-8B-Instruct") == "0.4440"
    assert cell("| arc_it | acc_norm", "paper: Meta-Llama-3-8B-Instruct") == ""        # not in the paper's Table 2
    assert cell("| average | printed en", "paper: Meta-Llama-3-8B-Instruct") == "0.6627"
    assert cell("| average | recomputed en", "paper: Meta-Llama-3-8B-Instruct") == "0.6379"
    assert cell("| average | printed it", "paper: Mistral-Ita-7b") == "0.5840"
    assert "anita_mc_it" in md and "leaderboard:" in md.split("| task")[0]

def test_always_B_scores_gold_fraction(embedded_dir):
    lm = ev.biased_lm(embedded_dir, "B", batch_size=16)
    m = eval_harness.extract_metrics(eval_harness.run_lm_eval(lm, eval_harness.resolve_suite("anita_mc_en,anita_mc_it")))
    assert m["anita_mc_en"]["acc"] == ev.gold_fraction("anita_mc_en", "B") == 3/8
    assert m["anita_mc_it"]["acc"] == ev.gold_fraction("anita_mc_it", "B") == 2/8
    assert m["anita_mc_en"]["acc_norm"] == 3/8  # single-token letters: length normalisation changes nothing


def test_paper_tables():
    pt = eval_paper.paper_table()
    assert (pt.value.notna() & pt.source.str.len().gt(0)).all()           # every cell has a value and a source: no NOT FOUND
    t1, t2 = pt[pt.table == "paper Table 1"], pt[pt.table == "paper Table 2"]
    assert len(t1) == 4*9 + 4 and len(t2) == 4*3 + 4
    assert set(t1.task) == {"winogrande", "truthfulqa_mc2", "mmlu", "hellaswag", "gsm8k", "arc_challenge", "average"}
    assert set(t2.task) == {"m_mmlu_it", "arc_it", "hellaswag_it", "average"}
    assert set(t2.model) == {"Mistral-Ita-7b", "LLaMAntino-2-70b-hf-UltraChat-ITA", "Llama-3-8b-Ita", eval_paper.ANITA_MODEL}
    v = pt.set_index(["table", "task", "metric", "model"]).value
    assert v[("paper Table 1", "gsm8k", "exact_match,strict-match", eval_paper.ANITA_MODEL)] == 0.6035
    assert v[("paper Table 1", "truthfulqa_mc2", "acc", "Meta-Llama-3-8B-Instruct")] == 0.4397
    assert v[("paper Table 2", "arc_it", "acc_norm", "LLaMAntino-2-70b-hf-UltraChat-ITA")] == 0.5004
    assert v[("Open Ita LLM Leaderboard", "m_mmlu_it", "acc", "Meta-Llama-3-8B-Instruct")] == 0.5590
    # both kinds of average: printed, and recomputed from the cells; they agree except Llama-3-Instruct's printed 0.6627
    avg = eval_paper.paper_averages(pt).set_index(["table", "model"])
    assert avg.loc[("paper Table 1", eval_paper.ANITA_MODEL), "printed"] == 0.7029 and avg.loc[("paper Table 2", eval_paper.ANITA_MODEL), "printed"] == 0.616
    for (table, model), r in avg[avg.printed.notna()].iterrows():
        off = abs(r.recomputed - r.printed)
        if model == "Meta-Llama-3-8B-Instruct": assert abs(r.recomputed - 0.6379) < 5e-5 and off > 0.02
        else: assert off < 6e-4, (table, model, r.recomputed, r.printed)


def test_paper_tables_match_transcription():
    "Cell by cell against the long-form transcription in ../shared/paper (paper names mapped with `lm_eval_name`)."
    src = Path(__file__).resolve().parents[1].parent/"shared"/"paper"
    if not src.exists(): pytest.skip("../shared/paper not present")
    pt = eval_paper.paper_table(leaderboard=False)
    ours = {(r.lang, r.task, r.metric, r.model_id): r.value for r in pt.itertuples()}
    theirs = {}
    for lang, f in (("en", "table1_en.csv"), ("it", "table2_it.csv")):
        for r in csv.DictReader(open(src/f, encoding="utf-8")):
            theirs[(lang, *eval_paper.lm_eval_name(r["task"], r["metric"]), r["model"])] = float(r["value"])
    assert ours == theirs


def test_bad_paper_table_is_named(tmp_path, monkeypatch):
    shutil.copytree(eval_harness.evaltasks_dir().parent/"paper", tmp_path/"paper"); (tmp_path/"evaltasks").mkdir()
    rows = (tmp_path/"paper"/"table2_it.csv").read_text().splitlines()
    rows[3] = rows[3].replace(",0.572,", ",,")
    (tmp_path/"paper"/"table2_it.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(eval_harness, "EVALTASKS_DIR", tmp_path/"evaltasks")
    with pytest.raises(ValueError, match=r"table2_it.csv, row 4: a cell without a value"): eval_paper.paper_table("it")


def test_real_suite_names_in_registry():
    specs = eval_harness.resolve_suite("paper")
    assert [s["task"] for s in specs] == ["winogrande", "truthfulqa_mc2", "mmlu", "hellaswag", "gsm8k", "arc_challenge",
                                          "m_mmlu_it", "arc_it", "hellaswag_it"]
    assert {s["task"]: s["num_fewshot"] for s in specs}["m_mmlu_it"] == 5


def test_compare_orders_steps(step, tmp_path):
    d, res = step
    for n, acc in (("ita", .4), ("dpo", .3), ("sft", .2)):
        write_json(tmp_path/n/"05_eval"/"results.json",
                   {"models": {n: {"model": f"runs/x/0{2+'sft dpo ita'.split().index(n)}_{n}/merged", "metrics": {"anita_mc_it": {"acc": acc}}}}})
    df = eval_paper.compare([tmp_path/"ita", d.parent, tmp_path/"sft", tmp_path/"dpo"], out_dir=tmp_path)
    assert [c for c in df.columns if not c.startswith(("paper", "leaderboard"))] == ["base", "sft", "dpo", "ita"]
    assert df.loc[("anita_mc_it", "acc"), "dpo"] == .3
    assert (tmp_path/"compare.png").stat().st_size > 1000 and "| base | sft | dpo | ita |" in (tmp_path/"compare.md").read_text()


def test_unknown_task_lists_close_names():
    with pytest.raises(ValueError, match=r"unknown lm-eval task or suite 'hellaswag_itt'.*close names: .*hellaswag_it"):
        eval_harness.resolve_suite("hellaswag_itt")
    with pytest.raises(ValueError, match="m_mmlu_it"):
        eval_harness.resolve_suite("mmlu_it")


def test_model_without_weights(tmp_path):
    (tmp_path/"m").mkdir(); (tmp_path/"m"/"config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"m: model folder has config.json but no weights"):
        eval_harness.make_lm(str(tmp_path/"m"))
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        ev.evaluate(models={"x": str(tmp_path/"nope")}, suite="local")


def test_empty_results_file(tmp_path):
    (tmp_path/"results.json").write_text("")
    with pytest.raises(ValueError, match=r"results.json: results file is empty"):
        eval_paper.compare([tmp_path/"results.json"])
    (tmp_path/"lm.json").write_text("")
    with pytest.raises(ValueError, match=r"lm.json: lm-eval results file is empty"):
        eval_harness.extract_metrics(tmp_path/"lm.json")
    (tmp_path/"r2.json").write_text(json.dumps({"models": {}}))
    with pytest.raises(ValueError, match="r2.json: no `models`"):
        eval_paper.compare([tmp_path/"r2.json"])


def test_vllm_missing_is_clear(monkeypatch):
    monkeypatch.setattr(eval_harness, "has_vllm", lambda: False)
    with pytest.raises(ImportError, match="backend='vllm' needs the `vllm` package"):
        eval_harness.make_lm("embedded", backend="vllm")


def test_include_path_user_task(tmp_path, embedded_dir):
    "A user's own lm-eval task folder (lm-eval's include path) evaluates beside anita's tasks."
    inc = _user_task(tmp_path/"my_tasks")
    res = ev.evaluate(models={"base": "embedded"}, suite="my_pairs", include=str(inc), batch_size=4, gen_max_new_tokens=0)
    assert res["models"]["base"]["n_docs"] == {"my_pairs": 3} and res["params"]["include"] == [str(inc)]
    with pytest.raises(ValueError, match="unknown lm-eval task or suite 'my_pairs'"): eval_harness.resolve_suite("my_pairs")
    with pytest.raises(FileNotFoundError, match="include: .*nope is not a folder"): ev.evaluate(suite="local", include=str(tmp_path/"nope"))


def test_free_order_auto_backend(monkeypatch):
    "backend=auto: each model's HF LM is freed before its vLLM LM is made, and every LM before the next model's."
    events = []
    class FakeLM:
        def __init__(self, ref, be): self.ref, self.be, self.model, self.tokenizer = ref, be, object(), None
    def make_lm(ref, be, *a, gpu_memory_utilization=0.9, **k):
        assert not [e for e in events if e[0] == "make" and ("free", e[1], e[2]) not in events], f"{ref}/{be} made while {events[-1]} not freed"
        events.append(("make", ref, be, gpu_memory_utilization)[:3 if be == "hf" else 4]); return FakeLM(ref, be)
    real_free = eval_harness.free_lm
    def free_lm(lm): events.append(("free", lm.ref, lm.be)); real_free(lm); assert lm.model is None
    def run_lm_eval(lm, specs, *a, **k):
        events.append(("eval", lm.ref, lm.be))
        return {"results": {s["task"]: {f"{m if ',' in m else m + ',none'}": 0.5 for m in s["metrics"]} for s in specs}, "n-samples": {}}
    monkeypatch.setattr(ev, "has_vllm", lambda: True)
    monkeypatch.setattr(ev, "make_lm", make_lm); monkeypatch.setattr(ev, "free_lm", free_lm)
    monkeypatch.setattr(ev, "run_lm_eval", run_lm_eval); monkeypatch.setattr(ev, "model_args", lambda ref: dict(pretrained=ref))
    monkeypatch.setattr(ev, "generate_samples", lambda lm, **k: events.append(("samples", lm.ref, lm.be)) or [])
    ev.evaluate(models={"a": "m1", "b": "m2"}, suite="local", backend="auto", gpu_memory_utilization=0.6)
    assert events == [("make", "m1", "hf"), ("eval", "m1", "hf"), ("free", "m1", "hf"),
                      ("make", "m1", "vllm", 0.6), ("eval", "m1", "vllm"), ("samples", "m1", "vllm"), ("free", "m1", "vllm"),
                      ("make", "m2", "hf"), ("eval", "m2", "hf"), ("free", "m2", "hf"),
                      ("make", "m2", "vllm", 0.6), ("eval", "m2", "vllm"), ("samples", "m2", "vllm"), ("free", "m2", "vllm")]
    with pytest.raises(ValueError, match="gpu_memory_utilization"): ev.evaluate(suite="local", gpu_memory_utilization=1.5)


def test_free_lm_releases_hf_model(embedded_dir):
    import gc, weakref
    lm = eval_harness.make_lm(embedded_dir, batch_size=4)
    w = weakref.ref(lm.model)
    eval_harness.free_lm(lm); gc.collect()
    assert w() is None


def test_minimal_pairs_with_stderr(embedded_dir):
    "The minimal-pair tasks run offline and come with lm-eval's standard error, sqrt(p(1-p)/(n-1)) for an accuracy."
    assert {s["task"] for s in eval_harness.resolve_suite("pairs")} == {"anita_pairs_it", "anita_pairs_en"}
    res = ev.evaluate(models={"base": "embedded"}, suite="anita_pairs_it", limit=40, batch_size=16, gen_max_new_tokens=0)
    m = res["models"]["base"]
    p, se = m["metrics"]["anita_pairs_it"]["acc"], m["stderr"]["anita_pairs_it"]["acc"]
    assert m["n_docs"] == {"anita_pairs_it": 40} and abs(p*40 - round(p*40)) < 1e-9 and abs(se - (p*(1-p)/39)**.5) < 1e-9
    assert p > 0.5     # the real SmolLM2 knows some Italian agreement: better than chance on these 40


def _user_task(folder) -> Path:
    "A user's lm-eval task folder (outside anita) with one minimal-pair task, `my_pairs`."
    inc = Path(folder); inc.mkdir(parents=True, exist_ok=True)
    (inc/"my_pairs.jsonl").write_text("".join(json.dumps(dict(split="test", good=g, bad=b)) + "\n" for g, b in
                                              [("La casa è rossa.", "La casa è rosso."), ("I gatti sono piccoli.", "I gatti è piccoli."),
                                               ("The dogs run.", "The dogs runs.")]))
    shutil.copy(eval_harness.evaltasks_dir()/"utils.py", inc/"my_utils.py")
    (inc/"my_pairs.yaml").write_text((eval_harness.evaltasks_dir()/"_anita_pairs_yaml").read_text().replace("utils.load_jsonl", "my_utils.load_jsonl")
                                     .replace("tag:\n  - anita_local\n", "") + "task: my_pairs\ndataset_kwargs:\n  data_file: my_pairs.jsonl\n")
    return inc


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    "`anita-run --recipe tiny` as `make demo` runs it (seed 42), plus a user's task folder through `--set eval.include=...`."
    import anita.sft, trl.trainer.utils as tu
    if getattr(tu, "_ChunkedLogProbFunction", None) is None and not hasattr(anita.sft, "ensure_logprob_kernel"):
        pytest.skip("TRL 1.15's fused LM head has no kernel on CPU torch here: needs the CPU log-prob fallback (issue 10)")
    from anita.runner import run_recipe
    root = tmp_path_factory.mktemp("runs")
    inc = _user_task(root.parent/"my_tasks")
    run_recipe("tiny", run="demo", root=root, sets=[f"eval.include={inc}", "eval.suite=local,pairs,my_pairs"], progress=False,
               log=lambda s: None)
    return root/"demo"


def test_demo_heldout_figures(demo):
    "The report opens with the held-out table, and each training step moves its own held-out figure the right way."
    md = (demo/"report.md").read_text()
    assert md.split("\n## ")[1].startswith("Held-out figures: what each step changed")
    table = md.split("\n## ")[1]
    assert "| figure | n | base | sft | dpo | ita | step's change |" in table
    eff = read_json(demo/"05_eval"/"heldout.json")["effects"]
    assert eff["sft"]["sft_loss"]["vs"] == "base" and eff["sft"]["sft_loss"]["delta"] < 0 and eff["sft"]["sft_loss"]["ok"]
    assert eff["dpo"]["dpo_margin"]["vs"] == "sft" and eff["dpo"]["dpo_margin"]["delta"] > 0 and eff["dpo"]["dpo_margin"]["ok"]
    assert eff["ita"]["ita_loss"]["vs"] == "dpo" and eff["ita"]["ita_loss"]["delta"] < 0 and eff["ita"]["ita_loss"]["ok"]
    held = read_json(demo/"05_eval"/"heldout.json")["models"]
    assert held["base"]["sft"]["rows"] == 20 and held["base"]["dpo"]["rows"] == 18 and held["base"]["ita"]["rows"] == 20
    assert held["base"]["en"]["rows"] == 20


def test_demo_include_path_from_pipeline(demo):
    r = read_json(demo/"05_eval"/"results.json")
    assert r["models"]["ita"]["n_docs"]["my_pairs"] == 3 and "my_pairs" in (demo/"05_eval"/"table.md").read_text()
    assert r["models"]["base"]["n_docs"]["anita_pairs_it"] == 100    # the tiny recipe's limit
