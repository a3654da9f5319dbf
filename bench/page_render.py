"""How smooth the chat page stays while a long answer streams and is
formatted as it grows (static/js/live.js), in Debian's Chromium.

Starts the fake OpenAI-compatible server (tests/fake_llm.py), the product
(daphne on a free port, SQLite in a temp dir) and a headless Chromium; asks
one question whose answer is `--tokens` deltas `--delay` seconds apart
(markdown of every kind: headings, paragraphs with emphasis, lists, tables,
and a code block of a fifth of the answer, the costliest case: one block that
grows for long), and prints one JSON line measured in the page:

- frames: animation frames seen while it streamed, and the gap between
  frames p50 / p99 / max (ms): 16.7 is 60 frames a second;
- long_tasks: main-thread tasks over 50 ms (count, longest, total ms);
- renders: how often live.js rendered, and its time per render p50 / p99 /
  max (ms), from the `live-render` measures it leaves when the page's URL
  has `#measure`;
- swap_ms: the swap to the server's HTML at `generation.finished`.

    .venv/bin/python bench/page_render.py                        # 5,000 tokens at 100/s
    .venv/bin/python bench/page_render.py --tokens 2000 --delay 0.005
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fake_llm import FakeLLM, Reply  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PASSWORD = "bench-password-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def answer_chunks(tokens: int) -> list[str]:
    """`tokens` deltas of markdown: sections of prose, lists and tables, with
    one long code block in the middle (a fifth of the tokens)."""
    chunks: list[str] = []
    code_at, code_len = tokens * 2 // 5, tokens // 5
    section = 0
    while len(chunks) < tokens:
        if len(chunks) >= code_at and code_len:
            chunks.append("```python\n")
            for i in range(code_len):
                chunks.append(f"value_{i} = compute({i}) + 1  # step {i}\n" if i % 4 == 0 else f"    x{i}")
            chunks.append("\n```\n\n")
            code_len = 0
            continue
        section += 1
        chunks += [f"## Section {section}\n\n", "This ", "is **", "bold", "** and ", "*this*", " is not. "]
        chunks += [f"Word{j} " for j in range(20)] + ["\n\n"]
        chunks += ["- first ", "item\n", "- second ", "`item`\n\n"]
        chunks += ["| a | b |\n", "|---|---|\n", f"| {section} | x |\n\n"]
    return chunks[:tokens]


PAGE_PROBE = """() => {
  window.__bench = {gaps: [], long: [], streaming: false};
  let last = performance.now();
  const tick = (now) => {
    if (window.__bench.streaming) window.__bench.gaps.push(now - last);
    last = now;
    requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) if (window.__bench.streaming) window.__bench.long.push(e.duration);
  }).observe({type: 'longtask'});
  const inner = document.getElementById('messages-inner');
  new MutationObserver(() => {
    const s = document.querySelector('.msg-assistant[data-status="streaming"]');
    const b = window.__bench;
    if (s && !b.streaming) { b.streaming = true; b.started = performance.now(); }
    const done = document.querySelector('.msg-assistant[data-status="complete"]');
    if (done && b.streaming) { b.streaming = false; b.ended = performance.now(); }
  }).observe(inner, {subtree: true, childList: true, attributes: true, attributeFilter: ['data-status']});
}"""


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=5000, help="deltas in the answer (default 5000)")
    parser.add_argument(
        "--delay", type=float, default=0.01, help="seconds between deltas (default 0.01: 100/s)"
    )
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="page-render-"))
    fake = FakeLLM().start()
    chunks = answer_chunks(args.tokens)
    fake.script(Reply(chunks=chunks, delay=args.delay))
    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "chatsite.settings",
        "DATABASE_URL": f"sqlite:///{work}/db.sqlite3",
        "OPENAI_API_KEY": "bench",
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_MODEL": "fake-model",
    }
    env.pop("REDIS_URL", None)
    python = sys.executable
    subprocess.run([python, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
    subprocess.run(
        [python, "manage.py", "shell", "-c",
         "from django.contrib.auth.models import User; "
         f"User.objects.create_user('bench', password='{PASSWORD}')"],
        cwd=ROOT, env=env, check=True,
    )  # fmt: skip
    log = open(work / "daphne.log", "wb")
    server = subprocess.Popen(
        [python, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "chatsite.asgi:application"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url + "/accounts/login/")
            page.get_by_label("Username").fill("bench")
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url(url + "/")
            page.goto("about:blank")
            page.goto(url + "/#measure")  # a fresh load: live.js reads the hash once
            page.wait_for_selector("#composer[data-ready]")
            page.evaluate(PAGE_PROBE)
            box = page.get_by_role("textbox", name="Message", exact=True)
            box.fill("Write a long answer")
            box.press("Enter")
            page.wait_for_selector(
                '.msg-assistant[data-status="complete"]', timeout=args.tokens * args.delay * 1000 + 60_000
            )
            data = page.evaluate(
                """() => ({
                  bench: window.__bench,
                  renders: performance.getEntriesByName('live-render').map((e) => e.duration),
                  swap: performance.getEntriesByName('live-swap').map((e) => e.duration),
                  blocks: document.querySelector('.msg-assistant .msg-body').children.length,
                })"""
            )
            browser.close()
    finally:
        server.terminate()
        server.wait(10)
        fake.stop()
        log.close()
    bench, renders, gaps, long = data["bench"], data["renders"], data["bench"]["gaps"], data["bench"]["long"]
    print(json.dumps({
        "tokens": args.tokens,
        "delay_s": args.delay,
        "streamed_s": round((bench.get("ended", 0) - bench.get("started", 0)) / 1000, 2),
        "blocks": data["blocks"],
        "frames": len(gaps),
        "frame_gap_ms": {"p50": pct(gaps, 50), "p99": pct(gaps, 99), "max": pct(gaps, 100)},
        "long_tasks": {"count": len(long), "longest_ms": pct(long, 100), "total_ms": round(sum(long), 1)},
        "renders": len(renders),
        "render_ms": {"p50": pct(renders, 50), "p99": pct(renders, 99), "max": pct(renders, 100),
                      "total": round(sum(renders), 1)},
        "swap_ms": pct(data["swap"], 100),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
