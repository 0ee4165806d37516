"""The GPU path's logic, checked on the CPU: what unsloth is asked to load and how its adapter is merged, the import order
in the step notebooks, the per-rank device map, the refusal to train a large model on the CPU, the batch plan against the
Trainer's own step count. What only a GPU can show (speed, memory, 4-bit kernels) is in `make gpu-check`."""
import json, os, sys, types
from pathlib import Path
import pytest

torch = pytest.importorskip("torch")
from anita import sft as S
from anita import backends, core, merge
from anita.core import write_json

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("transformers", "trl", "peft", "datasets")

@pytest.mark.parametrize("nb", ["02_sft", "03_dpo", "04_ita"])
def test_backend_resolved_before_heavy_imports(nb):
    "In each step notebook the cell after `parameters` calls `prepare_backend`, and no earlier cell imports transformers & co."
    cells = [c for c in json.loads((ROOT/"nbs"/f"{nb}.ipynb").read_text())["cells"] if c["cell_type"] == "code"]
    i = next(i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", []))
    assert "prepare_backend(cfg.backend, cfg.model)" in "".join(cells[i+1]["source"])
    for c in cells[:i+2]:
        src = "".join(c["source"])
        for m in HEAVY: assert f"import {m}" not in src and f"from {m}" not in src, (nb, m, src[:80])

class _FakeFLM:
    "Stands in for unsloth's FastLanguageModel on the CPU: records the call, loads the model with transformers + peft."
    calls = []
    @classmethod
    def from_pretrained(cls, name, **kw):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        cls.calls.append(dict(name=name, **kw))
        mapped = name if kw.get("use_exact_model_name") else "unsloth/some-bnb-4bit-copy"
        if kw.get("on_model_resolved"): kw["on_model_resolved"](mapped)
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32), AutoTokenizer.from_pretrained(name)
    @classmethod
    def get_peft_model(cls, m, r=16, lora_alpha=8, lora_dropout=0.0, target_modules=None, use_rslora=False, **kw):
        from peft import get_peft_model
        return get_peft_model(m, backends.lora_config(r, lora_alpha, lora_dropout, target_modules, use_rslora))

@pytest.fixture
def fake_unsloth(monkeypatch):
    mod = types.ModuleType("unsloth"); mod.FastLanguageModel = _FakeFLM; _FakeFLM.calls = []
    monkeypatch.setitem(sys.modules, "unsloth", mod)
    return _FakeFLM

def test_unsloth_loads_exactly_the_named_model_and_merges_into_it(fake_unsloth, embedded_dir, tmp_path):
    rec = {}
    m, tok = backends.load_for_training(embedded_dir, "unsloth", load_in_4bit=True, lora=dict(r=4, alpha=8), record=rec)
    call = fake_unsloth.calls[-1]
    assert call["name"] == embedded_dir and call["use_exact_model_name"] is True and call["load_in_4bit"] is True
    assert rec["loaded"] == embedded_dir            # not unsloth's pre-quantized mirror
    with torch.no_grad():                           # give the fresh adapter a non-zero delta
        for n, p in m.named_parameters():
            if "lora_B" in n: p.normal_(0, 0.02)
    out = merge.save_merged(m, tok, tmp_path/"merged", "unsloth", rec["loaded"])
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 400, 500, 600, 2]])
    m.eval()
    with torch.no_grad():
        ref = m(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    with m.disable_adapter(), torch.no_grad(): base = m(input_ids=ids).logits
    # merged into exactly the base it was trained on (fp32 on the CPU), and the adapter really is in it
    assert (ref - got).abs().max() < 1e-3 < (ref - base).abs().max()
    assert not (tmp_path/"merged"/"_adapter").exists()

def test_unsloth_must_come_first(fake_unsloth, monkeypatch):
    import anita.backends as B                   # `prepare_backend` lives there (re-exported by `anita.sft`)
    monkeypatch.setattr(B, "pick_backend", lambda b, m=None: "unsloth")
    monkeypatch.delitem(sys.modules, "unsloth")
    assert "transformers" in sys.modules        # imported by the test above / conftest
    with pytest.raises(RuntimeError, match="must be imported before"): backends.prepare_backend("unsloth")

def test_ranks_load_on_their_own_gpu(monkeypatch):
    for r in ("0", "1", "7"):
        monkeypatch.setenv("LOCAL_RANK", r); assert backends.local_device_map() == {"": int(r)}
    monkeypatch.setenv("WORLD_SIZE", "4"); assert backends.world_size() == 4

def test_auto_refuses_cpu_for_a_large_model(tmp_path):
    if core.device_info()["device"] == "cuda": pytest.skip("a GPU is visible")
    write_json(tmp_path/"config.json", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=14336, vocab_size=128256))
    with pytest.raises(RuntimeError) as e: backends.pick_backend("auto", str(tmp_path))
    msg = str(e.value)
    assert "8.0B parameters" in msg and "torch " in msg and "backend='cpu'" in msg
    assert backends.pick_backend("cpu", str(tmp_path)) == "cpu"
    with pytest.raises(RuntimeError, match="unknown size"): backends.pick_backend("auto", "meta-llama/not-in-the-cache")
    with pytest.raises(FileNotFoundError, match="no such"): backends.pick_backend("auto", str(tmp_path/"02_sft"/"merged"))

def test_plan_matches_the_trainers_steps(embedded_dir, tmp_path):
    "The plan's optimizer steps are the ones the Trainer takes, over whole epochs, packed and not."
    import anita.data as data
    from transformers import AutoTokenizer
    tok = core.ensure_pad_token(AutoTokenizer.from_pretrained(embedded_dir))
    ds = data.prepare_sft(str(data.sample_path("sft")), tok)
    ds = (ds[0] if isinstance(ds, tuple) else ds).select(range(10))
    for packing in (True, False):
        r = S.train_sft(embedded_dir, ds, tmp_path/f"p{packing}", generate=False, merge=False, backend="cpu", max_length=96,
                        batch_size=2, grad_accum=2, epochs=2, max_steps=-1, warmup_steps=1, optim="adamw_torch", lora_r=4,
                        lora_alpha=8, logging_steps=1, save_steps=100, gradient_checkpointing=False, packing=packing)["report"]
        assert r["optimizer_steps"] == r["plan"]["optimizer_steps"] == 2 * r["plan"]["steps_per_epoch"], (packing, r["plan"])
