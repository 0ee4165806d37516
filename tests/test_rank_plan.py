"""Several processes: rank 0 alone plans each step from the run folder and tells the other ranks (through torchrun's
store); they follow its plan instead of reading a run folder rank 0 is writing. A two-process `--steps sft,dpo,ita`
failed in CI when rank 1 planned DPO from a state rank 0 was still writing (its ranks then met in different groups)."""
import itertools, json
import pytest
import anita.runner as R
from anita import recipe
from anita.runner import run_recipe

class DictStore:
    "What the runner uses of a `torch.distributed.Store`: `set` a str, `get` bytes (a missing key is an error here)."
    def __init__(self, **kv): self.d = {k: json.dumps(v).encode() for k, v in kv.items()}
    def set(self, k, v): self.d[k] = v.encode()
    def get(self, k): return self.d[k]

@pytest.fixture
def ranks(monkeypatch):
    "`set(rank, store)`: this process becomes `rank` of 2, the launch's store is `store`, walks are numbered from 7."
    def set_(rank, store):
        monkeypatch.setenv("WORLD_SIZE", "2"); monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setattr(R, "launch_store", lambda: store)
        monkeypatch.setattr(R, "_WALKS", itertools.count(7))
    return set_

def test_rank0_tells_its_plan(ranks, tmp_path):
    "Rank 0 plans from the run folder and publishes, per step, its action, why and fingerprint."
    store = DictStore(); ranks(0, store)
    said = []
    assert run_recipe("tiny", run="r", root=tmp_path, steps="data,sft", dry_run=True, log=said.append) == \
        {"data": "would run", "sft": "would run"}
    plans = {k: json.loads(v) for k, v in store.d.items()}
    assert sorted(plans) == ["7/plan/data", "7/plan/sft"]
    for action, why, fp in plans.values(): assert action not in ("skip", "error") and len(fp) >= 16

def test_other_ranks_follow_rank0(ranks, tmp_path):
    "Rank 1 skips what rank 0 says is done (here nothing is on disk: it did not look) and stops where rank 0 stopped."
    store = DictStore(**{"7/plan/data": ["skip", None, "f" * 16],
                         "7/plan/sft": ["error", "StepError: step 'sft' needs step 'data' completed first", None]})
    ranks(1, store)
    said = []
    with pytest.raises(R.StepError, match="rank 0 stopped: StepError: step 'sft' needs"):
        run_recipe("tiny", run="r", root=tmp_path, steps="data,sft", log=said.append)
    assert any("data" in s and "done, skipped" in s for s in said), said
    assert not (tmp_path/"r"/"01_data").exists() and not (tmp_path/"r"/"pipeline.json").exists()
    assert "7/plan/sft" in store.d and len(store.d) == 2   # a follower tells nothing

def test_several_processes_need_torchrun(monkeypatch, tmp_path):
    "WORLD_SIZE > 1 without torchrun's agent store: a clear error before anything runs."
    monkeypatch.setenv("WORLD_SIZE", "2"); monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    with pytest.raises(recipe.UsageError, match="torchrun --nproc_per_node"):
        run_recipe("tiny", run="r", root=tmp_path, steps="data", log=lambda s: None)
    assert not (tmp_path/"r").exists()

_JOIN = """
import sys, time
import torch.distributed as dist
from anita.backends import init_distributed
time.sleep(float(sys.argv[1]))
assert init_distributed(False)
dist.barrier()   # and exit without leaving the group, as a step's kernel does
"""

_ACCELERATE_JOINS = """
import sys, time
import torch.distributed as dist
from anita.backends import prepare_backend
time.sleep(float(sys.argv[1]))
assert prepare_backend("cpu") == "cpu"   # the cell after `parameters`
from accelerate import PartialState
PartialState()   # what building `TrainingArguments` in a check cell does: joins the default way unless a group exists
dist.barrier()
"""

def _join_round(port, prefix, slow_rank0, tmp_path, script=_JOIN):
    "Two processes join a gloo group in a store like torchrun's agent store, rank 0 late by `slow_rank0` s; their exit codes."
    import os, subprocess, sys
    code, script = script, tmp_path/"join.py"; script.write_text(code)
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "TORCHELASTIC_USE_AGENT_STORE": "True", "OMP_NUM_THREADS": "1"}
    if prefix: env["ANITA_PG_PREFIX"] = prefix
    ps = [subprocess.Popen([sys.executable, str(script), str(slow_rank0 if r == 0 else 0)],
                           env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    return [p.wait(timeout=120) for p in ps], [p.stdout.read()[-2000:] for p in ps]

@pytest.fixture
def agent_port():
    "The port of a store like torchrun's agent store, kept open for the test."
    pytest.importorskip("torch")
    import socket, torch.distributed as dist
    from datetime import timedelta
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    agent = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=60))
    yield port
    del agent

def test_each_step_joins_its_own_group(tmp_path, agent_port):
    """CI, 2026-12-05: under one torchrun launch the Italian step's rank 1 read the address rank 0's DPO kernel had left in
    the agent store and failed ("Connection refused"): torch 2.13 keeps every kernel's group in the same store. With
    `ANITA_PG_PREFIX` (anita-run sets one per step) a late rank 0 in the second step is waited for, not a dead address."""
    rcs, out = _join_round(agent_port, "anita-pg/0/0/03_dpo/", 0, tmp_path)
    assert rcs == [0, 0], out
    rcs, out = _join_round(agent_port, "anita-pg/0/1/04_ita/", 4, tmp_path)   # the next step: rank 0 arrives 4 s late
    assert rcs == [0, 0], out

def test_the_notebook_joins_before_accelerate(tmp_path, agent_port):
    """CI, 2026-12-05, after the fix above: rank 1 of the DPO step failed the same way in a check cell, where building
    `TrainingArguments` made accelerate join the group without the prefix. `prepare_backend` (the cell after the
    parameters) now joins first, under the prefix, and accelerate uses that group."""
    pytest.importorskip("accelerate")
    for prefix, late in (("anita-pg/0/0/02_sft/", 0), ("anita-pg/0/1/03_dpo/", 4)):
        rcs, out = _join_round(agent_port, prefix, late, tmp_path, _ACCELERATE_JOINS)
        assert rcs == [0, 0], out
