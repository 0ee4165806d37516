"""The Slurm scripts: syntax, shellcheck, and the submitted job chain / command lines, with fake sbatch, srun, scontrol,
sinfo, squeue and accelerate: what a real single node cannot show (GPUs, several nodes, a partition's limits).
tests/test_slurm_real.py runs the tiny recipe on a real single-node Slurm."""
import json, os, shutil, subprocess, sys, textwrap
from pathlib import Path
import pytest
from anita.core import read_json

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT/"slurm"
SCRIPTS = sorted(SLURM.glob("*.sh")) + sorted(SLURM.glob("*.sbatch"))

def test_scripts_present():
    names = {p.name for p in SCRIPTS}
    assert {"env.sh", "submit.sh", "step.sbatch", "eval_array.sbatch", "train_multinode.sbatch", "report.sbatch", "prefetch.sbatch"} <= names
    for p in SLURM.glob("*.sbatch"):
        head = p.read_text()
        for opt in ("--time=", "--output=", "--requeue", "--job-name=", "--open-mode=append"): assert f"#SBATCH {opt}" in head, (p.name, opt)
        out = next(l for l in head.splitlines() if l.startswith("#SBATCH --output="))
        # a hand-submitted job logs into runs/, which every checkout has (tracked runs/.gitignore)
        assert out.startswith("#SBATCH --output=runs/"), out
    assert subprocess.run(["git", "ls-files", "--error-unmatch", "runs/.gitignore"], cwd=ROOT, capture_output=True).returncode == 0 \
        or not (ROOT/".git").exists()
    # a CPU job asks for no GPU: only the multi-node training script (GPU-only by nature) names GPUs in its header
    for n in ("step.sbatch", "eval_array.sbatch", "report.sbatch", "prefetch.sbatch"):
        assert "--gpus" not in "".join(l for l in (SLURM/n).read_text().splitlines(True) if l.startswith("#SBATCH")), n

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
"$FAKE_PY" -c 'import json,os,sys; print(json.dumps(dict(cmd="sbatch", args=sys.argv[1:], env={k: os.environ.get(k) for k in ("STEP","RECIPE","RUN","ROOT","ANITA_SETS","ANITA_FORCE","ANITA_OFFLINE","ANITA_REPO")})))' "$@" >> "$FAKE_LOG"
echo "$n"
''',
    # records; runs `bash -c ...` (the multi-node launcher) as node 0 so the fake accelerate sees the command line
    "srun": '''#!/bin/bash
"$FAKE_PY" -c 'import json,os,sys; print(json.dumps(dict(cmd="srun", args=sys.argv[1:], env={k: os.environ.get(k) for k in ("HF_HOME","HF_HUB_OFFLINE","HF_TOKEN")})))' "$@" >> "$FAKE_LOG"
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
if [ "${1:-}" = bash ]; then SLURM_NODEID=0 "$@"; fi
''',
    "scontrol": '''#!/bin/bash
"$FAKE_PY" -c 'import json,sys; print(json.dumps(dict(cmd="scontrol", args=sys.argv[1:])))' "$@" >> "$FAKE_LOG"
[ "$1 $2" = "show hostnames" ] && printf 'gpu-node-%s\\n' 7 8
exit 0
''',
    # a partition of 2 nodes with 32 CPUs and 8 H100s each (FAKE_SINFO replaces the output)
    "sinfo": '''#!/bin/bash
if [ -n "${FAKE_SINFO:-}" ]; then printf '%s\\n' "$FAKE_SINFO"; exit 0; fi
printf '%s\\n' 'gpu*|32|gpu:h100:8(S:0-1)|2-00:00:00|idle' 'gpu*|32|gpu:h100:8(S:0-1)|2-00:00:00|mixed'
''',
    # this user's queue (FAKE_SQUEUE: lines "id|name|state|comment")
    "squeue": '''#!/bin/bash
[ -n "${FAKE_SQUEUE:-}" ] && printf '%s\\n' "$FAKE_SQUEUE"
exit 0
''',
    "scancel": '''#!/bin/bash
"$FAKE_PY" -c 'import json,sys; print(json.dumps(dict(cmd="scancel", args=sys.argv[1:])))' "$@" >> "$FAKE_LOG"
''',
    "torchrun": '''#!/bin/bash
"$FAKE_PY" -c 'import json,os,sys; print(json.dumps(dict(cmd="torchrun", args=sys.argv[1:], env={k: os.environ.get(k) for k in ("OMP_NUM_THREADS",)})))' "$@" >> "$FAKE_LOG"
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
    for k in ("PARTITION", "ACCOUNT", "QOS", "TIME", "GPUS", "CPUS", "MEM", "SBATCH_EXTRA", "ANITA_ARGS", "ANITA_SETS", "ANITA_FORCE",
              "HF_HUB_OFFLINE", "ANITA_OFFLINE", "ANITA_SIGNAL_S", "SLURM_RESTART_COUNT", "FAKE_SINFO", "FAKE_SQUEUE"):
        env.pop(k, None)
    def calls(): return [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
    return env, calls

def _opt(args, name):
    "The value of `--name=value` in an argument list (None when absent)."
    return next((a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")), None)

def test_submit_chain_paper(fake_slurm, tmp_path):
    env, calls = fake_slurm
    r = subprocess.run(["bash", str(SLURM/"submit.sh"), "paper", "p1"], env={**env, "PARTITION": "boost_usr_prod",
                       "ACCOUNT": "proj42", "FAKE_SINFO": "boost_usr_prod|32|gpu:4|2-00:00:00|idle"}, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:8] == ["prefetch 1001", "data 1002", "sft 1003", "dpo 1004", "ita 1005", "eval 1006", "export 1007",
                         "report 1008"], r.stdout
    c = calls()
    assert [x["cmd"] for x in c] == ["sbatch"]*8
    assert [x["env"]["STEP"] for x in c[:7]] == ["prefetch", "data", "sft", "dpo", "ita", "eval", "export"]
    assert all(x["env"]["RECIPE"] == str(ROOT/"anita"/"recipes"/"paper.yaml") and x["env"]["RUN"] == "p1" for x in c)
    # the prefetch job and the data step (it streams the Italian corpus) run online, the others offline
    assert [x["env"]["ANITA_OFFLINE"] for x in c] == ["0", "0", "1", "1", "1", "1", "1", "1"]
    # the chain: each job after the previous one succeeded (cancelled when it failed), the report after all of them
    assert [_opt(x["args"], "dependency") for x in c] == [None, "afterok:1001", "afterok:1002", "afterok:1003", "afterok:1004",
                                                         "afterok:1005", "afterok:1006", "afterany:1001:1002:1003:1004:1005:1006:1007"]
    assert [_opt(x["args"], "kill-on-invalid-dep") for x in c] == [None] + ["yes"]*6 + [None]
    scripts = [Path(x["args"][-1]).name for x in c]
    assert scripts == ["prefetch.sbatch"] + ["step.sbatch"]*4 + ["eval_array.sbatch", "step.sbatch", "report.sbatch"]
    assert _opt(c[5]["args"], "array") == "0-1" and "%A_%a" in _opt(c[5]["args"], "output")
    assert [_opt(x["args"], "time") for x in c[1:7]] == ["08:00:00", "48:00:00", "48:00:00", "48:00:00", "12:00:00", "04:00:00"]
    for x in c:
        assert "--requeue" in x["args"] and "--parsable" in x["args"] and _opt(x["args"], "open-mode") == "append"
        assert _opt(x["args"], "partition") == "boost_usr_prod" and _opt(x["args"], "account") == "proj42"
        assert _opt(x["args"], "output").startswith(str(tmp_path/"runs"/"p1"/"logs"))
        assert _opt(x["args"], "comment") == f"anita:{tmp_path/'runs'/'p1'}"
    # the step jobs requeue themselves before their time limit
    assert [_opt(x["args"], "signal") for x in c] == [None] + ["B:USR1@120"]*6 + [None]
    assert _opt(c[2]["args"], "gpus-per-node") == "1" and _opt(c[2]["args"], "cpus-per-task") == "16"
    assert _opt(c[2]["args"], "job-name") == "anita-p1-sft"
    assert _opt(c[0]["args"], "gpus-per-node") is None                 # the prefetch job needs no GPU
    assert (tmp_path/"runs"/"p1"/"logs").is_dir()

def test_submit_checks_resources_against_partition(fake_slurm, tmp_path):
    "A request no node can satisfy (it would pend forever with PartitionConfig) is refused before anything is submitted."
    env, calls = fake_slurm
    small = {**env, "FAKE_SINFO": "debug*|2|(null)|infinite|idle"}
    r = subprocess.run(["bash", str(SLURM/"submit.sh"), "paper", "p1"], env=small, capture_output=True, text=True)
    assert r.returncode == 1 and "step 'data' asks for 16 CPUs per task but the nodes of partition 'debug' have at most 2" in r.stderr, r.stderr
    assert "set CPUS=2" in r.stderr and calls() == []
    r = subprocess.run(["bash", str(SLURM/"submit.sh"), "paper", "p1"], env={**small, "CPUS": "2"}, capture_output=True, text=True)
    assert r.returncode == 1 and "1 GPUs per node but the nodes of partition 'debug' have none: set GPUS=0" in r.stderr, r.stderr
    r = subprocess.run(["bash", str(SLURM/"submit.sh"), "paper", "p1"], capture_output=True, text=True,
                       env={**env, "FAKE_SINFO": "gpu*|32|gpu:h100:8|1-00:00:00|idle"})
    assert r.returncode == 1 and "--time=48:00:00 but partition 'gpu' allows at most 1440 minutes: set TIME" in r.stderr, r.stderr
    # the CPU tiny recipe asks for no GPU and fits a 2-CPU node
    r = subprocess.run(["bash", str(SLURM/"submit.sh"), "tiny", "t1"], env=small, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    c = calls()
    assert [x["env"]["STEP"] for x in c] == ["data", "sft", "dpo", "ita", "eval", "export", "report"]   # nothing to prefetch
    assert not any(a.startswith("--gpus") for x in c for a in x["args"])
    assert [x["env"]["ANITA_OFFLINE"] for x in c] == ["1"]*7

def test_submit_validates_and_passes_set_steps(fake_slurm, tmp_path):
    "--set and --steps are validated as in a local run and reach the jobs; a bad one submits nothing."
    env, calls = fake_slurm
    from anita.pipeline import main
    old = dict(os.environ)
    try:
        os.environ.update({k: v for k, v in env.items() if k in ("PATH", "FAKE_LOG", "FAKE_PY", "ANITA_REPO", "ANITA_VENV")})
        assert main(["--recipe", "tiny", "--run", "s", "--root", str(tmp_path/"runs"), "--slurm", "--set", "sft.lr=abc"]) == 2
        assert main(["--recipe", "tiny", "--run", "s", "--root", str(tmp_path/"runs"), "--slurm", "--set", "nosuchstep.x=1"]) == 2
        assert main(["--recipe", "tiny", "--run", "s", "--root", str(tmp_path/"runs"), "--slurm", "--steps", "sft,nope"]) == 2
        assert main(["--recipe", "tiny", "--run", "s", "--root", str(tmp_path/"runs"), "--slurm", "--steps", "dpo"]) == 2  # sft not done
        assert calls() == []
        assert main(["--recipe", "tiny", "--run", "s", "--root", str(tmp_path/"runs"), "--slurm", "--steps", "data,sft",
                     "--set", "sft.max_steps=3", "--set", "sft.model=/models/my model", "--force"]) == 0
    finally:
        os.environ.clear(); os.environ.update(old)
    c = calls()
    assert [x["env"]["STEP"] for x in c] == ["data", "sft", "report"]
    assert c[0]["env"]["ANITA_SETS"] == "sft.max_steps=3\nsft.model=/models/my model" and c[0]["env"]["ANITA_FORCE"] == "1"

def test_resubmit_refused_while_queued(fake_slurm, tmp_path):
    env, calls = fake_slurm
    rd = tmp_path/"runs"/"t1"
    q = {**env, "FAKE_SINFO": "debug*|2|(null)|infinite|idle",
         "FAKE_SQUEUE": f"41|anita-t1-sft|PENDING|anita:{rd}\n40|anita-t1-data|RUNNING|anita:{rd}\n39|other|RUNNING|anita:{tmp_path}/runs/t2"}
    r = subprocess.run(["bash", str(SLURM/"submit.sh"), "tiny", "t1"], env=q, capture_output=True, text=True)
    assert r.returncode == 1 and "already has a chain in the queue" in r.stderr and "scancel 41 40" in r.stderr, r.stderr
    assert calls() == []
    r = subprocess.run(["bash", str(SLURM/"submit.sh"), "tiny", "t1", "--replace"], env=q, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    c = calls()
    assert c[0] == dict(cmd="scancel", args=["41", "40"]) and [x["cmd"] for x in c[1:]] == ["sbatch"]*7

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
    # `anita-run --slurm` submits the same chain
    from anita.pipeline import main
    old = dict(os.environ)
    try:
        os.environ.update({k: v for k, v in env.items() if k in ("PATH", "FAKE_LOG", "FAKE_PY", "ANITA_REPO", "ANITA_VENV")})
        assert main(["--recipe", "paper", "--run", "p2", "--root", str(tmp_path/"runs"), "--slurm"]) == 0
    finally:
        os.environ.clear(); os.environ.update(old)
    assert len(calls()) == 3 + 8   # prefetch, data, sft, dpo, ita, eval, export, report

def test_step_job_command_line(fake_slurm, tmp_path):
    env, calls = fake_slurm
    rd = tmp_path/"runs"/"p1"; rd.mkdir(parents=True)
    (rd/"prefetch.json").write_text('{"status": "completed", "items": []}')     # the prefetch job ran: offline
    r = subprocess.run(["bash", str(SLURM/"step.sbatch")], capture_output=True, text=True,
                       env={**env, "STEP": "sft", "RECIPE": "paper", "RUN": "p1", "SLURM_JOB_ID": "77",
                            "ANITA_ARGS": "--flags cuda", "ANITA_SETS": "sft.max_steps=20\nsft.gen_prompts=['a b']",
                            "ANITA_FORCE": "1", "HF_TOKEN": "hf_SECRETTOKEN123"})
    assert r.returncode == 0, r.stderr
    (c,) = calls()
    assert c["args"] == ["--kill-on-bad-exit=1", "python", "-m", "anita.pipeline", "--recipe", "paper", "--run", "p1",
                         "--root", str(tmp_path/"runs"), "--steps", "sft", "--no-progress", "--set", "sft.max_steps=20",
                         "--set", "sft.gen_prompts=['a b']", "--force", "--flags", "cuda"]
    assert c["env"]["HF_HUB_OFFLINE"] == "1" and c["env"]["HF_HOME"] == str(tmp_path/"hf")
    assert "SECRETTOKEN" not in r.stdout + r.stderr and "token=set" in r.stdout and "offline=1" in r.stdout
    assert (tmp_path/"runs"/"p1"/"logs").is_dir()
    # after a requeue the job resumes: no --force
    r = subprocess.run(["bash", str(SLURM/"step.sbatch")], capture_output=True, text=True,
                       env={**env, "STEP": "sft", "RECIPE": "paper", "RUN": "p1", "ANITA_FORCE": "1", "SLURM_RESTART_COUNT": "1"})
    assert r.returncode == 0 and "--force" not in calls()[-1]["args"] and "restarts=1" in r.stdout
    # no completed prefetch: online; a missing STEP is an error naming it
    r = subprocess.run(["bash", str(SLURM/"step.sbatch")], capture_output=True, text=True, env={**env, "STEP": "data"})
    assert r.returncode == 0 and calls()[-1]["env"]["HF_HUB_OFFLINE"] is None
    r = subprocess.run(["bash", str(SLURM/"step.sbatch")], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "STEP" in r.stderr
    # env.sh leaves HF_HOME and ANITA_CACHE alone: no .cache/ in the checkout, the embedded model converted once
    e = {k: v for k, v in env.items() if k not in ("HF_HOME", "ANITA_CACHE")}
    r = subprocess.run(["bash", "-c", '. slurm/env.sh; echo "HF_HOME=${HF_HOME:-unset} ANITA_CACHE=${ANITA_CACHE:-unset}"'],
                       capture_output=True, text=True, env=e, cwd=ROOT)
    assert "HF_HOME=unset ANITA_CACHE=unset" in r.stdout, r.stdout + r.stderr

def test_prefetch_job_command_line(fake_slurm, tmp_path):
    env, calls = fake_slurm
    b = Path(env["PATH"].split(":")[0])
    (b/"python").write_text('#!/bin/bash\n"$FAKE_PY" -c \'import json,os,sys; print(json.dumps(dict(cmd="python", args=sys.argv[1:], '
                            'offline=os.environ.get("HF_HUB_OFFLINE"))))\' "$@" >> "$FAKE_LOG"\n'); (b/"python").chmod(0o755)
    r = subprocess.run(["bash", str(SLURM/"prefetch.sbatch")], capture_output=True, text=True,
                       env={**env, "RECIPE": "paper", "RUN": "p1", "ANITA_OFFLINE": "1", "ANITA_PREFETCH_STEPS": "data,sft"})
    assert r.returncode == 0, r.stderr
    (c,) = calls()
    assert c["args"] == ["-m", "anita.slurm", "prefetch", "--recipe", "paper", "--run", "p1", "--root", str(tmp_path/"runs"),
                         "--steps", "data,sft"] and c["offline"] is None       # the prefetch job is always online

def test_prefetch_list_cli():
    r = subprocess.run([sys.executable, "-m", "anita.slurm", "prefetch", "--recipe", "paper", "--list"], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    rows = [l.split("\t") for l in r.stdout.splitlines()]
    assert ["model", "meta-llama/Meta-Llama-3-8B-Instruct", "data.model"] in rows
    assert ["dataset", "mlabonne/orpo-dpo-mix-40k", "data.dpo_source"] in rows
    assert ["lm-eval", "m_mmlu_it", "eval.suite"] in rows and ["stream", "gsarti/clean_mc4_it", "data.ita_source"] in rows

def test_time_limit_signal_requeues(fake_slurm, tmp_path):
    "Near the time limit Slurm sends USR1 to the batch shell (--signal=B:USR1@...): the job requeues itself with scontrol."
    import signal, time
    env, calls = fake_slurm
    b = Path(env["PATH"].split(":")[0])
    (b/"srun").write_text('#!/bin/bash\necho $$ > "$FAKE_DIR/srun.pid"\nexec sleep 30\n')
    # as Slurm does on `scontrol requeue`: the running step is stopped
    (b/"scontrol").write_text('#!/bin/bash\n"$FAKE_PY" -c \'import json,sys; print(json.dumps(dict(cmd="scontrol", args=sys.argv[1:])))\' '
                              '"$@" >> "$FAKE_LOG"\nkill "$(cat "$FAKE_DIR/srun.pid")"\n')
    t0 = time.time()
    p = subprocess.Popen(["bash", str(SLURM/"step.sbatch")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**env, "STEP": "sft", "RECIPE": "tiny", "RUN": "t", "SLURM_JOB_ID": "88", "FAKE_DIR": str(tmp_path)})
    for _ in range(200):
        if (tmp_path/"srun.pid").exists(): break
        time.sleep(0.1)
    p.send_signal(signal.SIGUSR1)
    out, err = p.communicate(timeout=60)
    assert [x["args"] for x in calls() if x["cmd"] == "scontrol"] == [["requeue", "88"]], (out, err)
    assert "near its time limit: requeueing it" in out and time.time() - t0 < 25

def test_eval_array_task_command_line(fake_slurm, tmp_path):
    env, calls = fake_slurm
    r = subprocess.run(["bash", str(SLURM/"eval_array.sbatch")], capture_output=True, text=True,
                       env={**env, "RECIPE": "paper", "RUN": "p1", "SLURM_ARRAY_TASK_ID": "1"})
    assert r.returncode == 0, r.stderr
    a = calls()[0]["args"]
    assert a[a.index("--steps")+1] == "eval" and a[a.index("--shard")+1] == "1"

def test_procs_step_is_multiprocess(tmp_path):
    "A step with `procs` > 1 (processes per node) goes to the multi-process script with PROCS_PER_NODE set."
    from anita.recipe import load_recipe
    from anita.slurm import job_plan
    y = tmp_path/"p.yaml"
    y.write_text("name: p\nsteps:\n  data: {notebook: 01_data.ipynb}\n"
                 "  sft: {notebook: 02_sft.ipynb, slurm: {procs: 2, cpus: 2}}\n  dpo: {notebook: 03_dpo.ipynb}\n")
    jobs = {j["name"]: j for j in job_plan(load_recipe(y), "r", tmp_path, prefetch_job=False, env={})}
    sft = jobs["sft"]
    assert sft["script"] == "train_multinode.sbatch" and sft["env"]["PROCS_PER_NODE"] == "2", sft
    assert "--cpus-per-task=2" in sft["opts"] and not any(o.startswith("--procs") for o in sft["opts"])
    assert "--nodes=1" in sft["opts"]          # not the script's own default of 2 nodes
    assert jobs["dpo"]["script"] == "step.sbatch" and "PROCS_PER_NODE" not in jobs["dpo"]["env"]

def test_multinode_torchrun_command_line(fake_slurm, tmp_path):
    env, calls = fake_slurm
    r = subprocess.run(["bash", str(SLURM/"train_multinode.sbatch")], capture_output=True, text=True,
                       env={**env, "STEP": "sft", "RECIPE": "paper", "RUN": "p1", "SLURM_JOB_NODELIST": "gpu-node-[7-8]",
                            "SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "h100:4", "SLURM_CPUS_PER_TASK": "32",
                            "SLURM_JOB_ID": "1234", "ANITA_SETS": "sft.model=/m/my model"})
    assert r.returncode == 0, r.stderr
    srun, tr = [x for x in calls() if x["cmd"] != "scontrol"]
    assert srun["cmd"] == "srun" and "--ntasks-per-node=1" in srun["args"]
    assert tr["cmd"] == "torchrun" and tr["env"]["OMP_NUM_THREADS"] == "8"     # 32 CPUs shared by 4 processes
    a = tr["args"]
    for k, v in {"--nnodes": "2", "--nproc_per_node": "4", "--node_rank": "0", "--master_addr": "gpu-node-7",
                 "--master_port": "21234", "--steps": "sft", "--recipe": "paper"}.items():
        assert a[a.index(k)+1] == v, (k, a)
    assert a[a.index("-m")+1] == "anita.pipeline"
    assert a[-2:] == ["--set", "sft.model=/m/my model"]      # --set values with spaces reach every node intact
    # one CPU node, 2 processes (PROCS_PER_NODE, from the recipe's `procs`): the rendezvous is local
    r = subprocess.run(["bash", str(SLURM/"train_multinode.sbatch")], capture_output=True, text=True,
                       env={**env, "STEP": "sft", "RECIPE": "tiny", "RUN": "c1", "SLURM_JOB_NODELIST": "gpu-node-7",
                            "SLURM_NNODES": "1", "PROCS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "2"})
    assert r.returncode == 0, r.stderr
    tr = [x for x in calls() if x["cmd"] == "torchrun"][-1]
    assert tr["args"][tr["args"].index("--master_addr")+1] == "127.0.0.1" and tr["env"]["OMP_NUM_THREADS"] == "1"
    assert tr["args"][tr["args"].index("--nproc_per_node")+1] == "2"
    # neither GPUs nor PROCS_PER_NODE: refused, not a job that trains nothing
    r = subprocess.run(["bash", str(SLURM/"train_multinode.sbatch")], capture_output=True, text=True,
                       env={**env, "STEP": "sft", "RECIPE": "tiny", "RUN": "c2", "SLURM_JOB_NODELIST": "gpu-node-7"})
    assert r.returncode == 2 and "how many processes per node" in r.stderr

def test_array_shards_run_and_gather(tmp_path):
    "What the array tasks run: each shard executes the step's notebook with its value into its own folder; the report job gathers them."
    from test_pipeline import fake_nb
    from anita.runner import run_recipe
    from anita.runstate import gather_shards
    from anita.recipe import load_recipe
    from anita.report import write_report
    d = tmp_path/"nbs"; d.mkdir()
    fake_nb(d/"05_eval.ipynb", 'run = "nbtest"\nroot = "runs"\nsuite = "local"', '''
        from anita.core import run_dir, step_manifest
        sd = run_dir(run, "05_eval", root)
        with step_manifest(sd, "05_eval", dict(suite=suite)) as outs:
            (sd/"table.md").write_text(f"| suite | score |\\n|---|---|\\n| {suite} | 0.5 |\\n"); outs.append(sd/"table.md")''')
    (d/"r.yaml").write_text("nbs_dir: .\nsteps:\n  eval:\n    notebook: 05_eval.ipynb\n"
                            "    shards: {param: suite, values: [paper_en, paper_it]}\n")
    rd = tmp_path/"runs"/"a"
    from anita.runstate import run_lock
    with run_lock(rd):      # the array's tasks run at once: a task holding the run's lock does not stop the other one
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
