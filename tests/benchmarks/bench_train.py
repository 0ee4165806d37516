"""Training benchmark (not collected by pytest): anita's SFT against plain TRL, packed against padded, per backend; then DPO.

    python tests/benchmarks/bench_train.py                       # CPU: embedded SmolLM2-135M, the shipped SFT sample
    python tests/benchmarks/bench_train.py --repeats 3 --dpo-steps 0
    python tests/benchmarks/bench_train.py --model meta-llama/Meta-Llama-3-8B-Instruct --max-length 2048   # GPU: hf, unsloth

Same settings for every run: the same rows of the shipped SFT sample, LoRA r=16 alpha=16 on the seven projections,
`--max-length`, `--batch-size`, `--sft-steps` optimizer steps, no gradient accumulation, adamw_torch (CPU) / paged 8-bit
AdamW (GPU), no gradient checkpointing on the CPU, the same precision (fp32 on the CPU, bf16 on a GPU: TRL's own default
would be bf16 on the CPU too, which is not what anita trains with there). "plain TRL" is `trl.SFTTrainer` given the model and the prompt/completion
rows the way TRL's documentation shows (packing: `packing=True, packing_strategy="bfd", padding_free=True`; completion-only
loss); "anita" is `anita.sft.train_sft` with `packing=True` / `False` / `"auto"` (measured). Throughput = real (non-pad) tokens trained
per second of `trainer.train()`, counted the same way in both. Each run is its own process (peak memory is its own:
CUDA max allocated, CPU max RSS), and the runs are interleaved (trl, anita, trl padded, anita padded, then again) so a
busy shared machine slows all of them alike; the figures are medians over `--repeats` rounds.
Ends with one line per backend: `backend=NAME anita_vs_trl=R packed_vs_padded=R ...` and the DPO figures.
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time

LORA = dict(lora_r=16, lora_alpha=16, lora_dropout=0.0)

def _rows(a, tok):
    import anita.data as data
    ds = data.prepare_sft(str(data.sample_path("sft")), tok)
    return ds.select(range(min(a.rows, len(ds))))

def _common(a):
    c = dict(max_length=a.max_length, batch_size=a.batch_size, grad_accum=1, lr=1e-4, warmup_steps=0, logging_steps=1,
             save_steps=10_000, epochs=100, max_steps=a.steps, seed=42)
    if a.backend == "cpu": c.update(optim="adamw_torch", gradient_checkpointing=False)
    return c

def run_anita(a, tok, d):
    from anita.sft import train_sft
    # micro_batch_tokens: the same micro-batch as TRL's (batch_size packed rows of max_length), so both take the same steps
    r = train_sft(a.model, _rows(a, tok), d, backend=a.backend, packing="auto" if a.auto else a.packing, generate=False, merge=False, resume=False,
                  micro_batch_tokens=a.batch_size * a.max_length, **({"bf16": True} if a.precision == "bf16" else {}), **LORA, **_common(a))["report"]
    return dict(tokens=r["real_tokens_trained"], seconds=r["train_runtime_s"], steps=r["optimizer_steps"], peak_mem_gb=r["peak_mem_gb"],
                loss_first=r["loss_first"], loss_last=r["loss_last"], bf16=r["params"].get("bf16"),
                packing_used=r["data"].get("packing_measured", {}).get("packing", r["params"].get("packing")),
                packing_measured=r["data"].get("packing_measured"))

def _precision(a):
    "The precision both implementations train in: `--precision anita` = anita's default (bf16 on a GPU that has it, fp32 on the CPU); `bf16` = TRL's own default."
    import torch
    gpu = a.backend != "cpu"
    bf16 = a.precision == "bf16" or (a.precision == "anita" and gpu and torch.cuda.is_bf16_supported())
    return dict(bf16=bf16, fp16=gpu and not bf16)

def run_trl(a, tok, d):
    "Plain TRL as its documentation shows it: SFTTrainer + LoraConfig (+ a 4-bit model for `hf`, FastLanguageModel for `unsloth`)."
    import resource, torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer
    from anita.core import resolve_model
    from anita.trainconfig import LORA_TARGETS
    from anita.backends import ensure_logprob_kernel
    ensure_logprob_kernel()  # TRL 1.15 on a CPU torch has no Triton kernel for its fused LM head (a no-op on GPU)
    c, path, gpu = _common(a), resolve_model(a.model), a.backend != "cpu"
    peft_config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
    model, kw = path, {}
    if a.backend == "unsloth":
        from unsloth import FastLanguageModel
        model, tok = FastLanguageModel.from_pretrained(path, max_seq_length=a.max_length, load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                                                 use_gradient_checkpointing="unsloth")
        peft_config = None
    elif a.backend == "hf":
        from transformers import BitsAndBytesConfig
        kw["model_init_kwargs"] = dict(dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
                                        bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True))
    args = SFTConfig(output_dir=d, per_device_train_batch_size=c["batch_size"], gradient_accumulation_steps=1, learning_rate=c["lr"],
                     warmup_steps=0, max_steps=c["max_steps"], num_train_epochs=c["epochs"], logging_steps=1, save_steps=c["save_steps"],
                     optim=c.get("optim", "paged_adamw_8bit"), gradient_checkpointing=c.get("gradient_checkpointing", True) and a.backend == "hf",
                     max_length=a.max_length, packing=a.packing, padding_free=a.packing, packing_strategy="bfd", seed=42,
                     report_to="none", use_cpu=not gpu, disable_tqdm=True, **_precision(a), **kw)
    class Counting(SFTTrainer):
        tokens = 0
        def training_step(self, model, inputs, *x, **k):
            am, ids = inputs.get("attention_mask"), inputs.get("input_ids")
            self.tokens += int(am.sum()) if am is not None else int(ids.numel())
            return super().training_step(model, inputs, *x, **k)
    tr = Counting(model=model, args=args, train_dataset=_rows(a, tok), processing_class=tok, peft_config=peft_config)
    if torch.cuda.is_available(): torch.cuda.reset_peak_memory_stats()
    t0 = time.time(); tr.train(); s = time.time() - t0
    peak = torch.cuda.max_memory_allocated()/2**30 if torch.cuda.is_available() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    return dict(tokens=tr.tokens, seconds=round(s, 2), steps=tr.state.global_step, peak_mem_gb=round(peak, 3), loss_first=losses[0],
                loss_last=losses[-1], packing_used=a.packing, attn=tr.model.config._attn_implementation)

def run_dpo(a, tok, d):
    import anita.data as data
    from anita.dpo import train_dpo
    ds = data.prepare_dpo(str(data.sample_path("dpo")), tok)
    r = train_dpo(a.model, ds, d, backend=a.backend, max_prompt_length=a.max_length // 2, generate=False, merge=False,
                  resume=False, **_common(a))["report"]
    return dict(tokens=r["real_tokens_trained"], seconds=r["train_runtime_s"], steps=r["optimizer_steps"], peak_mem_gb=r["peak_mem_gb"],
                loss_first=r["loss_first"], loss_last=r["loss_last"])

def worker(a):
    from transformers import AutoTokenizer
    from anita.backends import require_model_input
    from anita.core import ensure_pad_token
    tok = ensure_pad_token(AutoTokenizer.from_pretrained(require_model_input(a.model)))
    with tempfile.TemporaryDirectory() as d:
        r = dict(trl=run_trl, anita=run_anita, dpo=run_dpo)[a.impl](a, tok, d)
    r["tokens_per_s"] = round(r["tokens"]/r["seconds"], 1) if r["seconds"] else None
    print("RESULT " + json.dumps(r))

def backends():
    import importlib.util
    from anita.core import device_info
    if device_info()["device"] != "cuda": return ["cpu"]
    return ["hf"] + (["unsloth"] if importlib.util.find_spec("unsloth") else [])

def _run(a, model, backend, impl, mode, steps):
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--backend", backend, "--impl", impl, "--steps", str(steps),
           "--max-length", str(a.max_length), "--batch-size", str(a.batch_size), "--rows", str(a.rows), "--precision", a.precision] + \
          {"packed": ["--packing"], "padded": [], "auto": ["--auto"]}[mode]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None: print(f"{backend}/{impl}/{mode}: failed\n{out.stderr[-3000:]}", flush=True); return None
    r = json.loads(line[7:])
    print(f"{backend:8s} {impl:6s} {mode}: {r['steps']} steps {r['tokens']} real tokens in {r['seconds']:.1f}s "
          f"= {r['tokens_per_s']} tokens/s  peak_mem_gb={r['peak_mem_gb']}  loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}"
          + (f"  measured: {r['packing_measured']}" if r.get("packing_measured") else ""), flush=True)
    return r

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: embedded on CPU, Meta-Llama-3-8B-Instruct on GPU")
    p.add_argument("--backends", default=None, help="comma list (default: all available: cpu, or hf and unsloth)")
    p.add_argument("--sft-steps", type=int, default=8); p.add_argument("--dpo-steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds (medians are reported)")
    p.add_argument("--impls", default="trl,anita", help="comma list of trl, anita")
    p.add_argument("--modes", default="packed,padded,auto", help="comma list of packed, padded, auto (anita measures and picks; trl skips it)")
    p.add_argument("--rows", type=int, default=40, help="rows of the shipped SFT sample")
    p.add_argument("--max-length", type=int, default=None); p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--precision", choices=["anita", "bf16"], default="anita",
                   help="anita: fp32 on the CPU, bf16 on a GPU (anita's defaults); bf16: bf16 autocast everywhere (TRL's default)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend"); p.add_argument("--impl"); p.add_argument("--steps", type=int); p.add_argument("--packing", action="store_true"); p.add_argument("--auto", action="store_true")
    a = p.parse_args()
    if a.worker: return worker(a)
    bks = a.backends.split(",") if a.backends else backends()
    gpu = bks != ["cpu"]
    model = a.model or ("meta-llama/Meta-Llama-3-8B-Instruct" if gpu else "embedded")
    a.max_length, a.batch_size = a.max_length or (2048 if gpu else 512), a.batch_size or 4
    impls, modes = a.impls.split(","), a.modes.split(",")
    res = {}
    for _ in range(a.repeats):
        for b in bks:
            for mode in modes:
                for impl in impls:
                    if impl == "trl" and mode == "auto": continue
                    r = _run(a, model, b, impl, mode, a.sft_steps)
                    if r: res.setdefault((b, impl, mode), []).append(r)
    dpo = {b: _run(a, model, b, "dpo", "padded", a.dpo_steps) for b in bks} if a.dpo_steps else {}
    med = lambda rs, k: statistics.median(r[k] for r in rs)
    ratio = lambda x, y: f"{x/y:.3f}" if x and y else "n/a"
    print(f"\nmodel={model} max_length={a.max_length} batch_size={a.batch_size} sft_steps={a.sft_steps} rows={a.rows} "
          f"repeats={a.repeats} precision={a.precision} (medians of interleaved runs)")
    for b in bks:
        t = {(i, pk): med(res[(b, i, pk)], "tokens_per_s") for (bb, i, pk) in res if bb == b}
        m = {(i, pk): med(res[(b, i, pk)], "peak_mem_gb") for (bb, i, pk) in res if bb == b}
        for i in impls:
            for pk in modes:
                if (i, pk) in t: print(f"backend={b} impl={i} {pk} tokens_per_s={t[(i, pk)]} peak_mem_gb={m[(i, pk)]}")
        line = f"backend={b}"
        for pk in modes:
            if pk != "auto": line += f" anita_vs_trl_{pk}={ratio(t.get(('anita', pk)), t.get(('trl', pk)))}"
        if "auto" in modes: line += f" anita_auto_vs_trl_best={ratio(t.get(('anita', 'auto')), max(t.get(('trl', k)) or 0 for k in ('packed', 'padded')))}"
        for i in impls: line += f" {i}_packed_vs_padded={ratio(t.get((i, 'packed')), t.get((i, 'padded')))}"
        if dpo.get(b): line += f" dpo_tokens_per_s={dpo[b]['tokens_per_s']} dpo_peak_mem_gb={dpo[b]['peak_mem_gb']}"
        print(line)

if __name__ == "__main__": main()
