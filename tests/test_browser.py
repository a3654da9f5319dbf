"""The page in a real browser: Debian's Chromium driven by Playwright, against
a real daphne serving the site and the fake model behind it."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
from django.db import connections
from playwright.sync_api import Page, expect, sync_playwright

from conversations.models import Message
from tests.conftest import ARTIFACTS, PASSWORD, LiveServer
from tests.fake_llm import Reply

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

T = TypeVar("T")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SHOTS = ARTIFACTS / "screenshots"

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


@pytest.fixture
def page() -> Iterator[Page]:
    # No skip when Chromium is missing: launching fails, and so does the test.
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1200, "height": 800})
        page = context.new_page()
        page.console_errors = []  # type: ignore[attr-defined]
        page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))  # type: ignore[attr-defined]
        yield page
        context.close()
        browser.close()


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


def test_log_in_send_watch_the_answer_stream_reload_see_it_persisted(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, page: Page
) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    fake_llm.script(Reply(chunks=ANSWER_CHUNKS, delay=0.06, usage=(40, 120)))
    log_in(page, daphne_server, "alice")
    page.screenshot(path=str(SHOTS / "empty.png"))

    composer = page.get_by_label("Message")
    composer.fill("Write an add function in Python")
    composer.press("Enter")

    # The question shows at once and the address bar gets the conversation's URL.
    expect(page.locator(".msg-user").first).to_contain_text("Write an add function in Python")
    expect(page).to_have_url(re.compile(r"/c/[0-9a-f-]{36}/$"))

    # The answer streams: partial text while its status is still `streaming`.
    streaming = page.locator('.msg-assistant[data-status="streaming"]')
    expect(streaming).to_contain_text("a function")
    partial = streaming.inner_text()
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    page.screenshot(path=str(SHOTS / "streaming.png"))

    # Then it finishes and the server's HTML replaces the streamed text.
    finished = page.locator('.msg-assistant[data-status="complete"]')
    expect(finished).to_be_visible(timeout=15_000)
    assert len(finished.inner_text()) > len(partial)
    expect(finished.locator("pre code")).to_contain_text("def add(a, b):")
    expect(finished.locator("strong")).to_have_text("the sum")
    expect(finished).to_contain_text("fake-model")
    page.screenshot(path=str(SHOTS / "finished.png"))

    answer = in_thread(lambda: Message.objects.get(role="assistant"))
    assert answer.status == "complete"
    assert answer.content == "".join(ANSWER_CHUNKS)
    assert f"/c/{answer.conversation_id}/" in page.url

    page.reload()
    persisted = page.locator(f'.msg-assistant[data-message-id="{answer.id}"]')
    expect(persisted).to_have_attribute("data-status", "complete")
    expect(persisted.locator("pre code")).to_contain_text("return a + b")
    expect(page.locator(".msg-user")).to_have_count(1)
    expect(page.locator(".conv-link.is-current")).to_have_text("Write an add function in Python")
    page.screenshot(path=str(SHOTS / "reloaded.png"), full_page=True)
    assert page.console_errors == []  # type: ignore[attr-defined]
