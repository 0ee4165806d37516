"Chat UI: message handling, streaming, the command line, the notebook, and a real headless-browser test of the Gradio app."
import json, os, shutil, socket, subprocess, sys, threading, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("ANITA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions"]

def test_to_messages_and_cli_defaults():
    from anita.chat import to_messages, parse_args
    from anita.core import ANITA_SYSTEM_PROMPT
    m = to_messages("Ciao", [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text", "text": "b"}]}])
    assert m == [dict(role="system", content=ANITA_SYSTEM_PROMPT), dict(role="user", content="a"),
                 dict(role="assistant", content="b"), dict(role="user", content="Ciao")]
    assert to_messages("x", [], "  ")[0] == dict(role="user", content="x")   # blank system prompt: none
    a = parse_args([])
    assert (a.host, a.share, a.model) == ("127.0.0.1", False, "embedded")   # local only unless asked
    assert parse_args(["--share", "--host", "0.0.0.0"]).share is True

def test_console_command_help(capsys):
    from anita.chat import main        # console_scripts: anita-chat=anita.chat:main
    with pytest.raises(SystemExit) as e: main(["--help"])
    assert e.value.code == 0 and "--model" in capsys.readouterr().out

@pytest.fixture(scope="module")
def chat_model(embedded_dir):
    from anita.chat import load_chat_model
    return load_chat_model(embedded_dir)

def test_stream_chat_streams_and_stops(chat_model):
    import threading
    from anita.chat import stream_chat, to_messages
    m, tok = chat_model
    chunks = list(stream_chat(m, tok, to_messages("Hello! Who are you?"), 0, 1.0, 10))
    assert len(chunks) >= 2, chunks                                   # streamed, not one final string
    assert all(b.startswith(a) for a, b in zip(chunks, chunks[1:]))   # each chunk extends the previous one
    ev = threading.Event()
    g = stream_chat(m, tok, to_messages("Tell me a long story."), 0, 1.0, 500, stop=ev)
    first = next(g); g.close()
    assert ev.is_set() and first

def test_chat_notebook(tmp_path):
    out = tmp_path/"10_chat.ipynb"
    r = subprocess.run([sys.executable, "-m", "papermill", "--cwd", str(ROOT/"nbs"), str(ROOT/"nbs"/"10_chat.ipynb"), str(out),
                        "-p", "root", str(tmp_path), "-p", "max_new_tokens", "8"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = tmp_path/"nbtest"/"10_chat"
    t = json.loads((d/"transcript.json").read_text())
    assert t["n_chunks"] >= 2 and t["reply"].strip() and t["reply"] == t["chunks"][-1]
    assert json.loads((d/"manifest.json").read_text())["status"] == "outputs-written"

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def test_chat_ui_in_headless_browser(chat_model, tmp_path):
    if not Path(CHROMIUM).exists():
        msg = f"browser test skipped: {CHROMIUM} not found (install Debian's `chromium` package)"
        print(msg); pytest.skip(msg)
    try: from playwright.sync_api import sync_playwright
    except ImportError:
        msg = "browser test skipped: the `playwright` Python package is not installed"; print(msg); pytest.skip(msg)
    from anita.chat import build_demo
    demo = build_demo(chat_model, max_new_tokens=24)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=True, quiet=True)
    shot = tmp_path/"chat.png"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded", timeout=120_000)
            box = page.locator("textarea").first
            box.wait_for(timeout=120_000)
            # record every text the bot message shows while it streams
            page.evaluate("""() => { window.__bot = []; window.__stop = false;
                new MutationObserver(() => { const b = document.querySelectorAll('[data-testid="bot"]');
                  const s = document.querySelector('[data-testid="stop-button"]'); if (s && s.offsetParent !== null) window.__stop = true;
                  if (b.length) { const t = b[b.length-1].innerText.trim(); if (t && window.__bot[window.__bot.length-1] !== t) window.__bot.push(t); } })
                .observe(document.body, {subtree: true, childList: true, characterData: true}); }""")
            box.fill("Ciao! Chi sei?")
            box.press("Enter")
            page.locator('[data-testid="bot"]').last.wait_for(timeout=180_000)
            page.wait_for_function("() => window.__bot.length > 0", timeout=180_000)
            # the reply is done when the stop button has gone away again
            page.wait_for_function("() => { const s = document.querySelector('[data-testid=\"stop-button\"]');"
                                   " return !s || s.offsetParent === null; }", timeout=300_000)
            states, stop_seen = page.evaluate("() => window.__bot"), page.evaluate("() => window.__stop")
            page.wait_for_timeout(500)                                      # let the UI settle before the screenshot
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        demo.close()
        if shot.exists():
            keep = Path(os.environ.get("ANITA_SCREENSHOT_DIR", "/tmp"))/"anita_chat_ui.png"
            shutil.copy(shot, keep); print("screenshot:", keep)
    assert shot.exists() and shot.read_bytes()[:4] == b"\x89PNG"
    assert states and states[-1].strip(), states
    assert stop_seen, "no stop button was shown while the reply streamed"
    assert len(states) >= 2, f"reply did not stream: {states}"       # several growing states were seen
    assert all(b.startswith(a[:max(1, len(a)-2)]) for a, b in zip(states, states[1:])), states
