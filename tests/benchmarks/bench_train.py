"""Training benchmark (not collected by pytest): a fixed number of SFT and DPO steps per available backend, same data.

    python tests/benchmarks/bench_train.py                       # CPU: embedded SmolLM2-135M, shipped samples
    python tests/benchmarks/bench_train.py --model meta-llama/Meta-Llama-3-8B-Instruct --max-length 2048 --batch-size 4

Each (backend, step) runs in its own process so peak memory is its own (CUDA: max allocated; CPU: max RSS).
Ends with one line per backend: `backend=NAME tokens_per_s=X peak_mem_gb=Y real_token_fraction=Z` (SFT figures),
followed on the same line by the DPO figures.
"""
import argparse, json, os, subprocess, sys, tempfile

def worker(a):
    from transformers import AutoTokenizer
    import anita.data as data
    from anita.sft import train_sft, require_model_input
    from anita.dpo import train_dpo
    tok = AutoTokenizer.from_pretrained(require_model_input(a.model))
    common = dict(backend=a.backend, max_length=a.max_length, batch_size=a.batch_size, grad_accum=1, lr=1e-4, warmup_steps=0,
                  logging_steps=1, save_steps=10_000, epochs=100, max_steps=a.steps, generate=False, merge=False, resume=False)
    if a.backend == "cpu": common.update(optim="adamw_torch", gradient_checkpointing=False)
    with tempfile.TemporaryDirectory() as d:
        if a.step == "sft":
            ds = data.prepare_sft(str(data.sample_path("sft")), tok)
            r = train_sft(a.model, ds, d, **common)["report"]
            frac = r["data"]["batches"]["packed"]["mean"]; base = r["data"]["batches"]["padded"]["mean"]
        else:
            ds = data.prepare_dpo(str(data.sample_path("dpo")), tok)
            r = train_dpo(a.model, ds, d, max_prompt_length=a.max_length // 2, **common)["report"]
            frac = r["data"]["batches"]["padded"]["mean"]; base = frac
    print("RESULT " + json.dumps(dict(backend=r["backend"], step=a.step, steps=r["optimizer_steps"], tokens_per_s=r["tokens_per_s"],
                                      peak_mem_gb=r["peak_mem_gb"], real_token_fraction=frac, padded_baseline=base,
                                      runtime_s=r["train_runtime_s"], loss_first=r["loss_first"], loss_last=r["loss_last"])))

def backends():
    import importlib.util
    from anita.core import device_info
    if device_info()["device"] != "cuda": return ["cpu"]
    return (["unsloth"] if importlib.util.find_spec("unsloth") else []) + ["hf"]

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: embedded on CPU, Meta-Llama-3-8B-Instruct on GPU")
    p.add_argument("--backends", default=None, help="comma list (default: all available)")
    p.add_argument("--sft-steps", type=int, default=6); p.add_argument("--dpo-steps", type=int, default=4)
    p.add_argument("--max-length", type=int, default=None); p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend"); p.add_argument("--step"); p.add_argument("--steps", type=int)
    a = p.parse_args()
    if a.worker: return worker(a)
    bks = a.backends.split(",") if a.backends else backends()
    gpu = bks != ["cpu"]
    model = a.model or ("meta-llama/Meta-Llama-3-8B-Instruct" if gpu else "embedded")
    ml, bs = a.max_length or (2048 if gpu else 256), a.batch_size or (4 if gpu else 2)
    res = {}
    for b in bks:
        for step, n in (("sft", a.sft_steps), ("dpo", a.dpo_steps)):
            cmd = [sys.executable, __file__, "--worker", "--model", model, "--backend", b, "--step", step, "--steps", str(n),
                   "--max-length", str(ml), "--batch-size", str(bs)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                print(f"{b}/{step}: failed\n{out.stderr[-3000:]}"); continue
            res[(b, step)] = r = json.loads(line[7:])
            print(f"{b:8s} {step}: {r['steps']} steps in {r['runtime_s']:.1f}s  tokens/s={r['tokens_per_s']}  "
                  f"peak_mem_gb={r['peak_mem_gb']}  real-token fraction={r['real_token_fraction']} "
                  f"(padded baseline {r['padded_baseline']})  loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}", flush=True)
    print(f"model={model} max_length={ml} batch_size={bs}")
    for b in bks:
        s, d = res.get((b, "sft")), res.get((b, "dpo"))
        if not s: continue
        tail = f" dpo_tokens_per_s={d['tokens_per_s']} dpo_peak_mem_gb={d['peak_mem_gb']}" if d else ""
        print(f"backend={b} tokens_per_s={s['tokens_per_s']} peak_mem_gb={s['peak_mem_gb']} "
              f"real_token_fraction={s['real_token_fraction']}{tail}")

if __name__ == "__main__": main()
