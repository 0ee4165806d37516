"""`anita-run --estimate` from a fixture throughput file (figures made up here, not measured; the arithmetic checked by
hand below), and the full-depth gpu-check part's logic on a tiny CPU stand-in."""
import json, shutil
from pathlib import Path
import pytest
from anita.estimate import estimate, estimate_text, read_throughput, EstimateError
from anita.recipe import load_recipe, apply_sets
from anita.pipeline import main

FIGS = dict(steps=dict(sft=dict(s_per_micro_batch=4.0, micro_batch_real_tokens=8192, peak_mem_gb=30.0),
                       ita=dict(s_per_micro_batch=4.0, micro_batch_real_tokens=8192, peak_mem_gb=30.0),
                       dpo=dict(s_per_micro_batch=2.0, batch_size=4, pair_tokens=1024, peak_mem_gb=20.0)))
REPORT = dict(sft=dict(token_lengths=dict(count=81920, mean=400.0, p90=700)),
              dpo=dict(token_lengths=dict(count=40000, mean=300.0, p90=512)),
              ita=dict(token_lengths=dict(count=100000, mean=655.36, p90=1500)))

def _throughput(d, figs=FIGS):
    p = Path(d)/"gpu-check.json"
    p.write_text(json.dumps(dict(probe=dict(devices=[dict(name="fixture GPU")]), started="fixture",
                                 parts=dict(full_depth_unsloth=dict(status="PASS", figures=figs)))))
    return p

@pytest.fixture
def run_root(tmp_path):
    (tmp_path/"paper"/"01_data").mkdir(parents=True)
    (tmp_path/"paper"/"01_data"/"report.json").write_text(json.dumps(REPORT))
    return tmp_path

def test_estimate_by_hand(run_root):
    e = estimate(load_recipe("paper"), _throughput(run_root), "paper", run_root)
    sft, dpo, ita = (e["steps"][k] for k in ("sft", "dpo", "ita"))
    # SFT: 81920 rows x 400 tokens = 32,768,000 tokens = 4000 packed rows of 8192. The paper's batch, 16 x 8 rows of 400
    # tokens = 51,200 tokens per optimizer step, is round(51200 / 8192) = round(6.25) = 6 packed rows (micro-batch 1).
    # 4000 / 6 = 666.7 -> 667 optimizer steps (1 epoch); 6 x 4.0 s = 24 s per step; 667 x 24 / 3600 = 4.4467 h.
    assert (sft["plan"]["train_rows"], sft["plan"]["grad_accum"], sft["plan"]["optimizer_steps"]) == (4000, 6, 667)
    assert sft["s_per_step"] == pytest.approx(24.0)
    assert sft["hours"] == pytest.approx(667 * 24 / 3600, abs=1e-3)
    assert sft["tokens"] == 32_768_000
    # DPO: 40000 pairs / batch 4 x grad_accum 1 = 10000 steps. Batches pad to ~p90 = 512 tokens, measured at 1024:
    # 2.0 s x (4/4) x (512/1024) = 1.0 s per step; 10000 s = 2.7778 h.
    assert dpo["plan"]["optimizer_steps"] == 10000 and dpo["s_per_step"] == pytest.approx(1.0)
    assert dpo["hours"] == pytest.approx(10000 / 3600, abs=1e-3)
    # ITA: 100000 x 655.36 = 65,536,000 tokens = 8000 packed rows; 16 x 8 x 655.36 = 83,886 tokens per step
    # -> round(10.24) = 10 micro-batches; 800 steps per epoch x 3 epochs = 2400 steps x 40 s = 96000 s = 26.667 h.
    assert (ita["plan"]["grad_accum"], ita["plan"]["optimizer_steps"]) == (10, 2400)
    assert ita["hours"] == pytest.approx(96000 / 3600, abs=1e-3)
    assert e["total_hours"] == pytest.approx(4.4467 + 2.7778 + 26.6667, abs=3e-3)
    assert e["dominant"] == "ita" and e["steps"]["eval"]["hours"] is None
    assert any(str(run_root/"paper"/"01_data"/"report.json") in a for a in e["assumptions"])
    assert "total: 33.89 h (evaluation not estimated); ita dominates (79%)" in estimate_text(e)
    assert "goal: the whole recipe (SFT + DPO + ITA + evaluation) <= 16 h on one H100" in estimate_text(e)

def test_estimate_cli_sets_steps_and_defaults(run_root, capsys):
    th = _throughput(run_root)
    assert main(["--recipe", "paper", "--run", "paper", "--root", str(run_root), "--estimate", "--throughput", str(th),
                 "--steps", "sft,dpo", "--set", "sft.max_steps=100"]) == 0
    out = capsys.readouterr().out
    steps = [l.split()[0] for l in out.splitlines()[2:] if l.split() and l.split()[0] in ("sft", "dpo", "ita", "eval")]
    assert steps == ["sft", "dpo"]
    assert " 0.67 " in out and " 2.78 " in out              # sft: 100 steps x 24 s / 3600 = 0.667 h; dpo 2.778 h
    assert "total: 3.44 h" in out and "): not decided: ita, eval not estimated" in out   # 0.667 + 2.778 = 3.444 h
    e = estimate(apply_sets(load_recipe("paper"), ["sft.max_steps=100"], check_notebooks=False), th, "paper", run_root)
    assert e["steps"]["sft"]["hours"] == pytest.approx(100 * 24 / 3600, abs=1e-3)
    # no data report: the stated defaults, named as assumptions
    assert main(["--recipe", "paper", "--run", "other", "--root", str(run_root), "--estimate",
                 "--throughput", str(th)]) == 0
    out = capsys.readouterr().out
    assert "assumption, not measured" in out and "100000 rows" in out and "evaluation not estimated" in out

def test_estimate_bad_throughput(tmp_path, capsys):
    nope = str(tmp_path/"nope.json")
    assert main(["--recipe", "paper", "--estimate", "--root", str(tmp_path), "--throughput", nope]) == 2
    assert "nope.json: no such throughput file" in capsys.readouterr().err
    bad = json.loads(json.dumps(FIGS))
    del bad["steps"]["dpo"]["pair_tokens"]
    th = _throughput(tmp_path, bad)
    assert main(["--recipe", "paper", "--estimate", "--root", str(tmp_path), "--throughput", str(th)]) == 2
    err = capsys.readouterr().err
    assert str(th) in err and "missing key `pair_tokens`" in err
    (tmp_path/"x.json").write_text(json.dumps(dict(parts=dict(full_depth_hf=dict(status="FAIL")))))
    want = "missing key `parts.full_depth_unsloth` or `parts.full_depth_hf` with status PASS"
    with pytest.raises(EstimateError, match=want):
        read_throughput(tmp_path/"x.json")

def test_estimate_out_of_memory(tmp_path):
    figs = json.loads(json.dumps(FIGS))
    figs["steps"]["sft"] = dict(oom="out of memory after 0 step(s): CUDA out of memory", peak_mem_gb=79.1)
    e = estimate(load_recipe("paper"), _throughput(tmp_path, figs), "none", tmp_path, steps=["sft", "dpo"])
    assert e["steps"]["sft"]["hours"] is None and "does not fit one fixture GPU" in e["steps"]["sft"]["notes"][0]
    assert "not decided: sft, ita, eval not estimated" in estimate_text(e) and e["dominant"] == "dpo"

def test_full_depth_settings_from_recipe(tmp_path):
    from anita.gpucheck import full_depth_settings, llama3_8b_config, plan
    s = full_depth_settings("paper")
    sft = s["sft"]
    assert (sft["max_length"], sft["gradient_checkpointing"], sft["optim"]) == (8192, True, "paged_adamw_8bit")
    assert (s["dpo"]["batch_size"], s["dpo"]["max_length"], s["ita"]["max_length"]) == (4, 1024, 8192)
    rec = tmp_path/"paper-copy.yaml"      # a value changed in a copy of the recipe shows in the part's settings
    text = Path(load_recipe("paper")["path"]).read_text()
    assert text.count('model: "{steps.sft}/merged"') == 1
    rec.write_text(text.replace('model: "{steps.sft}/merged"', 'max_length: 2048\n      model: "{steps.sft}/merged"'))
    assert full_depth_settings(str(rec))["dpo"]["max_length"] == 2048
    c = llama3_8b_config(32)             # full depth: the 8B's shape
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size) == (32, 4096, 14336, 32, 8, 128256)
    assert [p[0] for p in plan(tmp_path, only=["full_depth"])] == ["full_depth_unsloth", "full_depth_hf"]
    assert not any(p[0].startswith("full_depth") for p in plan(tmp_path))

STANDIN = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)

def test_full_depth_part_on_cpu_standin(tmp_path):
    "The part's code path end to end on a tiny CPU model (backend cpu: no 4-bit, no paged 8-bit AdamW: they need CUDA)."
    from anita.gpucheck import part_full_depth
    r = part_full_depth(str(tmp_path), backend="cpu", n_layers=2, steps=2, shape=STANDIN,
                        over=dict(max_length=128, max_prompt_length=64, batch_size=2, grad_accum=2))
    cfg = json.loads((Path(r["model"])/"config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (2, 64, 128256)
    sft, dpo, ita = (r["steps"][k] for k in ("sft", "dpo", "ita"))
    # batch_plan: 2 x 2 rows of the data's mean length per step, in packed rows of 128. With the real Llama-3 tokenizer
    # (which the stand-in model gets when `find_llama3_tokenizer_model` finds it) rows are ~64 tokens: 256 tokens = 2
    # packed rows; with the stand-in tokenizer ~123 tokens: 492 = 4 packed rows.
    from anita.core import find_llama3_tokenizer_model
    real = find_llama3_tokenizer_model() is not None
    assert sft["grad_accum"] == (2 if real else 4) and sft["micro_batch"] == 1 and sft["steps_timed"] == 1
    assert sft["settings"]["optim"] == "paged_adamw_8bit" and sft["settings"]["max_length"] == 128   # paper's, and over
    assert sft["settings"]["lora_r"] == 16 and dpo["settings"]["lora_r"] == 64 and dpo["settings"]["use_rslora"]
    assert dpo["batch_size"] == 2 and dpo["pair_tokens"] == 128 and dpo["s_per_micro_batch"] > 0
    assert ita["same_as"] == "sft"
    assert 100 < sft["micro_batch_real_tokens"] <= 128
    # the part's figures are what the estimator reads
    th = tmp_path/"gpu-check.json"
    th.write_text(json.dumps(dict(parts=dict(full_depth_hf=dict(status="PASS", figures=r)))))
    e = estimate(load_recipe("paper"), th, "none", tmp_path, backend="hf")
    assert e["backend"] == "hf" and e["steps"]["sft"]["hours"] > 0
