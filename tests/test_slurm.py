"The Slurm scripts: syntax, shellcheck, and the submitted job chain / command lines, with fake sbatch, srun, scontrol and accelerate."
import json, os, shutil, subprocess, sys, textwrap
from pathlib import Path
import pytest
from anita.core import read_json

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT/"slurm"
SCRIPTS = sorted(SLURM.glob("*.sh")) + sorted(SLURM.glob("*.sbatch"))

def test_scripts_present():
    names = {p.name for p in SCRIPTS}
    assert {"env.sh", "submit.sh", "step.sbatch", "eval_array.sbatch", "train_multinode.sbatch", "report.sbatch"} <= names
    for p in SLURM.glob("*.sbatch"):
        head = p.read_text()
        for opt in ("--time=", "--output=", "--requeue", "--job-name="): assert f"#SBATCH {opt}" in head, (p.name, opt)

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    sc = shutil.which("shellcheck") or ("/usr/bin/shellcheck" if Path("/usr/bin/shellcheck").exists() else None)
    if not sc: pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    r = subprocess.run([sc, "-x", str(script.relative_to(ROOT))], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

FAKE = {
    # records its arguments and the variables a job would see, prints a job id like `sbatch --parsable`
    "sbatch": '''#!/bin/bash
n=$(( $(wc -l < "$FAKE_LOG" 2>/dev/null || echo 0) + 1001 ))
"$FAKE_PY" -c 'import json,os,sys; print(json.dumps(dict(cmd="sbatch", args=sys.argv[1:], env={k: os.environ.get(k) for k in ("STEP","RECIPE","RUN","ROOT")})))' "$@" >> "$FAKE_LOG"
echo "$n"
''',
    # records; runs `bash -c ...` (the multi-node launcher) as node 0 so the fake accelerate sees the command line
    "srun": '''#!/bin/bash
"$FAKE_PY" -c 'import json,os,sys; print(json.dumps(dict(cmd="srun", args=sys.argv[1:], env={k: os.environ.get(k) for k in ("HF_HOME","HF_HUB_OFFLINE","HF_TOKEN")})))' "$@" >> "$FAKE_LOG"
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
if [ "${1:-}" = bash ]; then SLURM_NODEID=0 "$@"; fi
''',
    "scontrol": '''#!/bin/bash
[ "$1 $2" = "show hostnames" ] && printf 'gpu-node-%s\\n' 7 8
''',
    "accelerate": '''#!/bin/bash
"$FAKE_PY" -c 'import json,sys; print(json.dumps(dict(cmd="accelerate", args=sys.argv[1:])))' "$@" >> "$FAKE_LOG"
''',
}

@pytest.fixture
def fake_slurm(tmp_path):
    b = tmp_path/"bin"; b.mkdir()
    for n, src in FAKE.items():
        (b/n).write_text(src); (b/n).chmod(0o755)
    log = tmp_path/"calls.jsonl"
    venv = tmp_path/"venv"/"bin"; venv.mkdir(parents=True); (venv/"activate").write_text("# fake venv\n")
    env = {"ANITA_VENV": str(venv.parent), **os.environ, "PATH": f"{b}:{os.environ['PATH']}", "FAKE_LOG": str(log), "FAKE_PY": sys.executable,
           "ROOT": str(tmp_path/"runs"), "ANITA_REPO": str(ROOT), "PYTHON": sys.executable, "HF_HOME": str(tmp_path/"hf")}
    for k in ("PARTITION", "ACCOUNT", "QOS", "TIME", "GPUS", "SBATCH_EXTRA", "ANITA_ARGS", "HF_HUB_OFFLINE", "ANITA_OFFLINE"):
        env.pop(k, None)
    def calls(): return [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
    return env, calls

def _opt(args, name):
    "The value of `--name=value` in an argument list (None when absent)."
    return next((a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")), None)

def test_submit_chain_paper(fake_slurm, tmp_path):
    env, calls = fake_slurm
    r = subprocess.run(["bash", str(SLURM/"submit.sh"), "paper", "p1"], env={**env, "PARTITION": "boost_usr_prod",
                       "ACCOUNT": "proj42"}, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:7] == ["data 1001", "sft 1002", "dpo 1003", "ita 1004", "eval 1005", "export 1006", "report 1007"], r.stdout
    c = calls()
    assert [x["cmd"] for x in c] == ["sbatch"]*7
    assert [x["env"]["STEP"] for x in c[:6]] == ["data", "sft", "dpo", "ita", "eval", "export"]
    assert all(x["env"]["RECIPE"] == "paper" and x["env"]["RUN"] == "p1" for x in c)
    # the chain: each job after the previous one succeeded, the report after the last whatever happened
    assert [_opt(x["args"], "dependency") for x in c] == [None, "afterok:1001", "afterok:1002", "afterok:1003",
                                                         "afterok:1004", "afterok:1005", "afterany:1006"]
    scripts = [Path(x["args"][-1]).name for x in c]
    assert scripts == ["step.sbatch"]*4 + ["eval_array.sbatch", "step.sbatch", "report.sbatch"]
    assert _opt(c[4]["args"], "array") == "0-1" and "%A_%a" in _opt(c[4]["args"], "output")
    assert [_opt(x["args"], "time") for x in c[:6]] == ["08:00:00", "48:00:00", "48:00:00", "48:00:00", "12:00:00", "04:00:00"]
    for x in c:
        assert "--requeue" in x["args"] and "--parsable" in x["args"]
        assert _opt(x["args"], "partition") == "boost_usr_prod" and _opt(x["args"], "account") == "proj42"
        assert _opt(x["args"], "output").startswith(str(tmp_path/"runs"/"p1"/"logs"))
    assert _opt(c[1]["args"], "gpus-per-node") == "1" and _opt(c[1]["args"], "job-name") == "anita-p1-sft"
    assert (tmp_path/"runs"/"p1"/"logs").is_dir()

def test_submit_multinode_step_and_cli(fake_slurm, tmp_path):
    env, calls = fake_slurm
    y = tmp_path/"big.yaml"
    y.write_text(textwrap.dedent('''\
        name: big
        slurm: {gpus: 4}
        steps:
          data: {notebook: 01_data.ipynb}
          sft: {notebook: 02_sft.ipynb, slurm: {nodes: 2, time: "72:00:00"}}
        '''))
    r = subprocess.run(["bash", str(SLURM/"submit.sh"), str(y), "big"], env={**env, "TIME": "01:00:00"},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    c = calls()
    assert Path(c[1]["args"][-1]).name == "train_multinode.sbatch" and _opt(c[1]["args"], "nodes") == "2"
    assert _opt(c[1]["args"], "time") == "01:00:00"                      # TIME overrides the recipe's value
    assert _opt(c[1]["args"], "gpus-per-node") == "4"
    # `anita-run --slurm` submits the same chain through submit.sh
    from anita.pipeline import main
    old = dict(os.environ)
    try:
        os.environ.update({k: v for k, v in env.items() if k in ("PATH", "FAKE_LOG", "FAKE_PY", "PYTHON", "ANITA_REPO")})
        assert main(["--recipe", "paper", "--run", "p2", "--root", str(tmp_path/"runs"), "--slurm"]) == 0
    finally:
        os.environ.clear(); os.environ.update(old)
    assert len(calls()) == 3 + 7

def test_step_job_command_line(fake_slurm, tmp_path):
    env, calls = fake_slurm
    (tmp_path/"hf"/"hub"/"models--meta-llama--Meta-Llama-3-8B-Instruct").mkdir(parents=True)   # a warm cache
    r = subprocess.run(["bash", str(SLURM/"step.sbatch")], capture_output=True, text=True,
                       env={**env, "STEP": "sft", "RECIPE": "paper", "RUN": "p1", "SLURM_JOB_ID": "77",
                            "ANITA_ARGS": "--set sft.max_steps=20", "HF_TOKEN": "hf_SECRETTOKEN123"})
    assert r.returncode == 0, r.stderr
    (c,) = calls()
    assert c["args"] == ["--kill-on-bad-exit=1", "python", "-m", "anita.pipeline", "--recipe", "paper", "--run", "p1",
                         "--root", str(tmp_path/"runs"), "--steps", "sft", "--no-progress", "--set", "sft.max_steps=20"]
    assert c["env"]["HF_HUB_OFFLINE"] == "1" and c["env"]["HF_HOME"] == str(tmp_path/"hf")
    assert "SECRETTOKEN" not in r.stdout + r.stderr and "token=set" in r.stdout and "offline=1" in r.stdout
    assert (tmp_path/"runs"/"p1"/"logs").is_dir()
    # a cold cache stays online; a missing STEP is an error naming it
    shutil.rmtree(tmp_path/"hf")
    r = subprocess.run(["bash", str(SLURM/"step.sbatch")], capture_output=True, text=True, env={**env, "STEP": "data"})
    assert r.returncode == 0 and calls()[-1]["env"]["HF_HUB_OFFLINE"] is None
    r = subprocess.run(["bash", str(SLURM/"step.sbatch")], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "STEP" in r.stderr

def test_eval_array_task_command_line(fake_slurm, tmp_path):
    env, calls = fake_slurm
    r = subprocess.run(["bash", str(SLURM/"eval_array.sbatch")], capture_output=True, text=True,
                       env={**env, "RECIPE": "paper", "RUN": "p1", "SLURM_ARRAY_TASK_ID": "1"})
    assert r.returncode == 0, r.stderr
    a = calls()[0]["args"]
    assert a[a.index("--steps")+1] == "eval" and a[a.index("--shard")+1] == "1"

def test_multinode_accelerate_command_line(fake_slurm, tmp_path):
    env, calls = fake_slurm
    r = subprocess.run(["bash", str(SLURM/"train_multinode.sbatch")], capture_output=True, text=True,
                       env={**env, "STEP": "sft", "RECIPE": "paper", "RUN": "p1", "SLURM_JOB_NODELIST": "gpu-node-[7-8]",
                            "SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "h100:4"})
    assert r.returncode == 0, r.stderr
    srun, acc = calls()
    assert srun["cmd"] == "srun" and "--ntasks-per-node=1" in srun["args"]
    assert acc["cmd"] == "accelerate"
    a = acc["args"]
    assert a[0] == "launch" and "--multi_gpu" in a
    for k, v in {"--num_machines": "2", "--num_processes": "8", "--machine_rank": "0", "--rdzv_backend": "c10d",
                 "--main_process_ip": "gpu-node-7", "--main_process_port": "29500", "--steps": "sft", "--recipe": "paper"}.items():
        assert a[a.index(k)+1] == v, (k, a)
    assert a[a.index("-m")+1] == "anita.pipeline"

def test_array_shards_run_and_gather(tmp_path):
    "What the array tasks run: each shard executes the step's notebook with its value into its own folder; the report job gathers them."
    from test_pipeline import fake_nb
    from anita.pipeline import run_recipe, gather_shards, load_recipe, write_report
    d = tmp_path/"nbs"; d.mkdir()
    fake_nb(d/"05_eval.ipynb", 'run = "nbtest"\nroot = "runs"\nsuite = "local"', '''
        from anita.core import run_dir, step_manifest
        sd = run_dir(run, "05_eval", root)
        with step_manifest(sd, "05_eval", dict(suite=suite)) as outs:
            (sd/"table.md").write_text(f"| suite | score |\\n|---|---|\\n| {suite} | 0.5 |\\n"); outs.append(sd/"table.md")''')
    (d/"r.yaml").write_text("nbs_dir: .\nsteps:\n  eval:\n    notebook: 05_eval.ipynb\n"
                            "    shards: {param: suite, values: [paper_en, paper_it]}\n")
    rd = tmp_path/"runs"/"a"
    for i in (0, 1):
        assert run_recipe(d/"r.yaml", run="a", root=tmp_path/"runs", steps="eval", shard=i, progress=False, log=lambda s: None) == {"eval": "ran"}
    assert read_json(rd/"05_eval/shards/01/a/05_eval/manifest.json")["params"] == {"suite": "paper_it"}
    assert (rd/"05_eval.shard00.ipynb").exists()
    assert run_recipe(d/"r.yaml", run="a", root=tmp_path/"runs", steps="eval", shard=1, progress=False, log=lambda s: None) == {"eval": "skipped"}
    rec = load_recipe(d/"r.yaml")
    assert gather_shards(rd, rec) == ["eval"]
    m = read_json(rd/"05_eval/manifest.json")
    assert m["status"] == "completed" and [s["value"] for s in m["shards"]] == ["paper_en", "paper_it"]
    rep = write_report(rd, rec).read_text()
    assert "| paper_en | 0.5 |" in rep and "| paper_it | 0.5 |" in rep
