#!/usr/bin/env python
"""One version set for every install: check that the extras resolve within `constraints.txt` without moving a pin.

    python tests/check_versions.py [constraints.txt] [extra ...]    # default extras: gpu vllm

For each extra it asks pip for a dry-run resolution of `.[extra]` with the constraints (package index needed, nothing is
installed) and fails when pip cannot resolve it, or when the resolution would install a pinned package at another
version than the pin, or when the installed training stack (torch, transformers, trl, datasets, peft, accelerate)
differs from the pins. Exit code 0 when all holds, 1 otherwise; one line per finding."""
import json, subprocess, sys, tempfile
from importlib import metadata
from pathlib import Path

STACK = ("torch", "transformers", "trl", "datasets", "peft", "accelerate")

def norm(name): return name.lower().replace("_", "-").replace(".", "-")

def read_pins(path) -> dict:
    "`{name: version}` for each `name==version` line of a constraints file."
    pins = {}
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line: continue
        if "==" not in line: raise ValueError(f"{path}:{i}: expected `name==version`, got {line!r}")
        n, v = line.split("==", 1); pins[norm(n)] = v.strip()
    return pins

def base_version(v): return v.split("+")[0]

def installed_drift(pins, names=STACK) -> list:
    "Findings for installed packages of `names` whose version is not the pin (a local tag such as +cpu is ignored)."
    out = []
    for n in names:
        try: v = metadata.version(n)
        except metadata.PackageNotFoundError: out.append(f"{n}: not installed (pinned {pins.get(norm(n))})"); continue
        if norm(n) in pins and base_version(v) != pins[norm(n)]: out.append(f"{n}: installed {v}, pinned {pins[norm(n)]}")
    return out

def resolution_drift(pins, report:dict, extra:str) -> list:
    "Findings for a pip `--report`: any pinned package it would install at another version than the pin."
    out = []
    for item in report.get("install", []):
        n, v = norm(item["metadata"]["name"]), item["metadata"]["version"]
        if n in pins and base_version(v) != pins[n]: out.append(f"[{extra}] would install {n} {v}, pinned {pins[n]}")
        if n in map(norm, STACK) and n != "torch" and n not in pins: out.append(f"[{extra}] {n} {v} is not pinned")
    return out

def resolve(extra, constraints, root) -> tuple:
    with tempfile.TemporaryDirectory() as d:
        rep = Path(d)/"report.json"
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "-q", "-c", str(constraints),
                            f"{root}[{extra}]", "--report", str(rep)], capture_output=True, text=True)
        if r.returncode: return None, r.stderr.strip().splitlines()[-1:] or [f"pip exit {r.returncode}"]
        return json.loads(rep.read_text()), []

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    root = Path(__file__).resolve().parents[1]
    constraints = Path(argv[0]) if argv else root/"constraints.txt"
    extras = argv[1:] or ["gpu", "vllm"]
    pins = read_pins(constraints)
    bad = installed_drift(pins)
    for e in extras:
        rep, err = resolve(e, constraints, root)
        if err: bad += [f"[{e}] does not resolve within {constraints.name}: {x}" for x in err]; continue
        bad += resolution_drift(pins, rep, e)
        got = {norm(i["metadata"]["name"]): i["metadata"]["version"] for i in rep.get("install", [])}
        print(f"[{e}] resolves within {constraints.name}: " + ", ".join(f"{k} {v}" for k, v in sorted(got.items())
                                                                       if k in pins) or "nothing pinned to add")
    for b in bad: print("version drift:", b)
    if not bad: print("one version set: " + ", ".join(f"{n} {pins[norm(n)]}" for n in STACK))
    return 1 if bad else 0

if __name__ == "__main__": sys.exit(main())
