"""Benchmark of the evaluation step: documents/s of lm-eval's `hf` backend at batch size 1 and `auto` (and vLLM when
installed) on the same task set. Not a test (no timed assertions); prints a table and writes JSON.

    python tests/benchmarks/bench_eval.py                          # embedded SmolLM2 on the offline suite, CPU
    python tests/benchmarks/bench_eval.py --suite anita_mc_en,anita_mc_it --batch-sizes 1,16,auto   # log-likelihood only
    python tests/benchmarks/bench_eval.py --model meta-llama/Meta-Llama-3-8B-Instruct --suite paper --limit 200   # GPU

On CPU, `auto` is lm-eval's batch-size detection with `--max-length` capping the probe (lm-eval otherwise probes
generation batches at the model's full context, see `anita.eval_harness.effective_batch_size`).
"""
import argparse, json, os, sys, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def bench(model, suite, backend, batch_size, limit, max_length, repeats=1, per_task=False):
    from anita import eval as ev
    from anita import eval_harness
    specs = eval_harness.resolve_suite(suite)
    t0 = time.time()
    lm = eval_harness.make_lm(model, backend, batch_size=batch_size, max_length=max_length)
    load_s = time.time() - t0
    best = None
    for _ in range(repeats):
        t = time.time()
        raw = eval_harness.run_lm_eval(lm, specs, limit=limit)
        dt = time.time() - t
        best = dt if best is None else min(best, dt)
    n = sum(v["effective"] for v in raw["n-samples"].values())
    per_task = {}
    for s in (specs if per_task else []):  # per task: log-likelihood vs generation
        t = time.time(); r = eval_harness.run_lm_eval(lm, [s], limit=limit); per_task[s["task"]] = round(time.time() - t, 2)
    bs = getattr(lm, "batch_size", batch_size)
    del lm
    return dict(backend=backend, batch_size=str(batch_size), detected=str(bs), docs=n, load_s=round(load_s, 2),
                eval_s=round(best, 2), docs_per_s=round(n/best, 2), per_task_s=per_task)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded"); p.add_argument("--suite", default="local")
    p.add_argument("--limit", type=float, default=None); p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1); p.add_argument("--out", default=None)
    p.add_argument("--batch-sizes", default="1,auto", help="comma list of hf batch sizes, e.g. 1,16,auto")
    p.add_argument("--per-task", action="store_true", help="also time each task alone")
    a = p.parse_args(argv)
    import torch
    from anita.core import device_info
    from anita import eval as ev
    from anita import eval_harness
    dev = device_info()
    max_length = a.max_length or (512 if dev["device"] == "cpu" else None)
    limit = int(a.limit) if a.limit and a.limit >= 1 else a.limit
    cases = [("hf", int(b) if b.isdigit() else b) for b in a.batch_sizes.split(",")] + ([("vllm", "auto")] if eval_harness.has_vllm() and dev["device"] == "cuda" else [])
    rows = []
    for be, bs in cases:
        r = bench(a.model, a.suite, be, bs, limit, max_length, a.repeats, a.per_task); rows.append(r)
        print(json.dumps(r), flush=True)
    print(f"\n{a.model} on {a.suite} ({dev['name']}, {torch.get_num_threads()} threads, limit={limit}, max_length={max_length})")
    print(f"{'backend':8} {'batch':>6} {'detected':>8} {'docs':>5} {'eval s':>8} {'docs/s':>8}")
    for r in rows: print(f"{r['backend']:8} {r['batch_size']:>6} {r['detected']:>8} {r['docs']:>5} {r['eval_s']:>8} {r['docs_per_s']:>8}")
    if a.out: Path(a.out).write_text(json.dumps(dict(device=dev, model=a.model, suite=a.suite, rows=rows), indent=2))


if __name__ == "__main__":
    sys.exit(main())
