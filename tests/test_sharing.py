"""Shared links through the real server: the owner shares (the page with
its session and CSRF, or the API), another member reads the snapshot, a
stranger is sent to log in (`members`) or reads it (`public`), nothing
opens when sharing is `off`, an answer added later shows only once the link
is updated, a revoked link is 404, a shared message's file opens only
through the link, and "continue" copies the chat into the reader's own."""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.core.files.storage import default_storage

from api import tokens
from conversations.models import Attachment, Conversation, Message, Share
from files.models import File
from tests.conftest import LiveServer, module_server
from tests.factories import make_user, session_cookie
from tests.fake_llm import FakeLLM, Reply
from tests.test_attacks import _until
from tests.test_security import open_socket

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _browser(server: LiveServer, user: Any | None = None) -> httpx.Client:
    """A person's browser: their session cookie, and the CSRF token a page gives."""
    client = httpx.Client(base_url=server.url, timeout=20, follow_redirects=False)
    if user is not None:
        client.cookies.set(settings.SESSION_COOKIE_NAME, session_cookie(user))
    client.get("/" if user is not None else "/accounts/login/")  # a page with a form: the CSRF cookie
    return client


def _post(client: httpx.Client, path: str, **kwargs: Any) -> httpx.Response:
    return client.post(path, headers={"X-CSRFToken": client.cookies.get("csrftoken") or ""}, **kwargs)


def _chat(owner: Any, *turns: tuple[str, str]) -> Conversation:
    conversation = Conversation.objects.create(owner=owner, title="Release plan")
    for question, answer in turns:
        Message.objects.create(conversation=conversation, role="user", content=question)
        Message.objects.create(
            conversation=conversation, role="assistant", content=answer, model="fake-model"
        )
    return conversation


def test_a_member_reads_the_snapshot_until_the_owner_updates_it_and_a_revoked_link_is_gone(
    daphne_server: LiveServer,
) -> None:
    owner, reader = make_user("share_owner"), make_user("share_reader")
    conversation = _chat(
        owner, ("When do we ship?", "On **Tuesday**, after <script>alert(1)</script> review.")
    )
    mine = _browser(daphne_server, owner)

    made = _post(mine, f"/c/{conversation.pk}/share/", json={})
    assert made.status_code == 201, made.text
    link = made.json()
    assert link["url"] == f"{daphne_server.url}/s/{link['token']}/"
    assert len(link["token"]) >= 40 and str(conversation.pk) not in link["token"]

    theirs = _browser(daphne_server, reader)
    page = theirs.get(f"/s/{link['token']}/")
    assert page.status_code == 200
    assert "<strong>Tuesday</strong>" in page.text and "<script>alert" not in page.text
    assert (
        page.headers["X-Robots-Tag"].startswith("noindex") and 'name="robots" content="noindex' in page.text
    )
    assert 'id="composer"' not in page.text and "share_owner" not in page.text  # no name unless chosen
    assert "Continue in your own chat" in page.text

    stranger = _browser(daphne_server)
    away = stranger.get(f"/s/{link['token']}/")
    assert away.status_code == 302 and away.headers["Location"].startswith("/accounts/login/?next=/s/")

    # A later answer is not shown until the owner updates the link (same address).
    Message.objects.create(conversation=conversation, role="user", content="And the docs?")
    Message.objects.create(conversation=conversation, role="assistant", content="Docs on Wednesday.")
    assert "Docs on Wednesday" not in theirs.get(f"/s/{link['token']}/").text
    again = _post(mine, f"/c/{conversation.pk}/share/", json={"show_owner": True})
    assert again.status_code == 200 and again.json()["token"] == link["token"]
    updated = theirs.get(f"/s/{link['token']}/").text
    assert "Docs on Wednesday" in updated and "share_owner" in updated  # the owner chose to be named

    # Someone else cannot share or revoke it; the owner revokes it.
    assert _post(theirs, f"/c/{conversation.pk}/share/", json={}).status_code == 404
    listed = mine.get("/accounts/shared-links/")
    assert link["url"] in listed.text and "Revoke" in listed.text
    revoked = _post(mine, f"/c/{conversation.pk}/share/", data={"_method": "DELETE"})
    assert revoked.status_code == 302
    assert theirs.get(f"/s/{link['token']}/").status_code == 404
    assert theirs.get("/s/not-a-token/").status_code == 404


def test_the_api_shares_updates_and_revokes(daphne_server: LiveServer) -> None:
    owner, other = make_user("share_api"), make_user("share_api_other")
    conversation = _chat(owner, ("Hi", "Hello"))
    api = httpx.Client(
        base_url=daphne_server.url,
        headers={"Authorization": f"Bearer {tokens.create(owner, 'x')[1]}"},
        timeout=20,
    )
    theirs = httpx.Client(
        base_url=daphne_server.url,
        headers={"Authorization": f"Bearer {tokens.create(other, 'x')[1]}"},
        timeout=20,
    )
    path = f"/api/v1/conversations/{conversation.pk}/share"

    made = api.post(path, json={})
    assert made.status_code == 201 and set(made.json()) >= {"url", "token", "created_at", "updated_at"}
    assert api.post(path, json={}).json()["token"] == made.json()["token"]
    assert api.post(path, json={"show_owner": "yes"}).status_code == 400
    assert theirs.post(path, json={}).status_code == 404
    assert theirs.delete(path).status_code == 404
    assert api.delete(path).json() == {"revoked": True}
    assert not Share.objects.exists()
    assert api.delete(path).status_code == 404


def test_a_shared_file_opens_through_the_link_only_and_continue_copies_the_chat_and_its_files(
    daphne_server: LiveServer, fake_llm: FakeLLM
) -> None:
    owner, reader = make_user("share_files"), make_user("share_files_reader")
    conversation = _chat(owner)
    notes = File.objects.create(
        owner=owner, filename="plan.txt", content_type="text/plain", kind="text", bytes=9, text="PLAN-7f3a"
    )
    notes.blob.save(f"files/{owner.pk}/{notes.pk.hex}", _content(b"the plan!"), save=True)
    secret = File.objects.create(
        owner=owner, filename="secret.txt", content_type="text/plain", kind="text", bytes=6, text="secret"
    )
    secret.blob.save(f"files/{owner.pk}/{secret.pk.hex}", _content(b"secret"), save=True)
    # More than the reader may store (its bytes as recorded): named in the copy, not copied.
    huge = File.objects.create(
        owner=owner, filename="huge.log", content_type="text/plain", kind="text", bytes=10**12, text="big"
    )
    huge.blob.save(f"files/{owner.pk}/{huge.pk.hex}", _content(b"big"), save=True)
    record = {
        "id": str(notes.pk),
        "filename": "plan.txt",
        "bytes": 9,
        "content_type": "text/plain",
        "tokens": 3,
        "read_tokens": 3,
    }
    huge_record = {**record, "id": str(huge.pk), "filename": "huge.log", "bytes": 10**12}
    # Its bytes lost from storage since: named, and nothing of it left in the reader's.
    gone = File.objects.create(
        owner=owner, filename="gone.txt", content_type="text/plain", kind="text", bytes=4, text="gone"
    )
    gone.blob.save(f"files/{owner.pk}/{gone.pk.hex}", _content(b"gone"), save=True)
    default_storage.delete(gone.blob.name or "")
    gone_record = {**record, "id": str(gone.pk), "filename": "gone.txt", "bytes": 4}
    question = Message.objects.create(
        conversation=conversation,
        role="user",
        content="Read this",
        attachments=[record, huge_record, gone_record],
    )
    for one in (notes, huge, gone):
        Attachment.objects.create(message=question, file=one)
    Message.objects.create(conversation=conversation, role="assistant", content="It says: the plan.")
    token = _post(_browser(daphne_server, owner), f"/c/{conversation.pk}/share/", json={}).json()["token"]
    theirs = _browser(daphne_server, reader)

    page = theirs.get(f"/s/{token}/")
    assert f"/s/{token}/files/{notes.pk}/" in page.text
    got = theirs.get(f"/s/{token}/files/{notes.pk}/")
    assert got.status_code == 200 and got.content == b"the plan!"
    assert got.headers["Content-Disposition"].startswith("attachment")
    assert theirs.get(f"/files/{notes.pk}/").status_code == 404  # never without the link
    assert theirs.get(f"/s/{token}/files/{secret.pk}/").status_code == 404  # not in the share
    assert theirs.get(f"/s/{token}/files/{uuid.uuid4()}/").status_code == 404

    copied = _post(theirs, f"/s/{token}/continue/")
    assert copied.status_code == 302
    copy_id = re.search(r"/c/([0-9a-f-]+)/", copied.headers["Location"])
    assert copy_id
    copy = Conversation.objects.get(pk=copy_id[1])
    assert copy.owner == reader and copy.title == "Release plan (shared)"
    rows = list(copy.messages.order_by("created_at").values_list("role", "content"))
    assert rows == [
        ("user", "Read this\n\n(Shared with files: huge.log, gone.txt)"),
        ("assistant", "It says: the plan."),
    ]
    # plan.txt is the reader's own now: a file of theirs, the copied question holds it.
    copied_file = File.objects.get(owner=reader)
    assert (copied_file.filename, copied_file.text, copied_file.bytes) == ("plan.txt", "PLAN-7f3a", 9)
    held = copy.messages.get(role="user")
    assert held.attachments == [{**record, "id": str(copied_file.pk)}]
    assert list(Attachment.objects.filter(message__conversation=copy).values_list("file", flat=True)) == [
        copied_file.pk
    ]
    assert theirs.get(f"/files/{copied_file.pk}/").content == b"the plan!"
    assert default_storage.listdir(f"files/{reader.pk}")[1] == [copied_file.pk.hex]  # no bytes left over
    assert File.objects.filter(owner=owner).count() == 4  # the owner's stay theirs
    # Carried on, the model reads the copied file as it did in the original.
    fake_llm.script(Reply(chunks=["Still Tuesday."]))
    with contextlib.ExitStack() as sockets:
        ws = open_socket(daphne_server, session_cookie(reader), sockets)
        ws.send(
            json.dumps(
                {
                    "type": "message.send",
                    "conversation": str(copy.pk),
                    "content": "And then?",
                    "client_id": str(uuid.uuid4()),
                }
            )
        )
        _until(ws, lambda frame: frame["type"] == "generation.finished", 30)
    sent = json.dumps(fake_llm.streamed_requests[-1].body["messages"])
    assert "PLAN-7f3a" in sent and "big" not in sent  # the file's text, not the answer quoting it


def _content(data: bytes) -> Any:
    from django.core.files.base import ContentFile

    return ContentFile(data)


public_server = module_server("public", CHAT_SHARING="public")


no_sharing_server = module_server("off", CHAT_SHARING="off")


def test_public_links_open_for_anyone_and_off_opens_none(
    public_server: LiveServer, no_sharing_server: LiveServer
) -> None:
    owner = make_user("share_public")
    conversation = _chat(owner, ("Open question", "Open answer"))
    token = _post(_browser(public_server, owner), f"/c/{conversation.pk}/share/", json={}).json()["token"]

    stranger = _browser(public_server)
    page = stranger.get(f"/s/{token}/")
    assert page.status_code == 200 and "Open answer" in page.text
    assert "Continue in your own chat" not in page.text  # a stranger has no chats

    # The same link where sharing is off: nothing opens, and nothing can be shared.
    assert _browser(no_sharing_server, owner).get(f"/s/{token}/").status_code == 404
    refused = _post(_browser(no_sharing_server, owner), f"/c/{conversation.pk}/share/", json={})
    assert refused.status_code == 403 and "turned off" in refused.json()["error"]


def test_odd_tokens_a_turned_off_owner_and_a_stranger_who_continues(daphne_server: LiveServer) -> None:
    owner, reader = make_user("share_odd"), make_user("share_odd_reader")
    conversation = _chat(owner, ("Q", "A"))
    token = _post(_browser(daphne_server, owner), f"/c/{conversation.pk}/share/", json={}).json()["token"]
    theirs = _browser(daphne_server, reader)
    for odd in ("%00" * 30, "a" * 500, "../../etc/passwd", "x" * 19):
        assert theirs.get(f"/s/{odd}/").status_code == 404, odd

    stranger = _browser(daphne_server)
    sent = _post(stranger, f"/s/{token}/continue/")
    assert sent.status_code == 302 and sent.headers["Location"] == f"/accounts/login/?next=/s/{token}/"

    type(owner).objects.filter(pk=owner.pk).update(is_active=False)  # staff turned the owner off
    assert theirs.get(f"/s/{token}/").status_code == 404
