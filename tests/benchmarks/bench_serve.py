"""Load test of `anita-serve`: N concurrent clients, each sending chat completions with a prompt of a random size
(short, medium or long) for a fixed time, non-streaming; prints requests served, latency p50/p95 per prompt size and
errors by status. Not a test (no timed assertions).

    python tests/benchmarks/bench_serve.py              # starts anita-serve on the embedded model; 8 clients, 60 s
    python tests/benchmarks/bench_serve.py --clients 16 --seconds 120 --parallel 4 --queue-size 8
    python tests/benchmarks/bench_serve.py --url http://127.0.0.1:8000 --model 04_ita   # an already running server

`ANITA_API_KEY`, when set, is sent as the bearer key. Each client waits at most `--client-timeout` s for an answer.
"""
import argparse, json, os, random, socket, statistics, subprocess, sys, threading, time, urllib.error, urllib.request
from collections import Counter
from pathlib import Path

SIZES = {"short": 1, "medium": 10, "long": 100}   # repeats of a ~22-token sentence: prompts of ~35, ~255, ~2,500 tokens
SENTENCE = "La capitale d'Italia è Roma, una città antica e bellissima. "

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def start_server(model, parallel, queue_size, request_timeout):
    "`anita-serve` on a free port; (process, base url, /health) once it answers."
    port = _free_port()
    p = subprocess.Popen([str(Path(sys.executable).parent/"anita-serve"), "--model", model, "--port", str(port), "--quiet",
                          "--parallel", str(parallel), "--queue-size", str(queue_size),
                          "--request-timeout", str(request_timeout)])
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if p.poll() is not None: sys.exit(f"anita-serve exited with {p.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r: return p, url, json.loads(r.read())
        except OSError: time.sleep(1)
    p.kill()
    sys.exit("anita-serve did not start")

def client(url, model, key, until, max_tokens, timeout, rng, results, lock):
    "Send requests until `until`; record (size, status, seconds, completion tokens)."
    while time.time() < until:
        size = rng.choice(list(SIZES))
        body = dict(model=model, max_tokens=max_tokens, temperature=0, ignore_eos=True,
                    messages=[{"role": "user", "content": SENTENCE * SIZES[size] + " Riassumi."}])
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(), headers=headers)
        t0, toks = time.time(), 0
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, toks = r.status, json.loads(r.read())["usage"]["completion_tokens"]
        except urllib.error.HTTPError as e:
            status = e.code
            if e.code == 503: time.sleep(float(e.headers.get("Retry-After") or 1))
        except OSError: status = "timeout/connection"
        with lock: results.append((size, status, time.time() - t0, toks))

def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server (default: start one on --model)")
    p.add_argument("--model", default="embedded")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--queue-size", type=int, default=16)
    p.add_argument("--request-timeout", type=float, default=300)
    p.add_argument("--client-timeout", type=float, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args(argv)
    proc = None
    if a.url: url, model = a.url.rstrip("/"), a.model
    else:
        proc, url, health = start_server(a.model, a.parallel, a.queue_size, a.request_timeout)
        model = health["model"]
    key, results, lock = os.environ.get("ANITA_API_KEY"), [], threading.Lock()
    until = time.time() + a.seconds
    ths = [threading.Thread(target=client, args=(url, model, key, until, a.max_tokens, a.client_timeout,
                                                 random.Random(a.seed + i), results, lock)) for i in range(a.clients)]
    t0 = time.time()
    for t in ths: t.start()
    for t in ths: t.join()
    wall = time.time() - t0
    try:
        with urllib.request.urlopen(url + "/health", timeout=10) as r: health = json.loads(r.read())
    except OSError: health = {}
    if proc is not None:
        proc.terminate()
        proc.wait(30)
    ok = [r for r in results if r[1] == 200]
    print(f"{a.clients} clients, {a.seconds:.0f} s (all requests finished after {wall:.0f} s), "
          f"max_tokens {a.max_tokens}, --parallel {health.get('parallel')} --queue-size {health.get('queue_size')}, "
          f"machine: {os.cpu_count()} CPUs")
    print(f"{'prompt':8} {'served':>6} {'p50 s':>7} {'p95 s':>7}")
    for size in [*SIZES, "all"]:
        lat = [r[2] for r in ok if size in (r[0], "all")]
        print(f"{size:8} {len(lat):6d} {pct(lat, .5):7.2f} {pct(lat, .95):7.2f}")
    errors = Counter(r[1] for r in results if r[1] != 200)
    toks = sum(r[3] for r in ok)
    print(f"served {len(ok)} ({len(ok)/wall:.2f}/s, {toks/wall:.1f} completion tokens/s); "
          f"errors: {dict(errors) or 'none'}")
    out = dict(clients=a.clients, seconds=a.seconds, wall=wall, served=len(ok),
               errors={str(k): v for k, v in errors.items()},
               p50=pct([r[2] for r in ok], .5), p95=pct([r[2] for r in ok], .95), tokens_per_s=toks/wall, health=health)
    if a.json: Path(a.json).write_text(json.dumps(out, indent=1))
    return out

if __name__ == "__main__": main()
