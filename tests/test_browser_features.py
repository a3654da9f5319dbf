"""The chat page's features in a real Chromium against a real daphne: answer
statuses and their actions, versions, the composer, prompts, the sidebar,
export, errors, XSS, themes, small screens, the keyboard, and a long chat."""

from __future__ import annotations

import json
import re
import time
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from conversations.models import Conversation, Message, SystemPrompt
from tests.conftest import LiveServer
from tests.factories import make_user, session_cookie
from tests.fake_llm import Reply
from tests.test_browser import (
    ANSWER_CHUNKS,
    SHOTS,
    Tabs,
    ask,
    composer,
    finished,
    in_thread,
    make_conversation,
    open_chat,
)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


XSS_ANSWER = (
    "Look: <img src=x onerror=\"window.__xss='img';alert('img')\"> and "
    "<script>window.__xss='script';alert('script')</script> and "
    "[click me](javascript:alert('link')) and <a href=\"javascript:alert('a')\">raw</a>"
    " <svg onload=alert('svg')></svg> <iframe src=\"javascript:alert('frame')\"></iframe>"
)
XSS_QUESTION = (
    "<img src=x onerror=\"window.__xss='q';alert('q')\"><script>alert('q2')</script>"
    "[x](javascript:alert('q3'))"
)


def test_statuses_stop_continue_retry_and_interrupted(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    page = tabs.new(alice)
    open_chat(page, daphne_server)

    # Stopped, with Escape (the documented shortcut).
    fake_llm.script(Reply(chunks=[f"word{i} " for i in range(200)], delay=0.03))
    ask(page, "Talk for a long time")
    expect(page.locator('.msg-assistant[data-status="streaming"]')).to_contain_text("word3")
    expect(page.get_by_role("button", name="Stop")).to_have_attribute("aria-keyshortcuts", "Escape")
    page.keyboard.press("Escape")
    stopped = finished(page, "stopped")
    expect(stopped).to_be_visible()
    expect(stopped.locator(".msg-status")).to_have_text("Stopped")
    expect(stopped.get_by_role("button", name="Regenerate answer")).to_be_visible()

    # Truncated, with "Continue": the continuation is a new answer.
    fake_llm.script(Reply(chunks=["A long answer that is cut"], finish_reason="length"))
    ask(page, "Say something long")
    truncated = finished(page, "truncated")
    expect(truncated.locator(".msg-status")).to_have_text("Truncated: length limit reached")
    fake_llm.script(Reply(chunks=[" and here is the rest."]))
    truncated.get_by_role("button", name="Continue").click()
    expect(finished(page).last).to_contain_text("and here is the rest.")
    expect(truncated.get_by_role("button", name="Continue")).to_have_count(0)

    # Failed, with the error said and "Retry" (a regenerate).
    fake_llm.script(Reply.error_reply(500, "boom"))
    ask(page, "This one fails")
    failed = finished(page, "failed")
    expect(failed.locator(".msg-status")).to_have_text("Failed")
    expect(page.locator("#chat-error")).to_be_visible()
    expect(page.locator("#chat-error-text")).to_contain_text("model service")
    page.screenshot(path=str(SHOTS / "error.png"))
    fake_llm.script(Reply(chunks=["Second time lucky."]))
    failed.get_by_role("button", name="Retry").click()
    retried = finished(page).last
    expect(retried).to_contain_text("Second time lucky.")
    expect(retried.locator(".versions")).to_have_attribute("aria-label", "Version 2 of 2")

    # Interrupted (our process died mid-answer): shown as such after a load.
    conversation = in_thread(lambda: make_conversation(alice, "Crashed"))
    in_thread(lambda: Message.objects.create(conversation=conversation, role="user", content="and then?"))
    in_thread(
        lambda: Message.objects.create(
            conversation=conversation, role="assistant", content="Half an ans", status="interrupted"
        )
    )
    open_chat(page, daphne_server, f"/c/{conversation.id}/")
    interrupted = page.locator('.msg-assistant[data-status="interrupted"]')
    expect(interrupted.locator(".msg-status")).to_have_text("Interrupted")
    expect(interrupted.get_by_role("button", name="Regenerate answer")).to_be_visible()


def test_regenerate_and_edit_keep_every_version(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    page = tabs.new(alice)
    open_chat(page, daphne_server)
    fake_llm.script(Reply(chunks=["First answer."]))
    ask(page, "Original question")
    expect(finished(page)).to_contain_text("First answer.")

    fake_llm.script(Reply(chunks=["Second answer."]))
    finished(page).get_by_role("button", name="Regenerate answer").click()
    answer = finished(page)
    expect(answer).to_contain_text("Second answer.")
    expect(page.locator(".msg-assistant:not([hidden])")).to_have_count(1)
    switcher = answer.locator(".versions")
    expect(switcher).to_have_attribute("aria-label", "Version 2 of 2")
    expect(switcher).to_contain_text("2/2")
    answer.get_by_role("button", name="Previous version").click()
    expect(finished(page)).to_contain_text("First answer.")
    expect(finished(page).locator(".versions")).to_contain_text("1/2")
    finished(page).get_by_role("button", name="Next version").click()
    expect(finished(page)).to_contain_text("Second answer.")

    # Edit the last question and resend: the old question and answer stay reachable.
    fake_llm.script(Reply(chunks=["Answer to the edit."]))
    question = page.locator(".msg-user:not([hidden])")
    question.hover()
    question.get_by_role("button", name="Edit message").click()
    editor = page.get_by_role("textbox", name="Edit your message")
    expect(editor).to_be_focused()
    editor.fill("Edited question")
    editor.press("Enter")
    expect(page.locator(".msg-user:not([hidden])")).to_have_text(re.compile("Edited question"))
    expect(finished(page)).to_contain_text("Answer to the edit.")
    expect(page.locator(".msg-user:not([hidden]) .versions")).to_contain_text("2/2")
    page.screenshot(path=str(SHOTS / "versions.png"))
    page.locator(".msg-user:not([hidden])").get_by_role("button", name="Previous version").click()
    expect(page.locator(".msg-user:not([hidden])")).to_contain_text("Original question")

    # After a reload the versions are still there (server-rendered).
    page.reload()
    expect(page.locator(".msg-user:not([hidden])")).to_contain_text("Edited question")
    expect(page.locator(".msg-user[hidden]")).to_have_count(1)
    expect(page.locator(".msg-user:not([hidden]) .versions")).to_contain_text("2/2")
    rows = in_thread(lambda: list(Message.objects.values_list("content", "is_active")))
    assert ("Original question", False) in rows and ("Edited question", True) in rows
    assert ("First answer.", False) in rows and ("Second answer.", False) in rows


def test_composer_grows_sends_keeps_drafts_and_counts_characters(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    conversation = in_thread(lambda: make_conversation(alice, "Drafts"))
    page = tabs.new(alice)
    open_chat(page, daphne_server, f"/c/{conversation.id}/")
    box = composer(page)
    height = box.bounding_box()["height"]
    box.press_sequentially("line one")
    box.press("Shift+Enter")
    box.press_sequentially("line two")
    box.press("Shift+Enter")
    box.press_sequentially("line three")
    assert box.input_value() == "line one\nline two\nline three"
    assert box.bounding_box()["height"] > height + 20  # it grew
    expect(page.locator(".msg-user")).to_have_count(1)  # Shift+Enter did not send

    # The draft survives a reload, per conversation.
    page.wait_for_timeout(400)
    page.reload()
    expect(composer(page)).to_have_value("line one\nline two\nline three")
    open_chat(page, daphne_server, "/")
    expect(composer(page)).to_have_value("")
    open_chat(page, daphne_server, f"/c/{conversation.id}/")
    expect(composer(page)).to_have_value("line one\nline two\nline three")

    # The limit shows as it is approached.
    limit = int(box.get_attribute("maxlength"))
    counter = page.locator("#char-count")
    expect(counter).to_be_hidden()
    composer(page).fill("x" * int(limit * 0.9))
    expect(counter).to_be_visible()
    expect(counter).to_contain_text(f"/ {limit:,}")

    # Enter sends; the draft is gone afterwards.
    fake_llm.script(Reply(chunks=["Noted."]))
    composer(page).fill("Short one")
    composer(page).press("Enter")
    expect(finished(page).last).to_contain_text("Noted.")
    page.wait_for_timeout(400)
    page.reload()
    expect(composer(page)).to_have_value("")


def test_a_new_chat_picks_a_system_prompt_and_shows_it(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    in_thread(lambda: SystemPrompt.objects.create(name="Helpful", text="Be helpful.", is_default=True))
    pirate = in_thread(lambda: SystemPrompt.objects.create(name="Pirate", text="Talk like a pirate."))
    page = tabs.new(alice)
    open_chat(page, daphne_server)
    select = page.get_by_label("System prompt")
    expect(select.locator("option:checked")).to_have_text("Helpful")  # the default, preselected
    select.select_option(label="Pirate")
    fake_llm.script(Reply(chunks=["Arr."]))
    ask(page, "Hello")
    expect(finished(page)).to_contain_text("Arr.")
    expect(page.locator("#prompt-chip")).to_contain_text("Pirate")
    expect(page.locator("#prompt-pick")).to_be_hidden()
    conversation = in_thread(lambda: Conversation.objects.get())
    assert conversation.prompt_id == pirate.id
    assert fake_llm.streamed_requests[-1].body["messages"][0]["content"] == "Talk like a pirate."
    page.reload()
    expect(page.locator("#prompt-chip")).to_contain_text("Pirate")


def test_sidebar_pages_searches_renames_and_deletes(
    daphne_server: LiveServer, alice: Any, bob: Any, fake_llm: Any, tabs: Tabs
) -> None:
    def thousand() -> None:
        now = timezone.now()
        rows = [Conversation(owner=alice, title=f"Chat number {i:04d}") for i in range(1000)]
        Conversation.objects.bulk_create(rows)
        # Newest first: "Chat number 0999" is the newest.
        for i, row in enumerate(rows):
            row.updated_at = now - timedelta(minutes=1000 - i)
        Conversation.objects.bulk_update(rows, ["updated_at"], batch_size=250)
        target = rows[10]
        Message.objects.create(conversation=target, role="user", content="Where is the zebra crossing?")
        Conversation.objects.filter(pk=target.pk).update(updated_at=now - timedelta(days=30))
        Conversation.objects.create(owner=bob, title="Bob's secret zebra")

    in_thread(thousand)
    page = tabs.new(alice)
    start = time.perf_counter()
    open_chat(page, daphne_server)
    items = page.locator("#conversation-list > li.conv-item")
    expect(items.first).to_contain_text("Chat number 0999")
    count = items.count()
    assert count <= 60
    # Load on scroll: the list grows as it is scrolled, and stays quick.
    for _ in range(6):
        page.locator("#conv-nav").evaluate("n => n.scrollTop = n.scrollHeight")
        page.wait_for_timeout(150)
    expect(items).not_to_have_count(count)
    assert items.count() >= 150
    assert time.perf_counter() - start < 10
    titles = items.locator(".conv-title").all_inner_texts()
    assert titles[:3] == ["Chat number 0999", "Chat number 0998", "Chat number 0997"]
    assert len(titles) == len(set(titles))  # no duplicates when pages join

    # Search over titles and message text; never another user's chats.
    search = page.get_by_role("searchbox", name="Search chats")
    search.fill("zebra")
    results = page.locator("#search-results > li")
    expect(results).to_have_count(1)
    expect(results.first).to_contain_text("Chat number 0010")
    expect(results.first.locator(".conv-snippet")).to_contain_text("zebra crossing")
    page.screenshot(path=str(SHOTS / "search.png"))
    search.fill("Chat number 0123")
    expect(results.first).to_contain_text("Chat number 0123")
    search.press("Escape")
    expect(page.locator("#conversation-list")).to_be_visible()

    # Rename (Enter saves) and delete (with a confirmation that can be cancelled).
    first = items.first
    first.hover()
    first.get_by_role("button", name=re.compile("^Rename")).click()
    field = first.get_by_role("textbox", name="New title")
    field.fill("Renamed chat")
    field.press("Enter")
    expect(first.locator(".conv-title")).to_have_text("Renamed chat")
    renamed_id = first.get_attribute("data-conversation-id")
    assert renamed_id is not None
    for _ in range(50):
        if in_thread(lambda: Conversation.objects.get(pk=renamed_id).title) == "Renamed chat":
            break
        time.sleep(0.1)
    assert in_thread(lambda: Conversation.objects.get(pk=renamed_id).title) == "Renamed chat"

    first.get_by_role("button", name="Delete “Renamed chat”").click()
    dialog = page.get_by_role("dialog", name="Delete chat?")
    expect(dialog).to_be_visible()
    page.screenshot(path=str(SHOTS / "delete-confirm.png"))
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    expect(items.first.locator(".conv-title")).to_have_text("Renamed chat")
    items.first.get_by_role("button", name="Delete “Renamed chat”").click()
    dialog.get_by_role("button", name="Delete").click()
    expect(items.first.locator(".conv-title")).to_have_text("Chat number 0998")
    assert not in_thread(lambda: Conversation.objects.filter(pk=renamed_id).exists())


def test_rename_and_delete_reach_other_tabs_and_a_new_chat_gets_its_url(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    other = in_thread(lambda: make_conversation(alice, "Keep me"))
    page = tabs.new(alice)
    watcher = tabs.new(alice)
    open_chat(page, daphne_server)
    open_chat(watcher, daphne_server, f"/c/{other.id}/")

    fake_llm.script(Reply(chunks=["Hi there."], delay=0.2))
    ask(page, "A brand new chat")
    # The URL is the conversation's own as soon as it exists, before the answer ends.
    expect(page).to_have_url(re.compile(r"/c/[0-9a-f-]{36}/$"))
    expect(page.locator('.msg-assistant[data-status="streaming"]')).to_have_count(1)
    new_id = page.url.rstrip("/").split("/")[-1]
    expect(page.locator("#export-links")).to_be_visible()
    item = watcher.locator(f'.conv-item[data-conversation-id="{new_id}"]')
    expect(item).to_be_visible()  # the other tab's list got it, on top
    expect(watcher.locator("#conversation-list > li.conv-item").first).to_have_attribute(
        "data-conversation-id", new_id
    )
    expect(item.locator(".conv-title")).to_have_text("A fake title", timeout=10_000)  # auto title

    # A rename in one tab shows in the other (conversation.updated).
    row = page.locator(f'.conv-item[data-conversation-id="{new_id}"]')
    row.get_by_role("button", name=re.compile("^Rename")).click()
    row.get_by_role("textbox", name="New title").fill("Named by hand")
    row.get_by_role("textbox", name="New title").press("Enter")
    expect(item.locator(".conv-title")).to_have_text("Named by hand")
    expect(page.locator("#chat-title")).to_have_text("Named by hand")

    # Deleting the open conversation leaves it for a new chat; other tabs drop it.
    row.get_by_role("button", name="Delete “Named by hand”").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    expect(page).to_have_url(daphne_server.url + "/")
    expect(item).to_have_count(0)
    expect(watcher.locator(f'.conv-item[data-conversation-id="{other.id}"]')).to_be_visible()


def test_export_markdown_and_json(daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs) -> None:
    conversation = in_thread(lambda: make_conversation(alice, "Export me", turns=2))
    page = tabs.new(alice)
    open_chat(page, daphne_server, f"/c/{conversation.id}/")
    with page.expect_download() as md_info:
        page.get_by_role("link", name="Markdown").click()
    md = md_info.value
    assert md.suggested_filename.endswith(".md")
    text = open(md.path(), encoding="utf-8").read()
    assert "Question 0" in text and "Answer 1" in text
    with page.expect_download() as json_info:
        page.get_by_role("link", name="JSON").click()
    data = json.loads(open(json_info.value.path(), encoding="utf-8").read())
    assert json_info.value.suggested_filename.endswith(".json")
    assert "Answer 1" in json.dumps(data)


def test_upstream_rate_limit_and_quota_errors_say_when_to_try_again(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    from accounts.models import Quota

    page = tabs.new(alice)
    open_chat(page, daphne_server)
    fake_llm.script(Reply.error_reply(429, "slow down", headers={"Retry-After": "30"}))
    ask(page, "Too fast")
    error = page.locator("#chat-error-text")
    expect(error).to_contain_text(re.compile(r"Try again at \d\d:\d\d:\d\d \(in (30|29|28|27) s\)"))
    expect(error).not_to_contain_text("shortly")
    expect(page.locator("#chat-error")).to_have_attribute("role", "alert")
    page.screenshot(path=str(SHOTS / "rate-limited.png"))

    in_thread(lambda: Quota.objects.create(user=alice, tokens_per_day=1))
    page.get_by_role("button", name="Dismiss error").click()
    ask(page, "Over budget")
    expect(page.locator("#chat-error")).to_be_visible()
    expect(error).to_contain_text(re.compile(r"(quota|limit|budget)", re.I))
    expect(error).to_contain_text(re.compile(r"Try again at"))
    # Nothing typed is lost.
    expect(composer(page)).to_have_value(re.compile("Over budget"))


def test_xss_in_answers_and_questions_never_runs(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    page = tabs.new(alice)
    second = tabs.new(alice)
    open_chat(page, daphne_server)
    fake_llm.script(Reply(chunks=[XSS_ANSWER[:40], XSS_ANSWER[40:]], delay=0.05))
    ask(page, XSS_QUESTION)
    done = finished(page)
    expect(done).to_contain_text("click me")
    conversation_path = page.url.replace(daphne_server.url, "")
    open_chat(second, daphne_server, conversation_path)  # server-rendered this time
    page.reload()
    expect(page.locator("#composer[data-ready]")).to_have_count(1)
    for tab in (page, second):
        log = tab.locator("#messages")
        expect(log.locator(".msg-user")).to_contain_text("<img src=x")  # shown as text
        assert log.locator("img, script, svg:not(.icon), iframe").count() == 0
        assert log.locator("[onerror], [onload]").count() == 0
        hrefs = log.locator("a").evaluate_all("as => as.map(a => a.getAttribute('href') || '')")
        assert not [h for h in hrefs if h.strip().lower().startswith("javascript")]
        assert tab.evaluate("() => window.__xss") is None
        # Links in answers open safely.
        for attrs in log.locator(".prose a[href]").evaluate_all("as => as.map(a => [a.target, a.rel])"):
            assert attrs[0] == "_blank" and "noopener" in attrs[1]
    assert tabs.dialogs == []


def test_markdown_tables_links_and_copy_buttons(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    markdown = (
        "# Title\n\n## Sub\n\n- one\n- two\n\n1. first\n2. second\n\n"
        "| a | b |\n|---|---|\n| 1 | 2 |\n\n"
        "See [the docs](https://example.com/docs).\n\n```js\nconsole.log('hi');\n```\n"
    )
    fake_llm.script(Reply(chunks=[markdown]))
    page = tabs.new(alice, permissions=["clipboard-read", "clipboard-write"])
    open_chat(page, daphne_server)
    ask(page, "Show me markdown")
    done = finished(page)
    expect(done.locator("h1")).to_have_text("Title")
    expect(done.locator("h2")).to_have_text("Sub")
    expect(done.locator("ul li")).to_have_count(2)
    expect(done.locator("ol li")).to_have_count(2)
    expect(done.locator("table td")).to_have_text(["1", "2"])
    link = done.get_by_role("link", name="the docs")
    expect(link).to_have_attribute("target", "_blank")
    expect(link).to_have_attribute("rel", re.compile("noopener"))
    done.get_by_role("button", name="Copy code").click()
    expect(done.locator(".code-copy")).to_contain_text("Copied")
    assert page.evaluate("() => navigator.clipboard.readText()") == "console.log('hi');"
    done.get_by_role("button", name="Copy answer").click()
    assert page.evaluate("() => navigator.clipboard.readText()") == markdown
    page.locator(".msg-user").hover()
    page.locator(".msg-user").get_by_role("button", name="Copy message").click()
    assert page.evaluate("() => navigator.clipboard.readText()") == "Show me markdown"


def test_auto_scroll_follows_unless_scrolled_up_then_jump_to_latest(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    conversation = in_thread(lambda: make_conversation(alice, "Scrolling", turns=15))
    page = tabs.new(alice)
    open_chat(page, daphne_server, f"/c/{conversation.id}/")
    log = page.locator("#messages")
    # Checked after two frames: the page scrolls once per frame, not per delta.
    at_bottom_now = "m => m.scrollHeight - m.scrollTop - m.clientHeight < 48"
    at_bottom = f"""m => new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(
      () => resolve(({at_bottom_now})(m)))))"""
    assert log.evaluate(at_bottom)
    fake_llm.script(Reply(chunks=[f"Line {i}\n\n" for i in range(60)], delay=0.04))
    ask(page, "Many lines please")
    expect(page.locator('.msg-assistant[data-status="streaming"]')).to_contain_text("Line 5")
    page.wait_for_timeout(200)
    # Follows the answer (the "jump" button stays hidden: the view is stuck to the bottom).
    expect(page.locator("#jump-latest")).to_be_hidden()
    page.wait_for_function(f"() => ({at_bottom_now})(document.getElementById('messages'))", timeout=2000)
    log.hover()
    page.mouse.wheel(0, -600)
    page.wait_for_timeout(300)
    top = log.evaluate("m => m.scrollTop")
    jump = page.get_by_role("button", name="Jump to the latest")
    expect(jump).to_be_visible()
    page.wait_for_timeout(400)
    assert log.evaluate("m => m.scrollTop") == top  # left where the user put it
    jump.click()
    page.wait_for_function(f"() => ({at_bottom_now})(document.getElementById('messages'))", timeout=2000)
    expect(jump).to_be_hidden()
    expect(finished(page).last).to_contain_text("Line 59")
    assert log.evaluate(at_bottom)
    expect(jump).to_be_hidden()


def test_dark_theme_toggle_and_system_preference(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    conversation = in_thread(lambda: make_conversation(alice, "Dark", turns=0))
    in_thread(lambda: Message.objects.create(conversation=conversation, role="user", content="Code please"))
    in_thread(
        lambda: Message.objects.create(
            conversation=conversation,
            role="assistant",
            content=(
                "Sure:\n\n```python\nfor i in range(3):\n    print(i)  # hi\n```\n\n"
                "| x | y |\n|---|---|\n| 1 | 2 |\n"
            ),
        )
    )
    # Follows the system...
    page = tabs.new(alice, color_scheme="dark")
    open_chat(page, daphne_server, f"/c/{conversation.id}/")
    background = "() => getComputedStyle(document.body).backgroundColor"
    dark_bg = page.evaluate(background)
    page.locator("#user-menu summary").click()  # the account menu holds the theme
    theme = page.get_by_label("Theme")
    expect(theme).to_have_value("system")
    page.screenshot(path=str(SHOTS / "dark.png"))
    # ... and the choice overrides it (one step: a labelled choice), and sticks across reloads.
    theme.select_option(label="Light")
    expect(theme).to_have_value("light")
    light_bg = page.evaluate(background)
    assert light_bg != dark_bg
    page.reload()
    assert page.evaluate("() => document.documentElement.dataset.theme") == "light"
    assert page.evaluate(background) == light_bg
    page.locator("#user-menu summary").click()
    page.get_by_label("Theme").select_option(label="Dark")
    assert page.evaluate("() => document.documentElement.dataset.theme") == "dark"
    assert page.evaluate(background) == dark_bg
    light_page = tabs.new(alice, color_scheme="light")
    open_chat(light_page, daphne_server, f"/c/{conversation.id}/")
    assert light_page.evaluate(background) == light_bg


def test_mobile_375px_is_usable(daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs) -> None:
    conversation = in_thread(lambda: make_conversation(alice, "A chat on a phone with a long title", turns=2))
    page = tabs.new(
        alice, viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True, reduced_motion="reduce"
    )
    open_chat(page, daphne_server, f"/c/{conversation.id}/")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
    expect(page.locator("#sidebar")).not_to_be_in_viewport()
    fake_llm.script(Reply(chunks=["Fits ", "on a ", "phone.", *ANSWER_CHUNKS], delay=0.02))
    ask(page, "Does it fit?")
    expect(finished(page).last).to_contain_text("More29.")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
    for box in [
        composer(page).bounding_box(),
        page.get_by_role("button", name="Send").bounding_box(),
    ]:
        assert box["x"] >= 0 and box["x"] + box["width"] <= 375
    page.screenshot(path=str(SHOTS / "mobile.png"))
    page.get_by_role("button", name="Show conversations").click()
    expect(page.locator("#sidebar")).to_be_in_viewport()
    expect(page.locator(".conv-item.is-current")).to_be_visible()
    page.screenshot(path=str(SHOTS / "mobile-sidebar.png"))
    page.keyboard.press("Escape")
    expect(page.locator("#sidebar")).not_to_be_in_viewport()
    # The drawer has a close button of its own.
    page.get_by_role("button", name="Show conversations").click()
    page.get_by_role("button", name="Close conversations").click()
    expect(page.locator("#sidebar")).not_to_be_in_viewport()
    # The title has the room: export and shortcuts fold into "More".
    title = page.locator("#chat-title").bounding_box()
    assert title is not None
    assert title["width"] >= 120
    expect(page.locator("#export-md")).to_be_hidden()
    page.get_by_role("button", name="More: export, shortcuts").click()
    expect(page.locator("#export-md")).to_be_visible()
    expect(page.locator("#export-json")).to_be_visible()
    page.screenshot(path=str(SHOTS / "mobile-more.png"))
    page.get_by_role("button", name="Keyboard shortcuts").click()
    expect(page.locator("#shortcuts-dialog")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("#export-md")).to_be_hidden()


def test_keyboard_only_use_labels_and_csp(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    conversation = in_thread(lambda: make_conversation(alice, "Keyboard chat"))
    page = tabs.new(alice)
    response = page.goto(daphne_server.url + f"/c/{conversation.id}/")
    assert response is not None
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    expect(page.locator("#composer[data-ready]")).to_have_count(1)
    # No inline script: every <script> has a src or is JSON data.
    inline = page.locator("script:not([src]):not([type='application/json'])")
    assert inline.count() == 0

    # Every control has a name.
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('button, input, textarea, select, a[href]')]
          .filter(e => e.offsetParent !== null || e.closest('dialog'))
          .filter(e => {
            const labelled = e.labels && [...e.labels].some(l => l.textContent.trim());
            return !(labelled || e.getAttribute('aria-label') || e.textContent.trim() || e.title);
          }).map(e => e.outerHTML.slice(0, 80))"""
    )
    assert unnamed == []

    # The composer has the focus on load; from the top, the focus order is
    # skip link, top bar, sidebar, then the chat.
    expect(composer(page)).to_be_focused()
    page.get_by_role("link", name="Skip to content").focus()
    order = []
    for _ in range(8):
        page.keyboard.press("Tab")
        order.append(page.evaluate("() => document.activeElement.id || document.activeElement.className"))
    assert order.index("new-chat") < order.index("conv-search")

    # Shortcuts: ? for help, Ctrl+K search, Shift+Esc composer, Ctrl+Shift+O new chat.
    page.locator("body").click(position={"x": 5, "y": 300})
    page.keyboard.press("?")
    help_dialog = page.get_by_role("dialog", name="Keyboard shortcuts")
    expect(help_dialog).to_be_visible()
    expect(help_dialog).to_contain_text("New chat")
    page.screenshot(path=str(SHOTS / "shortcuts.png"))
    page.keyboard.press("Escape")
    expect(help_dialog).to_be_hidden()
    page.keyboard.press("Control+k")
    expect(page.get_by_role("searchbox", name="Search chats")).to_be_focused()
    page.keyboard.press("Shift+Escape")
    expect(composer(page)).to_be_focused()

    # Send and stop with the keyboard alone.
    fake_llm.script(Reply(chunks=[f"tick{i} " for i in range(200)], delay=0.03))
    page.keyboard.type("Keyboard only")
    page.keyboard.press("Enter")
    expect(page.locator('.msg-assistant[data-status="streaming"]')).to_contain_text("tick2")
    page.keyboard.press("Escape")
    expect(finished(page, "stopped")).to_be_visible()
    expect(composer(page)).to_be_focused()

    # Tab reaches the last answer's tools.
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    focused = page.evaluate(
        "() => document.activeElement.getAttribute('aria-label') || document.activeElement.id"
    )
    assert focused  # something labelled, not lost

    page.keyboard.press("Control+Shift+O")
    expect(page).to_have_url(daphne_server.url + "/")
    expect(page.get_by_role("heading", name="How can I help?")).to_be_visible()

    # The login page too: no inline script, labelled fields.
    anonymous = tabs.new()
    response = anonymous.goto(daphne_server.url + "/accounts/login/")
    assert response is not None
    assert "script-src 'self'" in response.headers["content-security-policy"]
    expect(anonymous.get_by_label("Username")).to_be_visible()
    anonymous.screenshot(path=str(SHOTS / "login.png"))


def test_a_500_message_conversation_loads_fast_and_scrolls_smoothly(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    def build() -> Conversation:
        conversation = Conversation.objects.create(owner=alice, title="A very long chat")
        base = timezone.now() - timedelta(hours=5)
        rows = []
        for i in range(500):
            role = "user" if i % 2 == 0 else "assistant"
            if role == "user":
                content = f"Question {i}: how do I do thing {i}?"
            else:
                content = (
                    f"Answer {i}. Here is **some** text with a list:\n\n- point a\n- point b\n\n"
                    f"```python\ndef f{i}(x):\n    return x * {i}\n```\n\nAnd a closing paragraph {i}."
                )
            rows.append(Message(conversation=conversation, role=role, content=content, status="complete"))
        Message.objects.bulk_create(rows)
        for i, row in enumerate(rows):
            row.created_at = base + timedelta(seconds=i)
        Message.objects.bulk_update(rows, ["created_at"], batch_size=250)
        return conversation

    conversation = in_thread(build)
    page = tabs.new(alice)
    page.goto(daphne_server.url + f"/c/{conversation.id}/")
    expect(page.locator("#composer[data-ready]")).to_have_count(1, timeout=15_000)
    timing = page.evaluate(
        """() => {
          const nav = performance.getEntriesByType('navigation')[0];
          const ready = performance.getEntriesByName('chat-interactive')[0];
          return {
            interactive: ready.startTime,
            response_end: nav.responseEnd,
            dom_content_loaded: nav.domContentLoadedEventEnd,
            bytes: nav.transferSize || nav.encodedBodySize,
          };
        }"""
    )
    assert page.locator(".msg").count() == 500
    expect(finished(page).last).to_contain_text("closing paragraph 499")
    # Scroll the whole chat top to bottom and back, a step per frame; measure frames.
    frames = page.evaluate(
        """() => new Promise((resolve) => {
          const m = document.getElementById('messages');
          const times = [];
          let last = performance.now();
          let step = 0;
          // A quick flick: 60 px a frame (3,600 px/s), up from the end for
          // 150 frames, then down again.
          const steps = 150;
          const max = m.scrollHeight - m.clientHeight;
          m.scrollTop = max;
          function tick(now) {
            times.push(now - last);
            last = now;
            step++;
            const offset = step <= steps ? step * 60 : (2 * steps - step) * 60;
            m.scrollTop = max - offset;
            if (step < steps * 2) requestAnimationFrame(tick);
            else resolve(times.slice(1));
          }
          requestAnimationFrame(tick);
        })"""
    )
    frames.sort()
    p95 = frames[int(len(frames) * 0.95)]
    median = frames[len(frames) // 2]
    print(
        f"\n500-message conversation: time to interactive {timing['interactive']:.0f} ms "
        f"(response end {timing['response_end']:.0f} ms, DOMContentLoaded "
        f"{timing['dom_content_loaded']:.0f} ms); scrolling frames: median {median:.1f} ms, "
        f"p95 {p95:.1f} ms, worst {frames[-1]:.1f} ms over {len(frames)} frames"
    )
    assert timing["interactive"] < 3000
    assert median < 25 and p95 < 100
    page.screenshot(path=str(SHOTS / "long-chat.png"))


def test_the_offline_demo_banner_shows_when_no_model_is_configured(
    daphne_server: LiveServer, alice: Any, demo_mode: None, tabs: Tabs
) -> None:
    """The shared daphne has a (fake) model configured, so the chat page is
    rendered here, in demo mode, and served in its place; static files and
    the socket still come from daphne."""
    from django.test import Client

    client = Client()
    in_thread(lambda: client.force_login(alice))
    html = in_thread(lambda: client.get("/").content.decode())
    page = tabs.new(alice)
    page.route(
        daphne_server.url + "/",
        lambda route: route.fulfill(status=200, content_type="text/html; charset=utf-8", body=html),
    )
    # A page served by Playwright is not "local" to Chromium, which then keeps
    # its socket from 127.0.0.1: only the banner is checked here.
    tabs.allowed.append(re.compile(r"LOCAL_NETWORK_ACCESS"))
    page.goto(daphne_server.url + "/")
    banner = page.get_by_role("note")
    expect(banner).to_contain_text("Demo mode")
    expect(banner).to_contain_text("OPENAI_API_KEY")
    expect(banner.locator(".banner-short")).to_be_hidden()
    page.screenshot(path=str(SHOTS / "demo-banner.png"))
    # On a phone it is one line: the conversation gets the screen.
    phone = tabs.new(alice, viewport={"width": 375, "height": 740}, is_mobile=True)
    phone.route(
        daphne_server.url + "/",
        lambda route: route.fulfill(status=200, content_type="text/html; charset=utf-8", body=html),
    )
    phone.goto(daphne_server.url + "/")
    banner = phone.get_by_role("note")
    expect(banner.locator(".banner-short")).to_be_visible()
    expect(banner.locator(".banner-long")).to_be_hidden()
    line = phone.evaluate(
        "() => parseFloat(getComputedStyle(document.querySelector('.banner-demo')).lineHeight)"
    )
    padding = phone.evaluate(
        "() => { const s = getComputedStyle(document.querySelector('.banner-demo'));"
        " return parseFloat(s.paddingTop) + parseFloat(s.paddingBottom) + parseFloat(s.borderTopWidth)"
        " + parseFloat(s.borderBottomWidth); }"
    )
    box = banner.bounding_box()
    assert box is not None
    assert box["height"] <= line + padding + 1
    phone.screenshot(path=str(SHOTS / "demo-banner-phone.png"))


def test_a_long_chat_shows_where_its_summarised_part_ends(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    from tests.test_summaries import mechanical_summary

    # Two turns that fill the context budget (8,000 tokens) between them: the
    # next question pushes the first turn out, and it is summarised.
    long_text = "We are planning the Lisbon offsite for the data team. " * 300  # ~4,100 tokens

    def setup() -> Conversation:
        conversation = make_conversation(alice, "Offsite planning", turns=0)
        for text in (f"The budget code is PAPAYA-42. {long_text}", f"Venue options. {long_text}"):
            Message.objects.create(conversation=conversation, role="user", content=text)
            Message.objects.create(conversation=conversation, role="assistant", content="Noted.")
        return conversation

    conversation = in_thread(setup)
    fake_llm.completion_default = Reply(respond=mechanical_summary)
    fake_llm.script(Reply(chunks=["The budget code is ", "PAPAYA-42."]))
    page = tabs.new(alice)
    open_chat(page, daphne_server, f"/c/{conversation.pk}/")
    expect(page.locator(".summary-marker")).to_have_count(0)
    ask(page, "What was the budget code?")
    expect(finished(page).last).to_contain_text("PAPAYA-42", timeout=15_000)

    # The marker appears live, right after the last summarised message.
    marker = page.locator("#summary-marker")
    expect(marker).to_have_count(1)
    first_answer = page.locator(".msg-assistant").first
    expect(page.locator(".msg-assistant").first.locator("xpath=following-sibling::*[1]")).to_have_id(
        "summary-marker"
    )
    assert first_answer.get_attribute("data-message-id")
    expect(marker.locator("summary")).to_have_text("Older messages above are summarised for the model")
    marker.locator("summary").click()
    expect(marker.locator(".summary-text")).to_contain_text("PAPAYA-42")
    sent = fake_llm.streamed_requests[-1].body["messages"]
    assert any(m["role"] == "system" and "PAPAYA-42" in m["content"] for m in sent)
    marker.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "summary-marker.png"))

    # After a reload it comes from the database, in the same place.
    page.reload()
    expect(page.locator(".msg-assistant").first.locator("xpath=following-sibling::*[1]")).to_have_id(
        "summary-marker"
    )
    assert tabs.unexpected_errors() == []


def test_a_new_chat_picks_its_model_and_shows_it(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    from conversations.models import ChatModel

    def setup() -> None:
        SystemPrompt.objects.create(name="Assistant", text="Be helpful.", is_default=True)
        ChatModel.objects.create(name="fake-fast", label="Fast", position=1)
        ChatModel.objects.create(name="fake-deep", label="Deep thinker", position=2)

    in_thread(setup)
    fake_llm.script(Reply(chunks=["Deep ", "thoughts."], model="fake-deep"))
    page = tabs.new(alice)
    open_chat(page, daphne_server)
    select = page.get_by_label("Model")
    expect(select.locator("option")).to_have_text(["Default (fake-model)", "Fast", "Deep thinker"])
    select.select_option(label="Deep thinker")
    page.screenshot(path=str(SHOTS / "model-pick.png"))
    ask(page, "Think hard.")
    done = finished(page)
    expect(done).to_contain_text("Deep thoughts.", timeout=15_000)
    # The conversation shows its model; the answer's line names the one that answered.
    expect(page.locator("#model-chip")).to_have_text("Model: Deep thinker")
    expect(page.locator("#model-pick")).to_be_hidden()
    expect(done.locator(".msg-usage")).to_contain_text("fake-deep")
    assert fake_llm.streamed_requests[-1].body["model"] == "fake-deep"
    page.reload()
    expect(page.locator("#model-chip")).to_have_text("Model: Deep thinker")
    assert tabs.unexpected_errors() == []


def test_a_user_creates_an_api_token_and_sees_it_once(
    daphne_server: LiveServer, alice: Any, tabs: Tabs
) -> None:
    page = tabs.new(alice)
    page.goto(daphne_server.url + "/accounts/usage/")
    page.get_by_role("link", name="API tokens").click()
    page.get_by_label("Name").fill("notebook")
    page.get_by_label("Expires after").select_option(label="90 days")
    page.get_by_role("button", name="Create token").click()
    value = page.get_by_label("New API token").input_value()
    assert value.startswith("chat_")
    expect(page.locator(".tokens-table tbody tr")).to_have_count(1)
    expect(page.locator(".tokens-table")).to_contain_text("notebook")
    page.screenshot(path=str(SHOTS / "api-tokens.png"))
    page.goto(daphne_server.url + "/accounts/tokens/")  # later: the token is not shown again
    expect(page.get_by_label("New API token")).to_have_count(0)
    page.get_by_role("button", name="Revoke").click()
    expect(page.locator(".tokens-table tbody tr.is-revoked")).to_have_count(1)
    assert tabs.unexpected_errors() == []


def test_a_failed_answer_keeps_its_reason_and_has_nothing_to_copy(
    daphne_server: LiveServer, alice: Any, fake_llm: Any, tabs: Tabs
) -> None:
    fake_llm.script(
        Reply.error_reply(400, "max_tokens is too large for this model", code="invalid_request_error")
    )
    page = tabs.new(alice)
    open_chat(page, daphne_server)
    ask(page, "Write a novel")
    failed = finished(page, "failed")
    reason = "The model service rejected the request: max_tokens is too large for this model"
    expect(failed.locator(".msg-error")).to_have_text(reason)
    expect(failed.locator('[data-action="copy"]')).to_be_hidden()
    page.screenshot(path=str(SHOTS / "failed-reason.png"))
    page.reload()
    failed = finished(page, "failed")
    expect(failed.locator(".msg-status")).to_have_text("Failed")
    expect(failed.locator(".msg-error")).to_have_text(reason)
    expect(failed.locator('[data-action="copy"]')).to_be_hidden()
    assert tabs.unexpected_errors() == []


def test_the_ledger_in_the_admin_fits_and_warns_of_models_without_a_price(
    daphne_server: LiveServer, tabs: Tabs
) -> None:
    from decimal import Decimal

    from conversations.models import ModelPrice, TokenUsage
    from tests.factories import make_user

    def setup() -> Any:
        root = make_user("root", is_staff=True, is_superuser=True)
        ModelPrice.objects.create(
            model="gpt-priced", input_per_million=Decimal("0.15"), output_per_million=Decimal("0.6")
        )
        for model, cost in (("gpt-priced", "0.001234"), ("llama-free", "0")):
            TokenUsage.objects.create(
                user=root, model=model, prompt_tokens=1200, completion_tokens=340, cost=Decimal(cost)
            )
        return root

    root = in_thread(setup)
    page = tabs.new(root, viewport={"width": 1280, "height": 800})
    page.goto(daphne_server.url + "/admin/conversations/tokenusage/")
    expect(page.locator(".unpriced-warning")).to_contain_text("No price is set for llama-free")
    expect(page.locator(".total-cost")).to_have_text("$0.001234")
    expect(page.locator("#result_list")).to_contain_text("$0.001234")
    # Nothing wider than the window.
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0
    page.screenshot(path=str(SHOTS / "admin-ledger.png"), full_page=True)
    page.goto(daphne_server.url + "/admin/conversations/tokenusage/report/")
    expect(page.locator(".unpriced-warning")).to_contain_text("llama-free")
    page.screenshot(path=str(SHOTS / "admin-report.png"), full_page=True)
    assert tabs.unexpected_errors() == []


def test_the_sidebar_groups_chats_by_date(daphne_server: LiveServer, alice: Any, tabs: Tabs) -> None:
    def setup() -> None:
        now = timezone.now()
        for title, age in (
            ("Old one", 90),
            ("This month", 20),
            ("This week", 3),
            ("Yesterday's", 1),
            ("Fresh", 0),
        ):
            conversation = make_conversation(alice, title)
            if age:  # noon that many days ago: never "today" whatever the hour
                moment = timezone.localtime(now).replace(hour=12) - timedelta(days=age)
                Conversation.objects.filter(pk=conversation.pk).update(updated_at=moment)

    in_thread(setup)
    page = tabs.new(alice)
    open_chat(page, daphne_server)
    groups = page.locator("#conversation-list > li.conv-group")
    expect(groups).to_have_text(["Today", "Yesterday", "Previous 7 days", "Previous 30 days", "Older"])
    rows = page.locator("#conversation-list > li")
    expect(rows).to_have_text(
        ["Today", "Fresh", "Yesterday", "Yesterday's", "Previous 7 days", "This week",
         "Previous 30 days", "This month", "Older", "Old one"]
    )  # fmt: skip
    page.screenshot(path=str(SHOTS / "sidebar-groups.png"))
    # Arrow keys walk the chats, over the headings.
    page.locator(".conv-item .conv-link").first.focus()
    page.keyboard.press("ArrowDown")
    assert page.evaluate("() => document.activeElement.textContent") == "Yesterday's"
    assert tabs.unexpected_errors() == []


def test_the_account_menu_holds_usage_tokens_theme_and_log_out(
    daphne_server: LiveServer, alice: Any, tabs: Tabs
) -> None:
    for viewport in ({"width": 1280, "height": 800}, {"width": 375, "height": 740}):
        page = tabs.new(alice, viewport=viewport)
        open_chat(page, daphne_server)
        menu = page.locator("#user-menu")
        expect(menu.get_by_role("link", name="Your usage")).to_be_hidden()
        menu.locator("summary").click()
        for name in ("Your usage", "API tokens"):
            expect(menu.get_by_role("link", name=name)).to_be_visible()
        expect(menu.get_by_label("Theme")).to_be_visible()
        expect(menu.get_by_role("button", name="Log out")).to_be_visible()
        assert page.evaluate("() => document.documentElement.scrollWidth") <= viewport["width"]
        page.screenshot(path=str(SHOTS / f"account-menu-{viewport['width']}.png"))
        page.keyboard.press("Escape")
        expect(menu.get_by_role("link", name="Your usage")).to_be_hidden()
        menu.locator("summary").click()
        menu.get_by_role("link", name="Your usage").click()
        expect(page).to_have_url(re.compile(r"/accounts/usage/$"))
    page.locator("#user-menu summary").click()
    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(re.compile(r"/accounts/login/"))
    assert tabs.unexpected_errors() == []


def test_a_tab_over_the_socket_limit_says_so(daphne_server: LiveServer, alice: Any, tabs: Tabs) -> None:
    """Twenty sockets of alice are open elsewhere: the page's socket is
    closed with 4429, and the page says what to do instead of spinning."""
    from contextlib import ExitStack

    from django.conf import settings as django_settings
    from websockets.sync.client import connect as ws_connect

    cookie = in_thread(lambda: session_cookie(alice))
    with ExitStack() as stack:
        for _ in range(django_settings.CHAT_MAX_SOCKETS_PER_USER):
            ws = stack.enter_context(
                ws_connect(
                    daphne_server.ws_url + "/ws/chat/",
                    additional_headers={"Cookie": f"sessionid={cookie}", "Origin": daphne_server.url},
                )
            )
            ws.send(json.dumps({"type": "nonsense"}))
            ws.recv(timeout=10)  # in: counted
        page = tabs.new(alice)
        page.goto(daphne_server.url + "/")
        status = page.locator("#connection-status")
        expect(status).to_contain_text("Too many chat tabs are open for your account")
        page.screenshot(path=str(SHOTS / "socket-limit.png"))


def test_the_login_throttle_and_account_recovery_pages(daphne_server: LiveServer, tabs: Tabs) -> None:
    in_thread(lambda: make_user("locked", email="locked@example.com"))
    tabs.allowed.append(re.compile(r"status of 429"))  # the refusal itself
    page = tabs.new(extra_http_headers={"X-Forwarded-For": "10.99.0.7"})
    page.goto(daphne_server.url + "/accounts/login/")
    for _ in range(11):
        page.get_by_label("Username").fill("locked")
        page.get_by_label("Password").fill("not-the-password")
        page.get_by_role("button", name="Log in").click()
        page.wait_for_load_state()
    expect(page.locator("#throttled")).to_contain_text(re.compile(r"Try again in \d+ (s|min|h)"))
    page.screenshot(path=str(SHOTS / "login-throttled.png"))
    page.get_by_role("link", name="Forgot your password?").click()
    expect(page.get_by_role("heading", name="Forgot your password?")).to_be_visible()
    page.get_by_label("Email").fill("locked@example.com")
    page.get_by_role("button", name="Send the link").click()
    expect(page.get_by_role("heading", name="Check your e-mail")).to_be_visible()
    page.screenshot(path=str(SHOTS / "password-reset-sent.png"))
