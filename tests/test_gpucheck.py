"""The GPU check's CPU-testable pieces: the no-CUDA stop, the part runner (PASS/FAIL/SKIP, timeouts, summary, exit code),
the 8B-shaped model's sizes, the merge check, and the offline wheel list and slimming. The GPU parts run on a GPU only."""
import base64, csv, hashlib, io, json, os, subprocess, sys, zipfile
from pathlib import Path
import pytest
from anita import gpucheck as G
from anita import gpurunner, gpuwheels

ROOT = Path(__file__).resolve().parents[1]

def _py(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "anita.gpucheck", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)

no_cuda = pytest.mark.skipif(G.cuda_probe()["ok"], reason="CUDA is usable here: the no-CUDA stop cannot be seen")

@no_cuda
def test_no_cuda_stops_at_once():
    r = _py("--out", "runs/should-not-exist", timeout=60)
    assert r.returncode == G.EXIT_NO_CUDA == 3
    assert r.stderr.startswith("gpu-check: no CUDA: ") and "Traceback" not in r.stderr + r.stdout
    # with a driver but a CPU-only torch (this machine's), the message names the torch build
    import torch
    if torch.version.cuda is None:
        r = _py(env={"ANITA_GPUCHECK_ASSUME_DRIVER": "1"})
        assert r.returncode == 3 and "CPU-only build" in r.stderr and "Traceback" not in r.stderr

def test_driver_but_no_torch_stops_with_a_message(tmp_path, monkeypatch, capsys):
    "A Python that sees the driver but has no torch (e.g. a venv that hides the node's) exits 3 with a message, no traceback."
    monkeypatch.setattr(G, "cuda_probe", lambda: dict(ok=True, driver="580", torch=None, torch_cuda=None, devices=[],
                                                      reason="driver found; torch is not installed in this Python yet"))
    assert G.main(["--out", str(tmp_path/"gc")]) == G.EXIT_NO_CUDA
    err = capsys.readouterr().err
    assert "no CUDA: driver found; torch is not installed" in err and sys.executable in err
    assert not (tmp_path/"gc").exists()

@no_cuda
def test_make_gpu_check_stops_before_installing(tmp_path):
    "`make gpu-check` probes with the system Python before any install and stops with the check's message."
    r = subprocess.run(["make", "-s", "gpu-check", f"GPU_CHECK_OUT={tmp_path}/out", f"VENV={tmp_path}/no-venv"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "gpu-check: no CUDA" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path/"no-venv").exists() and not (tmp_path/"out").exists()

def test_runner_keeps_going_and_summarises(tmp_path):
    r = _py("--selftest", "--out", str(tmp_path))
    assert r.returncode == G.EXIT_FAILED, r.stderr
    lines = r.stdout.splitlines()
    assert [l.split()[:2] for l in lines] == [["PASS", "ok"], ["FAIL", "broken"], ["SKIP", "n/a"], ["FAIL", "hang"],
                                             ["FAIL", "crash"], ["PASS", "after"]]
    s = json.loads((tmp_path/"gpu-check.json").read_text())
    assert s["status"] == "FAIL" and s["failed"] == ["broken", "hang", "crash"]
    assert "timed out after 3s" in s["parts"]["hang"]["error"] and s["parts"]["hang"]["seconds"] < 30
    assert "exited with code 7" in s["parts"]["crash"]["error"]
    assert "fails on purpose" in Path(s["parts"]["broken"]["log"]).read_text()   # the traceback is in the part's log
    assert s["parts"]["ok"]["figures"]["answer"] == 42
    r = _py("--selftest", "--parts", "ok,n/a,after", "--out", str(tmp_path/"ok"))
    assert r.returncode == G.EXIT_OK and json.loads((tmp_path/"ok"/"gpu-check.json").read_text())["status"] == "PASS"

def test_timeout_kills_the_whole_group(tmp_path):
    "A part that started its own child is killed with it when its time is up."
    mod = tmp_path/"hangmod.py"
    mod.write_text("import subprocess, sys, time\ndef part(pidfile):\n"
                   "    p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
                   "    open(pidfile, 'w').write(str(p.pid)); time.sleep(120)\n")
    os.environ["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    try: r = gpurunner.run_part("hang", "hangmod:part", dict(pidfile=str(tmp_path/"pid")), timeout_s=5, log_dir=tmp_path)
    finally: os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].split(os.pathsep, 1)[1]
    assert r["status"] == "FAIL" and "timed out" in r["error"]
    pid = int((tmp_path/"pid").read_text())
    import time; time.sleep(0.5)
    alive = Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert not alive

def test_plan_and_env_part(tmp_path):
    names = [p[0] for p in G.plan(tmp_path)]
    assert names == ["env", "bnb", "models", "sft_hf", "sft_unsloth", "sft_compare", "dpo", "ita", "eval"]
    with pytest.raises(ValueError, match="unknown"): G.plan(tmp_path, only=["gpu"])
    e = G.part_env()
    assert e["torch_source"] == "pinned" or "node's own torch" in e["torch_source"]
    assert e["versions"]["transformers"] and isinstance(e["missing"], list)

def test_llama3_8b_shape():
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    cfg = G.llama3_8b_config(32)
    with torch.device("meta"): m = AutoModelForCausalLM.from_config(cfg)
    assert round(sum(p.numel() for p in m.parameters())/1e9, 2) == 8.03    # Meta-Llama-3-8B's parameter count
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads) == (128256, 4096, 14336, 8)

def test_check_merge(tiny_llama3_dir, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    from peft import get_peft_model
    from anita.backends import lora_config
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama3_dir), lora_config(r=4, alpha=8))
    for n, p in pm.named_parameters():
        if "lora_B" in n: torch.nn.init.normal_(p, std=0.05)
    pm.save_pretrained(tmp_path/"adapter")
    merged = pm.merge_and_unload(); merged.save_pretrained(tmp_path/"merged")
    assert G.check_merge(tiny_llama3_dir, tmp_path/"adapter", tmp_path/"merged")["max_rel_diff"] < 1e-6
    with pytest.raises(AssertionError, match="not merged"): G.check_merge(tiny_llama3_dir, tmp_path/"adapter", tiny_llama3_dir)
    sd = merged.state_dict(); k = next(k for k in sd if "q_proj" in k); sd[k] = sd[k] * 1.5   # a wrong merge
    merged.load_state_dict(sd); merged.save_pretrained(tmp_path/"bad")
    with pytest.raises(AssertionError, match="differ from base\\+adapter"): G.check_merge(tiny_llama3_dir, tmp_path/"adapter", tmp_path/"bad")

def _wheel(d, name, files, requires=()):
    p = Path(d)/f"{name}-1.0-py3-none-manylinux_2_24_x86_64.whl"
    rec, di = [], f"{name}-1.0.dist-info"
    files = {**files, f"{di}/METADATA": ("Metadata-Version: 2.1\nName: " + name + "\nVersion: 1.0\n"
             + "".join(f"Requires-Dist: {r}\n" for r in requires)).encode(),
             f"{di}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: py3-none-manylinux_2_24_x86_64\n"}
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        for n, data in files.items():
            z.writestr(n, data)
            rec.append([n, "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode(), str(len(data))])
        rec.append([f"{di}/RECORD", "", ""])
        buf = io.StringIO(); csv.writer(buf, lineterminator="\n").writerows(rec); z.writestr(f"{di}/RECORD", buf.getvalue())
    return p

def test_slim_wheel_installs(tmp_path):
    "A bitsandbytes-like wheel slimmed to one CUDA binary still installs with pip; the other binaries are gone."
    libs = {f"bnbx/libbitsandbytes_cuda{v}.so": os.urandom(200_000) for v in ("118", "124", "126", "128", "129", "130")}
    w = _wheel(tmp_path, "bnbx", {"bnbx/__init__.py": b"X = 1\n", "bnbx/libbitsandbytes_cpu.so": b"cpu",
                                  "bnbx/libbitsandbytes_rocm63.so": os.urandom(200_000), "bnbx/libbitsandbytes_cuda130.dll": b"win",
                                  "bnbx/native/libfoo.dylib": b"mac", **libs})
    (tmp_path/"slim").mkdir()
    r = gpuwheels.slim_wheel(w, tmp_path/"slim", cuda="130")
    assert r["mib"] < r["mib_before"] / 4 and len(r["dropped"]) == 8
    t = tmp_path/"site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(t),
                        str(tmp_path/"slim"/w.name)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in (t/"bnbx").iterdir() if x.name != "__pycache__") == ["__init__.py", "libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"]
    rec = (t/"bnbx-1.0.dist-info"/"RECORD").read_text()
    assert "cuda126" not in rec and "rocm" not in rec
    assert gpuwheels.slim_wheel(_wheel(tmp_path, "pure", {"pure/__init__.py": b""}), tmp_path/"slim")["dropped"] == []

def test_wheel_list(tmp_path):
    "The closure follows Requires-Dist (markers for the node's Python), leaves torch-built packages to the node, and keeps the size limit."
    deps = {"trl": ["accelerate>=1", "datasets>=4", "jinja2"], "datasets": ["pyarrow>=21", "dill<0.4.2", "pandas",
            "tomli; python_version < '3.11'"], "unsloth": ["unsloth_zoo", "torch", "xformers; platform_system == 'Linux'", "bitsandbytes"],
            "lm-eval": ["scikit-learn", "sacrebleu", "extra-thing; extra == 'dev'"]}
    big = {"pyarrow": 700_000, "scikit-learn": 900_000}
    def download(n, raw):
        return _wheel(raw, n.replace("-", "_"), {f"{n.replace('-', '_')}/x.bin": os.urandom(big.get(n, 1000))}, deps.get(n, []))
    r = gpuwheels.gpu_wheels(tmp_path/"w", present=gpuwheels.parse_freeze("torch==2.11.0+cu130\ntransformers==5.17.0\naccelerate==1.15.0\nJinja2==3\nnumpy==2\n"),
                     python_version="3.12", max_mib=1.2, download=download)
    assert set(r["carried"]) == {"trl", "datasets", "pyarrow", "dill", "pandas", "bitsandbytes", "unsloth", "unsloth-zoo"}
    assert r["left_to_node"] == ["xformers"] and r["ok"]          # torch is the node's (present), xformers too
    assert [g["group"] for g in r["left_out"]] == ["eval"] and "scikit-learn" in r["left_out"][0]["packages"]
    assert r["total_mib"] <= 1.2 and sum(f.stat().st_size for f in (tmp_path/"w").glob("*.whl"))/2**20 <= 1.2
    assert json.loads((tmp_path/"w"/"wheels.json").read_text())["carried"]["trl"]["group"] == "training"
    assert gpuwheels.wheel_requires(download("datasets", tmp_path), "3.10")[-1] == "tomli"
    assert "tomli" not in gpuwheels.wheel_requires(download("datasets", tmp_path), "3.12")

def test_slim_pyarrow_parts(tmp_path):
    "pyarrow loses Flight, headers and tests, keeps the libraries `datasets` imports (Substrait: pyarrow.lib links it)."
    w = _wheel(tmp_path, "pyarrow", {"pyarrow/libarrow.so.2500": b"a", "pyarrow/libparquet.so.2500": b"p",
               "pyarrow/libarrow_flight.so.2500": b"f" * 1000, "pyarrow/_flight.cpython-312-x86_64-linux-gnu.so": b"f",
               "pyarrow/libarrow_substrait.so.2500": b"s", "pyarrow/include/arrow/api.h": b"h", "pyarrow/tests/test_x.py": b"t",
               "pyarrow/parquet/__init__.py": b"", "pyarrow/__init__.py": b""})
    (tmp_path/"slim").mkdir()
    r = gpuwheels.slim_wheel(w, tmp_path/"slim")
    assert sorted(r["dropped"]) == ["pyarrow/_flight.cpython-312-x86_64-linux-gnu.so", "pyarrow/include/arrow/api.h",
                                    "pyarrow/libarrow_flight.so.2500", "pyarrow/tests/test_x.py"]
