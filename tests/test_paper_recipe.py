"""The paper recipe, end to end, on the CPU: `anita-run --recipe paper` with the recipe unchanged except its sizes and what
an offline CPU needs. Full epochs (`max_steps: -1`), the warm-up, rsLoRA, DPO's beta and warm-up ratio, the learning rates
and the Italian step's 3 epochs stay as the paper has them; every step must end `completed`."""
import math, os, subprocess, sys
from pathlib import Path
import pytest
from anita.core import read_json

pytestmark = pytest.mark.timeout(3600)   # the whole recipe: about 6 minutes on an idle 2-core CPU
ROOT = Path(__file__).resolve().parents[1]
STAGES = "{base: embedded, sft: '{root}/{run}/02_sft/merged', dpo: '{root}/{run}/03_dpo/merged', ita: '{root}/{run}/04_ita/merged'}"

# what an offline CPU needs: the embedded model for Meta-Llama-3-8B-Instruct, the shipped samples for the Hub datasets,
# the local lm-eval tasks for the Hub ones, no released ANITA column, torch AdamW for bitsandbytes' 8-bit optimizers, fp32
OFFLINE = {"data.model": "embedded", "data.sft_source": "null", "data.dpo_source": "null", "data.ita_source": "null",
           "sft.model": "embedded", "sft.optim": "adamw_torch", "dpo.optim": "adamw_torch", "ita.optim": "adamw_torch",
           "eval.models": STAGES, "eval.suite": "local", "eval.dtype": "float32"}
# sizes only: rows, sequence lengths, batches, logging and generation lengths
SIZES = {"data.n_ita": "24",
         "sft.max_length": "256", "sft.batch_size": "2", "sft.grad_accum": "2", "sft.logging_steps": "2",
         "sft.gen_max_new_tokens": "8",
         "dpo.max_length": "192", "dpo.max_prompt_length": "96", "dpo.n_train": "8", "dpo.logging_steps": "1",
         "dpo.gen_max_new_tokens": "8",
         "ita.max_length": "256", "ita.batch_size": "2", "ita.grad_accum": "1", "ita.n_train": "8", "ita.logging_steps": "2",
         "ita.gen_max_new_tokens": "8",
         "eval.batch_size": "16", "eval.gen_max_new_tokens": "8"}
# the recipe's substance, which this test must not change
KEPT = {"sft": ["epochs", "max_steps", "warmup_steps", "lr", "lora_r", "lora_alpha", "lora_dropout", "weight_decay", "packing",
                "backend", "load_in_4bit", "seed"],
        "dpo": ["epochs", "max_steps", "warmup_steps", "lr", "lora_r", "lora_alpha", "use_rslora", "beta", "batch_size", "backend"],
        "ita": ["epochs", "max_steps", "warmup_steps", "lr", "lora_r", "lora_alpha", "packing", "backend"]}

def test_overrides_change_only_sizes_and_offline_needs():
    touched = {k for k in {**OFFLINE, **SIZES}}
    kept = {f"{s}.{k}" for s, ks in KEPT.items() for k in ks}
    assert not touched & kept, touched & kept
    from anita.recipe import load_recipe, apply_sets
    paper = apply_sets(load_recipe("paper"), [])["steps"]   # the recipe with its presets resolved, as the pipeline runs it
    for k in touched:   # every override names a parameter the paper recipe has
        s, p = k.split(".")
        assert p in paper[s]["params"], k
    assert paper["sft"]["params"]["max_steps"] == -1 and paper["ita"]["params"]["epochs"] == 3
    assert paper["dpo"]["params"]["use_rslora"] is True and paper["sft"]["params"]["warmup_steps"] == 100

@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    sets = [a for k, v in {**OFFLINE, **SIZES}.items() for a in ("--set", f"{k}={v}")]
    cmd = [str(Path(sys.executable).parent/"anita-run"), "--recipe", "paper", "--run", "cpu", "--root", str(root), *sets]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=3500)
    print(r.stdout[-6000:], r.stderr[-6000:])
    assert r.returncode == 0, f"anita-run --recipe paper failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return root/"cpu"

def _report(rd, step): return read_json(rd/step/"report.json")

def test_every_step_completed(paper_run):
    for step in ("01_data", "02_sft", "03_dpo", "04_ita", "05_eval"):
        assert read_json(paper_run/step/"manifest.json")["status"] == "completed", step
    assert (paper_run/"report.md").exists()

def test_full_epochs_and_warmup_as_the_paper(paper_run):
    sft, dpo, ita = (_report(paper_run, s) for s in ("02_sft", "03_dpo", "04_ita"))
    for r in (sft, dpo, ita):
        assert r["params"]["max_steps"] == -1 and r["optimizer_steps"] == r["plan"]["optimizer_steps"] > 0
    assert sft["plan"]["optimizer_steps"] == sft["plan"]["steps_per_epoch"]                    # one whole epoch
    assert ita["plan"]["optimizer_steps"] == 3 * ita["plan"]["steps_per_epoch"]                # three whole epochs
    assert sft["plan"]["packed"] and sft["plan"]["warmup_steps"] == 100                         # warm-up steps as the paper
    assert dpo["plan"]["warmup_steps"] == math.ceil(0.1 * dpo["plan"]["optimizer_steps"])       # warm-up ratio 0.1
    assert dpo["params"]["use_rslora"] is True and dpo["params"]["lora_r"] == 64 and dpo["params"]["beta"] == 0.1
    # the packed plan keeps the unpacked batch's tokens per optimizer step (within one packed row)
    p = sft["plan"]
    assert abs(p["tokens_per_step"] - p["target_tokens_per_step"]) <= p["mean_train_row_tokens"]

def test_steps_chain_and_eval_covers_every_stage(paper_run):
    dpo, ita = _report(paper_run, "03_dpo"), _report(paper_run, "04_ita")
    assert dpo["loaded_model"] == str(paper_run/"02_sft"/"merged")
    assert ita["loaded_model"] == str(paper_run/"03_dpo"/"merged")
    res = read_json(paper_run/"05_eval"/"results.json")
    assert set(res["models"]) == {"base", "sft", "dpo", "ita"}, list(res["models"])
