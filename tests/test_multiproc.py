"""Training on two processes on the CPU (torchrun, DDP over gloo), as a user runs it:

    anita-run --recipe tiny --root R --run two --steps data
    torchrun --nproc_per_node 2 -m anita.pipeline --recipe tiny --root R --run two --steps sft,dpo,ita

Checked: every step completes with `world_size` 2 and each rank's tokens in its report, only rank 0 writes (the other
rank leaves its notebook and log in `logs/` and nothing else), the losses agree with a one-process run of the same
global batch (2 rows x 2 accumulation steps on one process, 2 rows on each of 2 processes), and a run killed after its first
checkpoint resumes under two processes (the first SFT run of the two-process chain is killed after its first
checkpoint) and still ends with the losses of the one-process run that was not killed.

Why the losses may still differ a little: the two processes' gradients are summed by an all-reduce, in another order
than one process's accumulation (float rounding); TRL normalises the loss by the tokens of the whole global batch on
both paths (`average_tokens_across_devices`), and with LoRA dropout 0 and packing off each micro-batch is the same rows
padded the same way, so nothing else should differ. Tolerance: `LOSS_TOL` (relative) per logged step.
"""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOSS_TOL = 2e-3          # relative, per logged step
STEPS = ("sft", "dpo", "ita")
# a few steps each, packing off (packed rows would be cut per process), 8 rows: 2 optimizer steps per epoch
# (sft: 9 rows, of which one prompt is longer than max_length: 8 rows, so that no process gets a short last batch)
COMMON = [f"{s}.{k}" for s in STEPS for k in ("max_steps=4", "save_steps=2", "batch_size=2")] + \
         ["sft.n_train=9", "dpo.n_train=8", "ita.n_train=8", "sft.packing=false", "ita.packing=false"]
ONE = COMMON + [f"{s}.grad_accum=2" for s in STEPS]     # 1 process x 2 rows x 2 accumulation steps
TWO = COMMON + [f"{s}.grad_accum=1" for s in STEPS]     # 2 processes x 2 rows
DIRS = dict(sft="02_sft", dpo="03_dpo", ita="04_ita")

def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg", "PYTHONHASHSEED": "0"}

def _sets(sets): return [a for s in sets for a in ("--set", s)]

def anita_run(root, run, steps, sets=()):
    r = subprocess.run([str(BIN/"anita-run"), "--recipe", "tiny", "--root", str(root), "--run", run, "--steps", steps,
                        "--no-progress", *_sets(sets)], capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

def torchrun_cmd(root, run, steps, sets, port):
    return [str(BIN/"torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
            "-m", "anita.pipeline", "--", "--recipe", "tiny", "--root", str(root), "--run", run, "--steps", steps,
            "--no-progress", *_sets(sets)]

def _port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def losses(rd, step): return [r["loss"] for r in json.loads((rd/DIRS[step]/"train_log.json").read_text())]

def kill_after_checkpoint(cmd, ck, log, what="checkpoint-2"):
    """Start `cmd`, SIGKILL it and every process under it (torchrun, both ranks, their papermill kernels, which run in
    sessions of their own) once `ck/what` is complete."""
    import psutil
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, env=_env(), cwd=ROOT, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    t0 = time.time()
    while not (ck/what/"trainer_state.json").exists():
        assert p.poll() is None, Path(log).read_text()[-4000:]
        assert time.time() - t0 < 900, f"no {what} in time"
        time.sleep(0.2)
    procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    for q in procs:
        try: q.kill()
        except psutil.NoSuchProcess: pass
    psutil.wait_procs(procs, timeout=60)
    p.wait(timeout=60)

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    t0 = time.time()
    for run in ("one", "two"): anita_run(root, run, "data")
    anita_run(root, "one", "sft,dpo,ita", ONE)
    t1 = time.time()
    kill_after_checkpoint(torchrun_cmd(root, "two", "sft", TWO, _port()), root/"two"/"02_sft"/"checkpoints",
                          root/"killed.log")
    assert json.loads((root/"two"/"02_sft"/"manifest.json").read_text())["status"] != "completed"
    r = subprocess.run(torchrun_cmd(root, "two", "sft,dpo,ita", TWO, _port()), capture_output=True, text=True,
                       env=_env(), cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    print(f"\n1 process: {t1-t0:.0f}s with 2 data steps; 2 processes (killed once): {time.time()-t1:.0f}s")
    return root

def test_two_processes_complete(runs):
    rd = runs/"two"
    for s in STEPS:
        m = json.loads((rd/DIRS[s]/"manifest.json").read_text())
        assert m["status"] == "completed", (s, m.get("error"))
        rep = json.loads((rd/DIRS[s]/"report.json").read_text())
        assert rep["world_size"] == 2 and len(rep["rank_tokens"]) == 2 and all(n > 0 for n in rep["rank_tokens"]), rep
        assert rep["real_tokens_trained"] == sum(rep["rank_tokens"]) and rep["optimizer_steps"] == 4
        assert rep["plan"]["world_size"] == 2 and rep["plan"]["grad_accum"] == 1
        assert (rd/DIRS[s]/"merged"/"config.json").exists() and (rd/DIRS[s]/"README.md").exists()
        ck = rd/DIRS[s]/"checkpoints"
        assert not (ck/".staging").exists()
        # each rank's RNG state is in every checkpoint, so that both resume where they were
        for c in ck.glob("checkpoint-*"):
            assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in c.iterdir()}, c
    # rank 1 left its executed notebooks and logs in logs/ and nothing else: no notebook, state or report of its own
    r1 = sorted(p.name for p in rd.rglob("*rank1*"))
    assert r1 and all((rd/"logs"/n).exists() for n in r1), r1
    assert {f"{DIRS[s]}.rank1.ipynb" for s in STEPS} <= set(r1)
    st = json.loads((rd/"pipeline.json").read_text())["steps"]
    assert not any("rank" in k for k in st), st

def test_losses_agree_with_one_process(runs):
    for s in STEPS:
        one, two = losses(runs/"one", s), losses(runs/"two", s)
        rep1 = json.loads((runs/"one"/DIRS[s]/"report.json").read_text())
        assert rep1["world_size"] == 1 and rep1["plan"]["grad_accum"] == 2 and rep1["plan"]["rows"] % 4 == 0
        assert len(one) == len(two) == 4, (s, one, two)
        print(f"{s}: 1 process {one}\n{' '*len(s)}  2 processes {two}")
        for a, b in zip(one, two): assert abs(a - b) <= LOSS_TOL * max(abs(a), 1e-3), (s, one, two)
        assert one[0] != one[-1]            # it trained

def test_two_processes_resume_after_kill(runs):
    "The SFT step killed after its first checkpoint resumed from it under two processes (its losses: the test above)."
    rep = json.loads((runs/"two"/"02_sft"/"report.json").read_text())
    assert rep["resumed_from"] and rep["resumed_from"].endswith(("checkpoint-2", "checkpoint-4")), rep["resumed_from"]
    assert rep["world_size"] == 2 and rep["optimizer_steps"] == 4
    # (the losses of all 4 steps, 2 of them from before the kill, agree with the one-process run: test_losses_agree...)

def _rank_worker(rank, port, q):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from anita.backends import init_distributed, on_rank0, all_ranks
    assert init_distributed()
    ran = []
    got = on_rank0(lambda: ran.append(rank) or {"from": rank})
    try: on_rank0(lambda: 1/0); err = None
    except Exception as e: err = f"{type(e).__name__}: {e}"
    q.put((rank, got, ran, all_ranks(rank * 10), err))

def test_on_rank0_and_all_ranks_on_two_processes():
    "Rank 0 alone runs the work and every rank gets its result, or its error (no rank waits for one that failed)."
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), _port()
    ps = [ctx.Process(target=_rank_worker, args=(r, port, q)) for r in (0, 1)]
    for p in ps: p.start()
    res = dict((x[0], x[1:]) for x in (q.get(timeout=300) for _ in ps))
    for p in ps: p.join(60)
    assert res[0] == ({"from": 0}, [0], [0, 10], "ZeroDivisionError: division by zero"), res[0]
    assert res[1] == ({"from": 0}, [], [0, 10], "RuntimeError: rank 0 failed: ZeroDivisionError: division by zero"), res[1]

def test_other_ranks_write_no_manifest(tmp_path, monkeypatch):
    from anita.core import step_manifest
    monkeypatch.setenv("RANK", "1")
    with step_manifest(tmp_path/"s", "s") as outs: outs.append(str(tmp_path/"s"/"x"))
    assert not (tmp_path/"s"/"manifest.json").exists()
    monkeypatch.setenv("RANK", "0")
    with step_manifest(tmp_path/"s", "s"): pass
    assert json.loads((tmp_path/"s"/"manifest.json").read_text())["status"] == "outputs-written"
