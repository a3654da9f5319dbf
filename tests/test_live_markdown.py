"""An answer is formatted while it streams (static/js/live.js), in a real
Chromium against a real daphne: headings, emphasis, lists, tables, links and
code are elements before `generation.finished`, an unclosed fence is an open
code block, the swap to the server's HTML changes neither text nor layout,
only the last block is rendered again, and markup split across deltas never
runs."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import LiveServer
from tests.fake_llm import Reply
from tests.test_browser import SHOTS, Tabs, ask, finished, open_chat

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


RICH_CHUNKS = [
    "## Plan", "ning\n\n",
    "Some **bo", "ld** text and *empha", "sis*.\n\n",
    "- one\n", "- two\n\n",
    "| a | b |\n", "|---|---|\n", "| 1 | 2 |\n\n",
    "See [the docs](https://example.com/docs).\n\n",
    "```python\n", "def f(x):\n", "    return x  # the same\n",
]  # fmt: skip
# The fence is never closed: an open code block, on the page as on the server.

STREAMING = '.msg-assistant[data-status="streaming"]'

# The layout of an answer's body: its text and each block's box.
LAYOUT = """(body) => ({
  text: body.innerText,
  height: body.getBoundingClientRect().height,
  blocks: [...body.children].map((b) => {
    const r = b.getBoundingClientRect();
    return [b.tagName, Math.round(r.top - body.getBoundingClientRect().top), Math.round(r.height)];
  }),
})"""


def test_markdown_is_formatted_while_it_streams_and_the_swap_changes_nothing(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    fake_llm.script(Reply(chunks=RICH_CHUNKS, delay=0.03, hold_end=True))
    page = tabs.new(alice)
    open_chat(page, daphne_server)
    ask(page, "Show me everything")

    streaming = page.locator(STREAMING)
    body = streaming.locator(".msg-body")
    # Every construct is an element before the answer finishes.
    expect(body.locator("h2")).to_have_text("Planning")
    expect(body.locator("strong")).to_have_text("bold")
    heading = body.locator("h2").element_handle()  # a finished block by now
    expect(body.locator("em")).to_have_text("emphasis")
    expect(body.locator("ul > li")).to_have_text(["one", "two"])
    expect(body.locator("table td")).to_have_text(["1", "2"])
    link = body.get_by_role("link", name="the docs")
    expect(link).to_have_attribute("target", "_blank")
    expect(link).to_have_attribute("rel", "noopener noreferrer nofollow")
    # The unclosed fence: an open, highlighted code block with its copy button.
    code = body.locator(".code-block pre code.language-python")
    expect(code).to_contain_text("return x  # the same")
    expect(code.locator(".hljs-keyword").first).to_have_text("def")
    expect(body.locator(".code-block .code-lang")).to_have_text("python")
    expect(body.get_by_role("button", name="Copy code")).to_be_visible()
    # The heading, finished long ago, is still the node first rendered.
    assert heading.evaluate("h => h.isConnected")
    page.screenshot(path=str(SHOTS / "live-markdown-streaming.png"))

    # Another tab opened now gets a snapshot: formatted the same way.
    other = tabs.new(alice)
    open_chat(other, daphne_server, page.url.replace(daphne_server.url, ""))
    expect(other.locator(STREAMING).locator(".msg-body h2")).to_have_text("Planning")
    expect(other.locator(STREAMING).locator(".msg-body .code-block code")).to_contain_text("return x")

    before = body.evaluate(LAYOUT)
    fake_llm.release_hangs()
    done = finished(page)
    expect(done).to_have_count(1)
    # The server's HTML (Pygments classes now) in place of the page's own.
    expect(done.locator(".msg-body pre code .hl-k").first).to_have_text("def")
    after = done.locator(".msg-body").evaluate(LAYOUT)
    assert after["text"] == before["text"]
    assert after["blocks"] == before["blocks"]
    assert abs(after["height"] - before["height"]) < 1
    page.screenshot(path=str(SHOTS / "live-markdown-finished.png"))
    assert tabs.dialogs == []


XSS_PIECES = (
    "Look: <img src=x onerror=\"window.__xss='img'\"> and <script>window.__xss='script'</script>\n\n"
    "[click](javascript:window.__xss='link') [case](JaVaScRiPt:window.__xss='case') "
    "[data](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==) <javascript:window.__xss='auto'>\n\n"
    "[ent](&#106;avascript:window.__xss='entity') ![pic](x\" onerror=\"window.__xss='alt')\n\n"
    "<a href=\"javascript:window.__xss='raw'\">raw</a> <svg onload=\"window.__xss='svg'\"></svg>\n\n"
    "```\"><img src=x onerror=window.__xss='info'>\ncode\n```\n\n"
    "<iframe src=\"javascript:window.__xss='frame'\"></iframe> the end"
)


def assert_nothing_ran(page: Page) -> None:
    log = page.locator("#messages")
    assert log.locator("img, script, svg:not(.icon), iframe, object, embed").count() == 0
    assert log.locator("[onerror], [onload], [style]").count() == 0
    hrefs = log.locator("a").evaluate_all("as => as.map(a => a.getAttribute('href') || '')")
    assert not [h for h in hrefs if h.strip().lower().startswith(("javascript", "data", "vbscript"))]
    assert page.evaluate("() => window.__xss") is None


def test_markup_split_across_deltas_never_runs_while_streaming(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    # Seven characters a delta: every tag and link arrives in pieces.
    pieces = [XSS_PIECES[i : i + 7] for i in range(0, len(XSS_PIECES), 7)]
    fake_llm.script(Reply(chunks=pieces, delay=0.002, hold_end=True))
    page = tabs.new(alice)
    open_chat(page, daphne_server)
    ask(page, "Try to break the page")
    streaming = page.locator(STREAMING)
    expect(streaming).to_contain_text("the end")
    expect(streaming.locator(".msg-body p").first).to_contain_text("<img src=x")  # shown as text
    assert_nothing_ran(page)
    fake_llm.release_hangs()
    expect(finished(page)).to_contain_text("the end")
    assert_nothing_ran(page)
    assert tabs.dialogs == []


def test_a_long_answer_renders_only_its_last_block_again(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    # 150 paragraphs of 5 deltas each. Rendering the whole answer per delta
    # would add ~ paragraphs x deltas / 2 nodes (tens of thousands); rendering
    # the last block only adds a few per render.
    chunks = []
    for i in range(150):
        chunks += [f"Paragraph {i} ", "has **some", "** words ", "in it", ".\n\n"]
    fake_llm.script(Reply(chunks=chunks, delay=0.001))
    page = tabs.new(alice)
    open_chat(page, daphne_server)
    page.evaluate(
        """() => {
          window.__added = 0;
          new MutationObserver((records) => {
            for (const r of records) window.__added += r.addedNodes.length;
          }).observe(document.getElementById('messages-inner'), {childList: true, subtree: true});
        }"""
    )
    ask(page, "Write a lot")
    done = finished(page)
    expect(done.locator(".msg-body > p")).to_have_count(150, timeout=20_000)
    added = page.evaluate("() => window.__added")
    assert added < 20 * len(chunks), added
