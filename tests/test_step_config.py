"""Each training step's values are written once, in its config dataclass (`SFTStepConfig`, `DPOStepConfig`,
`ITAStepConfig`): the paper's as the defaults, each with its source, and named presets (`tiny`: the CPU demo) beside them.
The notebooks' parameter cells name a preset, the recipes name a preset and what they change, and the pipeline resolves
the preset into every field: a value changed in the config shows in the resolved recipe, the notebook and the manifest."""
import ast, json
from dataclasses import fields
from pathlib import Path
import pytest, yaml
from anita.trainconfig import SFTStepConfig, TRL_NAMES, SOURCES, step_config, notebook_config, preset_values
from anita.dpo import DPOStepConfig
from anita.ita import ITAStepConfig
from anita.recipe import load_recipe, apply_sets, config_schema, check_param

ROOT = Path(__file__).resolve().parents[1]
from anita.data import DataStepConfig
STEPS = dict(data=("01_data.ipynb", DataStepConfig), sft=("02_sft.ipynb", SFTStepConfig), dpo=("03_dpo.ipynb", DPOStepConfig),
             ita=("04_ita.ipynb", ITAStepConfig))
PLACES = {"run", "root", "step_dir", "data_dir", "preset"}   # where the step reads and writes, and which values
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
    "A recipe value the pipeline fills in to chain steps (`{steps.sft}/merged`)."
    return k in CHAINED and isinstance(v, str) and "{steps." in v

def _eq(a, b): return list(a) == list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b

@pytest.mark.parametrize("step", STEPS)
def test_parameter_cell_holds_places_and_preset(step):
    "A training notebook's parameter cell names where it reads and writes and its preset: no training value."
    nb, cls = STEPS[step]
    cell = cell_params(nb)
    places = PLACES - {"data_dir"} if step == "data" else PLACES   # the data step reads no other step
    assert set(cell) == places, f"{nb}: {sorted(set(cell) ^ places)}"
    assert cell["preset"] == "tiny" and cell["preset"] in cls.PRESETS

@pytest.mark.parametrize("step", STEPS)
def test_presets_are_fields_of_the_right_type(step):
    nb, cls = STEPS[step]
    schema = config_schema(cls)
    assert set(cls.PRESETS) == {"paper", "tiny"} and cls.PRESETS["paper"] == {}
    for name, values in cls.PRESETS.items():
        for k, v in values.items():
            assert k in schema, f"{cls.__name__}.PRESETS[{name!r}]: {k} is no field"
            check_param(v, schema[k], f"{cls.__name__}.PRESETS[{name!r}].{k}")

@pytest.mark.parametrize("name", ["tiny", "paper"])
def test_recipes_name_a_preset_and_only_real_changes(name):
    "The shipped recipes set no training value: a preset and the pipeline's chaining only."
    for step in STEPS:
        own = _recipe(name)[step]["params"]
        assert own["preset"] == name
        assert all(_chained(k, v) for k, v in own.items() if k != "preset"), (name, step, own)

@pytest.mark.parametrize("name", ["tiny", "paper"])
def test_the_recipe_resolves_to_the_preset(name):
    "What the pipeline gives a step notebook: every field at the preset's value, and the chained inputs."
    r = apply_sets(load_recipe(name), [])
    for step, (nb, cls) in STEPS.items():
        p, want = r["steps"][step]["params"], preset_values(cls, name)
        for k, v in want.items():
            if _chained(k, p.get(k)): continue
            assert _eq(p[k], v), (name, step, k, p[k], v)
        assert notebook_config(cls, p) == step_config(cls, **{**want, **{k: p[k] for k in want}})

def test_a_value_changed_in_one_place_reaches_the_notebook_and_the_manifest(tmp_path, monkeypatch):
    """Acceptance (issue 24): the tiny SFT learning rate and step count changed in `SFTStepConfig.PRESETS` alone show in
    the resolved recipe, in the config the step notebook builds, and in the step's manifest."""
    from anita.core import read_json
    from anita.runner import run_recipe
    monkeypatch.setitem(SFTStepConfig.PRESETS, "tiny", {**SFTStepConfig.PRESETS["tiny"], "lr": 7e-4, "max_steps": 1})
    r = load_recipe("tiny")
    r["steps"] = {"sft": r["steps"]["sft"]}   # the SFT step alone, on the shipped sample prepared inline
    r = apply_sets(r, ["sft.data_dir=null", "sft.gen_max_new_tokens=2"])
    assert (r["steps"]["sft"]["params"]["lr"], r["steps"]["sft"]["params"]["max_steps"]) == (7e-4, 1)
    run_recipe(r, run="one", root=tmp_path, progress=False)
    m = read_json(tmp_path/"one"/"02_sft"/"manifest.json")
    assert m["status"] == "completed" and (m["params"]["lr"], m["params"]["max_steps"]) == (7e-4, 1)
    rep = read_json(tmp_path/"one"/"02_sft"/"report.json")
    assert rep["params"]["lr"] == 7e-4 and rep["optimizer_steps"] == 1   # the config the notebook trained with
    nb = json.loads((tmp_path/"one"/"02_sft.ipynb").read_text())
    injected = "".join(next(c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", []))["source"])
    assert "lr = 0.0007" in injected and 'preset = "tiny"' in injected

def test_every_default_has_a_source():
    for cls in (DataStepConfig, SFTStepConfig, DPOStepConfig, ITAStepConfig):
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
    from anita.recipe import RecipeError
    assert SFTStepConfig().packing == ITAStepConfig().packing == "auto"
    paper = apply_sets(load_recipe("paper"), [])["steps"]
    assert paper["sft"]["params"]["packing"] == paper["ita"]["params"]["packing"] == "auto"
    for v, want in (("auto", "auto"), ("true", True), ("false", False)):
        r = apply_sets(load_recipe("tiny"), [f"sft.packing={v}", f"ita.packing={v}"])
        assert r["steps"]["sft"]["params"]["packing"] == r["steps"]["ita"]["params"]["packing"] == want
    for bad in ("maybe", "1"):
        with pytest.raises(RecipeError, match=f"--set sft.packing.*must be one of True, False, auto, got"):
            apply_sets(load_recipe("tiny"), [f"sft.packing={bad}"])
