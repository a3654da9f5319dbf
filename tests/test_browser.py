"""The page in a real browser: Debian's Chromium driven by Playwright, against
a real daphne serving the site and the fake model behind it.

This module holds the shared browser fixtures and helpers, and the streaming
tests: the answer streams, survives a reload mid-stream, reaches a second
browser live, and survives a dropped socket and a lost frame."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
from django.conf import settings as django_settings
from django.db import connections
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Dialog,
    Page,
    expect,
    sync_playwright,
)

from conversations.models import Conversation, Message
from tests.conftest import ARTIFACTS, LiveServer
from tests.factories import PASSWORD, session_cookie
from tests.fake_llm import Reply

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

T = TypeVar("T")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SHOTS = ARTIFACTS / "screenshots"
DESKTOP = {"width": 1200, "height": 800}

ANSWER_CHUNKS = [
    "Here is ",
    "a function ",
    "that adds:\n\n",
    "```python\n",
    "def add(a, b):\n",
    "    return a + b\n",
    "```\n\n",
    "It returns ",
    "**the sum**.",
] + [f" More{i}." for i in range(30)]
ANSWER = "".join(ANSWER_CHUNKS)


# --- Browser fixtures ---------------------------------------------------------------


def launch_browser() -> Iterator[Browser]:
    """Chromium for one test module. No skip when Chromium is missing:
    launching fails, and so does the test.

    Playwright's sync API keeps its (idle) event loop set on this thread while
    it lives, which makes Django refuse the ORM calls of fixtures (`alice`, the
    flush between transactional tests) here: nothing awaits on that loop while
    they run, so they are allowed while the browser lives."""
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            yield browser
            browser.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


class Tabs:
    """Opens pages in fresh browser contexts; records console errors (CSP
    violations included), uncaught exceptions and JavaScript dialogs."""

    def __init__(self, browser: Browser, server: LiveServer) -> None:
        self.browser = browser
        self.server = server
        self.contexts: list[BrowserContext] = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        # Console errors a test causes on purpose (e.g. a socket it cuts).
        self.allowed: list[re.Pattern[str]] = []

    def new(self, user: Any | None = None, **context_options: Any) -> Page:
        options = {"viewport": DESKTOP, **context_options}
        context = self.browser.new_context(**options)
        self.contexts.append(context)
        if user is not None:
            cookie = in_thread(lambda: session_cookie(user))
            context.add_cookies(
                [{"name": django_settings.SESSION_COOKIE_NAME, "value": cookie, "url": self.server.url}]
            )
        page = context.new_page()

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                self.errors.append(f"{page.url}: {message.text}")

        page.on("console", on_console)
        page.on("pageerror", lambda e: self.errors.append(f"{page.url}: uncaught {e}"))

        def on_dialog(dialog: Dialog) -> None:
            self.dialogs.append(f"{dialog.type}: {dialog.message}")
            dialog.dismiss()

        page.on("dialog", on_dialog)
        return page

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not any(p.search(e) for p in self.allowed)]

    def close(self) -> None:
        for context in self.contexts:
            context.close()


def open_tabs(browser: Browser, server: LiveServer) -> Iterator[Tabs]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    tabs = Tabs(browser, server)
    yield tabs
    tabs.close()
    # Every page of every test: no console error, no CSP violation, no dialog.
    assert tabs.unexpected_errors() == []
    assert tabs.dialogs == []


# --- Helpers ---------------------------------------------------------------------------


def in_thread(query: Callable[[], T]) -> T:
    """Run an ORM query off this thread: Playwright's sync API keeps an event
    loop running here, and Django refuses ORM calls beside a running loop."""

    def run() -> T:
        try:
            return query()
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result()


def log_in(page: Page, server: LiveServer, username: str) -> None:
    page.goto(server.url + "/")
    expect(page).to_have_url(f"{server.url}/accounts/login/?next=/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(server.url + "/")


def open_chat(page: Page, server: LiveServer, path: str = "/") -> None:
    """Open a chat page and wait until it is interactive (socket open)."""
    page.goto(server.url + path)
    expect(page.locator("#composer[data-ready]")).to_have_count(1)


def composer(page: Page) -> Any:
    return page.get_by_role("textbox", name="Message", exact=True)


def ask(page: Page, text: str) -> None:
    box = composer(page)
    box.fill(text)
    box.press("Enter")


def finished(page: Page, status: str = "complete") -> Any:
    return page.locator(f'.msg-assistant:not([hidden])[data-status="{status}"]')


def make_conversation(user: Any, title: str = "A chat", turns: int = 1, **fields: Any) -> Conversation:
    conversation = Conversation.objects.create(owner=user, title=title, **fields)
    for i in range(turns):
        Message.objects.create(conversation=conversation, role="user", content=f"Question {i}")
        Message.objects.create(conversation=conversation, role="assistant", content=f"Answer {i}")
    return conversation


# --- The tests ------------------------------------------------------------------------------


def test_log_in_send_watch_the_answer_stream_reload_see_it_persisted(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    fake_llm.script(Reply(chunks=ANSWER_CHUNKS, delay=0.04, usage=(40, 120)))
    page = tabs.new()
    log_in(page, daphne_server, "alice")
    expect(page.locator("#composer[data-ready]")).to_have_count(1)
    expect(page.get_by_role("heading", name="How can I help?")).to_be_visible()
    page.screenshot(path=str(SHOTS / "empty.png"))

    ask(page, "Write an add function in Python")

    # The question shows at once and the address bar gets the conversation's URL.
    expect(page.locator(".msg-user").first).to_contain_text("Write an add function in Python")
    expect(page).to_have_url(re.compile(r"/c/[0-9a-f-]{36}/$"))

    # The answer streams, formatted as it grows: the paragraph is a paragraph
    # while its status is still `streaming`. Blocks that are complete are
    # rendered once and kept: only the last block is rendered again.
    streaming = page.locator('.msg-assistant[data-status="streaming"]')
    expect(streaming.locator(".msg-body.prose p").first).to_contain_text("a function")
    expect(streaming.locator(".code-block pre code")).to_contain_text("def add")  # an open code block
    page.evaluate(
        """() => {
          window.__question = document.querySelector('.msg-user');
          window.__firstBlock = document.querySelector('.msg-assistant .msg-body > p');
          window.__added = 0;
          new MutationObserver((records) => {
            for (const r of records) window.__added += r.addedNodes.length;
          }).observe(document.getElementById('messages-inner'), {childList: true, subtree: true});
        }"""
    )
    partial = streaming.inner_text()
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    expect(composer(page)).to_be_disabled()
    assert page.locator("#messages").get_attribute("aria-live") == "polite"
    expect(streaming.locator(".msg-body > p").last).to_contain_text("It returns")
    assert page.evaluate(
        "() => window.__firstBlock === document.querySelector('.msg-assistant .msg-body > p')"
    )
    page.screenshot(path=str(SHOTS / "streaming.png"))

    # Then it finishes and the server's HTML replaces the streamed text.
    done = finished(page)
    expect(done).to_be_visible(timeout=15_000)
    assert len(done.inner_text()) > len(partial)
    expect(done.locator("pre code")).to_contain_text("def add(a, b):")
    expect(done.locator("pre code .hl-k").first).to_have_text("def")  # highlighted on the server
    expect(done.locator("strong")).to_have_text("the sum")
    expect(done.locator(".msg-usage")).to_have_text(re.compile(r"fake-model · 40 in · 120 out · \$"))
    # While it streamed: the question is the same node and only the answer's
    # own nodes were added (no list re-render).
    assert page.evaluate("() => window.__question === document.querySelector('.msg-user')")
    assert page.evaluate("() => window.__added") < 200
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    expect(composer(page)).to_be_enabled()
    expect(composer(page)).to_be_focused()

    # The title is made after the first answer and pushed to the page.
    expect(page.locator("#chat-title")).to_have_text("A fake title")
    expect(page.locator(".conv-item.is-current .conv-title")).to_have_text("A fake title")
    page.screenshot(path=str(SHOTS / "finished-code.png"))

    answer = in_thread(lambda: Message.objects.get(role="assistant"))
    assert answer.status == "complete"
    assert answer.content == ANSWER
    assert f"/c/{answer.conversation_id}/" in page.url

    page.reload()
    persisted = page.locator(f'.msg-assistant[data-message-id="{answer.id}"]')
    expect(persisted).to_have_attribute("data-status", "complete")
    expect(persisted.locator("pre code")).to_contain_text("return a + b")
    expect(page.locator(".msg-user")).to_have_count(1)
    expect(page.locator(".conv-item.is-current .conv-title")).to_have_text("A fake title")


def test_reload_mid_stream_shows_the_whole_answer_once_finished(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    fake_llm.script(Reply(chunks=ANSWER_CHUNKS, delay=0.05, usage=(40, 120)))
    page = tabs.new(alice)
    open_chat(page, daphne_server)
    ask(page, "Stream something long")
    streaming = page.locator('.msg-assistant[data-status="streaming"]')
    expect(streaming).to_contain_text("It returns", timeout=10_000)

    page.reload()  # mid-stream: the answer runs on on the server
    expect(page.locator("#composer[data-ready]")).to_have_count(1)
    # The page shows the checkpointed text, joins, and follows the stream.
    expect(page.locator('.msg-assistant[data-status="streaming"]')).to_have_count(1)
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    done = finished(page)
    expect(done).to_be_visible(timeout=15_000)
    text = done.inner_text()
    assert "More29." in text and text.count("More0.") == 1 and text.count("Here is a function") == 1
    expect(done.locator("pre code")).to_contain_text("return a + b")
    expect(page.locator(".msg-assistant")).to_have_count(1)
    answer = in_thread(lambda: Message.objects.get(role="assistant"))
    assert answer.content == ANSWER


def test_a_second_browser_sees_the_answer_stream_live(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    conversation = in_thread(lambda: make_conversation(alice, "Shared chat"))
    fake_llm.script(Reply(chunks=ANSWER_CHUNKS, delay=0.05, usage=(40, 120)))
    first = tabs.new(alice)
    second = tabs.new(alice)  # another browser context: another "device"
    path = f"/c/{conversation.id}/"
    open_chat(first, daphne_server, path)
    open_chat(second, daphne_server, path)

    ask(first, "Both of you, watch this")
    # The second tab sees the question and the answer while it streams.
    expect(second.locator(".msg-user").last).to_have_text("Both of you, watch this")
    live = second.locator('.msg-assistant[data-status="streaming"]')
    expect(live).to_contain_text("a function")
    expect(live).not_to_contain_text("More29.")
    expect(second.get_by_role("button", name="Stop")).to_be_visible()
    done = finished(second).last
    expect(done).to_contain_text("More29.", timeout=15_000)
    assert done.inner_text().count("More7.") == 1
    expect(finished(first).last).to_contain_text("More29.")


def test_a_dropped_socket_reconnects_and_a_lost_frame_is_recovered(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    """The page's socket goes through a proxy that drops one delta (a gap in
    `seq`: the page must re-join) and then cuts the connection mid-answer
    ("reconnecting…", automatic re-join). The answer ends whole, no text twice."""
    conversation = in_thread(lambda: make_conversation(alice, "Flaky network"))
    fake_llm.script(Reply(chunks=ANSWER_CHUNKS, delay=0.06, usage=(40, 120)))
    tabs.allowed.append(re.compile(r"WebSocket", re.I))
    page = tabs.new(alice)
    sockets: list[Any] = []
    dropped: list[int] = []

    def route(ws: Any) -> None:
        server = ws.connect_to_server()
        sockets.append(ws)

        def to_page(message: Any) -> None:
            frame = json.loads(message) if isinstance(message, str) else {}
            if frame.get("type") == "generation.delta" and frame.get("seq") == 3:
                if not dropped:
                    dropped.append(3)
                    return  # lost on the way: the page sees seq 4 after 2
            ws.send(message)

        server.on_message(to_page)

    page.route_web_socket(re.compile(r"/ws/chat/"), route)
    open_chat(page, daphne_server, f"/c/{conversation.id}/")
    ask(page, "Through a bad network")
    streaming = page.locator('.msg-assistant[data-status="streaming"]')
    expect(streaming).to_contain_text("It returns", timeout=10_000)
    assert dropped == [3]

    sockets[-1].close(code=4000, reason="network cut")
    expect(page.locator("#connection-status")).to_have_text("Reconnecting…")
    page.screenshot(path=str(SHOTS / "reconnecting.png"))
    expect(page.locator("#connection-status")).to_be_hidden(timeout=10_000)
    assert len(sockets) >= 2

    done = finished(page).last
    expect(done).to_contain_text("More29.", timeout=15_000)
    text = done.locator(".msg-body").inner_text()
    expected = "Here is a function that adds:\ndef add(a, b):\n    return a + b\n\nIt returns the sum."
    assert text.startswith(expected.split("\n")[0])
    for i in range(30):
        assert text.count(f"More{i}.") == 1, f"More{i}. shown {text.count(f'More{i}.')} times"
    assert text.count("def add") == 1


def test_an_answer_too_long_for_one_websocket_message_reaches_the_page(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    """Its `generation.finished` (content and html, over 1 MiB together)
    comes as `frame.part` messages; the page joins them and shows the answer,
    and the same after a reload (the page's join)."""
    lines = [f"Line {i:05d} of a very long answer." for i in range(16_000)]
    chunks = ["\n\n".join(lines[i : i + 500]) + "\n\n" for i in range(0, len(lines), 500)]
    fake_llm.script(Reply(chunks=chunks, usage=(10, 100_000)))
    page = tabs.new(alice)
    open_chat(page, daphne_server)
    ask(page, "Write a book")
    done = finished(page)
    expect(done).to_be_visible(timeout=30_000)
    expect(done).to_contain_text("Line 15999 of a very long answer.")
    expect(done.locator("p")).to_have_count(16_000)
    answer = in_thread(lambda: Message.objects.get(role="assistant"))
    assert answer.content == "".join(chunks)
    page.reload()
    expect(finished(page)).to_contain_text("Line 15999 of a very long answer.", timeout=15_000)


def test_the_tools_the_model_used_show_as_chips(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    fake_llm.script(
        Reply(
            chunks=["Let me look that up. "],
            finish_reason="tool_calls",
            tool_calls=[{"id": "call_1", "name": "current_time", "arguments": '{"timezone": "Asia/Tokyo"}'}],
        ),
        Reply(chunks=["It is **evening** in Tokyo."], delay=0.02),
    )
    page = tabs.new(alice)
    open_chat(page, daphne_server)
    ask(page, "What time is it in Tokyo?")
    done = finished(page)
    expect(done).to_contain_text("It is evening in Tokyo.", timeout=15_000)
    chip = done.locator(".tool-chip")
    expect(chip).to_have_count(1)
    expect(chip.locator("summary")).to_have_text("used current_time (Asia/Tokyo)")
    chip.locator("summary").click()
    expect(chip.locator("pre").first).to_have_text('{"timezone": "Asia/Tokyo"}')
    expect(chip.locator("pre").nth(1)).to_contain_text("Asia/Tokyo")
    page.screenshot(path=str(SHOTS / "tool-chip.png"))
    page.reload()  # the chips come back from the database
    expect(finished(page).locator(".tool-chip summary")).to_have_text("used current_time (Asia/Tokyo)")
