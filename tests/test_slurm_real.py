"""The tiny recipe on a real single-node Slurm, submitted with the README's command (`anita-run ... --slurm`).

Needs a running Slurm: CI starts one with `bash .ci/slurm-up` (Debian's slurm-wlm and munge, slurmctld and slurmd as
root, proctrack/linuxproc, no cgroups); elsewhere these tests skip and say so. Three chains run side by side:
- `full`: the whole tiny recipe (sizes shrunk): every step `completed`, the eval array's two tasks run, the report is
  written;
- `fail`: the data step fails (a missing input file): the chain ends at once and the report names the failed step;
- `tl`: `--steps data,sft` with `--set` overrides; when the SFT step has written a checkpoint its time limit is brought
  near, Slurm signals the job, the job requeues itself and the step resumes from its checkpoint;
- `ddp`: `--steps data,sft,dpo` of the tiny recipe with `slurm: {procs: 2, cpus: 2}` on the SFT step: the SFT job is
  `slurm/train_multinode.sbatch`, torchrun starts 2 processes (DDP over gloo), and the chain goes on with DPO.
What one node cannot show (GPUs, several nodes, a partition's limits) is in tests/test_slurm.py, with fake commands.
"""
import json, os, re, shutil, subprocess, sys, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
ANITA_RUN = str(Path(sys.executable).parent/"anita-run")
TIMEOUT_S = int(os.environ.get("ANITA_SLURM_TEST_TIMEOUT", "1500"))   # the whole module, on a busy machine

MAX_STEPS = 12
STEPS_TL = [f"sft.max_steps={MAX_STEPS}", "sft.save_steps=2", "sft.batch_size=4", "sft.max_length=256", "sft.n_train=48"]

def _why_not() -> str|None:
    "None when a Slurm controller answers and its node takes jobs, else why not."
    for c in ("sbatch", "squeue", "scontrol", "sinfo"):
        if not shutil.which(c): return f"{c} not found"
    try:
        r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        if "UP" not in r.stdout: return f"scontrol ping: {(r.stdout + r.stderr).strip() or 'no answer'}"
        s = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.TimeoutExpired) as e: return f"Slurm does not answer ({e})"
    if not any(x.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for x in s): return f"no node takes jobs (sinfo: {s})"
    return None

WHY = _why_not()
pytestmark = [pytest.mark.skipif(WHY is not None, reason=f"no usable Slurm here ({WHY}); `sudo bash .ci/slurm-up` starts a "
                                 "single-node one (CI does)"),
              pytest.mark.timeout(TIMEOUT_S + 120)]   # the chains run while the first test waits: the module's limit, not 1200 s a test

def jobs(jid) -> list:
    "`scontrol show job -o JID` as dicts (one per array task)."
    r = subprocess.run(["scontrol", "show", "job", "-o", str(jid)], capture_output=True, text=True)
    return [dict(re.findall(r"(\w+)=(\S*)", l)) for l in r.stdout.splitlines() if l.strip()]

def queued(ids) -> list:
    r = subprocess.run(["squeue", "-h", "-o", "%F", "-j", ",".join(ids)], capture_output=True, text=True)
    return r.stdout.split() if r.returncode == 0 else []

def submit(cwd, run, *args, env=None, recipe="tiny") -> dict:
    r = subprocess.run([ANITA_RUN, "--recipe", str(recipe), "--run", run, "--root", "runs", "--slurm", *args], cwd=cwd,
                       capture_output=True, text=True, env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stdout + r.stderr
    ids = dict(l.split() for l in r.stdout.splitlines() if re.fullmatch(r"\w+ \d+", l))
    assert "report" in ids, r.stdout
    return ids

# the whole recipe's chain with its sizes shrunk (the path is the same: every step, the eval array's two shards, the report)
STEPS_FULL = [f"data.n_heldout_{k}=4" for k in ("sft", "dpo", "ita", "en")] + \
             [f"{s}.{k}={v}" for s in ("sft", "dpo", "ita") for k, v in (("max_steps", 2), ("save_steps", 2),
                                                                        ("gen_max_new_tokens", 4))] + \
             ["eval.limit=4", "eval.heldout_max_length=64", "eval.gen_max_new_tokens=4", "export.max_new_tokens=4"]
STEPS_DDP = ["sft.max_steps=4", "sft.save_steps=2", "dpo.max_steps=2", "dpo.save_steps=2"]

def ddp_recipe(d) -> Path:
    "The tiny recipe with its SFT step on 2 processes of one node (CPU, gloo)."
    import yaml
    from anita.recipe import find_recipe
    r = yaml.safe_load(find_recipe("tiny").read_text())
    r["name"] = "tiny-ddp"
    r["steps"]["sft"]["slurm"] = dict(procs=2, cpus=2)
    (d/"tiny-ddp.yaml").write_text(yaml.safe_dump(r, sort_keys=False))
    return d/"tiny-ddp.yaml"

@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    os.chmod(d, 0o755)
    t0 = time.time()
    want = os.environ.get("ANITA_SLURM_CHAINS", "full,fail,tl,ddp").split(",")   # a subset while developing
    c = {}
    if "full" in want: c["full"] = submit(d, "full", *[a for s in STEPS_FULL for a in ("--set", s)])
    if "fail" in want: c["fail"] = submit(d, "fail", "--set", "data.sft_source=/nonexistent/sft.jsonl")
    # heavier steps than the tiny default (4 packed rows of 256 tokens each), so the step is still running when
    # Slurm's signal comes (it checks time limits every 30 s); a signal during the merge after training also resumes
    # from the last checkpoint
    if "tl" in want: c["tl"] = submit(d, "tl", "--steps", "data,sft", *[a for s in STEPS_TL for a in ("--set", s)],
                                      env=dict(TIME="30", ANITA_SIGNAL_S="120"))
    if "ddp" in want: c["ddp"] = submit(d, "ddp", "--steps", "data,sft,dpo",
                                        *[a for s in STEPS_DDP for a in ("--set", s)], recipe=ddp_recipe(d))
    yield dict(dir=d, runs=d/"runs", t0=t0, **c)
    left = queued([i for ch in c.values() for i in ch.values()])
    if left: subprocess.run(["scancel", *left])
    print(f"\nreal-Slurm chains: {time.time()-t0:.0f}s in all")

def wait(ids, t0, what):
    while queued(list(ids)):
        assert time.time() - t0 < TIMEOUT_S, f"{what}: still queued after {TIMEOUT_S}s: {queued(list(ids))}"
        time.sleep(3)

def manifest(p): return json.loads(Path(p).read_text())

def test_relative_root_and_duplicate_chain(chains):
    "A relative --root is taken from the folder the command runs in; a run whose chain is queued is not queued twice."
    if "fail" not in chains: pytest.skip("chain fail not submitted (ANITA_SLURM_CHAINS)")
    assert (chains["runs"]/"fail"/"logs").is_dir()
    r = subprocess.run([ANITA_RUN, "--recipe", "tiny", "--run", "fail", "--root", "runs", "--slurm"], cwd=chains["dir"],
                       capture_output=True, text=True)
    if queued(list(chains["fail"].values())):
        assert r.returncode == 1 and "already has a chain in the queue" in r.stderr, r.stdout + r.stderr
    # a request the node cannot satisfy is refused, saying what to change (here: 2 CPUs)
    cpus = max(int(x.rstrip("+")) for x in subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split())
    r = subprocess.run([ANITA_RUN, "--recipe", "tiny", "--run", "big", "--root", "runs", "--slurm"], cwd=chains["dir"],
                       capture_output=True, text=True, env={**os.environ, "CPUS": str(cpus + 1)})
    assert r.returncode == 1 and f"set CPUS={cpus}" in r.stderr, r.stderr

def test_time_limit_requeues_and_resumes(chains):
    "The SFT step reaches its time limit after a checkpoint: the job requeues itself and the step resumes from the checkpoint."
    if "tl" not in chains: pytest.skip("chain tl not submitted (ANITA_SLURM_CHAINS)")
    ids, rd, t0 = chains["tl"], chains["runs"]/"tl", chains["t0"]
    sft = ids["sft"]
    ck = rd/"02_sft"/"checkpoints"
    # wait for the step's first checkpoint, then bring the job's time limit near: Slurm sends the --signal
    while True:
        j = jobs(sft)[0]
        assert j["JobState"] in ("PENDING", "RUNNING"), f"sft ended ({j['JobState']}) before its first checkpoint: {rd}/logs"
        if j["JobState"] == "RUNNING" and list(ck.glob("checkpoint-*")): break
        assert time.time() - t0 < TIMEOUT_S, "no checkpoint in time"
        time.sleep(2)
    run_s = sum(int(x) * m for x, m in zip(reversed(re.split("[-:]", j["RunTime"])), (1, 60, 3600, 86400)))
    limit_min = run_s // 60 + 2          # about 1-2 minutes left: less than the 120 s of --signal=B:USR1@120
    subprocess.run(["scontrol", "update", f"JobId={sft}", f"TimeLimit={limit_min}"], check=True)
    while True:
        j = jobs(sft)[0]
        if int(j.get("Restarts", 0)) >= 1: break
        assert j["JobState"] in ("RUNNING", "PENDING", "REQUEUED", "COMPLETING"), \
            f"sft ended {j['JobState']} instead of being requeued: {(rd/'logs').glob('*sft*.out')}"
        assert time.time() - t0 < TIMEOUT_S
        time.sleep(2)
    # the requeued job waits (Slurm holds a requeued job for a while): let it start now, with time to finish
    for _ in range(30):
        if jobs(sft)[0]["JobState"] == "PENDING": break
        time.sleep(1)
    subprocess.run(["scontrol", "update", f"JobId={sft}", "TimeLimit=60", "StartTime=now"], check=True)
    wait(ids.values(), t0, "chain tl")
    j = jobs(sft)[0]
    assert j["JobState"] == "COMPLETED" and j["Restarts"] == "1", j
    rep = json.loads((rd/"02_sft"/"report.json").read_text())
    assert rep["resumed_from"] and "checkpoint-" in rep["resumed_from"], rep.get("resumed_from")
    assert rep["optimizer_steps"] == MAX_STEPS
    m = manifest(rd/"02_sft"/"manifest.json")
    assert m["status"] == "completed" and m["params"]["max_steps"] == MAX_STEPS and m["params"]["batch_size"] == 4 and m["params"]["save_steps"] == 2   # --set reached the job
    log = next((rd/"logs").glob("slurm-anita-tl-sft-*.out")).read_text()
    # one log for both runs of the job (--open-mode=append): the first run, the requeue, the resumed run
    assert "restarts=0" in log and "near its time limit: requeueing it" in log and "restarts=1" in log, log[-3000:]
    assert "resuming after a failed or killed run" in log
    # --steps: only data, sft and the report were submitted; the report lists the steps not run
    assert set(ids) == {"data", "sft", "report"} and not (rd/"03_dpo").exists()
    assert jobs(ids["report"])[0]["JobState"] == "COMPLETED"

def test_failed_step_ends_chain(chains):
    if "fail" not in chains: pytest.skip("chain fail not submitted (ANITA_SLURM_CHAINS)")
    ids, rd = chains["fail"], chains["runs"]/"fail"
    wait(ids.values(), chains["t0"], "chain fail")
    st = {n: jobs(i)[0] for n, i in ids.items()}
    assert st["data"]["JobState"] == "FAILED"
    for n in ("sft", "dpo", "ita", "eval"):
        assert st[n]["JobState"] == "CANCELLED" and st[n]["Reason"] == "DependencyNeverSatisfied", (n, st[n])
    assert st["report"]["JobState"] == "COMPLETED"
    rep = (rd/"report.md").read_text()
    assert "**Failed:** step `data`" in rep and "/nonexistent/sft.jsonl" in rep, rep[:2000]
    assert "| sft | 02_sft.ipynb | not run |" in rep
    assert manifest(rd/"01_data"/"manifest.json")["status"] == "failed"

def test_tiny_chain_completes(chains):
    if "full" not in chains: pytest.skip("chain full not submitted (ANITA_SLURM_CHAINS)")
    ids, rd = chains["full"], chains["runs"]/"full"
    wait(ids.values(), chains["t0"], "chain full")
    for n, i in ids.items():
        for j in jobs(i): assert j["JobState"] == "COMPLETED", (n, j["JobState"], j.get("Reason"), f"logs: {rd/'logs'}")
    tasks = jobs(ids["eval"])
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1"]           # the eval array's two shards ran
    for s in ("00", "01"):
        assert manifest(rd/"05_eval"/"shards"/s/"full"/"05_eval"/"manifest.json")["status"] == "completed"
    for d in ("01_data", "02_sft", "03_dpo", "04_ita", "05_eval", "13_export"):
        assert manifest(rd/d/"manifest.json")["status"] == "completed", d
    rep = (rd/"report.md").read_text()
    assert rep.count("| completed |") == 6 and "Failed" not in rep
    assert "anita_mc_en" in rep and "anita_arith" in rep                   # both shards' tables
    print(f"\ntiny chain on Slurm: {time.time()-chains['t0']:.0f}s")

def test_two_process_step_and_chain_go_on(chains):
    "A step with `procs: 2` runs as the multi-process job (torchrun, 2 ranks, gloo) and the chain goes on after it."
    if "ddp" not in chains: pytest.skip("chain ddp not submitted (ANITA_SLURM_CHAINS)")
    ids, rd = chains["ddp"], chains["runs"]/"ddp"
    wait(ids.values(), chains["t0"], "chain ddp")
    for n, i in ids.items():
        for j in jobs(i): assert j["JobState"] == "COMPLETED", (n, j["JobState"], j.get("Reason"), f"logs: {rd/'logs'}")
    log = next((rd/"logs").glob("slurm-anita-ddp-sft-*.out")).read_text()
    assert "1 node(s) x 2 process(es)" in log, log[-3000:]
    rep = json.loads((rd/"02_sft"/"report.json").read_text())
    assert rep["world_size"] == 2 and len(rep["rank_tokens"]) == 2 and rep["optimizer_steps"] == 4
    assert (rd/"logs"/"02_sft.rank1.ipynb").exists() and not (rd/"02_sft.rank1.ipynb").exists()
    for d in ("01_data", "02_sft", "03_dpo"):
        assert manifest(rd/d/"manifest.json")["status"] == "completed", d
    assert json.loads((rd/"03_dpo"/"report.json").read_text())["world_size"] == 1    # DPO: one process (the recipe)
    assert jobs(ids["report"])[0]["JobState"] == "COMPLETED"
