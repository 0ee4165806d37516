"""Issue 21 (part A): run state that is safe at paper scale. A step's outputs are checked file by file against its
manifest, only the pipeline marks a step `completed` (after the notebook's last cell), an input edited in place is seen
even with its size and mtime kept, and a training step reads the data step's datasets without writing into its
folder."""
import json, os, signal, time
from pathlib import Path
import pytest
from anita.core import read_json, write_json
from anita.runner import run_recipe
from test_pipeline import fake, reader, fake_nb, _cli   # noqa: F401 (fixtures)

def _run(y, tmp_path, **kw):
    return run_recipe(y, run="r", root=tmp_path/"runs", progress=False, **{"log": lambda s: None, **kw})

def _same_size_edit(p:Path, text:str):
    "Rewrite `p` with `text` of the same size, then put its mtime back: only its content (and ctime) changed."
    st = p.stat()
    assert len(text.encode()) == st.st_size
    p.write_text(text)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (p.stat().st_size, p.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)

DS_RECIPE = "name: ds\nnbs_dir: .\nsteps:\n  data:\n    notebook: 01_ds.ipynb\n    params: {n: 3}\n"

@pytest.fixture
def ds(fake):
    "A one-step recipe whose step writes a folder output (`ds/`, like a `save_to_disk` dataset) and a file."
    fake_nb(fake/"01_ds.ipynb", 'run = "nbtest"\nroot = "runs"\nn = 2', '''
        from anita.core import run_dir, step_manifest, write_json
        sd = run_dir(run, "01_ds", root)
        with step_manifest(sd, "01_ds", dict(n=n)) as outs:
            (sd/"ds").mkdir(exist_ok=True)
            (sd/"ds"/"data-00000-of-00001.arrow").write_text("row\\n" * n)
            write_json(sd/"ds"/"state.json", dict(rows=n))
            outs += [sd/"ds", write_json(sd/"report.json", dict(rows=n))]''')
    (fake/"ds.yaml").write_text(DS_RECIPE)
    return fake/"ds.yaml"

def test_changed_outputs_are_rebuilt_naming_the_file(ds, tmp_path):
    "Item 2: a completed step whose files differ from its manifest (one deleted in a folder, one edited) reruns."
    sd = tmp_path/"runs"/"r"/"01_ds"
    assert _run(ds, tmp_path) == dict(data="ran")
    assert _run(ds, tmp_path) == dict(data="skipped")
    (sd/"ds"/"data-00000-of-00001.arrow").unlink()          # the folder `ds` is still there, one file of it is gone
    logs = []
    assert _run(ds, tmp_path, dry_run=True, log=logs.append) == dict(data="would run")
    assert "output ds/data-00000-of-00001.arrow is missing" in logs[-1], logs
    m = read_json(sd/"manifest.json")
    assert m["status"] == "completed"
    assert sorted(m["files"]) == ["ds/data-00000-of-00001.arrow", "ds/state.json", "report.json"]
    assert m["files"]["ds/data-00000-of-00001.arrow"][0] == 12
    assert _run(ds, tmp_path) == dict(data="ran")
    assert (sd/"ds"/"data-00000-of-00001.arrow").read_text() == "row\n" * 3
    assert _run(ds, tmp_path) == dict(data="skipped")
    _same_size_edit(sd/"ds"/"data-00000-of-00001.arrow", "ROW\n" * 3)   # damaged in place: same size, same mtime
    logs = []
    assert _run(ds, tmp_path, log=logs.append) == dict(data="ran")
    assert any("output ds/data-00000-of-00001.arrow changed (content hash)" in s for s in logs), logs
    assert (sd/"ds"/"data-00000-of-00001.arrow").read_text() == "row\n" * 3
    (sd/"report.json").write_text("{}")                       # another size
    logs = []
    assert _run(ds, tmp_path, dry_run=True, log=logs.append) == dict(data="would run")
    assert "output report.json changed (size 2, recorded" in logs[-1], logs
    assert _run(ds, tmp_path, force=True) == dict(data="ran")     # rebuilt beside the finished step, then swapped in
    cache = read_json(tmp_path/"runs"/"r"/".fingerprints.json")         # the hashes follow the files to their folder
    assert str(sd/"report.json") in cache and not any(".01_ds.new" in k for k in cache)
    assert _run(ds, tmp_path) == dict(data="skipped")

def test_input_edit_keeping_size_and_mtime_is_seen(reader, tmp_path):
    "Item 5: the file-hash cache is not fooled by an edit that keeps the file's size and modification time."
    y, src = reader
    assert _run(y, tmp_path) == dict(data="ran", train="ran", eval="ran")
    assert _run(y, tmp_path) == dict(data="skipped", train="skipped", eval="skipped")
    _same_size_edit(src, "a\nb\nc\ndee\n")                    # 5 rows -> 4 rows, same 10 bytes
    assert _run(y, tmp_path) == dict(data="ran", train="ran", eval="ran")
    assert read_json(tmp_path/"runs"/"r"/"02_train"/"report.json")["rows"] == 4

KILLER = '''
import os, signal
from pathlib import Path
marker = sd/".killed"                   # in the step's own folder: not an input of the step
if not marker.exists():                 # after the outputs are written, before the notebook's last cell: anita-run dies
    marker.touch()
    os.kill(os.getppid(), signal.SIGKILL); os.kill(os.getpid(), signal.SIGKILL)'''

def test_completed_only_after_the_last_cell(fake, tmp_path):
    "Item 3: anita-run killed after a notebook wrote its outputs, before its last cell ran, leaves a step not done."
    fake_nb(fake/"01_data.ipynb", 'run = "nbtest"\nroot = "runs"\nn = 2', '''
        from anita.core import run_dir, step_manifest, write_json
        sd = run_dir(run, "01_data", root)
        with step_manifest(sd, "01_data", dict(n=n)) as outs:
            outs.append(write_json(sd/"report.json", dict(rows=n, counts=dict(kept=n, dropped=0))))''', extra=[KILLER])
    rd = tmp_path/"runs"/"r"; marker = rd/"01_data"/".killed"
    p = _cli(fake, tmp_path, "--steps", "data")
    out = p.communicate(timeout=300)[0]
    assert p.returncode == -signal.SIGKILL and marker.exists(), out
    assert read_json(rd/"01_data"/"manifest.json")["status"] == "outputs-written"   # not `completed`
    assert read_json(rd/"pipeline.json")["steps"]["01_data"]["status"] == "running"
    logs = []
    assert _run(fake/"recipe.yaml", tmp_path, steps="data", log=logs.append) == dict(data="ran")
    assert "running (resuming after a failed or killed run)" in logs[0], logs
    m = read_json(rd/"01_data"/"manifest.json")
    assert m["status"] == "completed" and list(m["files"]) == ["report.json"] and m["pipeline"]["finished_at"]
    assert read_json(rd/"pipeline.json")["steps"]["01_data"]["status"] == "completed"
    assert _run(fake/"recipe.yaml", tmp_path, steps="data") == dict(data="skipped")

def test_a_notebook_that_reports_no_outputs_is_not_completed(fake, tmp_path):
    "Item 3: a notebook that ends without an `outputs-written` manifest is a failed step, not a completed one."
    fake_nb(fake/"01_data.ipynb", 'run = "nbtest"\nroot = "runs"\nn = 2', '''
        from anita.core import run_dir, write_json
        write_json(run_dir(run, "01_data", root)/"report.json", dict(rows=n))''')
    from anita.runner import StepError
    with pytest.raises(StepError, match="did not write an `outputs-written` manifest"):
        _run(fake/"recipe.yaml", tmp_path, steps="data")
    assert read_json(tmp_path/"runs"/"r"/"01_data"/"manifest.json")["status"] == "failed"

def test_training_data_is_read_without_writing_into_the_data_step(tmp_path):
    "Item 1: `load_step_data` loads the data step's dataset into memory: a `.map` (as TRL does) writes no cache there."
    from datasets import Dataset
    from anita.sft import load_step_data
    d = tmp_path/"01_data"
    Dataset.from_dict(dict(prompt=["a", "b"], chosen=["c", "d"], rejected=["e", "f"])).save_to_disk(str(d/"dpo"))
    write_json(d/"manifest.json", dict(status="completed", outputs=["dpo"]))
    before = sorted(p.name for p in (d/"dpo").iterdir())
    ds = load_step_data(d, "dpo", "embedded")
    ds = ds.map(lambda r: {"prompt": r["prompt"] + "!"}).filter(lambda r: r["chosen"] != "d")
    assert list(ds["prompt"]) == ["a!"] and sorted(p.name for p in (d/"dpo").iterdir()) == before
