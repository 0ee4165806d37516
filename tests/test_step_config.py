"""Each training step's defaults are written once, in its config dataclass (`SFTStepConfig`, `DPOStepConfig`,
`ITAStepConfig`): the recipes and the notebooks' parameter cells must agree with them. The notebooks' cells hold the tiny
demo's values (nbdev_test runs them), the tiny recipe repeats them, and the paper recipe must bring every field back to the
config's (paper) default, or a paper run would train with a tiny value."""
import ast, json
from dataclasses import fields
from pathlib import Path
import pytest, yaml
from anita.trainconfig import SFTStepConfig, TRL_NAMES, SOURCES, step_config, notebook_config
from anita.dpo import DPOStepConfig
from anita.ita import ITAStepConfig

ROOT = Path(__file__).resolve().parents[1]
STEPS = dict(sft=("02_sft.ipynb", SFTStepConfig), dpo=("03_dpo.ipynb", DPOStepConfig), ita=("04_ita.ipynb", ITAStepConfig))
NOTEBOOK_ONLY = {"run", "root", "step_dir", "data_dir", "n_train"}   # where the step reads and writes, and how many rows: not training
CHAINED = {"model", "data_dir"}                           # set by the pipeline from the previous step's output

def _recipe(name): return yaml.safe_load((ROOT/"anita"/"recipes"/f"{name}.yaml").read_text())["steps"]

def cell_params(nb:str) -> dict:
    "The names and literal values of a notebook's `parameters` cell."
    cells = json.loads((ROOT/"nbs"/nb).read_text())["cells"]
    src = "".join(next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))["source"])
    out = {}
    for node in ast.parse(src).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else node.target
        out[target.id] = ast.literal_eval(node.value)
    return out

def defaults(cls) -> dict: return {f.name: f.default for f in fields(cls)}

def _chained(k, v) -> bool:
    "A recipe value the pipeline fills in to chain steps (`{steps.sft}/merged`, or the older `{root}/{run}/...`)."
    return k in CHAINED and isinstance(v, str) and ("{steps." in v or "{run}" in v)

def _eq(a, b): return list(a) == list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b

@pytest.mark.parametrize("step", STEPS)
def test_parameter_cell_names_config_fields(step):
    "Every parameter of the cell is a config field (same name, value of the field's type) or a notebook-only one."
    nb, cls = STEPS[step]
    cell = cell_params(nb)
    unknown = set(cell) - set(defaults(cls)) - NOTEBOOK_ONLY
    assert not unknown, f"{nb}: parameters that are no field of {cls.__name__}: {sorted(unknown)}"
    cfg = notebook_config(cls, cell)
    for k, v in cell.items():
        if k in NOTEBOOK_ONLY or v is None: continue
        d, f = defaults(cls)[k], next(f for f in fields(cls) if f.name == k)
        if d is not None and "|" not in str(f.type): assert isinstance(v, type(d)) or isinstance(d, float) and isinstance(v, int), (nb, k, v, d)
        assert getattr(cfg, k) == v

@pytest.mark.parametrize("step", STEPS)
def test_tiny_recipe_is_the_parameter_cell(step):
    "The tiny recipe (the CPU demo) sets the values the notebook's parameter cell has (the pipeline's chaining aside)."
    nb, cls = STEPS[step]
    cell, tiny = cell_params(nb), _recipe("tiny")[step]["params"]
    assert set(tiny) <= set(cell), f"tiny.yaml {step}: not parameters of {nb}: {sorted(set(tiny) - set(cell))}"
    for k, v in tiny.items():
        if _chained(k, v): continue
        assert _eq(v, cell[k]), f"tiny.yaml {step}.{k} = {v!r}, but {nb}'s parameter cell has {cell[k]!r}"

@pytest.mark.parametrize("step", STEPS)
def test_paper_recipe_is_the_config(step):
    "Each value the paper recipe sets equals the config's default; with the cell's values under it, a paper run gets them all."
    nb, cls = STEPS[step]
    cell, paper, want = cell_params(nb), _recipe("paper")[step]["params"], defaults(cls)
    for k, v in paper.items():
        if k in NOTEBOOK_ONLY or _chained(k, v): continue
        assert k in want, f"paper.yaml {step}.{k}: no field of {cls.__name__}"
        assert _eq(v, want[k]), f"paper.yaml {step}.{k} = {v!r}, but {cls.__name__}.{k} defaults to {want[k]!r}"
    run = {**cell, **paper}   # what the pipeline gives the notebook in a paper run
    for k, d in want.items():
        if k in CHAINED and step != "sft": continue
        got = run.get(k, d)
        assert _eq(got, d), f"a paper run of {step} gets {k}={got!r} (from {nb}'s parameter cell): paper.yaml must set {d!r}"

def test_every_default_has_a_source():
    for cls in (SFTStepConfig, DPOStepConfig, ITAStepConfig):
        for f in fields(cls):
            assert f.metadata.get("source") in SOURCES and f.metadata.get("doc"), (cls.__name__, f.name)

def test_library_names_accepted_unknown_refused():
    c = step_config(SFTStepConfig, **{TRL_NAMES["lr"]: 1e-5, TRL_NAMES["batch_size"]: 3, TRL_NAMES["epochs"]: 2})
    assert (c.lr, c.batch_size, c.epochs) == (1e-5, 3, 2)
    with pytest.raises(TypeError, match="unknown parameter.*learnin_rate"): step_config(DPOStepConfig, learnin_rate=1)
    assert DPOStepConfig().lora_r == 64 and DPOStepConfig().seed == SFTStepConfig().seed   # shared fields inherited
    assert ITAStepConfig().epochs == 3 and ITAStepConfig().completion_only is False

def test_train_args_from_the_config(tmp_path):
    "The recipe's values reach TRL under TRL's names, with `report_to` and the progress bar settable from the recipe."
    pytest.importorskip("trl")
    from trl import DPOConfig
    from anita.sft import train_args, resolve_report_to
    cfg = step_config(DPOStepConfig, lr=3e-5, grad_accum=2, warmup_steps=0.1, disable_tqdm=True, report_to="none")
    a = train_args(DPOConfig, tmp_path, cfg, "cpu", beta=cfg.beta)
    assert (a.learning_rate, a.per_device_train_batch_size, a.gradient_accumulation_steps) == (3e-5, 4, 2)
    assert (a.warmup_steps, a.lr_scheduler_type.value, a.beta, a.optim.value) == (0.1, "linear", 0.1, "adamw_torch")
    assert a.disable_tqdm is True and a.report_to == []
    assert train_args(DPOConfig, tmp_path, DPOStepConfig(), "cpu").disable_tqdm is False   # a progress bar by default
    from importlib.util import find_spec
    assert resolve_report_to("auto") == ("tensorboard" if find_spec("tensorboard") else "none")
    if not find_spec("wandb"):
        with pytest.raises(ModuleNotFoundError, match="wandb is not installed"): resolve_report_to("wandb")


def test_packing_takes_true_false_or_auto():
    "`packing` is True, False or `auto` in the recipes and on the command line; another value is refused before anything runs."
    from anita.recipe import load_recipe, apply_sets, RecipeError
    assert SFTStepConfig().packing == ITAStepConfig().packing == "auto"
    assert _recipe("paper")["sft"]["params"]["packing"] == _recipe("paper")["ita"]["params"]["packing"] == "auto"
    for v, want in (("auto", "auto"), ("true", True), ("false", False)):
        r = apply_sets(load_recipe("tiny"), [f"sft.packing={v}", f"ita.packing={v}"])
        assert r["steps"]["sft"]["params"]["packing"] == r["steps"]["ita"]["params"]["packing"] == want
    for bad in ("maybe", "1"):
        with pytest.raises(RecipeError, match=f"--set sft.packing.*must be one of True, False, auto, got"):
            apply_sets(load_recipe("tiny"), [f"sft.packing={bad}"])
