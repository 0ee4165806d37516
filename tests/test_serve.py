"`anita-serve` as users run it, checked with the `openai` client against the embedded model on 127.0.0.1."
import json, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest

openai = pytest.importorskip("openai")
BIN = Path(sys.executable).parent

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def _start(*args, timeout=600):
    port = _free_port()
    p = subprocess.Popen([str(BIN/"anita-serve"), "--port", str(port), "--quiet", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if p.poll() is not None: raise RuntimeError(f"anita-serve exited {p.returncode}:\n{p.stdout.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r: return p, port, json.loads(r.read())
        except OSError: time.sleep(1)
    p.kill(); raise TimeoutError("anita-serve did not answer /health")

@pytest.fixture(scope="module")
def server():
    p, port, health = _start("--model", "embedded", "--served-name", "anita")
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300), health
    p.terminate(); p.wait(timeout=30)

MSGS = [{"role": "system", "content": "Rispondi in italiano."}, {"role": "user", "content": "Qual è la capitale d'Italia?"}]

def test_models_and_health(server):
    client, health = server
    assert health == {"status": "ok", "model": "anita", "backend": "transformers"}
    assert [m.id for m in client.models.list().data] == ["anita"]

def test_completion_and_stream(server):
    client, _ = server
    r = client.chat.completions.create(model="anita", messages=MSGS, max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    assert text.strip() and r.choices[0].message.role == "assistant" and r.model == "anita"
    assert r.choices[0].finish_reason in ("stop", "length") and 0 < r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 10
    chunks = list(client.chat.completions.create(model="anita", messages=MSGS, max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) >= 2 and "".join(deltas) == text       # greedy: the stream is the same reply, in pieces
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

def test_stop_and_max_tokens(server):
    client, _ = server
    r = client.chat.completions.create(model="anita", messages=MSGS, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    full = client.chat.completions.create(model="anita", messages=MSGS, max_tokens=12, temperature=0).choices[0].message.content
    word = full.split()[1] if len(full.split()) > 1 else full.strip()[-1]
    cut = client.chat.completions.create(model="anita", messages=MSGS, max_tokens=12, temperature=0, stop=[word])
    assert cut.choices[0].message.content == full[:full.index(word)] and cut.choices[0].finish_reason == "stop"

def test_bad_requests(server):
    client, _ = server
    with pytest.raises(openai.BadRequestError, match="messages"): client.chat.completions.create(model="anita", messages=[])
    with pytest.raises(openai.BadRequestError) as e: client.chat.completions.create(model="anita", messages=MSGS, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="anita", messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.NotFoundError, match="this server serves `anita`") as e:
        client.chat.completions.create(model="gpt-4o", messages=MSGS)
    assert e.value.body["code"] == "model_not_found"

def test_missing_model_is_a_clear_error(tmp_path):
    r = subprocess.run([str(BIN/"anita-serve"), "--model", str(tmp_path/"runs"/"demo"/"04_ita"/"merged")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "no such model folder or GGUF file" in r.stderr and "04_ita" in r.stderr

def test_gguf_with_llama_cpp():
    "The GGUF file shipped with the embedded model, served by llama.cpp (needs llama-cpp-python)."
    pytest.importorskip("llama_cpp")
    from anita.core import _smollm2_pkg_dir, SMOLLM2_GGUF
    p, port, health = _start("--model", str(_smollm2_pkg_dir()/SMOLLM2_GGUF))
    try:
        assert health["backend"] == "llama.cpp"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model=health["model"], messages=MSGS, max_tokens=8, temperature=0)
        s = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=health["model"], messages=MSGS, max_tokens=8, temperature=0, stream=True) if c.choices)
        assert r.choices[0].message.content.strip() and s == r.choices[0].message.content
    finally:
        p.terminate(); p.wait(timeout=30)
