"Integration tests of the training steps (anita.sft / anita.dpo / anita.ita) on CPU with tiny models."
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import pytest

torch = pytest.importorskip("torch")
from anita.core import write_json, ANITA_SYSTEM_PROMPT
from anita import sft as S
from anita import backends, batching, core, trainconfig

FAST = dict(backend="cpu", max_length=64, batch_size=2, grad_accum=1, lr=1e-3, warmup_steps=0, optim="adamw_torch",
            lora_r=4, lora_alpha=8, logging_steps=1, save_steps=50, gradient_checkpointing=False)

_TOKS = {}
def _tok(d):
    from transformers import AutoTokenizer
    if d not in _TOKS: _TOKS[d] = core.ensure_pad_token(AutoTokenizer.from_pretrained(d))
    return _TOKS[d]

def _data(kind, tok, **kw):
    import anita.data as data
    out = dict(sft=data.prepare_sft, dpo=data.prepare_dpo, ita=data.prepare_ita)[kind](str(data.sample_path(kind)), tok, **kw)
    return out[0] if isinstance(out, tuple) else out

def _ids(tok):
    "BOS and end-of-turn ids of the tiny Llama-3 tokenizer: 128000/128009 with the real tokenizer.model, other ids with the stand-in."
    bos, eot = tok.bos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")
    if len(tok) == 128256: assert (bos, eot) == (128000, 128009)
    return bos, eot

def _trained(tok, row):
    return tok.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l != -100])

@pytest.mark.parametrize("which", ["llama3", "chatml"])
def test_completion_only_mask(which, tiny_llama3_dir, embedded_dir):
    from datasets import Dataset
    tok = _tok(tiny_llama3_dir if which == "llama3" else embedded_dir)
    eot = tok.eos_token
    msgs = [dict(role="system", content=ANITA_SYSTEM_PROMPT), dict(role="user", content="Qual è la capitale d'Italia?")]
    p = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ds = Dataset.from_dict(dict(prompt=[p], completion=["Roma." + eot]))
    tds, rep = batching.tokenize_lm(ds, tok, max_length=512)
    row = tds[0]
    assert _trained(tok, row) == "Roma." + eot                      # answer + one end-of-turn token trained
    header = "<|start_header_id|>assistant<|end_header_id|>\n\n" if which == "llama3" else "<|im_start|>assistant\n"
    n_prompt = sum(l == -100 for l in row["labels"])
    assert tok.decode(row["input_ids"][:n_prompt]).endswith(header)  # role headers not trained
    assert batching.token_checks(tds, tok) == dict(examples=1, doubled_bos=0, not_one_eot=0)
    if which == "llama3":
        bos, eot_id = _ids(tok)
        assert row["input_ids"][0] == bos and row["input_ids"][1] != bos
        assert row["input_ids"].count(bos) == 1 and row["labels"].count(eot_id) == 1

def test_sample_tokens_llama3(tiny_llama3_dir):
    "The data step's SFT rows (BOS string in the prompt, EOT string after the answer) give one BOS and one trained EOT."
    from datasets import Dataset
    tok = _tok(tiny_llama3_dir)
    ds = _data("sft", tok)
    tds, rep = batching.tokenize_lm(ds, tok, max_length=4096)
    assert batching.token_checks(tds, tok) == dict(examples=len(ds), doubled_bos=0, not_one_eot=0)
    bos, _ = _ids(tok)
    assert all(r[0] == bos and r[1] != bos for r in tds["input_ids"])
    # a doubled BOS in the text, or none, still gives exactly one
    d2 = Dataset.from_dict(dict(prompt=["<|begin_of_text|><|begin_of_text|>Hi", "Hi"], completion=["Yo", "Yo<|eot_id|><|eot_id|>"]))
    t2, _ = batching.tokenize_lm(d2, tok, max_length=64)
    assert [r[:2] for r in t2["input_ids"]] == [[bos, t2[0]["input_ids"][1]]]*2 and t2[0]["input_ids"][1] != bos
    assert batching.token_checks(t2, tok)["not_one_eot"] == 0

def test_bad_input(embedded_dir):
    from datasets import Dataset
    tok = _tok(embedded_dir)
    with pytest.raises(ValueError, match="empty"): batching.tokenize_lm(Dataset.from_dict(dict(text=[])), tok)
    with pytest.raises(ValueError, match="expected `prompt`"): batching.tokenize_lm(Dataset.from_dict(dict(instruction=["a"])), tok)
    with pytest.raises(ValueError, match="row 1"): batching.tokenize_lm(Dataset.from_dict(dict(text=["ok", ""])), tok)
    ds = Dataset.from_dict(dict(text=["parola " * 100, "breve"]))
    tds, rep = batching.tokenize_lm(ds, tok, max_length=32)
    assert rep["truncated"] == 1 and max(len(r) for r in tds["input_ids"]) == 32
    from anita.dpo import check_pairs
    with pytest.raises(ValueError, match="missing"): check_pairs(Dataset.from_dict(dict(prompt=["a"], chosen=["b"])), tok)
    with pytest.raises(RuntimeError, match="batch_size"):
        with S.oom_guard(16, 8192, False): raise torch.OutOfMemoryError("CUDA out of memory")

def test_packing_no_cross_contamination(tiny_llama3_dir):
    "Packed (padding-free, position_ids) logits of the model as trained equal those of each sequence alone; real-token fraction >= 98%."
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    tok = _tok(tiny_llama3_dir)
    m, _ = backends.load_for_training(tiny_llama3_dir, "cpu", lora=dict(r=4))
    m.train()   # training mode, as in the trainer (dropout 0)
    bos, eot = _ids(tok)
    words = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    a, b = [bos, *words("The quick brown"), eot], [bos, *words("Hello world"), eot]
    if len(tok) == 128256: assert (a, b) == ([128000, 791, 4062, 14198, 128009], [128000, 9906, 1917, 128009])
    coll = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)
    batch = coll([dict(input_ids=a), dict(input_ids=b)])
    assert batch["position_ids"].tolist() == [list(range(len(a))) + list(range(len(b)))]
    with torch.no_grad():
        packed = m(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        la, lb = m(input_ids=torch.tensor([a])).logits[0], m(input_ids=torch.tensor([b])).logits[0]
        naive = m(input_ids=batch["input_ids"]).logits[0]   # without position ids: b attends to a
        cached = m(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits[0]
    assert torch.allclose(packed[:len(a)], la, atol=1e-5) and torch.allclose(packed[len(a):], lb, atol=1e-5)
    assert not torch.allclose(naive[len(a):], lb, atol=1e-3)
    assert not torch.allclose(cached[len(a):], lb, atol=1e-3)  # why load_for_training turns use_cache off
    tds, _ = batching.tokenize_lm(_data("sft", tok), tok, max_length=512)
    st = batching.batch_stats(tds, tok, 512, 4)
    assert st["packed"]["mean"] >= 0.98 and st["packed"]["min"] >= 0.98
    assert st["padded"]["mean"] < st["packed"]["mean"]
    assert st["packed_rows"] < st["rows"]

def _adapter(d):
    from safetensors.torch import load_file
    return load_file(str(Path(d)/"adapter"/"adapter_model.safetensors"))

def test_chain_tiny_llama3(tiny_llama3_dir, tmp_path):
    "SFT -> DPO -> ITA on the tiny Llama-3, reading each previous merged model; merge equals base + adapter."
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    from anita.dpo import train_dpo
    from anita.ita import train_ita
    tok = _tok(tiny_llama3_dir)
    r1 = S.train_sft(tiny_llama3_dir, _data("sft", tok), tmp_path/"02_sft", max_steps=3, gen_max_new_tokens=4, **FAST)
    rep = r1["report"]
    assert rep["optimizer_steps"] == 3 and rep["data"]["token_checks"]["doubled_bos"] == 0
    for f in ("adapter/adapter_model.safetensors", "merged/config.json", "merged/tokenizer.json", "README.md",
              "train_log.json", "train_log.csv", "loss.png", "generations.json", "report.json"):
        assert (tmp_path/"02_sft"/f).exists(), f
    assert len(json.loads((tmp_path/"02_sft"/"train_log.json").read_text())) == 3
    assert "base_model:" in (tmp_path/"02_sft"/"README.md").read_text()
    assert len(rep["generations"]) == len(trainconfig.GEN_PROMPTS)
    # merge: merged weights == base + adapter
    x = torch.tensor([[_ids(tok)[0], *tok("The quick brown", add_special_tokens=False)["input_ids"]]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama3_dir, dtype=torch.float32)
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, r1["adapter"]).eval()(x).logits
        got = AutoModelForCausalLM.from_pretrained(r1["merged"], dtype=torch.float32).eval()(x).logits
    assert torch.allclose(want, got, atol=1e-4)
    # chain; a step refuses an incomplete previous output
    with pytest.raises(ValueError, match="not 'completed'"):
        write_json(tmp_path/"02_sft"/"manifest.json", dict(status="running"))
        train_dpo(r1["merged"], _data("dpo", tok), tmp_path/"03_dpo", max_steps=2, **FAST)
    write_json(tmp_path/"02_sft"/"manifest.json", dict(status="completed"))
    dpo = {**FAST, "lr": 5e-4}
    r2 = train_dpo(r1["merged"], _data("dpo", tok), tmp_path/"03_dpo", max_steps=2, generate=False, max_prompt_length=48, **dpo)
    assert r2["report"]["optimizer_steps"] == 2 and r2["report"]["data"]["token_checks"] == dict(doubled_bos=0, not_one_eot=0)
    assert r2["report"]["params"]["use_rslora"] is True and (tmp_path/"03_dpo"/"merged"/"config.json").exists()
    write_json(tmp_path/"03_dpo"/"manifest.json", dict(status="completed"))
    r3 = train_ita(r2["merged"], _data("ita", tok, n=40), tmp_path/"04_ita", max_steps=2, generate=False, **FAST)
    assert r3["report"]["optimizer_steps"] == 2 and (tmp_path/"04_ita"/"merged"/"model.safetensors").exists()
    assert r3["report"]["data"]["trained_tokens"] == r3["report"]["data"]["tokens"] - r3["report"]["data"]["kept"]  # every token

def test_refuses_missing_previous_step(tmp_path):
    from anita.dpo import train_dpo
    from anita.ita import train_ita
    from datasets import Dataset
    with pytest.raises(FileNotFoundError, match="previous step"):
        train_dpo(str(tmp_path/"02_sft"/"merged"), Dataset.from_dict(dict(prompt=["a"], chosen=["b"], rejected=["c"])), tmp_path/"x")
    (tmp_path/"03_dpo"/"merged").mkdir(parents=True)
    write_json(tmp_path/"03_dpo"/"manifest.json", dict(status="completed"))
    with pytest.raises(FileNotFoundError, match="no model weights|no config.json"):
        train_ita(str(tmp_path/"03_dpo"/"merged"), Dataset.from_dict(dict(text=["a"])), tmp_path/"y")

def test_chain_embedded(embedded_dir, tmp_path):
    "The three steps on the embedded SmolLM2 (ChatML), a couple of steps each."
    from anita.dpo import train_dpo
    from anita.ita import train_ita
    tok = _tok(embedded_dir)
    r1 = S.train_sft("embedded", _data("sft", tok), tmp_path/"02_sft", max_steps=2, generate=False, **FAST)
    assert r1["report"]["data"]["token_checks"] == dict(examples=r1["report"]["data"]["kept"], doubled_bos=0, not_one_eot=r1["report"]["data"]["truncated"])
    write_json(tmp_path/"02_sft"/"manifest.json", dict(status="completed"))
    r2 = train_dpo(r1["merged"], _data("dpo", tok), tmp_path/"03_dpo", max_steps=2, generate=False, max_prompt_length=48, **FAST)
    assert r2["report"]["data"]["token_checks"]["not_one_eot"] == 0
    write_json(tmp_path/"03_dpo"/"manifest.json", dict(status="completed"))
    r3 = train_ita(r2["merged"], _data("ita", tok, n=20), tmp_path/"04_ita", max_steps=2, gen_max_new_tokens=4, **FAST)
    assert r3["report"]["optimizer_steps"] == 2 and len(r3["report"]["generations"]) == 3

_KILL_SCRIPT = """
import sys, time
from anita import sft as S
from anita.data import prepare_sft, sample_path
from transformers import AutoTokenizer
slow = float(sys.argv[3])
if slow:
    from anita.trainers import AnitaTrainerMixin
    _orig = AnitaTrainerMixin.training_step
    def _slow(self, *a, **k):
        time.sleep(slow); return _orig(self, *a, **k)
    AnitaTrainerMixin.training_step = _slow
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ds = prepare_sft(str(sample_path("sft")), tok)
r = S.train_sft(sys.argv[1], ds, sys.argv[2], generate=False, merge=False,
                **{**%r, **dict(max_steps=8, save_steps=2, save_total_limit=2, packing=True, epochs=3)})
print("STEPS", r["report"]["optimizer_steps"], "RESUMED", r["report"]["resumed_from"])
"""

def test_resume_after_kill(tiny_llama3_dir, tmp_path):
    "SIGKILL mid-training, rerun with the same params: resumes from the last checkpoint, same steps, same adapter."
    script = tmp_path/"train.py"; script.write_text(_KILL_SCRIPT % FAST)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = tmp_path/"killed"
    p = subprocess.Popen([sys.executable, str(script), tiny_llama3_dir, str(out), "1.0"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    t0 = time.time()
    while not (S.latest_checkpoint(out/"checkpoints") or "").endswith("checkpoint-4"):
        assert p.poll() is None, p.stdout.read().decode()[-3000:]
        assert time.time() - t0 < 600, "no checkpoint-4 in time"
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL); p.wait()
    assert not (out/"adapter").exists()
    r = subprocess.run([sys.executable, str(script), tiny_llama3_dir, str(out), "0"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "STEPS 8 RESUMED" in r.stdout and "checkpoint-" in r.stdout.split("RESUMED")[-1]
    ref = subprocess.run([sys.executable, str(script), tiny_llama3_dir, str(tmp_path/"ref"), "0"], env=env, capture_output=True, text=True)
    assert ref.returncode == 0 and "STEPS 8 RESUMED None" in ref.stdout, ref.stderr[-3000:]
    a, b = _adapter(out), _adapter(tmp_path/"ref")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    rep = json.loads((out/"report.json").read_text())
    assert rep["optimizer_steps"] == 8 and rep["resumed_from"].endswith(("checkpoint-4", "checkpoint-6"))
    assert not list((out/"checkpoints").glob(".staging*"))

def test_packing_auto_is_kept_on_resume(tiny_llama3_dir, tmp_path):
    "`packing='auto'` measures once: the choice goes beside the checkpoints and a resumed run trains the same way."
    ds = _data("sft", _tok(tiny_llama3_dir))
    ds = ds.select(range(min(12, len(ds))))
    # max_length 256: with the stand-in tokenizer (no ../shared) the sample's prompts pass FAST's 64 tokens
    opts = {**FAST, **dict(max_length=256, max_steps=2, save_steps=2, packing="auto", generate=False, merge=False)}
    r1 = S.train_sft(tiny_llama3_dir, ds, tmp_path/"s", **opts)["report"]
    m = r1["data"]["packing_measured"]
    assert m["packed_tokens_per_s"] > 0 and m["padded_tokens_per_s"] > 0 and r1["plan"]["packed"] == m["packing"]
    saved = json.loads((tmp_path/"s"/"checkpoints"/"packing.json").read_text())
    assert saved["packing"] == m["packing"]
    # were the timing to come out the other way now, the resumed run must still train as its checkpoints began
    write_json(tmp_path/"s"/"checkpoints"/"packing.json", dict(saved, packing=not saved["packing"]))
    r2 = S.train_sft(tiny_llama3_dir, ds, tmp_path/"s", **opts)["report"]
    assert r2["resumed_from"] and r2["data"]["packing_measured"]["reused"] is True
    assert r2["plan"]["packed"] == (not saved["packing"])
