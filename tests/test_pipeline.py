"Integration tests of `anita.pipeline` (anita-run) on small fake step notebooks: skip, rerun downstream, kill/resume, bad input."
import json, os, re, signal, subprocess, sys, textwrap, time
from pathlib import Path
import pytest
from anita.core import read_json
from anita.recipe import RecipeError, load_recipe, apply_sets, check_recipe_params, list_steps, notebook_params
from anita.runner import StepError, run_recipe
from anita.runstate import run_lock
from anita.pipeline import main
from anita.report import write_report

ROOT = Path(__file__).resolve().parents[1]

def fake_nb(path, params, body, extra=()):
    "A notebook with a `parameters` cell, one code cell, and `extra` code cells."
    cells = [dict(id="params", cell_type="code", metadata=dict(tags=["parameters"]), source=textwrap.dedent(params).strip(),
                  execution_count=None, outputs=[]),
             dict(id="body", cell_type="code", metadata={}, source=textwrap.dedent(body).strip(), execution_count=None, outputs=[])]
    cells += [dict(id=f"extra{i}", cell_type="code", metadata={}, source=src, execution_count=None, outputs=[])
              for i, src in enumerate(extra)]
    nb = dict(cells=cells, metadata=dict(kernelspec=dict(name="python3", display_name="Python 3", language="python")),
              nbformat=4, nbformat_minor=5)
    Path(path).write_text(json.dumps(nb))

RECIPE = """\
name: fake
nbs_dir: .
steps:
  data:
    notebook: 01_data.ipynb
    params: {n: 3}
  train:
    notebook: 02_train.ipynb
    params: {data_dir: "{root}/{run}/01_data", steps: 4, sleep: 0.0}
  eval:
    notebook: 03_eval.ipynb
    params: {model: "{root}/{run}/02_train"}
"""

@pytest.fixture
def fake(tmp_path):
    "Three chained fake steps: data writes rows, train 'trains' with a checkpoint per step (resumable), eval reads the model."
    d = tmp_path/"nbs"; d.mkdir()
    fake_nb(d/"01_data.ipynb", 'run = "nbtest"\nroot = "runs"\nn = 2', '''
        from anita.core import run_dir, step_manifest, write_json
        sd = run_dir(run, "01_data", root)
        with step_manifest(sd, "01_data", dict(n=n)) as outs:
            outs.append(write_json(sd/"report.json", dict(rows=n, counts=dict(kept=n, dropped=0))))''',
        extra=["#| cuda\nraise SystemError('a GPU demo cell must not run in the pipeline')", "#| eval: false\nraise SystemError"])
    fake_nb(d/"02_train.ipynb", 'run = "nbtest"\nroot = "runs"\ndata_dir = None\nsteps = 2\nsleep = 0.0', '''
        import time
        from anita.core import run_dir, step_manifest, write_json, read_json
        sd = run_dir(run, "02_train", root)
        ck = sd/"checkpoint.json"
        with step_manifest(sd, "02_train", dict(steps=steps), inputs=dict(data=data_dir)) as outs:
            rows = read_json(f"{data_dir}/report.json")["rows"]
            start = read_json(ck)["step"] if ck.exists() else 0
            for i in range(start, steps):
                time.sleep(sleep)
                write_json(ck, dict(step=i+1))
            log = [dict(step=i+1, loss=2.0/(i+1), tokens_per_s=100.0) for i in range(steps)]
            outs.append(write_json(sd/"train_log.json", log))
            outs.append(write_json(sd/"report.json", dict(steps_done=read_json(ck)["step"], resumed_from=start, rows=rows)))''')
    fake_nb(d/"03_eval.ipynb", 'run = "nbtest"\nroot = "runs"\nmodel = None', '''
        from anita.core import run_dir, step_manifest, write_json, read_json
        sd = run_dir(run, "03_eval", root)
        with step_manifest(sd, "03_eval", inputs=dict(model=model)) as outs:
            r = read_json(f"{model}/report.json")
            (sd/"table.md").write_text(f"| task | acc |\\n|---|---|\\n| fake | {r['steps_done']/10} |\\n")
            outs += [sd/"table.md", write_json(sd/"report.json", dict(acc=r["steps_done"]/10))]''')
    fake_nb(d/"09_boom.ipynb", 'run = "nbtest"\nroot = "runs"', '''
        from anita.core import run_dir, step_manifest
        with step_manifest(run_dir(run, "09_boom", root), "09_boom"): raise ValueError("boom: bad row 7")''')
    fake_nb(d/"10_die.ipynb", 'run = "nbtest"\nroot = "runs"', '''
        import os, signal
        from anita.core import run_dir, step_manifest
        with step_manifest(run_dir(run, "10_die", root), "10_die"): os.kill(os.getpid(), signal.SIGKILL)  # like the OOM killer''')
    (d/"recipe.yaml").write_text(RECIPE)
    return d

def _run(fake, tmp_path, **kw):
    return run_recipe(fake/"recipe.yaml", run="r", root=tmp_path/"runs", progress=False, log=lambda s: None, **kw)

def _mtime(p): return Path(p).stat().st_mtime_ns

def test_skip_then_rerun_changed_step_and_downstream(fake, tmp_path):
    rd = tmp_path/"runs"/"r"
    assert _run(fake, tmp_path) == dict(data="ran", train="ran", eval="ran")
    for s in ("01_data", "02_train", "03_eval"):
        m = read_json(rd/s/"manifest.json")
        assert m["status"] == "completed" and m["pipeline"]["fingerprint"].startswith("sha256:")
        assert (rd/f"{s}.ipynb").exists() and (rd/"logs"/f"{s}.log").exists()
    assert read_json(rd/"01_data/report.json")["rows"] == 3            # recipe value injected over the notebook default
    assert "GPU demo" not in (rd/"01_data.ipynb").read_text()          # cells flagged cuda / eval: false left out
    assert read_json(rd/"02_train/report.json")["steps_done"] == 4
    assert "| fake | 0.4 |" in (rd/"03_eval/table.md").read_text()
    assert sorted(p.name for p in fake.iterdir()) == \
        ["01_data.ipynb", "02_train.ipynb", "03_eval.ipynb", "09_boom.ipynb", "10_die.ipynb", "recipe.yaml"]   # nothing written into nbs/
    before = {s: _mtime(rd/f"{s}.ipynb") for s in ("01_data", "02_train", "03_eval")}
    t0 = time.time()
    assert _run(fake, tmp_path) == dict(data="skipped", train="skipped", eval="skipped")
    assert time.time() - t0 < 30 and {s: _mtime(rd/f"{s}.ipynb") for s in before} == before
    # a parameter change reruns that step and the ones after it, not the ones before
    assert _run(fake, tmp_path, sets=["train.steps=5"]) == dict(data="skipped", train="ran", eval="ran")
    assert _mtime(rd/"01_data.ipynb") == before["01_data"]
    assert read_json(rd/"02_train/manifest.json")["params"] == {"steps": 5}
    assert "| fake | 0.5 |" in (rd/"03_eval/table.md").read_text()
    assert _run(fake, tmp_path, sets=["train.steps=5"]) == dict(data="skipped", train="skipped", eval="skipped")
    # --force reruns the selected step; its new manifest makes the next step stale
    assert _run(fake, tmp_path, sets=["train.steps=5"], steps="data", force=True) == dict(data="ran")
    assert _run(fake, tmp_path, sets=["train.steps=5"]) == dict(data="skipped", train="ran", eval="ran")
    rep = (rd/"report.md").read_text()
    for s in ("[02_train.ipynb](02_train.ipynb)", "| completed |", "loss (first → last logged) | 2 → 0.4 over 5 logs (down)",
              "| fake | 0.5 |", "counts.kept | 3", "[log](logs/03_eval.log)", "## Recipe"):
        assert s in rep, s
    assert "<table>" in (rd/"report.html").read_text()

def _cli(fake, tmp_path, *args):
    return subprocess.Popen([sys.executable, "-m", "anita.pipeline", "--recipe", str(fake/"recipe.yaml"), "--run", "r",
                             "--root", str(tmp_path/"runs"), "--no-progress", *args], cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

def _wait_ckpt(p, ck, at_least, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if ck.exists():
            try:
                if read_json(ck)["step"] >= at_least: return
            except ValueError: pass
        assert p.poll() is None, p.communicate()[0]
        time.sleep(0.2)
    raise AssertionError("the training step never checkpointed")

def test_kill_during_training_then_resume(fake, tmp_path):
    rd = tmp_path/"runs"/"r"; ck = rd/"02_train"/"checkpoint.json"
    slow = ["--set", "train.steps=12", "--set", "train.sleep=0.5"]
    # 1. SIGTERM (Slurm preemption, scancel): the step is marked failed, with exit status 143
    p = _cli(fake, tmp_path, *slow)
    _wait_ckpt(p, ck, 2)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 143, out
    m = read_json(rd/"02_train/manifest.json")
    assert m["status"] == "failed" and not (rd/"02_train/report.json").exists()
    assert read_json(rd/"pipeline.json")["steps"]["02_train"]["status"] == "failed"
    # 2. SIGKILL of the whole process group (kernel included) mid-step: the manifest stays `running`, never `completed`
    p = _cli(fake, tmp_path, *slow)
    k0 = read_json(ck)["step"]
    _wait_ckpt(p, ck, k0 + 2)
    os.killpg(p.pid, signal.SIGKILL); p.communicate(timeout=30)
    assert read_json(rd/"02_train/manifest.json")["status"] == "running"
    assert not (rd/"02_train/report.json").exists() and not (rd/"03_eval").exists()
    # 3. the next run resumes the step from its checkpoint and completes the chain with consistent outputs
    res = run_recipe(fake/"recipe.yaml", run="r", root=tmp_path/"runs", progress=False, log=lambda s: None,
                     sets=["train.steps=12", "train.sleep=0.5"])
    assert res == dict(data="skipped", train="ran", eval="ran")
    r = read_json(rd/"02_train/report.json")
    assert r["steps_done"] == 12 and r["resumed_from"] >= k0 + 2
    assert read_json(rd/"02_train/manifest.json")["status"] == "completed"
    assert "| fake | 1.2 |" in (rd/"03_eval/table.md").read_text()
    # with other parameters the step starts afresh (its folder is cleared), never from the old checkpoint
    run_recipe(fake/"recipe.yaml", run="r", root=tmp_path/"runs", progress=False, log=lambda s: None, steps="data,train",
               sets=["train.steps=3", "train.sleep=0.0"])
    assert read_json(rd/"02_train/report.json") | {"rows": 3} == dict(steps_done=3, resumed_from=0, rows=3)

def test_notebook_that_raises(fake, tmp_path):
    (fake/"boom.yaml").write_text("nbs_dir: .\nsteps:\n  boom: {notebook: 09_boom.ipynb}\n")
    with pytest.raises(StepError) as e:
        run_recipe(fake/"boom.yaml", run="b", root=tmp_path/"runs", progress=False, log=lambda s: None)
    ex = tmp_path/"runs"/"b"/"09_boom.ipynb"
    assert "ValueError: boom: bad row 7" in str(e.value) and str(ex) in str(e.value)
    assert ex.exists() and "boom: bad row 7" in ex.read_text()
    m = read_json(tmp_path/"runs/b/09_boom/manifest.json")
    assert m["status"] == "failed" and "bad row 7" in m["error"]
    assert main(["--recipe", str(fake/"boom.yaml"), "--run", "b", "--root", str(tmp_path/"runs"), "--no-progress"]) == 1
    # a kernel that dies (killed for memory) is a failed step too, never left `running`
    (fake/"die.yaml").write_text("nbs_dir: .\nsteps:\n  die: {notebook: 10_die.ipynb}\n")
    with pytest.raises(StepError, match="(?s)step 'die' failed: DeadKernelError.*executed notebook: .*10_die.ipynb"):
        run_recipe(fake/"die.yaml", run="b", root=tmp_path/"runs", progress=False, log=lambda s: None)
    assert read_json(tmp_path/"runs/b/10_die/manifest.json")["status"] == "failed"

def test_bad_inputs(fake, tmp_path):
    y = fake/"recipe.yaml"
    with pytest.raises(RecipeError, match="unknown step 'sftt'"): _run(fake, tmp_path, steps="data,sftt")
    with pytest.raises(RecipeError, match="unknown step 'sftt'"): _run(fake, tmp_path, sets=["sftt.steps=2"])
    with pytest.raises(RecipeError, match=r"--set train.steps: expected int, got str 'many'"): _run(fake, tmp_path, sets=["train.steps=many"])
    with pytest.raises(RecipeError, match=r"--set train.sleep: expected float, got bool"): _run(fake, tmp_path, sets=["train.sleep=true"])
    with pytest.raises(RecipeError, match=r"02_train.ipynb has no parameter 'lr'.*data_dir, steps, sleep"):
        _run(fake, tmp_path, sets=["train.lr=0.1"])
    with pytest.raises(RecipeError, match="STEP.PARAM=VALUE"): _run(fake, tmp_path, sets=["steps=3"])
    (fake/"bad_key.yaml").write_text(RECIPE + "stages: {}\n")
    with pytest.raises(RecipeError, match="bad_key.yaml: unknown recipe key 'stages'"): load_recipe(fake/"bad_key.yaml")
    (fake/"bad_step_key.yaml").write_text(RECIPE.replace("params: {n: 3}", "parms: {n: 3}"))
    with pytest.raises(RecipeError, match="step 'data': unknown key 'parms'"): load_recipe(fake/"bad_step_key.yaml")
    (fake/"bad_type.yaml").write_text(RECIPE.replace("steps: 4", "steps: four"))
    with pytest.raises(RecipeError, match=r"bad_type.yaml: train.steps: expected int, got str 'four'"):
        run_recipe(fake/"bad_type.yaml", run="r", root=tmp_path/"runs", log=lambda s: None)
    (fake/"bad_param.yaml").write_text(RECIPE.replace("steps: 4", "stepz: 4"))
    with pytest.raises(RecipeError, match="02_train.ipynb has no parameter 'stepz'"):
        run_recipe(fake/"bad_param.yaml", run="r", root=tmp_path/"runs", log=lambda s: None)
    (fake/"missing.yaml").write_text(RECIPE.replace("03_eval.ipynb", "03_evl.ipynb"))
    with pytest.raises(FileNotFoundError, match="03_evl.ipynb: notebook of step 'eval' not found"):
        run_recipe(fake/"missing.yaml", run="r", root=tmp_path/"runs", log=lambda s: None)
    with pytest.raises(FileNotFoundError, match="known recipes are"): load_recipe("no-such-recipe")
    # a step whose previous step never completed refuses to start
    with pytest.raises(StepError, match="step 'train' needs step 'data' completed first"): _run(fake, tmp_path, steps="train")
    assert not (tmp_path/"runs"/"r"/"02_train.ipynb").exists()
    # the CLI turns bad input into exit status 2 with the message on stderr
    assert main(["--recipe", str(y), "--run", "r", "--root", str(tmp_path/"runs"), "--steps", "nope"]) == 2

def test_lock_and_dry_run(fake, tmp_path):
    rd = tmp_path/"runs"/"r"
    with run_lock(rd):
        with pytest.raises(RuntimeError, match="in use by another anita-run"): _run(fake, tmp_path)
    logs = []
    assert run_recipe(fake/"recipe.yaml", run="r", root=tmp_path/"runs", dry_run=True, log=logs.append) == \
        dict(data="would run", train="would run", eval="would run")
    assert not (rd/"01_data.ipynb").exists() and any("[2/3] train" in l for l in logs)

def test_set_coercion(fake):
    r = apply_sets(load_recipe(fake/"recipe.yaml"), ["train.sleep=1", "train.data_dir=123", "data.n=7"])
    assert r["steps"]["train"]["params"]["sleep"] == 1      # an int is fine for a float parameter
    assert r["steps"]["train"]["params"]["data_dir"] == 123      # None default: any type, parsed as YAML
    assert r["steps"]["data"]["params"]["n"] == 7
    assert notebook_params(fake/"02_train.ipynb") == dict(run=str, root=str, data_dir=None, steps=int, sleep=float)

@pytest.mark.parametrize("name", ["tiny", "paper"])
def test_shipped_recipes(name):
    r = load_recipe(name)
    assert list(r["steps"]) == ["data", "sft", "dpo", "ita", "eval", "export"]
    assert [s["dir"] for s in r["steps"].values()] == ["01_data", "02_sft", "03_dpo", "04_ita", "05_eval", "13_export"]
    assert len(list_steps(r).splitlines()) == 6
    nbs = ROOT/"nbs"
    present = [n for n, s in r["steps"].items() if (nbs/s["notebook"]).exists()]
    if not present: pytest.skip("step notebooks not written yet")
    check_recipe_params(load_recipe(name, nbs), present)   # the recipe's params exist in the notebooks, with their types

# --- issue 12: never skip stale or missing work, never destroy a finished step ---

READ_RECIPE = RECIPE.replace("notebook: 01_data.ipynb\n    params: {n: 3}", "notebook: 01_read.ipynb\n    dir: 01_data\n    params: {src: SRC}")

@pytest.fixture
def reader(fake, tmp_path):
    "The fake recipe whose data step counts the lines of a file or a folder of files (`src`)."
    fake_nb(fake/"01_read.ipynb", 'run = "nbtest"\nroot = "runs"\nstep_dir = None\nsrc = None', '''
        from pathlib import Path
        from anita.core import run_dir, step_manifest, write_json
        sd = Path(step_dir) if step_dir else run_dir(run, "01_read", root); p = Path(src)
        with step_manifest(sd, "01_data", dict(src=src)) as outs:
            n = sum(len(f.read_text().splitlines()) for f in ([p] if p.is_file() else sorted(p.glob("*.txt"))))
            outs.append(write_json(sd/"report.json", dict(rows=n)))''')
    src = tmp_path/"rows.txt"; src.write_text("a\nb\nc\nd\ne\n")
    (fake/"read.yaml").write_text(READ_RECIPE.replace("SRC", str(src)))
    return fake/"read.yaml", src

def _runr(y, tmp_path, **kw):
    return run_recipe(y, run="r", root=tmp_path/"runs", progress=False, **{"log": lambda s: None, **kw})

def test_changed_inputs_rerun(reader, tmp_path):
    "Item 1: the content of input files, folders and the previous step's outputs is in the fingerprint."
    y, src = reader; rd = tmp_path/"runs"/"r"
    assert _runr(y, tmp_path) == dict(data="ran", train="ran", eval="ran")
    assert read_json(rd/"02_train/report.json")["rows"] == 5
    src.write_text("a\nb\n")                                    # the same file, cut to 2 rows
    assert _runr(y, tmp_path) == dict(data="ran", train="ran", eval="ran")
    assert read_json(rd/"02_train/report.json")["rows"] == 2
    assert _runr(y, tmp_path) == dict(data="skipped", train="skipped", eval="skipped")
    # the previous step's output changed behind the pipeline's back: that step is rebuilt (its files differ from its
    # manifest, issue 21), then the steps after it rerun on the rebuilt output
    (rd/"01_data/report.json").write_text(json.dumps(dict(rows=9)))
    assert _runr(y, tmp_path) == dict(data="ran", train="ran", eval="ran")
    assert read_json(rd/"02_train/report.json")["rows"] == 2
    # a folder input: a file added to it reruns the step
    d = tmp_path/"rows"; d.mkdir(); (d/"1.txt").write_text("a\n")
    assert _runr(y, tmp_path, sets=[f"data.src={d}"], steps="data") == dict(data="ran")
    assert _runr(y, tmp_path, sets=[f"data.src={d}"], steps="data") == dict(data="skipped")
    (d/"2.txt").write_text("b\nc\n")
    assert _runr(y, tmp_path, sets=[f"data.src={d}"], steps="data") == dict(data="ran")
    assert read_json(rd/"01_data/report.json")["rows"] == 3

def test_missing_outputs_are_rebuilt(fake, tmp_path):
    "Item 2: a completed step whose outputs are gone is run again (in place, from its checkpoints), never skipped."
    rd = tmp_path/"runs"/"r"
    _run(fake, tmp_path)
    (rd/"01_data/report.json").unlink()
    assert _run(fake, tmp_path) == dict(data="ran", train="ran", eval="ran")
    assert read_json(rd/"01_data/report.json")["rows"] == 3
    (rd/"02_train/train_log.json").unlink()
    # the next step alone refuses to start on a previous step whose outputs are gone
    with pytest.raises(StepError, match=r"needs step 'train' completed first.*train_log.json"): _run(fake, tmp_path, steps="eval")
    assert _run(fake, tmp_path) == dict(data="skipped", train="ran", eval="ran")
    assert (rd/"02_train/train_log.json").exists()
    assert read_json(rd/"02_train/report.json")["resumed_from"] == 4     # rebuilt from its last checkpoint, not retrained

def test_finished_step_survives_a_failed_replacement(fake, tmp_path):
    "Item 3: --force or changed parameters build the new attempt beside the finished step and swap it in on success."
    rd = tmp_path/"runs"/"r"
    _run(fake, tmp_path)
    before = (rd/"02_train/report.json").read_text(), read_json(rd/"02_train/manifest.json")
    (rd/"01_data/report.json").unlink()                  # the input of train is gone: --force must not clear train first
    with pytest.raises(StepError, match="needs step 'data' completed first"): _run(fake, tmp_path, steps="train", force=True)
    assert (rd/"02_train/report.json").read_text() == before[0] and (rd/"02_train/checkpoint.json").exists()
    _run(fake, tmp_path, steps="data")
    # a replacement that fails leaves the finished step as it was
    with pytest.raises(StepError, match="no such file"):
        _run(fake, tmp_path, steps="train", sets=[f"train.data_dir={tmp_path/'nowhere'}"])
    m = read_json(rd/"02_train/manifest.json")
    assert m["status"] == "completed" and m["params"] == before[1]["params"] and (rd/"02_train/report.json").read_text() == before[0]
    with pytest.raises(StepError): _run(fake, tmp_path, steps="train", force=True, sets=[f"train.data_dir={tmp_path/'nowhere'}"])
    assert read_json(rd/"02_train/manifest.json")["status"] == "completed"
    # a forced replacement that succeeds is swapped in, and nothing is left beside it
    assert _run(fake, tmp_path, steps="train", force=True) == dict(train="ran")
    m2 = read_json(rd/"02_train/manifest.json")
    assert m2["status"] == "completed" and m2["pipeline"]["finished_at"] >= before[1]["pipeline"]["finished_at"]
    assert read_json(rd/"02_train/report.json")["resumed_from"] == 0 and (rd/"02_train.ipynb").exists()
    assert sorted(p.name for p in rd.iterdir() if p.name.startswith(".") and p.name != ".lock") == [".fingerprints.json"]

def _cli_err(capsys, *args):
    rc = main(["--no-progress", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err

@pytest.mark.parametrize("run", ["..", ".", "", "a/b", "ABS", "../x"])
def test_run_names_cannot_escape_root(fake, tmp_path, capsys, run):
    "Items 4 and 5: a run name is a plain folder name; anything else is one error line and exit status 2."
    root = tmp_path/"runs"/"sub"; root.mkdir(parents=True)
    if run == "ABS": run = str(tmp_path/"elsewhere")
    rc, err = _cli_err(capsys, "--recipe", str(fake/"recipe.yaml"), "--root", str(root), "--run", run, "--force")
    assert rc == 2 and len(err) == 1 and err[0].startswith("anita-run: error: ") and "run name" in err[0], err
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and "nbs" not in p.parts) == []
    assert _cli_err(capsys, "--recipe", str(fake/"recipe.yaml"), "--root", str(root), "--run", run, "--report-only")[0] == 2

def test_step_names_and_folders(fake):
    "Item 4: a step name or folder that is not a plain folder name, or two steps in one folder, is a recipe error."
    for bad, msg in [("dir: ../../etc", "step 'eval': folder '../../etc'"), ("dir: /tmp/x", "folder '/tmp/x'"),
                     ("dir: 02_train", "steps 'train' and 'eval' both write to folder '02_train'"), ("dir: logs", "'logs' is reserved")]:
        (fake/"bad_dir.yaml").write_text(RECIPE.replace('model: "{root}/{run}/02_train"}', 'model: "{root}/{run}/02_train"}\n    ' + bad))
        with pytest.raises(RecipeError, match=re.escape(msg)): load_recipe(fake/"bad_dir.yaml")
    (fake/"bad_name.yaml").write_text(RECIPE.replace("  eval:", "  ../eval:"))
    with pytest.raises(RecipeError, match=r"step name '../eval'"): load_recipe(fake/"bad_name.yaml")

def test_user_errors_are_one_line(fake, tmp_path, capsys):
    "Item 5: a file where a folder goes, an empty --steps, an unknown --flags value: one clear line, exit status 2."
    y = str(fake/"recipe.yaml")
    (tmp_path/"afile").write_text("x")
    for args, msg in [(["--root", str(tmp_path/"afile"), "--run", "r"], "afile is a file, not a folder"),
                      (["--root", str(tmp_path/"afile"/"sub"), "--run", "r"], "afile is a file, not a folder"),
                      (["--root", str(tmp_path/"runs"), "--run", "r", "--steps", ","], "--steps ',': no step"),
                      (["--root", str(tmp_path/"runs"), "--run", "r", "--flags", "gpu"], "--flags: unknown flag 'gpu'")]:
        rc, err = _cli_err(capsys, "--recipe", y, *args)
        assert rc == 2 and len(err) == 1 and err[0].startswith("anita-run: error: ") and msg in err[0], (args, err)
    (tmp_path/"runs"/"r").mkdir(parents=True); (tmp_path/"runs"/"r"/"02_train").write_text("not a folder")
    rc, err = _cli_err(capsys, "--recipe", y, "--root", str(tmp_path/"runs"), "--run", "r")
    assert rc == 2 and len(err) == 1 and "02_train is a file, not a folder" in err[0], err
    assert not (tmp_path/"runs"/"r"/"01_data").exists()          # checked before any step runs

def _snapshot(d):
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, p.stat().st_size) for p in Path(d).rglob("*")} if Path(d).exists() else {}

def test_dry_run_writes_nothing_and_tells_the_truth(reader, tmp_path):
    "Item 6: --dry-run creates nothing (not even the run folder or its lock) and predicts what the real run does."
    y, src = reader; rd = tmp_path/"runs"/"r"
    logs = []
    assert _runr(y, tmp_path, dry_run=True, log=logs.append) == dict(data="would run", train="would run", eval="would run")
    assert not (tmp_path/"runs").exists()
    with pytest.raises(StepError, match="needs step 'data' completed first"): _runr(y, tmp_path, dry_run=True, steps="train")
    _runr(y, tmp_path)
    def check(expect, **kw):
        snap = _snapshot(tmp_path/"runs")
        dry = _runr(y, tmp_path, dry_run=True, **kw)
        assert _snapshot(tmp_path/"runs") == snap
        assert dry == {k: "would run" if v == "ran" else v for k, v in expect.items()}, dry
        assert _runr(y, tmp_path, **kw) == expect
    check(dict(data="skipped", train="skipped", eval="skipped"))
    (rd/"02_train/manifest.json").write_text('{"step": "02_tr')          # truncated: train reruns, so does eval
    check(dict(data="skipped", train="ran", eval="ran"))
    src.write_text("x\n")                                               # a changed input: its step and the ones after
    check(dict(data="ran", train="ran", eval="ran"))
    src.write_text("y\nz\n")
    check(dict(data="ran", eval="skipped"), steps="data,eval")          # eval reads train's outputs, unchanged
    check(dict(data="skipped", train="ran", eval="ran"))
    check(dict(train="ran"), steps="train", force=True)

def test_manifest_records_the_anita_commit(fake, tmp_path):
    "Item 7: git_commit is the commit of the anita source in use (with -dirty), even with --root outside the repository."
    from anita.core import git_commit
    want = git_commit(ROOT)
    if want is None: pytest.skip("the anita source is not a git checkout")
    _run(fake, tmp_path, steps="data")
    assert not str(tmp_path).startswith(str(ROOT))
    assert read_json(tmp_path/"runs/r/01_data/manifest.json")["git_commit"] == want

@pytest.mark.parametrize("value,msg", [("sft.max_steps=-5", "--set sft.max_steps: must be -1 (whole epochs) or >= 1, got -5"),
                                       ("sft.max_steps=0", "--set sft.max_steps: must be -1"),
                                       ("sft.lr=-1", "--set sft.lr: must be > 0, got -1"),
                                       ("dpo.beta=0", "--set dpo.beta: must be > 0"),
                                       ("data.n_ita=0", "--set data.n_ita: must be >= 1, got 0"),
                                       ("sft.batch_size=0", "--set sft.batch_size: must be >= 1")])
def test_set_ranges(tmp_path, capsys, value, msg):
    "Item 8: out-of-range values are one error line and exit status 2, before anything runs."
    rc, err = _cli_err(capsys, "--recipe", "tiny", "--nbs-dir", str(ROOT/"nbs"), "--root", str(tmp_path/"runs"), "--run", "r", "--dry-run", "--set", value)
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"anita-run: error: {msg}"), err
    assert not (tmp_path/"runs").exists()

def test_recipe_ranges(tmp_path):
    "Item 8: the same rules hold for the recipe's own values; the shipped ones and -1 / None pass."
    r = apply_sets(load_recipe("tiny", ROOT/"nbs"), ["sft.max_steps=-1", "sft.n_train=null", "sft.lr=2e-4"])
    check_recipe_params(r, list(r["steps"]))
    r["steps"]["dpo"]["params"]["lr"] = 0.0
    with pytest.raises(RecipeError, match=r"tiny.yaml: dpo.lr: must be > 0, got 0.0"): check_recipe_params(r, ["dpo"])

def test_set_paths_from_the_callers_folder(reader, tmp_path, monkeypatch, capsys):
    "Item 11: a relative --set path is taken from where anita-run was typed, and the manifest records it absolute."
    y, src = reader
    monkeypatch.chdir(tmp_path)
    rc, err = _cli_err(capsys, "--recipe", str(y), "--root", "runs", "--run", "r", "--steps", "data", "--set", f"data.src={src.name}")
    assert rc == 0, err
    m = read_json(tmp_path/"runs/r/01_data/manifest.json")
    assert m["params"]["src"] == str(src) and read_json(tmp_path/"runs/r/01_data/report.json")["rows"] == 5
    r = apply_sets(load_recipe(y), ["train.data_dir={root}/{run}/01_data", "eval.model=owner/name"])
    assert r["steps"]["train"]["params"]["data_dir"] == "{root}/{run}/01_data" and r["steps"]["eval"]["params"]["model"] == "owner/name"

def test_step_notebooks_write_only_their_own_folder():
    "Item 10: the cells the pipeline runs in a step notebook (test cells too) write no folder but the step's own into the run."
    import ast
    from anita.runner import FLAGGED_CELL
    rec = load_recipe("tiny", ROOT/"nbs")
    for st in rec["steps"].values():
        nb = json.loads((ROOT/"nbs"/st["notebook"]).read_text(encoding="utf-8"))
        for c in nb["cells"]:
            src = "".join(c["source"])
            if c["cell_type"] != "code" or FLAGGED_CELL.search(src): continue   # flagged cells are left out of pipeline runs
            for m in re.finditer(r"run_dir\(\s*run\s*,\s*([^,)]+)", src):
                assert ast.literal_eval(m.group(1)) == st["dir"], f"{st['notebook']}: a cell writes {m.group(0)}... into the run folder"

# --- issue 14: the recipe owns the step folders ---

def test_renamed_folders_fake(fake, tmp_path):
    "A step renamed with `dir:` writes that folder (its notebook gets `step_dir`); `{steps.NAME}` follows it; a notebook without `step_dir` cannot be renamed."
    y = fake/"renamed.yaml"
    y.write_text(RECIPE.replace("notebook: 01_data.ipynb", "notebook: 01_read.ipynb\n    dir: rows").replace("params: {n: 3}", f"params: {{src: {fake/'recipe.yaml'}}}")
                 .replace('"{root}/{run}/01_data"', '"{steps.data}"').replace('"{root}/{run}/02_train"', '"{steps.train}"'))
    fake_nb(fake/"01_read.ipynb", 'run = "nbtest"\nroot = "runs"\nstep_dir = None\nsrc = None', '''
        from pathlib import Path
        from anita.core import run_dir, step_manifest, write_json
        sd = Path(step_dir) if step_dir else run_dir(run, "01_read", root)
        with step_manifest(sd, "01_read", dict(src=src)) as outs:
            outs.append(write_json(sd/"report.json", dict(rows=len(Path(src).read_text().splitlines()))))''')
    rd = tmp_path/"runs"/"r"
    assert _runr(y, tmp_path) == dict(data="ran", train="ran", eval="ran")
    assert sorted(p.name for p in rd.iterdir() if p.is_dir()) == ["02_train", "03_eval", "logs", "rows"]
    assert read_json(rd/"02_train/report.json")["rows"] == len((fake/"recipe.yaml").read_text().splitlines())
    assert "[rows.ipynb](rows.ipynb)" in (rd/"report.md").read_text()
    assert _runr(y, tmp_path) == dict(data="skipped", train="skipped", eval="skipped")
    # the same folder named the old way is the same input: nothing reruns
    assert _runr(y, tmp_path, sets=[f"train.data_dir={{root}}/{{run}}/rows"]) == dict(data="skipped", train="skipped", eval="skipped")
    (fake/"renamed_train.yaml").write_text(y.read_text().replace("notebook: 02_train.ipynb", "notebook: 02_train.ipynb\n    dir: trained"))
    with pytest.raises(RecipeError, match="02_train.ipynb has no `step_dir` parameter, so it cannot be given folder 'trained'"):
        _runr(fake/"renamed_train.yaml", tmp_path)
    (fake/"bad_ref.yaml").write_text(y.read_text().replace("{steps.train}", "{steps.trian}"))
    with pytest.raises(RecipeError, match=r"step 'eval': \{steps.trian\} names no step"): load_recipe(fake/"bad_ref.yaml")

def test_no_step_folder_names_in_the_recipes():
    "The shipped recipes chain their steps with `{steps.NAME}`, never with a folder name."
    for name in ("tiny", "paper"):
        text = (ROOT/"anita"/"recipes"/f"{name}.yaml").read_text()
        assert not re.search(r"\{run\}/\d\d_", text), name
        assert "{steps.sft}/merged" in text and "{steps.data}" in text

def _tree(d:Path) -> dict:
    "`{path: (size, mtime_ns)}` of every file under `d`, hidden ones too."
    return {str(f.relative_to(d)): (f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(d.rglob("*")) if f.is_file()}

RENAMED = dict(data="prepared", sft="tuned", dpo="aligned", ita="italian", eval="scores", export="gguf")

@pytest.mark.timeout(3600)   # six real steps: about 5 minutes on an idle 2-core CPU
def test_every_step_folder_renamed_real_steps(tmp_path):
    """The tiny recipe (real notebooks, sizes shrunk) with every step's folder renamed by `dir:`: the run completes, each step
    reads the ones before it from their new folders, and the evaluation (models ordered by the chain of step manifests,
    not by folder names) and its held-out figures reach the report and `compare`. No step writes into another step's folder,
    and a second run right after skips all six steps and changes no step folder (issue 21, item 1)."""
    import yaml
    from anita.eval_paper import compare
    tiny = yaml.safe_load((ROOT/"anita"/"recipes"/"tiny.yaml").read_text())
    assert list(tiny["steps"]) == list(RENAMED)
    for n, d in RENAMED.items(): tiny["steps"][n]["dir"] = d
    tiny["steps"]["eval"]["params"]["models"] = {"ita": "{steps.ita}/merged", "base": "embedded"}   # 2 of the 4 (time)
    tiny["nbs_dir"] = str(ROOT/"nbs")
    (tmp_path/"renamed.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False))
    sizes = [f"data.n_heldout_{k}=4" for k in ("sft", "dpo", "ita", "en")]
    sizes += [f"{s}.{k}={v}" for s in ("sft", "dpo", "ita") for k, v in (("max_steps", 2), ("save_steps", 2), ("gen_max_new_tokens", 4))]
    sizes += ["eval.suite=anita_mc_en", "eval.limit=4", "eval.heldout_max_length=64", "eval.gen_max_new_tokens=4",
              "export.types=[f16]", "export.max_new_tokens=4", "export.llama_cpp_check=false"]
    rd, snaps = tmp_path/"runs"/"r", {}
    def snap(line):   # each step's folder as it was when the step completed: later steps must leave it alone
        if m := re.match(r"\[\d+/\d+\] (\w+) .*: completed in ", line): snaps[m.group(1)] = _tree(rd/RENAMED[m.group(1)])
    assert run_recipe(tmp_path/"renamed.yaml", run="r", root=tmp_path/"runs", sets=sizes, progress=False, log=snap) == \
        {n: "ran" for n in RENAMED}
    assert list(snaps) == list(RENAMED)
    for n, d in RENAMED.items(): assert _tree(rd/d) == snaps[n], f"{d} changed after its step completed"
    assert sorted(p.name for p in rd.iterdir() if p.is_dir()) == sorted([*RENAMED.values(), "logs"])
    for d in RENAMED.values(): assert read_json(rd/d/"manifest.json")["status"] == "completed", d
    assert read_json(rd/"tuned/manifest.json")["params"]["data_dir"] == str(rd/"prepared")
    assert read_json(rd/"aligned/manifest.json")["params"]["model"] == str(rd/"tuned"/"merged")
    assert read_json(rd/"italian/manifest.json")["params"]["model"] == str(rd/"aligned"/"merged")
    res = read_json(rd/"scores"/"results.json")
    assert {n: m["steps_from_base"] for n, m in res["models"].items()} == dict(ita=3, base=None)   # ita <- dpo <- sft <- base
    assert res["params"]["heldout"] == str(rd/"prepared"/"heldout")
    held = (rd/"scores"/"heldout.md").read_text()
    assert "| figure | n | base | ita | step's change |" in held and "ita − base" in held   # recipe order, not the mapping's
    assert (rd/"gguf"/"anita-F16.gguf").stat().st_size > 0 and read_json(rd/"gguf"/"report.json")["passed"]
    rep = (rd/"report.md").read_text()
    assert "## Evaluation" in rep and "### eval" in rep and "anita_mc_en" in rep and "![eval chart](scores/chart.png)" in rep
    # issue 21, item 1: a second run right after skips every step, in seconds, and changes no step folder
    t0, logs = time.time(), []
    assert run_recipe(tmp_path/"renamed.yaml", run="r", root=tmp_path/"runs", sets=sizes, progress=False, log=logs.append) == \
        {n: "skipped" for n in RENAMED}
    print(f"second run of the six real steps: {time.time()-t0:.1f}s")
    assert sum(": done, skipped" in s for s in logs) == 6, logs
    for n, d in RENAMED.items(): assert _tree(rd/d) == snaps[n], f"{d} changed by the second run"
    assert held.strip().splitlines()[0] in rep and "## Export checks" in rep and "[scores.ipynb](scores.ipynb)" in rep
    assert list(compare(rd, paper=False).columns) == ["base", "ita"]   # the run's folder: its results found, whatever their folder
