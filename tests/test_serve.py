"`anita-serve` as users run it, checked with the `openai` client and raw HTTP against the embedded model on 127.0.0.1."
import http.client, json, os, socket, subprocess, sys, threading, time, urllib.request
from pathlib import Path
import pytest

openai = pytest.importorskip("openai")
BIN = Path(sys.executable).parent
KEY = "test-key-5f1c0e"

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def _health(port) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r: return json.loads(r.read())

def _start(*args, timeout=600, log=None, env=None):
    port = _free_port()
    out = open(log, "w") if log else subprocess.PIPE
    p = subprocess.Popen([str(BIN/"anita-serve"), "--port", str(port), "--quiet", *args], stdout=out,
                         stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    t0 = time.time()
    while time.time() - t0 < timeout:
        if p.poll() is not None:
            raise RuntimeError(f"anita-serve exited {p.returncode}:\n{Path(log).read_text() if log else p.stdout.read()}")
        try: return p, port, _health(port)
        except OSError: time.sleep(1)
    p.kill()
    raise TimeoutError("anita-serve did not answer /health")

def _stop(p):
    p.terminate()
    try: p.wait(timeout=30)
    except subprocess.TimeoutExpired: p.kill()

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    "The embedded model behind an API key (from ANITA_API_KEY), 2 slots, 300 kB bodies at most; its log in a file."
    log = tmp_path_factory.mktemp("serve")/"serve.log"
    p, port, health = _start("--model", "embedded", "--served-name", "anita", "--parallel", "2", "--queue-size", "4",
                             "--request-timeout", "120", "--max-request-bytes", "300000", log=log,
                             env={"ANITA_API_KEY": KEY})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120)
    yield dict(client=client, health=health, port=port, log=log)
    _stop(p)

MSGS = [{"role": "system", "content": "Rispondi in italiano."}, {"role": "user", "content": "Qual è la capitale d'Italia?"}]

def _wait_health(port, cond, timeout=30) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        h = _health(port)
        if cond(h): return h
        time.sleep(0.2)
    raise AssertionError(f"/health did not reach the state in {timeout} s: {h}")

def _send(port, method="POST", path="/v1/chat/completions", body=b"", headers=None, timeout=30):
    "A raw request; the open connection (read it with `getresponse`)."
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.putrequest(method, path, skip_accept_encoding=True)
    for k, v in {"Authorization": f"Bearer {KEY}", "Content-Length": str(len(body)), **(headers or {})}.items():
        if v is not None: c.putheader(k, v)
    c.endheaders(body or None)
    return c

def _call(port, method="POST", path="/v1/chat/completions", body=b"", headers=None, timeout=30):
    "Status, headers and JSON body of a raw request."
    c = _send(port, method, path, body, headers, timeout)
    r = c.getresponse()
    out = r.status, dict(r.getheaders()), json.loads(r.read() or b"null")
    c.close()
    return out

def _long_body(max_tokens=4000, stream=False) -> bytes:
    "A request that runs to `max_tokens` (vLLM's `ignore_eos`): thousands of tokens, minutes on a CPU."
    body = dict(model="anita", messages=MSGS, max_tokens=max_tokens, temperature=0, ignore_eos=True, stream=stream)
    return json.dumps(body).encode()

def test_models_and_health(server):
    h = server["health"]
    assert (h["status"], h["model"], h["backend"], h["auth"]) == ("ok", "anita", "transformers", True)
    assert h["context_length"] == 8192 and h["parallel"] == 2 and h["queue_size"] == 4
    assert [m.id for m in server["client"].models.list().data] == ["anita"]

def test_completion_and_stream(server):
    client = server["client"]
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
    client = server["client"]
    r = client.chat.completions.create(model="anita", messages=MSGS, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    full = client.chat.completions.create(model="anita", messages=MSGS, max_tokens=12, temperature=0).choices[0].message.content
    word = full.split()[1] if len(full.split()) > 1 else full.strip()[-1]
    cut = client.chat.completions.create(model="anita", messages=MSGS, max_tokens=12, temperature=0, stop=[word])
    assert cut.choices[0].message.content == full[:full.index(word)] and cut.choices[0].finish_reason == "stop"

def test_bad_requests(server):
    client = server["client"]
    with pytest.raises(openai.BadRequestError, match="messages"): client.chat.completions.create(model="anita", messages=[])
    with pytest.raises(openai.BadRequestError) as e: client.chat.completions.create(model="anita", messages=MSGS, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="anita", messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.NotFoundError, match="this server serves `anita`") as e:
        client.chat.completions.create(model="gpt-4o", messages=MSGS)
    assert e.value.body["code"] == "model_not_found"

# Issue 23, item 1: long prompts are refused before generating; a client that leaves stops its generation; a long
# request does not hold up a short one; a full queue is a 503; every request has a time limit.

def test_prompt_checked_against_context_and_size(server):
    client = server["client"].with_options(timeout=60)
    t0 = time.time()
    ask = lambda text, n: client.chat.completions.create(model="anita", messages=[{"role": "user", "content": text}], max_tokens=n)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 8192") as e:     # the 200 kB prompt
        ask("ciao " * 40_000, 2)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"
    assert time.time() - t0 < 60
    with pytest.raises(openai.BadRequestError, match="context length"): ask("ciao " * 5000, 4000)  # fits, not with max_tokens
    status, _, body = _call(server["port"], body=json.dumps(dict(messages=[{"role": "user", "content": "x" * 400_000}])).encode())
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert "--max-request-bytes" in body["error"]["message"]

def _cancelled_after(port, n0, timeout=30):
    return _wait_health(port, lambda h: h["running"] == 0 and h["cancelled"] > n0, timeout)

def test_generation_stops_when_the_client_leaves(server):
    port, client = server["port"], server["client"]
    n0 = _health(port)["cancelled"]
    with pytest.raises(openai.APITimeoutError):                 # non-streaming: the client gives up after 3 s
        client.with_options(timeout=3).chat.completions.create(model="anita", messages=MSGS, max_tokens=4000, temperature=0,
                                                               extra_body={"ignore_eos": True})
    h = _cancelled_after(port, n0)
    c = _send(port, body=_long_body(stream=True))               # streaming: read the first event, then hang up
    r = c.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    c.close()
    _cancelled_after(port, h["cancelled"])

def test_short_request_is_not_blocked_by_a_long_one(server):
    port, client = server["port"], server["client"]
    short = lambda timeout: client.with_options(timeout=timeout).chat.completions.create(model="anita", messages=MSGS,
                                                                                        max_tokens=2, temperature=0)
    alone = short(120).choices[0].message.content
    c = _send(port, body=_long_body())
    try:
        _wait_health(port, lambda h: h["running"] == 1)
        t0 = time.time()
        r = short(60)
        assert r.choices[0].message.content == alone and time.time() - t0 < 60     # the same greedy reply, beside the long one
        assert _health(port)["running"] == 1                                       # and the long one is still going
    finally: c.close()
    _wait_health(port, lambda h: h["running"] == 0)

def test_queue_full_and_time_limit(tmp_path):
    "One slot, no queue, 8 s per request: a second request is refused at once; the first ends at its time limit."
    p, port, _ = _start("--model", "embedded", "--served-name", "anita", "--parallel", "1", "--queue-size", "0",
                        "--request-timeout", "8", log=tmp_path/"serve.log", env={"ANITA_API_KEY": KEY})
    try:
        t0 = time.time()
        c = _send(port, body=_long_body(), timeout=60)
        _wait_health(port, lambda h: h["running"] == 1)
        status, headers, body = _call(port, body=_long_body(2))
        assert status == 503 and headers["Retry-After"] == "1" and body["error"]["code"] == "server_overloaded"
        assert "queue" in body["error"]["message"]
        r = c.getresponse()
        out = json.loads(r.read())
        assert r.status == 200 and out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["completion_tokens"] < 4000
        assert time.time() - t0 < 60
        h = _health(port)
        assert (h["timed_out"], h["refused"]) == (1, 1)
    finally: _stop(p)

# Item 2: HTTP-level errors are JSON errors with the right status, and client errors leave no traceback in the log.

def _raw(port, data:bytes, timeout=15):
    "Status and JSON body for raw bytes sent on a fresh connection (the server closes it after an error)."
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        size = lambda: int(buf.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        while b"\r\n\r\n" not in buf or len(buf.split(b"\r\n\r\n", 1)[1]) < size():
            got = s.recv(65536)
            if not got: break
            buf += got
    head, body = buf.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)

def test_http_errors_are_json(server):
    port = server["port"]
    deep = b"[" * 100_000 + b"]" * 100_000
    for (method, headers, body), (status, code) in [
            (("POST", {"Content-Length": "abc"}, b""), (400, "bad_content_length")),
            (("POST", {"Content-Length": "-1"}, b""), (400, "bad_content_length")),
            (("POST", {"Content-Length": None}, b""), (411, "length_required")),
            (("POST", {"Content-Length": None, "Transfer-Encoding": "chunked"}, b""), (411, "length_required")),
            (("POST", {}, deep[:150_000]), (400, "invalid_request")),
            (("POST", {}, b"{\"messages\": [" + b"[" * 50_000), (400, "invalid_request")),
            (("PUT", {}, b"{}"), (405, "method_not_allowed")),
            (("DELETE", {}, b""), (405, "method_not_allowed")),
            (("BREW", {}, b""), (501, "not_implemented"))]:
        t0 = time.time()
        got = _call(port, method, body=body, headers=headers, timeout=15)
        assert (got[0], got[2]["error"]["code"]) == (status, code), (method, headers, body[:20], got)
        assert set(got[2]["error"]) == {"message", "type", "param", "code"} and time.time() - t0 < 15
    assert _call(port, "POST", body=deep)[2]["error"]["message"] == "the request body is nested too deeply"
    assert _call(port, "GET", "/v1/nowhere")[0] == 404 and _call(port, "POST", "/v2/x", b"{}")[0] == 404
    assert _raw(port, b"GARBAGE\r\n\r\n")[0] == 400
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:           # a client that leaves mid-body
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                  b"\r\nContent-Length: 1000\r\n\r\n{\"mess")
    assert _health(port)["status"] == "ok"
    time.sleep(0.5)
    log = Path(server["log"]).read_text()
    assert "Traceback" not in log and KEY not in log, log[-3000:]

# Item 3: options are checked before the model loads: a one-line error, exit code 2.

@pytest.mark.parametrize("args,msg", [(["--port", "99999"], "--port 99999: expected 0-65535"),
                                      (["--max-tokens-limit", "-5"], "--max-tokens-limit -5: expected a positive integer"),
                                      (["--parallel", "0"], "--parallel 0"), (["--queue-size", "-1"], "--queue-size -1"),
                                      (["--request-timeout", "0"], "--request-timeout 0"),
                                      (["--host", "0.0.0.0"], "not a loopback address and no API key")])
def test_bad_options_before_loading(tmp_path, args, msg):
    env = {k: v for k, v in os.environ.items() if k != "ANITA_API_KEY"}
    r = subprocess.run([str(BIN/"anita-serve"), "--model", str(tmp_path/"runs"/"x"/"merged"), *args],
                       capture_output=True, text=True, timeout=300, env=env)   # the model is missing too: the option first
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("anita-serve: error: "), r.stderr
    assert msg in r.stderr and "Traceback" not in r.stderr

def test_port_in_use_is_an_error_before_loading():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        t0 = time.time()
        r = subprocess.run([str(BIN/"anita-serve"), "--port", str(s.getsockname()[1])], capture_output=True, text=True,
                           timeout=300)
    assert r.returncode == 2 and "in use" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "anita-serve:" not in r.stdout                                   # it never announced a loaded model

def test_missing_model_is_a_clear_error(tmp_path):
    r = subprocess.run([str(BIN/"anita-serve"), "--model", str(tmp_path/"runs"/"demo"/"04_ita"/"merged")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "no such model folder or GGUF file" in r.stderr and "04_ita" in r.stderr

# Item 4: an API key, required on /v1 when set.

def test_api_key(server):
    port, client = server["port"], server["client"]
    bad = client.with_options(api_key="wrong")
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="anita", messages=MSGS, max_tokens=2)
    assert e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError): bad.models.list()
    for headers in ({"Authorization": None}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY}x"}):
        status, h, body = _call(port, body=b"{}", headers=headers)
        assert status == 401 and h["WWW-Authenticate"] == "Bearer" and body["error"]["type"] == "invalid_request_error"
    assert _call(port, "GET", "/health", headers={"Authorization": None})[0] == 200
    assert client.chat.completions.create(model="anita", messages=MSGS, max_tokens=2).usage.completion_tokens > 0

def test_gguf_with_llama_cpp():
    "The GGUF file shipped with the embedded model, served by llama.cpp (needs llama-cpp-python)."
    pytest.importorskip("llama_cpp")
    from anita.core import smollm2_pkg_dir, SMOLLM2_GGUF
    p, port, health = _start("--model", str(smollm2_pkg_dir()/SMOLLM2_GGUF))
    try:
        assert health["backend"] == "llama.cpp" and health["parallel"] == 1
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        r = client.chat.completions.create(model=health["model"], messages=MSGS, max_tokens=8, temperature=0)
        s = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=health["model"], messages=MSGS, max_tokens=8, temperature=0, stream=True) if c.choices)
        assert r.choices[0].message.content.strip() and s == r.choices[0].message.content
    finally: _stop(p)
