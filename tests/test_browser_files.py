"""Files on the page, in a real Chromium against a real daphne: a file by the
attach button (with its upload's progress), a picture by drag and drop, a
refused upload and a refused send explained, the files on the question
after sending and after a reload, and the same on a phone; a conversation
shared by its Share button and read by another user (on a phone too)."""

from __future__ import annotations

import base64
import re
import struct
import zlib
from typing import Any

import pytest
from playwright.sync_api import FilePayload, Page, expect

from conversations.models import ChatModel
from tests.conftest import LiveServer
from tests.fake_llm import FakeLLM, Reply
from tests.test_browser import SHOTS, Tabs, composer, finished, in_thread, open_chat

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

LOG = b"".join(
    b"2026-12-02 10:%02d:%02d INFO all quiet on node %d\n" % (i // 60 % 60, i % 60, i) for i in range(6000)
)


def _picture(size: int = 48) -> bytes:
    """A PNG of four coloured squares (something to see in a thumbnail)."""
    colours = [(47, 111, 235), (240, 180, 40), (40, 160, 90), (198, 47, 47)]
    rows = b""
    for y in range(size):
        row = b"\x00"
        for x in range(size):
            row += bytes(colours[(y >= size // 2) * 2 + (x >= size // 2)])
        rows += row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


PNG = _picture()


def _drop(page: Page, name: str, data: bytes, mime: str) -> None:
    """Drop a file onto the composer as a person dragging it from their desktop would."""
    transfer = page.evaluate_handle(
        """([name, b64, mime]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: mime }));
            return transfer;
        }""",
        [name, base64.b64encode(data).decode(), mime],
    )
    page.dispatch_event("#composer", "dragenter", {"dataTransfer": transfer})
    expect(page.locator("#composer.is-dropping")).to_have_count(1)
    page.dispatch_event("#composer", "drop", {"dataTransfer": transfer})


def _paste(page: Page, name: str, data: bytes) -> None:
    """Paste a picture into the message box, as after taking a screenshot."""
    page.locator("#composer-input").evaluate(
        """(box, [name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/png" }));
            const options = { clipboardData: transfer, bubbles: true, cancelable: true };
            box.dispatchEvent(new ClipboardEvent("paste", options));
        }""",
        [name, base64.b64encode(data).decode()],
    )


def test_attach_by_button_and_by_drop_see_progress_and_chips_send_and_reload(
    daphne_server: LiveServer, alice: Any, fake_llm: FakeLLM, tabs: Tabs
) -> None:
    page = tabs.new(alice)
    open_chat(page, daphne_server, "/")
    # A slow uplink, so that the upload's progress can be watched.
    network = page.context.new_cdp_session(page)
    network.send("Network.enable")
    network.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": 200 * 1024},
    )

    page.locator("#file-input").set_input_files(
        [FilePayload(name="node.log", mimeType="text/plain", buffer=LOG)]
    )
    chip = page.locator("#attach-list .file-chip").first
    expect(chip).to_contain_text("node.log")
    expect(chip).to_contain_text("KB")
    bar = chip.locator("progress.file-progress")
    page.wait_for_function(
        "() => { const bar = document.querySelector('#attach-list progress');"
        " return bar && bar.value > 0 && bar.value < 100; }"
    )
    page.screenshot(path=str(SHOTS / "files-uploading.png"))
    expect(chip).to_have_class("file-chip is-ready", timeout=30_000)
    expect(bar).to_be_hidden()
    network.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )

    # A file of a kind the product does not read: refused, and said why
    # (the browser logs the 400 of its upload).
    tabs.allowed.append(re.compile(r"status of 400 \(Bad Request\)"))
    binary = b"\x7fELF\x02" + bytes(range(256)) * 4
    page.locator("#file-input").set_input_files(
        [FilePayload(name="tool.bin", mimeType="application/octet-stream", buffer=binary)]
    )
    refused = page.locator("#attach-list .file-chip.is-error")
    expect(refused).to_contain_text("cannot be read here")
    expect(refused).to_contain_text("PDF documents and images")
    page.screenshot(path=str(SHOTS / "files-refused-upload.png"))
    refused.get_by_role("button", name="Remove tool.bin").click()
    expect(refused).to_have_count(0)

    _drop(page, "dot.png", PNG, "image/png")
    picture = page.locator("#attach-list .file-chip", has_text="dot.png")
    expect(picture).to_have_class("file-chip is-ready")
    expect(picture.locator("img.file-thumb")).to_have_count(1)
    page.screenshot(path=str(SHOTS / "files-tray.png"))

    # The chat's model cannot see: the send is refused and nothing is lost.
    composer(page).fill("What do these show?")
    composer(page).press("Enter")
    expect(page.locator("#chat-error")).to_contain_text("cannot see images")
    expect(composer(page)).to_have_value("What do these show?")
    expect(page.locator("#attach-list .file-chip.is-ready")).to_have_count(2)
    page.screenshot(path=str(SHOTS / "files-refused-send.png"))

    in_thread(lambda: ChatModel.objects.create(name="fake-model", label="Fake", vision=True))
    fake_llm.script(Reply(chunks=["A log ", "and a dot."]))
    composer(page).press("Enter")
    expect(finished(page).last).to_contain_text("A log and a dot.")
    question = page.locator(".msg-user").last
    expect(question.locator(".msg-files .file-chip")).to_have_count(2)
    expect(question.locator(".msg-files")).to_contain_text("node.log")
    expect(question.locator(".file-note")).to_contain_text("Only the first 6,000 of")
    expect(page.locator("#attach-list")).to_be_hidden()
    parts = [m for m in fake_llm.streamed_requests[-1].body["messages"] if m["role"] == "user"][-1]["content"]
    assert parts[0] == {"type": "text", "text": "What do these show?"}
    assert parts[1]["text"].startswith("File: node.log")
    assert parts[3]["image_url"]["url"].startswith("data:image/png;base64,")
    page.screenshot(path=str(SHOTS / "files-sent.png"))

    page.reload()
    question = page.locator(".msg-user").last
    expect(question.locator(".msg-files .file-chip")).to_have_count(2)
    expect(question.locator(".file-note")).to_contain_text("Only the first 6,000 of")
    thumb = question.locator("img.file-thumb")
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=thumb.element_handle())
    link = question.locator("a.file-chip-link", has_text="node.log")
    with page.expect_download() as download:
        link.click()
    assert download.value.suggested_filename == "node.log"

    phone = tabs.new(alice, viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    open_chat(phone, daphne_server, page.url.removeprefix(daphne_server.url))
    expect(phone.locator(".msg-user .msg-files .file-chip")).to_have_count(2)
    expect(phone.get_by_role("button", name="Attach files")).to_be_visible()
    _paste(phone, "screenshot.png", PNG)  # a screenshot pasted into the box
    expect(phone.locator("#attach-list .file-chip.is-ready")).to_contain_text("screenshot.png")
    box = phone.locator("#attach-list").bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375
    phone.screenshot(path=str(SHOTS / "files-phone.png"))
    assert tabs.unexpected_errors() == []


def test_share_a_conversation_and_open_the_link_as_another_user(
    daphne_server: LiveServer, alice: Any, bob: Any, tabs: Tabs
) -> None:
    from tests.test_browser import make_conversation

    conversation = in_thread(lambda: make_conversation(alice, "Launch plan", turns=2))
    page = tabs.new(alice)
    open_chat(page, daphne_server, f"/c/{conversation.pk}/")
    page.get_by_role("button", name="Share").click()
    dialog = page.locator("#share-dialog")
    expect(dialog).to_be_visible()
    address = page.locator("#share-url")
    expect(address).to_have_value(re.compile(r"/s/[A-Za-z0-9_-]{40,}/$"))
    url = address.input_value()
    page.screenshot(path=str(SHOTS / "share-dialog.png"))
    page.get_by_role("button", name="Done").click()

    reader = tabs.new(bob)
    reader.goto(url)
    expect(reader.locator("#shared-title")).to_have_text("Launch plan")
    expect(reader.locator(".msg-assistant")).to_have_count(2)
    expect(reader.locator("#composer")).to_have_count(0)
    reader.screenshot(path=str(SHOTS / "shared-page.png"))
    phone = tabs.new(bob, viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    phone.goto(url)
    expect(phone.get_by_role("button", name="Continue in your own chat")).to_be_visible()
    phone.screenshot(path=str(SHOTS / "shared-page-phone.png"))
    phone.get_by_role("button", name="Continue in your own chat").click()
    expect(phone.locator("#composer[data-ready]")).to_have_count(1)  # the reader's own copy, to carry on
    expect(phone.locator(".msg-assistant")).to_have_count(2)

    # Revoked: the link no longer opens.
    page.get_by_role("button", name="Share").click()
    page.get_by_role("button", name="Revoke").click()
    expect(page.locator("#share-status")).to_contain_text("revoked")
    tabs.allowed.append(re.compile(r"status of 404 \(Not Found\)"))
    gone = reader.goto(url)
    assert gone is not None and gone.status == 404


def test_make_a_project_chat_in_it_share_and_open_the_link_as_another_user(
    daphne_server: LiveServer, alice: Any, bob: Any, fake_llm: FakeLLM, tabs: Tabs
) -> None:
    from tests.test_browser import ask

    page = tabs.new(alice)
    open_chat(page, daphne_server)
    page.get_by_role("link", name="New project").click()
    page.get_by_label("Name").fill("Support desk")
    page.get_by_label("Instructions").fill("Answer as our support team, in German.")
    page.get_by_label("Add files").set_input_files(
        [
            FilePayload(
                name="manual.md", mimeType="text/markdown", buffer=b"# Manual\n\nPress the green button.\n"
            )
        ]
    )
    page.screenshot(path=str(SHOTS / "project-form.png"), full_page=True)
    page.get_by_role("button", name="Create the project").click()
    expect(page.locator("#composer[data-ready]")).to_have_count(1)
    assert re.search(r"/p/[0-9a-f-]{36}/$", page.url)
    banner = page.locator("#project-banner")
    expect(banner).to_contain_text("Project: Support desk")
    expect(banner).to_contain_text("manual.md")
    group = page.locator(".project-group", has_text="Support desk")
    expect(group).to_be_visible()

    fake_llm.script(Reply(chunks=["Guten ", "Tag!"]))
    ask(page, "Where is the start button?")
    expect(finished(page).last).to_contain_text("Guten Tag!")
    page.wait_for_url(re.compile(r"/c/[0-9a-f-]{36}/$"))
    sent = fake_llm.streamed_requests[-1].body["messages"]
    assert any("in German" in str(m["content"]) for m in sent if m["role"] == "system")
    assert any("green button" in str(m["content"]) for m in sent if m["role"] == "system")
    # The chat is listed under its project, not among the others.
    expect(group.locator(".project-chat")).to_have_count(1)
    expect(page.locator("#conversation-list .conv-item")).to_have_count(0)
    page.screenshot(path=str(SHOTS / "project-chat.png"))
    page.reload()
    expect(page.locator(".project-group", has_text="Support desk").locator(".project-chat")).to_have_count(1)
    expect(page.locator("#move-select")).to_have_value(re.compile(r"[0-9a-f-]{36}"))

    # Shared, and opened by a colleague.
    page.get_by_role("button", name="Share").click()
    address = page.locator("#share-url")
    expect(address).to_have_value(re.compile(r"/s/[A-Za-z0-9_-]{40,}/$"))
    url = address.input_value()
    page.get_by_role("button", name="Done").click()
    reader = tabs.new(bob)
    reader.goto(url)
    expect(reader.locator(".msg-assistant")).to_contain_text("Guten Tag!")
    # Not the project, though: another user's project is not found.
    project_path = re.sub(
        r"^https?://[^/]+", "", page.locator("#project-banner a").first.get_attribute("href") or ""
    )
    tabs.allowed.append(re.compile(r"status of 404 \(Not Found\)"))
    theirs = reader.goto(daphne_server.url + project_path)
    assert theirs is not None and theirs.status == 404

    phone = tabs.new(alice, viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    open_chat(phone, daphne_server, project_path)
    phone.screenshot(path=str(SHOTS / "project-phone.png"))
    phone.get_by_role("button", name="Show conversations").click()
    expect(phone.locator(".project-group", has_text="Support desk")).to_be_visible()
    phone.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().left >= 0")
    expect(phone.locator(".project-group", has_text="Support desk").locator(".project-chat")).to_have_count(1)
    phone.screenshot(path=str(SHOTS / "project-phone-sidebar.png"))


def test_projects_made_renamed_and_deleted_in_one_tab_show_in_the_others(
    daphne_server: LiveServer, alice: Any, tabs: Tabs
) -> None:
    """Another tab's sidebar and Move menu follow (project.created, updated,
    deleted): a project made there appears in its place by name, a new name
    moves it, and once deleted its chats are back among the others."""
    from conversations.models import Conversation

    chat = Conversation.objects.create(owner=alice, title="Old notes")
    watching = tabs.new(alice)
    open_chat(watching, daphne_server, f"/c/{chat.pk}/")
    working = tabs.new(alice)
    open_chat(working, daphne_server)

    working.get_by_role("link", name="New project").click()
    working.get_by_label("Name").fill("Zeta team")
    working.get_by_role("button", name="Create the project").click()
    expect(working.locator("#project-banner")).to_contain_text("Project: Zeta team")
    working.get_by_role("link", name="New project").click()
    working.get_by_label("Name").fill("Mid team")
    working.get_by_role("button", name="Create the project").click()
    expect(working.locator("#project-banner")).to_contain_text("Project: Mid team")

    names = watching.locator(".project-group .project-link")
    expect(names).to_have_text(["Mid team", "Zeta team"])
    expect(watching.locator(".projects-empty")).to_be_hidden()
    expect(watching.locator("#move-select option")).to_have_text(["No project", "Mid team", "Zeta team"])

    # Renamed: it moves to where its new name goes.
    zeta = working.locator("#project-banner")
    working.goto(daphne_server.url + "/")
    working.locator(".project-link", has_text="Zeta team").click()
    zeta.get_by_role("link", name="Edit project").click()
    working.get_by_label("Name").fill("Alpha team")
    working.get_by_role("button", name="Save").click()
    expect(working.locator("#project-banner")).to_contain_text("Project: Alpha team")
    expect(names).to_have_text(["Alpha team", "Mid team"])

    # The watched chat goes into it, from the watching tab; then the project is deleted elsewhere.
    watching.locator("#move-select").select_option(label="Alpha team")
    watching.get_by_role("button", name="Move", exact=True).click()
    expect(watching.locator("#project-banner")).to_contain_text("Project: Alpha team")
    expect(watching.locator("#composer[data-ready]")).to_have_count(1)
    alpha = watching.locator(".project-group", has_text="Alpha team")
    expect(alpha.locator(".project-chat")).to_have_count(1)
    expect(alpha.locator(".project-count")).to_have_text("1")
    expect(watching.locator(".project-group", has_text="Mid team").locator(".project-count")).to_have_text(
        "0"
    )
    watching.screenshot(path=str(SHOTS / "projects-followed.png"))
    # Renamed again while the watching tab shows a chat of it: its banner follows, and a
    # lower-case name sorts as the server sorts it (case aside).
    working.get_by_role("link", name="Edit project").click()
    working.get_by_label("Name").fill("alpha crew")
    working.get_by_role("button", name="Save").click()
    expect(watching.locator("#project-banner .project-banner-name a").first).to_have_text("alpha crew")
    expect(names).to_have_text(["alpha crew", "Mid team"])
    working.get_by_role("link", name="Edit project").click()
    working.get_by_role("button", name="Delete the project").click()
    expect(names).to_have_text(["Mid team"])
    expect(watching.locator("#project-banner")).to_have_count(0)  # the chat stays, in no project
    expect(watching.locator("#conversation-list .conv-item", has_text="Old notes")).to_have_count(1)
    expect(watching.locator("#move-select option")).to_have_text(["No project", "Mid team"])
    assert Conversation.objects.get(pk=chat.pk).project_id is None
