"Issue 21 item 5: bad recipe files, parameter ranges, reserved folders, --report-only --dry-run, relative recipe paths."
import ast, json
from pathlib import Path
import pytest
from anita.pipeline import main
from anita.recipe import load_recipe, apply_sets
from anita.recipe import check_range, params_cell

ROOT = Path(__file__).resolve().parents[1]

def _nb(path, params, body):
    "A notebook with a `parameters` cell and one code cell."
    code = dict(cell_type="code", execution_count=None, outputs=[])
    cells = [dict(code, id="params", metadata=dict(tags=["parameters"]), source=params),
             dict(code, id="body", metadata={}, source=body)]
    ks = dict(name="python3", display_name="Python 3", language="python")
    Path(path).write_text(json.dumps(dict(cells=cells, nbformat=4, nbformat_minor=5, metadata=dict(kernelspec=ks))))

READ_NB = '''from pathlib import Path
from anita.core import run_dir, step_manifest, write_json
sd = Path(step_dir) if step_dir else run_dir(run, "01_read", root)
with step_manifest(sd, "01_read", dict(src=src)) as outs:
    outs.append(write_json(sd/"report.json", dict(rows=len(Path(src).read_text().splitlines()))))'''

@pytest.fixture
def nbs(tmp_path):
    d = tmp_path/"nbs"; d.mkdir()
    _nb(d/"01_read.ipynb", 'run = "nbtest"\nroot = "runs"\nstep_dir = None\nsrc = None', READ_NB)
    return d

def _cli(capsys, *args):
    rc = main(["--no-progress", *args])
    out = capsys.readouterr()
    return rc, out.err.strip().splitlines(), out.out

def _one_line(rc, err, *msgs):
    assert rc == 2 and len(err) == 1 and err[0].startswith("anita-run: error: "), (rc, err)
    assert all(m in err[0] for m in msgs), err

def _recipe(d, step):
    return f"name: t\nnbs_dir: {d}\nsteps:\n  read:\n{step}"

@pytest.mark.parametrize("step,msgs", [
    ("    notebook: 7\n", ["step 'read'", "`notebook` must be a notebook file name ending in .ipynb, got 7"]),
    ("    notebook: /etc/passwd\n", ["step 'read'", "got '/etc/passwd'"]),
    ("    notebook: 01_read.ipynb\n    dir: recipe.yaml\n", ["folder 'recipe.yaml' is reserved"]),
    ("    notebook: 01_read.ipynb\n    dir: pipeline.json\n", ["folder 'pipeline.json' is reserved"]),
    ("    notebook: 01_read.ipynb\n    dir: report.md\n", ["folder 'report.md' is reserved"]),
    ("    notebook: junk.ipynb\n", ["NBS/junk.ipynb: not a Jupyter notebook"])])
def test_bad_recipe_is_one_line(nbs, tmp_path, capsys, step, msgs):
    "A `notebook` that is no notebook, a step folder the run folder uses itself: one line, exit 2, nothing written."
    (nbs/"junk.ipynb").write_bytes(b"\x00\xff not json")
    y = tmp_path/"r.yaml"; y.write_text(_recipe(nbs, step))
    msgs = [m.replace("NBS", str(nbs)) for m in msgs] if "NBS" in msgs[0] else [str(y), *msgs]   # the file at fault
    _one_line(*_cli(capsys, "--recipe", str(y), "--root", str(tmp_path/"runs"), "--run", "r")[:2], *msgs)
    assert not (tmp_path/"runs").exists()

def test_recipe_not_utf8(nbs, tmp_path, capsys):
    y = tmp_path/"r.yaml"
    y.write_bytes(_recipe(nbs, "    notebook: 01_read.ipynb   # caff\xe8\n").encode("latin-1"))
    _one_line(*_cli(capsys, "--recipe", str(y), "--root", str(tmp_path/"runs"), "--run", "r", "--dry-run")[:2],
              f"{y}: not UTF-8 text (byte 0xe8 at offset")

@pytest.mark.parametrize("value,msg", [
    ("sft.lr=.inf", "--set sft.lr: must be a finite number, got inf"),
    ("sft.lr=inf", "--set sft.lr: must be a finite number, got inf"),
    ("sft.weight_decay=.nan", "--set sft.weight_decay: must be a finite number, got nan"),
    ("data.n_heldout_en=-3", "--set data.n_heldout_en: must be >= 0, got -3"),
    ("export.max_new_tokens=-1", "--set export.max_new_tokens: must be >= 1, got -1"),
    ("eval.heldout_batch_size=0", "--set eval.heldout_batch_size: must be >= 1, got 0"),
    ("eval.gpu_memory_utilization=1.5", "must be in (0, 1], got 1.5")])
def test_set_ranges_general(tmp_path, capsys, value, msg):
    "Non-finite numbers in any parameter, negative counts, sizes below 1: refused by rule, one line, exit 2."
    rc, err, _ = _cli(capsys, "--recipe", "tiny", "--nbs-dir", str(ROOT/"nbs"), "--root", str(tmp_path/"runs"),
                      "--run", "r", "--dry-run", "--set", value)
    _one_line(rc, err, msg)

def test_recipe_file_ranges(tmp_path, capsys):
    "The same rules hold for values written in a recipe file."
    y = tmp_path/"t.yaml"
    args = ("--nbs-dir", str(ROOT/"nbs"), "--root", str(tmp_path/"runs"), "--run", "r", "--dry-run")
    tiny = (ROOT/"anita/recipes/tiny.yaml").read_text()
    data_preset = "      preset: tiny                    # DataStepConfig"
    assert tiny.count(data_preset) == 1
    y.write_text(tiny.replace(data_preset, "      n_heldout_en: -3\n" + data_preset))
    _one_line(*_cli(capsys, "--recipe", str(y), *args)[:2], f"{y}: data.n_heldout_en: must be >= 0, got -3")
    assert tiny.count("      preset: tiny                              # SFTStepConfig") == 1
    y.write_text(tiny.replace("      preset: tiny                              # SFTStepConfig", "      lr: .inf\n      preset: tiny  # SFTStepConfig"))
    _one_line(*_cli(capsys, "--recipe", str(y), *args)[:2], f"{y}: sft.lr: must be a finite number, got inf")

def test_every_default_passes_the_rules():
    "The general rules refuse no default of any notebook's parameters cell, nor any value of the shipped recipes."
    n = 0
    for nb in sorted((ROOT/"nbs").glob("*.ipynb")):
        src = params_cell(nb)
        for node in ast.parse(src or "").body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                name = (node.targets[0] if isinstance(node, ast.Assign) else node.target).id
                try: v = ast.literal_eval(node.value)
                except ValueError: continue
                check_range(name, v, f"{nb.name}: {name}"); n += 1
    assert n > 100
    for r in ("tiny", "paper"):   # with the presets resolved: every value of every preset of the training steps
        for s, st in apply_sets(load_recipe(r, ROOT/"nbs"), [])["steps"].items():
            for k, v in st["params"].items(): check_range(k, v, f"{r}: {s}.{k}")

def test_report_only_dry_run_writes_nothing(nbs, tmp_path, capsys):
    "--report-only --dry-run names the report it would write and leaves report.md alone; without --dry-run: rewritten."
    y = tmp_path/"r.yaml"; y.write_text(_recipe(nbs, "    notebook: 01_read.ipynb\n"))
    rd = tmp_path/"runs"/"r"; rd.mkdir(parents=True); (rd/"report.md").write_text("an older report\n")
    args = ("--recipe", str(y), "--root", str(tmp_path/"runs"), "--run", "r", "--report-only")
    rc, err, out = _cli(capsys, *args, "--dry-run")
    assert rc == 0 and (rd/"report.md").read_text() == "an older report\n" and not (rd/"report.html").exists(), err
    assert f"would write {rd/'report.md'}" in out
    assert _cli(capsys, *args)[0] == 0 and (rd/"report.md").read_text() != "an older report\n"

def test_relative_paths_in_a_recipe_file(nbs, tmp_path, monkeypatch, capsys):
    """A relative path written in a recipe file is taken from the recipe file's folder, wherever anita-run is typed
    (not from the run folder, where the notebook runs); one given with --set from the folder where it is typed."""
    exp = tmp_path/"exp"; exp.mkdir(); (exp/"rows.txt").write_text("a\nb\nc\n")
    y = exp/"r.yaml"; y.write_text(_recipe(nbs, "    notebook: 01_read.ipynb\n    params: {src: rows.txt}\n"))
    assert load_recipe(y)["steps"]["read"]["params"]["src"] == str(exp/"rows.txt")
    cwd = tmp_path/"elsewhere"; cwd.mkdir(); monkeypatch.chdir(cwd)
    rc, err, _ = _cli(capsys, "--recipe", str(y), "--root", "runs", "--run", "r")
    assert rc == 0, err
    assert json.loads((cwd/"runs/r/01_read/report.json").read_text())["rows"] == 3
    assert json.loads((cwd/"runs/r/01_read/manifest.json").read_text())["params"]["src"] == str(exp/"rows.txt")
    (cwd/"rows.txt").write_text("x\n")
    assert apply_sets(load_recipe(y), ["read.src=rows.txt"])["steps"]["read"]["params"]["src"] == str(cwd/"rows.txt")
