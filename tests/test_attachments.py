"""Files in the conversation, through the real server: what the fake model
receives for a text file, a CSV and a PDF (content parts headed with their
names, the cut marked and shown), an image for a model that can see (and
refused for one that cannot), another person's file refused everywhere,
files sent again on later turns, the API's content parts through the openai
SDK, the ledger counting the files, and pruning and deletion taking files
with them."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import urllib.error
import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
from django.conf import settings
from django.core.management import call_command
from django.utils import timezone

from api import tokens
from conversations.models import Attachment, ChatModel, Conversation, Message, TokenUsage
from files.models import File
from tests.conftest import LiveServer, module_server
from tests.factories import make_user, session_cookie
from tests.fake_llm import FakeLLM, Reply
from tests.test_attacks import _until
from tests.test_files import PNG, _upload, text_pdf
from tests.test_security import open_socket

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CONTEXT_TOKENS = 400  # of a message's files, on this module's server


server = module_server(
    "attachments",
    CHAT_FILE_CONTEXT_TOKENS=str(CONTEXT_TOKENS),
    CHAT_FILE_MAX_PER_MESSAGE="4",
    OPENAI_VISION_MODELS="eyes-model",
)


def _person(name: str) -> tuple[Any, str]:
    user = make_user(f"att_{name}_{uuid.uuid4().hex[:6]}")
    return user, tokens.create(user, "files")[1]


def _file(server: LiveServer, token: str, name: str, data: bytes) -> dict[str, Any]:
    status, made = _upload(server, token, name, data)
    assert status == 201, made
    return made


def _send(ws: Any, content: str, files: list[str], **extra: Any) -> str:
    client_id = str(uuid.uuid4())
    frame = {
        "type": "message.send",
        "content": content,
        "client_id": client_id,
        "attachments": files,
        **extra,
    }
    ws.send(json.dumps(frame))
    return client_id


def _last_user_content(fake: FakeLLM) -> Any:
    return [m for m in fake.streamed_requests[-1].body["messages"] if m["role"] == "user"][-1]["content"]


def test_text_csv_and_pdf_reach_the_model_as_named_parts_and_the_cut_is_said(
    server: LiveServer, fake_llm: FakeLLM, sockets: contextlib.ExitStack
) -> None:
    user, token = _person("docs")
    notes = _file(server, token, "notes.md", b"# Launch\n\nThe launch is on Tuesday.\n")
    table = _file(server, token, "stock.csv", b"name,qty\nbolt,4\nnut,7\n")
    manual = _file(server, token, "manual.pdf", text_pdf("Chapter one: the red button.", "Never press it."))
    long_log = _file(server, token, "server.log", b"".join(b"line %05d: all quiet\n" % i for i in range(400)))
    fake_llm.default = Reply(chunks=["Read", " them"], usage=None)
    ws = open_socket(server, session_cookie(user), sockets)

    _send(ws, "Summarise these", [notes["id"], table["id"], manual["id"], long_log["id"]])
    created = _until(ws, lambda f: f["type"] == "message.created")
    finished = _until(ws, lambda f: f["type"] == "generation.finished")

    assert finished["status"] == "complete"
    parts = _last_user_content(fake_llm)
    assert parts[0] == {"type": "text", "text": "Summarise these"}
    texts = [p["text"] for p in parts[1:]]
    assert texts[0].startswith("File: notes.md\n\n# Launch") and "Tuesday" in texts[0]
    assert texts[1].startswith("File: stock.csv\n\nname,qty\nbolt,4")
    assert texts[2].startswith("File: manual.pdf") and "the red button" in texts[2]
    # The log crosses the message's room: cut, and the model is told.
    assert texts[3].startswith("File: server.log")
    read = CONTEXT_TOKENS - notes["tokens"] - table["tokens"] - manual["tokens"]
    assert f"[Only the first {read:,} of {long_log['tokens']:,} tokens were read.]" in texts[3]
    assert "line 00399" not in texts[3]
    # The person sees what went with the question, and how much was read.
    held = created["message"]["attachments"]
    assert [a["filename"] for a in held] == ["notes.md", "stock.csv", "manual.pdf", "server.log"]
    assert held[0] == {
        "id": notes["id"],
        "filename": "notes.md",
        "bytes": notes["bytes"],
        "content_type": "text/markdown",
        "tokens": notes["tokens"],
        "read_tokens": notes["tokens"],
    }
    assert held[3]["read_tokens"] == read < held[3]["tokens"]
    # The ledger counts the files (no usage from upstream: the estimate).
    answer = Message.objects.get(pk=finished["message"])
    row = TokenUsage.objects.get(message=answer)
    assert row.estimated and row.prompt_tokens >= CONTEXT_TOKENS

    # A later turn sends the files again, as part of their turn.
    _send(ws, "And the stock?", [], conversation=created["message"]["conversation"])
    _until(ws, lambda f: f["type"] == "generation.finished")
    sent = [m for m in fake_llm.streamed_requests[-1].body["messages"] if m["role"] == "user"]
    assert sent[0]["content"][1]["text"].startswith("File: notes.md")
    assert sent[1]["content"] == "And the stock?"


def test_an_image_reaches_a_model_that_sees_and_is_refused_for_one_that_does_not(
    server: LiveServer, fake_llm: FakeLLM, sockets: contextlib.ExitStack
) -> None:
    ChatModel.objects.update_or_create(name="eyes-model", defaults={"vision": True, "enabled": True})
    user, token = _person("eyes")
    picture = _file(server, token, "screen.png", PNG)
    fake_llm.default = Reply(chunks=["A dot"], usage=(800, 2))
    ws = open_socket(server, session_cookie(user), sockets)

    client_id = _send(ws, "", [picture["id"]])  # the default model cannot see
    refused = _until(ws, lambda f: f["type"] == "error")
    assert refused["code"] == "invalid_request" and refused["client_id"] == client_id
    assert "cannot see images" in refused["message"] and "screen.png" in refused["message"]
    assert not Conversation.objects.filter(owner=user).exists()  # nothing was stored

    _send(ws, "What is this?", [picture["id"]], model="eyes-model")
    _until(ws, lambda f: f["type"] == "generation.finished")
    parts = _last_user_content(fake_llm)
    assert fake_llm.streamed_requests[-1].body["model"] == "eyes-model"
    assert parts[1] == {"type": "text", "text": "Image: screen.png"}
    assert parts[2] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()},
    }


def test_another_persons_file_and_too_many_files_are_refused_with_nothing_stored(
    server: LiveServer, fake_llm: FakeLLM, sockets: contextlib.ExitStack
) -> None:
    _owner, owner_token = _person("owner")
    thief, thief_token = _person("thief")
    secret = _file(server, owner_token, "secret.txt", b"the vault code is 1234")
    ws = open_socket(server, session_cookie(thief), sockets)

    _send(ws, "read it", [secret["id"]])
    refused = _until(ws, lambda f: f["type"] == "error")
    assert refused["code"] == "not_found" and "1234" not in json.dumps(refused)

    mine = [_file(server, thief_token, f"n{i}.txt", b"note %d" % i)["id"] for i in range(5)]
    _send(ws, "read them", mine)
    too_many = _until(ws, lambda f: f["type"] == "error")
    assert too_many["code"] == "invalid_request" and "At most 4 files" in too_many["message"]
    _send(ws, "read them", ["not-an-id"])
    assert "file ids" in _until(ws, lambda f: f["type"] == "error")["message"]
    assert not Conversation.objects.filter(owner=thief).exists()
    assert fake_llm.streamed_requests == []

    # The conversations API refuses it the same way.
    conversation = _api(server, thief_token, "/api/v1/conversations", {})[1]
    status, body = _api(
        server,
        thief_token,
        f"/api/v1/conversations/{conversation['id']}/messages",
        {"content": "read it", "attachments": [secret["id"]]},
    )
    assert status == 404 and "1234" not in json.dumps(body)


def _api(server: LiveServer, token: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        server.url + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_conversations_api_sends_files_with_a_message(server: LiveServer, fake_llm: FakeLLM) -> None:
    _user, token = _person("api")
    notes = _file(server, token, "plan.txt", b"Step one: coffee.")
    fake_llm.default = Reply(chunks=["Coffee first"], usage=(40, 2))
    conversation = _api(server, token, "/api/v1/conversations", {})[1]

    status, sent = _api(
        server,
        token,
        f"/api/v1/conversations/{conversation['id']}/messages",
        {"attachments": [notes["id"]]},  # only a file: no text needed
    )

    assert status == 200, sent
    assert sent["message"]["attachments"][0]["filename"] == "plan.txt"
    assert sent["answer"]["content"] == "Coffee first"
    assert _last_user_content(fake_llm) == [{"type": "text", "text": "File: plan.txt\n\nStep one: coffee."}]
    fake_llm.wait_for(lambda: fake_llm.completion_requests)
    titled = fake_llm.completion_requests[-1].body["messages"]
    assert any(m["role"] == "user" and m["content"] == "plan.txt" for m in titled)  # named by its file


def test_the_sdk_sends_file_and_image_parts_through_chat_completions(
    server: LiveServer, fake_llm: FakeLLM
) -> None:
    ChatModel.objects.update_or_create(name="eyes-model", defaults={"vision": True, "enabled": True})
    _user, token = _person("sdk")
    _other, other_token = _person("sdk_other")
    uploaded = _file(server, token, "notes.txt", b"Remember the milk.")
    theirs = _file(server, other_token, "theirs.txt", b"private")
    client = openai.OpenAI(api_key=token, base_url=server.url + "/api/v1", max_retries=0)
    fake_llm.default = Reply(chunks=["Milk", " and a PDF"], usage=(900, 4))
    pdf_data = "data:application/pdf;base64," + base64.b64encode(text_pdf("Quarterly figures: up.")).decode()
    image = "data:image/png;base64," + base64.b64encode(PNG).decode()

    odd_detail: Any = {"type": "image_url", "image_url": {"url": image, "detail": []}}  # ignored, not a 500
    reply = client.chat.completions.create(
        model="eyes-model",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What do these say?"},
                    {"type": "file", "file": {"file_id": uploaded["id"].upper()}},  # any spelling of the id
                    {"type": "file", "file": {"filename": "q3.pdf", "file_data": pdf_data}},
                    odd_detail,
                ],
            }
        ],
    )

    assert reply.choices[0].message.content == "Milk and a PDF"
    parts = _last_user_content(fake_llm)
    assert parts[0] == {"type": "text", "text": "What do these say?"}
    assert parts[1] == {"type": "text", "text": "File: notes.txt\n\nRemember the milk."}
    assert parts[2]["text"].startswith("File: q3.pdf") and "Quarterly figures: up." in parts[2]["text"]
    assert parts[3] == {"type": "image_url", "image_url": {"url": image}}
    assert not File.objects.filter(filename="q3.pdf").exists()  # read, never stored

    def refused(model: str, content: list[dict[str, Any]]) -> openai.APIStatusError:
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}])  # type: ignore[misc, list-item]
        return caught.value

    other = refused("eyes-model", [{"type": "file", "file": {"file_id": theirs["id"]}}])
    assert other.status_code == 404 and "private" not in str(other.body)
    blind = refused("fake-model", [{"type": "image_url", "image_url": {"url": image}}])
    assert blind.status_code == 400 and "cannot see images" in str(blind.body)
    remote = refused("eyes-model", [{"type": "image_url", "image_url": {"url": "http://10.0.0.1/x.png"}}])
    assert remote.status_code == 400 and "data: URL" in str(remote.body)
    not_image = "data:image/png;base64," + base64.b64encode(b"\x7fELF" + bytes(300)).decode()
    fake = refused("eyes-model", [{"type": "image_url", "image_url": {"url": not_image}}])
    assert fake.status_code == 400 and "must be a picture" in str(fake.body)
    bad = refused("eyes-model", [{"type": "file", "file": {"file_data": "data:text/plain;base64,@@@"}}])
    assert bad.status_code == 400 and "base64" in str(bad.body)
    # One small upload named again and again: refused before anything is read.
    many = refused("eyes-model", [{"type": "file", "file": {"file_id": uploaded["id"]}}] * 5)
    assert many.status_code == 400 and "At most 4 files and images in one request" in str(many.body)


def test_pruning_and_deleting_take_the_files_nobody_holds(
    server: LiveServer, fake_llm: FakeLLM, sockets: contextlib.ExitStack
) -> None:
    user, token = _person("prune")
    kept = _file(server, token, "kept.txt", b"still needed")
    old = _file(server, token, "old.txt", b"old news")
    never_sent = _file(server, token, "draft.txt", b"never sent")
    fresh_draft = _file(server, token, "today.txt", b"just uploaded")
    in_deleted = _file(server, token, "gone.txt", b"in a deleted chat")
    fake_llm.default = Reply(chunks=["ok"], usage=(5, 1))
    ws = open_socket(server, session_cookie(user), sockets)
    conversations = []
    for files in ([old["id"]], [kept["id"]], [in_deleted["id"]]):
        _send(ws, "look", files)
        conversations.append(_until(ws, lambda f: f["type"] == "conversation.created")["conversation"]["id"])
        _until(ws, lambda f: f["type"] == "generation.finished")
    long_ago = timezone.now() - timedelta(days=100)
    Conversation.objects.filter(pk=conversations[0]).update(updated_at=long_ago)
    File.objects.filter(pk=never_sent["id"]).update(created_at=timezone.now() - timedelta(days=2))
    blob = Path(str(settings.MEDIA_ROOT)) / str(File.objects.get(pk=old["id"]).blob.name)

    out = io.StringIO()
    call_command("prune_history", "--older-than", "90d", "--dry-run", stdout=out)
    assert "and 2 file(s) no message would hold" in out.getvalue()
    assert File.objects.filter(owner=user).count() == 5
    out = io.StringIO()
    call_command("prune_history", "--older-than", "90d", stdout=out)
    assert "Deleted 2 file(s) no message holds" in out.getvalue()

    remaining = set(File.objects.filter(owner=user).values_list("filename", flat=True))
    assert remaining == {"kept.txt", "today.txt", "gone.txt"}
    assert not blob.exists()

    page = _page_client(user)
    assert page.post(f"/c/{conversations[2]}/delete").status_code in (200, 302)
    assert not File.objects.filter(pk=in_deleted["id"]).exists()
    assert File.objects.filter(pk=kept["id"]).exists()
    assert Attachment.objects.filter(message__conversation_id=conversations[1]).count() == 1
    assert File.objects.filter(pk=fresh_draft["id"]).exists()


def _page_client(user: Any) -> Any:
    from django.test import Client

    page = Client()
    page.cookies[settings.SESSION_COOKIE_NAME] = session_cookie(user)
    return page


def test_a_turn_and_its_files_are_kept_or_dropped_together_and_a_summary_names_them(
    alice: Any, settings: Any
) -> None:
    from conversations import attachments
    from conversations.history import plan_history, transcript
    from tests.test_history import chat

    settings.CHAT_SUMMARY_TOKENS = 40
    report = File.objects.create(
        owner=alice,
        filename="report.pdf",
        content_type="application/pdf",
        kind="pdf",
        bytes=10,
        blob="files/x/report",
        text="figures " * 200,
        tokens=400,
    )
    conversation = chat(alice)
    first = conversation.add("user", "look at this")
    Message.objects.filter(pk=first.pk).update(attachments=attachments.records([report]))
    Attachment.objects.create(message=first, file=report)
    conversation.add("assistant", "It is a report.")
    question = conversation.add("user", "and now?")

    whole = plan_history(conversation.conversation, upto=question, budget=2000)
    assert whole.after[0]["content"][1]["text"].startswith("File: report.pdf\n\nfigures")
    # A budget the file does not fit: the turn goes whole (never its text without its file).
    planned = plan_history(conversation.conversation, upto=question, budget=300)
    assert [m["content"] for m in planned.after] == ["and now?"]
    said = transcript(planned.pending)
    assert "User: look at this\n(Files sent with it: report.pdf)" in said
    assert "figures" not in said  # a summary names a dropped turn's files, it does not reread them


def test_an_edited_question_keeps_its_files_unless_it_names_others(
    server: LiveServer, fake_llm: FakeLLM, sockets: contextlib.ExitStack
) -> None:
    user, token = _person("edit")
    first = _file(server, token, "first.txt", b"first version")
    second = _file(server, token, "second.txt", b"second version")
    fake_llm.default = Reply(chunks=["ok"], usage=(5, 1))
    ws = open_socket(server, session_cookie(user), sockets)
    _send(ws, "read", [first["id"]])
    question = _until(ws, lambda f: f["type"] == "message.created")["message"]
    _until(ws, lambda f: f["type"] == "generation.finished")

    def edit(message: dict[str, Any], **extra: Any) -> dict[str, Any]:
        frame = {
            "type": "message.edit",
            "conversation": message["conversation"],
            "message": message["id"],
            "content": "read again",
            "client_id": str(uuid.uuid4()),
            **extra,
        }
        ws.send(json.dumps(frame))
        created: dict[str, Any] = _until(ws, lambda f: f["type"] == "message.created")["message"]
        _until(ws, lambda f: f["type"] == "generation.finished")
        return created

    kept = edit(question)
    assert [a["filename"] for a in kept["attachments"]] == ["first.txt"]
    assert _last_user_content(fake_llm)[1]["text"] == "File: first.txt\n\nfirst version"
    swapped = edit(kept, attachments=[second["id"]])
    assert [a["filename"] for a in swapped["attachments"]] == ["second.txt"]
    assert _last_user_content(fake_llm)[1]["text"] == "File: second.txt\n\nsecond version"
    dropped = edit(swapped, attachments=[])
    assert dropped["attachments"] == [] and _last_user_content(fake_llm) == "read again"


def test_exports_name_the_files_and_deleting_an_account_deletes_its_files(
    server: LiveServer, fake_llm: FakeLLM, sockets: contextlib.ExitStack
) -> None:
    user, token = _person("export")
    notes = _file(server, token, "minutes.txt", b"We agreed on Friday.")
    fake_llm.default = Reply(chunks=["Friday."], usage=(5, 1))
    ws = open_socket(server, session_cookie(user), sockets)
    _send(ws, "When?", [notes["id"]])
    conversation = _until(ws, lambda f: f["type"] == "message.created")["message"]["conversation"]
    _until(ws, lambda f: f["type"] == "generation.finished")
    page = _page_client(user)

    markdown = page.get(f"/c/{conversation}/export.md").content.decode()
    assert "**You:**\n\nWhen?\n\n_Files: minutes.txt (20 bytes)_" in markdown
    exported = json.loads(page.get(f"/c/{conversation}/export.json").content)
    assert exported["messages"][0]["attachments"][0]["filename"] == "minutes.txt"

    blob = Path(str(settings.MEDIA_ROOT)) / str(File.objects.get(pk=notes["id"]).blob.name)
    assert blob.exists()
    user.delete()
    assert not File.objects.filter(pk=notes["id"]).exists()
    assert not blob.exists()
