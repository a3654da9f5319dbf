"""The holes an attacker found, each tried again as it was found: through a
real daphne where it was found there (admin rights, invitations, poisoned
sends, old links, look-alike names, a leaked key, sockets that outlive
their sign-in, a crashing frame, a foreign Origin, bad API input), and in
this process where the hole is a rule of the code (batches, worker
identity, clocks, Redis names).

Each test failed before its fix. Each refused attempt that matters is a
line on the `security` log."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import re
import string
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypedDict, cast

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session
from django.utils import timezone
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from api import tokens
from conversations import refusals
from conversations.generation import fanout, identity, recovery, runner, turns
from conversations.models import Conversation, Message
from conversations.sockets import socket_counts
from tests.conftest import LiveServer, connect, database_url, module_server, run_daphne
from tests.factories import PASSWORD, make_conversation, make_user, session_cookie
from tests.fake_llm import FakeLLM, Reply
from tests.test_api import error_of, http
from tests.test_security import (
    Visitor,
    closed_with,
    logged_in,
    mailed_link,
    open_socket,
    security_lines,
    staff_who_may,
)

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

LONE_SURROGATE = "x\ud800y"  # valid JSON as "x\\ud800y", no character
NUL = "x\x00y"


def _a_name(prefix: str) -> str:
    return prefix + "".join(random.choices(string.ascii_lowercase, k=6))


def _admin_action(visitor: Visitor, action: str, *users: Any) -> tuple[int, str, str]:
    """POST an action of the admin's user list, as its form does."""
    server = visitor.server
    status, _, page = visitor.get("/admin/auth/user/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert token is not None, (status, page[:300])
    form = [("csrfmiddlewaretoken", token[1]), ("action", action), ("index", "0"), ("select_across", "0")]
    form += [("_selected_action", str(user.pk)) for user in users]
    return visitor._open(server.url + "/admin/auth/user/", urllib.parse.urlencode(form).encode())


def _active(user: Any) -> bool:
    return get_user_model().objects.get(pk=user.pk).is_active


# --- 1. Admin rights ---------------------------------------------------------------------


def test_a_staff_member_who_may_only_view_users_cannot_deactivate_anyone(daphne_server: LiveServer) -> None:
    root = get_user_model().objects.create_superuser(_a_name("root"), password=PASSWORD)
    waiting = make_user(_a_name("waiting"), is_active=False)
    viewer = Visitor(daphne_server)
    viewer.use_session_of(staff_who_may(_a_name("viewer"), "view_user"))

    status, _, page = viewer.get("/admin/auth/user/")
    assert status == 200 and "deactivate_users" not in page  # not offered

    _admin_action(viewer, "deactivate_users", root)
    _admin_action(viewer, "activate_users", waiting)
    assert _active(root) and not _active(waiting)
    refused = security_lines(daphne_server, "admin_action_refused")
    assert any("action=deactivate_users" in line and f"address={viewer.address}" in line for line in refused)


def test_a_staff_member_who_may_change_users_cannot_lock_out_a_superuser(daphne_server: LiveServer) -> None:
    root = get_user_model().objects.create_superuser(_a_name("root"), password=PASSWORD)
    plain = make_user(_a_name("plain"))
    changer = Visitor(daphne_server)
    changer.use_session_of(staff_who_may(_a_name("changer"), "view_user", "change_user"))

    _status, _, page = _admin_action(changer, "deactivate_users", root, plain)
    assert _active(root) and not _active(plain)
    assert root.username in page  # "Left as they are: ..."
    assert any(
        root.username in line and "action=deactivate_users" in line
        for line in security_lines(daphne_server, "admin_action_refused")
    )


# --- 2. Invitations need the permission to add users ---------------------------------------


def test_a_staff_member_without_add_user_cannot_invite(daphne_server: LiveServer) -> None:
    staff = Visitor(daphne_server)
    staff.use_session_of(staff_who_may(_a_name("staff"), "view_user"))
    invitee = _a_name("invitee")
    status, _, page = staff.get("/accounts/invite/")
    assert status == 403 and "permission to add users" in page
    status, _, _ = staff._open(
        daphne_server.url + "/accounts/invite/",
        urllib.parse.urlencode({"username": invitee, "email": "x@example.com"}).encode(),
    )
    assert status == 403
    assert not get_user_model().objects.filter(username=invitee).exists()
    assert "Invite by e-mail" not in staff.get("/admin/auth/user/")[2]
    assert any(f"address={staff.address}" in line for line in security_lines(daphne_server, "invite_refused"))


# --- 3. Poisoned sends -----------------------------------------------------------------------


def _send_frame(content: str, client_id: str | None = None) -> tuple[str, str]:
    client_id = client_id or str(uuid.uuid4())
    frame = {"type": "message.send", "conversation": None, "content": content, "client_id": client_id}
    return client_id, json.dumps(frame)  # ensure_ascii: "\ud800" and "\u0000" as escapes


def _until(
    ws: ClientConnection, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        frame: dict[str, Any] = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        if predicate(frame):
            return frame


def test_a_poisoned_send_is_refused_alone_and_everyone_elses_sends_are_answered(
    daphne_server: LiveServer, fake_llm: FakeLLM, sockets: contextlib.ExitStack
) -> None:
    fake_llm.default = Reply(chunks=["fine"], usage=(5, 1))
    attacker = open_socket(daphne_server, session_cookie(make_user(_a_name("attacker"))), sockets)
    victims = [
        open_socket(daphne_server, session_cookie(make_user(_a_name("victim"))), sockets) for _ in range(4)
    ]
    poisoned = [_send_frame(LONE_SURROGATE), _send_frame(NUL)]
    clean = [_send_frame(f"question {i}") for i in range(len(victims))]
    # All at once, so that they reach the server together.
    for (_, frame), ws in zip(clean, victims, strict=True):
        ws.send(frame)
    for _, frame in poisoned:
        attacker.send(frame)

    for ws in victims:
        finished = _until(ws, lambda f: f["type"] in ("generation.finished", "error"))
        assert (finished["type"], finished.get("status")) == ("generation.finished", "complete"), finished
    errors = [_until(attacker, lambda f: f["type"] == "error") for _ in poisoned]
    assert {e["client_id"] for e in errors} == {client_id for client_id, _ in poisoned}
    assert {e["code"] for e in errors} == {"invalid_request"}
    assert not Message.objects.filter(client_id__in=[c for c, _ in poisoned]).exists()
    assert Message.objects.filter(client_id__in=[c for c, _ in clean]).count() == len(clean)
    # The attacker's socket is open, and a clean send of theirs is answered.
    attacker.send(_send_frame("sorry")[1])
    assert _until(attacker, lambda f: f["type"] == "generation.finished")["status"] == "complete"


def test_a_batch_with_a_poisoned_send_gives_each_send_its_own_outcome(alice: Any, bob: Any) -> None:
    sends = [
        turns.Send(alice, None, LONE_SURROGATE, uuid.uuid4()),
        turns.Send(bob, None, "clean one", uuid.uuid4()),
        turns.Send(alice, None, NUL, uuid.uuid4()),
        turns.Send(bob, None, "clean two", uuid.uuid4()),
    ]
    outcomes = turns.accept_messages(sends)
    kinds = [o.code if isinstance(o, refusals.Refusal) else type(o).__name__ for o in outcomes]
    assert kinds == ["invalid_request", "Accepted", "invalid_request", "Accepted"]
    assert "lone surrogate" in str(outcomes[0]) and "NUL" in str(outcomes[2])
    assert Message.objects.filter(role="user").count() == 2


def test_a_batch_that_fails_together_is_accepted_one_by_one(
    alice: Any, bob: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever makes the batch's INSERT fail (here one send whose title cannot
    be made), only that send hears it."""
    real = turns.title_from

    def title_from(content: str) -> str:
        if content == "the bad one":
            raise ValueError("no title for this")
        return real(content)

    monkeypatch.setattr(turns, "title_from", title_from)
    sends = [
        turns.Send(alice, None, "good", uuid.uuid4()),
        turns.Send(bob, None, "the bad one", uuid.uuid4()),
    ]
    outcomes = turns.accept_messages(sends)
    assert isinstance(outcomes[0], turns.Accepted) and isinstance(outcomes[1], ValueError)
    assert list(Message.objects.filter(role="user").values_list("content", flat=True)) == ["good"]


def _csrf_post_json(visitor: Visitor, path: str, body: bytes) -> tuple[int, str, str]:
    visitor.get("/")  # the csrftoken cookie
    token = next(c.value for c in visitor.jar if c.name == settings.CSRF_COOKIE_NAME)
    assert token is not None
    request = urllib.request.Request(
        visitor.server.url + path,
        data=body,
        headers={
            "Content-Type": "application/json",
            "X-CSRFToken": token,
            "Origin": visitor.server.url,
            "X-Forwarded-For": visitor.address,
        },
    )
    try:
        with visitor.opener.open(request, timeout=10) as response:
            return response.status, response.url, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.url, exc.read().decode()


def test_bad_text_through_the_api_and_rename_is_a_clear_400(daphne_server: LiveServer, alice: Any) -> None:
    token = tokens.create(alice, "attacks")[1]
    conversation = make_conversation(alice, title="Mine")
    for content in (LONE_SURROGATE, NUL):
        body = json.dumps({"messages": [{"role": "user", "content": content}]}).encode()
        assert error_of(http(daphne_server, "POST", "/api/v1/chat/completions", token, body))[0] == 400
        body = json.dumps({"content": content}).encode()
        path = f"/api/v1/conversations/{conversation.pk}/messages"
        assert error_of(http(daphne_server, "POST", path, token, body))[0] == 400
        visitor = Visitor(daphne_server)
        visitor.use_session_of(alice)
        status, _, reply = _csrf_post_json(
            visitor, f"/c/{conversation.pk}/rename", json.dumps({"title": content}).encode()
        )
        assert status == 400 and "error" in json.loads(reply)
    assert Conversation.objects.get(pk=conversation.pk).title == "Mine"
    assert not Message.objects.filter(conversation=conversation).exists()


# --- 4. A banned user's old link -------------------------------------------------------------


def test_a_deactivated_user_cannot_come_back_through_an_old_link(daphne_server: LiveServer) -> None:
    name = _a_name("banned")
    banned = make_user(name, email=f"{name}@example.com")
    visitor = Visitor(daphne_server)
    visitor.post("/accounts/password-reset/", {"email": banned.email})
    link = mailed_link(daphne_server, "/accounts/password-reset/key/")
    key = link.rstrip("/").rsplit("/", 1)[1].split("-", 1)[1]  # allauth's <uidb36>-<key>: a Django token
    uid_token = f"{urlsafe_base64_encode(force_bytes(banned.pk))}/{key}/"
    banned.is_active = False  # staff ban them
    banned.save()

    thief = Visitor(daphne_server)
    # The invitation's address took any reset link, set is_active and logged in.
    _status, url, page = thief.get(f"/accounts/invitation/{uid_token}")
    assert "This link no longer works" in page
    new = "back-again-9"
    thief._open(url, urllib.parse.urlencode({"new_password1": new, "new_password2": new}).encode())
    _status, url, page = thief.get(link)  # and the reset page itself
    assert "This link no longer works" in page
    banned.refresh_from_db()
    assert not banned.is_active and banned.check_password(PASSWORD)
    assert not logged_in(thief.get("/"), daphne_server)
    assert any(f"user={name}" in line for line in security_lines(daphne_server, "invitation_refused"))


def test_a_password_reset_link_does_not_log_in_through_the_invitation_address(
    daphne_server: LiveServer,
) -> None:
    name = _a_name("active")
    user = make_user(name, email=f"{name}@example.com")
    Visitor(daphne_server).post("/accounts/password-reset/", {"email": user.email})
    link = mailed_link(daphne_server, "/accounts/password-reset/key/")
    key = link.rstrip("/").rsplit("/", 1)[1].split("-", 1)[1]  # allauth's <uidb36>-<key>: a Django token
    uidb64 = urlsafe_base64_encode(force_bytes(user.pk))
    visitor = Visitor(daphne_server)
    assert "This link no longer works" in visitor.get(f"/accounts/invitation/{uidb64}/{key}/")[2]
    assert not logged_in(visitor.get("/"), daphne_server)


# --- 5. Look-alike usernames ------------------------------------------------------------------


def _fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) for c in text)


def _math_bold(text: str) -> str:
    return "".join(chr(0x1D41A + ord(c) - ord("a")) for c in text)


def test_look_alike_spellings_of_a_username_share_its_login_throttle(daphne_server: LiveServer) -> None:
    name = _a_name("bob")
    make_user(name)
    spellings = [_fullwidth(name), _math_bold(name), name.upper(), f" {name} "]
    assert logged_in(Visitor(daphne_server).log_in(_fullwidth(name)), daphne_server)  # Django's own NFKC
    for attempt in range(10):  # a distributed guesser: each from an address of its own
        status, _, _ = Visitor(daphne_server).log_in(spellings[attempt % len(spellings)], "guess")
        assert status == 200
    status, _, _ = Visitor(daphne_server).log_in(name, PASSWORD)
    assert status == 429
    assert any(f"user={name}" in line for line in security_lines(daphne_server, "login_throttled"))


# --- 6. The model key when the upstream quotes it -------------------------------------------------

GROQ_KEY = "gsk_" + "".join(random.choices(string.ascii_letters + string.digits, k=48))


groq_server = module_server(
    "groq", "A daphne whose key is not shaped like OpenAI's.", OPENAI_API_KEY=GROQ_KEY
)


def _pieces(secret: str, size: int = 8) -> list[str]:
    return [secret[i : i + size] for i in range(len(secret) - size + 1)]


def test_the_key_never_leaves_the_server_when_the_upstream_quotes_it(
    groq_server: LiveServer, fake_llm: FakeLLM, alice: Any, sockets: contextlib.ExitStack
) -> None:
    quoting = Reply.error_reply(
        400, f"Invalid header: Authorization: {{authorization}} (key {GROQ_KEY[:12]}****{GROQ_KEY[-4:]})"
    )
    fake_llm.script(quoting)
    ws = open_socket(groq_server, session_cookie(alice), sockets)
    ws.send(_send_frame("hello")[1])
    error = _until(ws, lambda f: f["type"] == "error")
    _until(ws, lambda f: f["type"] == "generation.finished")
    fake_llm.script(quoting)
    token = tokens.create(alice, "groq")[1]
    body = {"messages": [{"role": "user", "content": "hi"}]}
    api = http(groq_server, "POST", "/api/v1/chat/completions", token, body)
    sent = {name.lower(): value for name, value in fake_llm.requests[-1].headers.items()}
    assert sent["authorization"] == f"Bearer {GROQ_KEY}"  # it was quoted
    assert api[0] == 400 and "Invalid header" in api[2].decode()
    for where, text in (("frame", json.dumps(error)), ("API", api[2].decode()), ("log", groq_server.log())):
        leaked = [piece for piece in _pieces(GROQ_KEY) if piece in text]
        assert not leaked, f"the {where} holds {leaked[:3]}"


# --- 7. Sockets that outlive their sign-in ------------------------------------------------------


def _session_of(visitor: Visitor) -> str:
    value = next(c.value for c in visitor.jar if c.name == settings.SESSION_COOKIE_NAME)
    assert value is not None
    return value


def test_a_logout_in_another_tab_closes_the_old_socket(
    daphne_server: LiveServer, sockets: contextlib.ExitStack
) -> None:
    name = _a_name("leaver")
    make_user(name)
    browser = Visitor(daphne_server)
    assert logged_in(browser.log_in(name), daphne_server)
    tab = open_socket(daphne_server, _session_of(browser), sockets)
    other = open_socket(daphne_server, session_cookie(make_user(_a_name("stays"))), sockets)
    csrf = next(c.value for c in browser.jar if c.name == settings.CSRF_COOKIE_NAME)
    browser._open(
        daphne_server.url + "/accounts/logout/",
        urllib.parse.urlencode({"csrfmiddlewaretoken": csrf}).encode(),
    )
    with contextlib.suppress(Exception):
        tab.send(_send_frame("still here?")[1])
    assert closed_with(tab) == 4401
    assert not Message.objects.filter(conversation__owner__username=name).exists()
    other.send(json.dumps({"type": "nonsense"}))  # someone else's socket is untouched
    assert json.loads(other.recv(timeout=10))["type"] == "error"
    assert any(f"user={name}" in line for line in security_lines(daphne_server, "socket_signed_out"))


def test_a_deactivated_users_socket_is_closed(
    daphne_server: LiveServer, sockets: contextlib.ExitStack
) -> None:
    user = make_user(_a_name("deactivated"))
    tab = open_socket(daphne_server, session_cookie(user), sockets)
    tab.send(json.dumps({"type": "nonsense"}))
    assert json.loads(tab.recv(timeout=10))["type"] == "error"
    staff = Visitor(daphne_server)
    staff.use_session_of(staff_who_may(_a_name("moderator"), "view_user", "change_user"))
    _admin_action(staff, "deactivate_users", user)
    assert not _active(user)
    assert closed_with(tab) == 4401


async def test_a_socket_whose_session_is_gone_asks_again_and_closes(alice: Any, settings: Any) -> None:
    """No event came (it was lost): the socket asks before it acts."""
    settings.CHAT_SESSION_RECHECK = 0
    ws = await connect(alice)
    await sync_to_async(Session.objects.all().delete)()
    await ws.send_json_to(
        {"type": "message.send", "conversation": None, "content": "hi", "client_id": str(uuid.uuid4())}
    )
    closed = await ws.receive_output(timeout=5)
    assert closed == {"type": "websocket.close", "code": 4401}
    assert not await sync_to_async(Message.objects.exists)()
    await ws.disconnect()


async def _connected(user: Any) -> Any:
    """A socket whose handshake is done (counted, following its user's topic)."""
    ws = await connect(user)
    await ws.send_json_to({"type": "nonsense"})
    assert (await ws.receive_json_from(timeout=5))["type"] == "error"
    return ws


async def test_a_new_password_closes_the_sockets_of_older_sign_ins(alice: Any) -> None:
    ws = await _connected(alice)

    def change_password() -> None:
        alice.set_password("a-brand-new-one-7")
        alice.save()

    await sync_to_async(change_password)()
    closed = await ws.receive_output(timeout=5)
    assert closed == {"type": "websocket.close", "code": 4401}
    await ws.disconnect()


# --- 8. A frame that crashed the socket ---------------------------------------------------------


def test_a_deeply_nested_frame_is_refused_and_never_leaks_a_socket_slot(
    daphne_server: LiveServer, sockets: contextlib.ExitStack
) -> None:
    cookie = session_cookie(make_user(_a_name("nester")))
    for _ in range(settings.CHAT_MAX_SOCKETS_PER_USER + 1):
        with ws_connect(
            daphne_server.ws_url + "/ws/chat/",
            additional_headers={
                "Cookie": f"{settings.SESSION_COOKIE_NAME}={cookie}",
                "Origin": daphne_server.url,
            },
            open_timeout=10,
        ) as ws:
            ws.send("[" * 200_000)
            reply = json.loads(ws.recv(timeout=10))
            assert (reply["code"], "nested too deeply" in reply["message"]) == ("invalid_request", True)
            ws.send(json.dumps({"type": "nonsense"}))  # and it still answers
            assert json.loads(ws.recv(timeout=10))["type"] == "error"
    # Every slot came back: a full set of tabs opens (as soon as the server saw the closes).
    deadline = time.monotonic() + 15
    tabs: list[Any] = []
    while len(tabs) < settings.CHAT_MAX_SOCKETS_PER_USER and time.monotonic() < deadline:
        ws = open_socket(daphne_server, cookie, sockets)
        ws.send(json.dumps({"type": "nonsense"}))
        try:
            assert json.loads(ws.recv(timeout=10))["type"] == "error"
            tabs.append(ws)
        except Exception:
            ws.close()
    assert len(tabs) == settings.CHAT_MAX_SOCKETS_PER_USER


async def test_a_socket_that_crashes_is_uncounted(alice: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from conversations.consumers import ChatConsumer

    async def crash(self: Any, text_data: Any = None, bytes_data: Any = None) -> None:
        raise RuntimeError("a bug")

    ws = await _connected(alice)
    counts = socket_counts()
    assert counts.local.get(alice.pk)
    monkeypatch.setattr(ChatConsumer, "receive", crash)
    await ws.send_to(text_data="{}")
    with pytest.raises(RuntimeError):
        await ws.receive_output(timeout=5)
    assert not counts.local.get(alice.pk)


# --- 9. The websocket's Origin: scheme, host and port -------------------------------------------


def _handshake(server: LiveServer, cookie: str, origin: str) -> int:
    """101 if the handshake is accepted, else the HTTP status it got."""
    try:
        with ws_connect(
            server.ws_url + "/ws/chat/",
            additional_headers={"Cookie": f"{settings.SESSION_COOKIE_NAME}={cookie}", "Origin": origin},
            open_timeout=10,
        ):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def test_a_socket_from_another_port_or_scheme_is_refused(daphne_server: LiveServer) -> None:
    cookie = session_cookie(make_user(_a_name("origin")))
    port = urllib.parse.urlsplit(daphne_server.url).port
    assert port is not None
    assert _handshake(daphne_server, cookie, daphne_server.url) == 101
    for foreign in (
        "http://localhost:9999",
        f"http://localhost:{port}",  # an allowed host, but not the one this socket reached
        f"http://127.0.0.1:{port + 1}",
        f"https://127.0.0.1:{port}",
        "http://127.0.0.1",
        "null",
    ):
        assert _handshake(daphne_server, cookie, foreign) == 403, foreign
    assert any("localhost:9999" in line for line in security_lines(daphne_server, "origin_refused"))


# --- 10 and 11. Bad API input ------------------------------------------------------------------


def test_bad_requests_are_clear_errors_never_500(daphne_server: LiveServer, alice: Any) -> None:
    token = tokens.create(alice, "bad input")[1]
    conversation = make_conversation(alice, title="Kept")
    deep = b"[" * 100_000
    status, _kind, code = error_of(http(daphne_server, "POST", "/api/v1/chat/completions", token, deep))
    assert (status, code) == (400, "invalid_request")
    path = f"/api/v1/conversations/{conversation.pk}/messages"
    assert error_of(http(daphne_server, "POST", path, token, deep))[0] == 400
    visitor = Visitor(daphne_server)
    visitor.use_session_of(alice)
    assert _csrf_post_json(visitor, f"/c/{conversation.pk}/rename", deep)[0] == 400

    crafted = base64.urlsafe_b64encode(b"2020-01-01T00:00:00|notauuid").decode()
    assert error_of(http(daphne_server, "GET", f"/api/v1/conversations?cursor={crafted}", token))[0] == 400
    assert visitor.get(f"/conversations/?cursor={crafted}")[0] == 400

    huge = json.dumps({"messages": [{"role": "user", "content": "x" * 10_000_000}]}).encode()
    status, headers, body = http(daphne_server, "POST", "/api/v1/chat/completions", token, huge)
    assert (status, json.loads(body)["error"]["code"]) == (413, "too_large")
    assert headers["Content-Type"] == "application/json"

    too_many = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1_000_000}
    status, body_text = http(daphne_server, "POST", "/api/v1/chat/completions", token, too_many)[::2]
    assert (
        status == 400 and f"at most {settings.OPENAI_MAX_TOKENS}" in json.loads(body_text)["error"]["message"]
    )
    assert "Traceback" not in daphne_server.log()


# --- 12. The caretaker starts with the process -----------------------------------------------


class _FastCaretaker(TypedDict):
    """run_daphne's environment overrides (a plain dict[str, str] could also hold `probe`)."""

    CHAT_SWEEP_INTERVAL: str
    CHAT_CHECKPOINT_INTERVAL: str


def test_a_worker_nobody_has_reached_settles_a_dead_workers_answer(
    fake_llm: FakeLLM, tmp_path: Path, sockets: contextlib.ExitStack
) -> None:
    db_url = database_url()
    # The model stops sending after a few tokens: the answer cannot end on its
    # own however slowly the survivor starts (a busy machine took 12 s).
    fake_llm.default = Reply(chunks=[f" w{i}" for i in range(400)], delay=0.03, usage=(10, 400), hang_after=5)
    cookie = session_cookie(make_user(_a_name("orphan")))
    fast: _FastCaretaker = {"CHAT_SWEEP_INTERVAL": "0.2", "CHAT_CHECKPOINT_INTERVAL": "0.2"}
    with run_daphne(db_url, fake_llm.base_url, tmp_path / "doomed.log", **fast) as doomed:
        tab = open_socket(doomed, cookie, sockets)
        tab.send(_send_frame("a long one")[1])
        started = _until(tab, lambda f: f["type"] == "generation.started")
        _until(tab, lambda f: f["type"] == "generation.delta" and f["seq"] >= 3)
        # The survivor: started now, and never sent a request.
        with run_daphne(
            db_url, fake_llm.base_url, tmp_path / "survivor.log", probe=False, **fast
        ) as survivor:
            tab.close()  # the answer's only tab
            doomed.process.kill()
            doomed.process.wait(10)
            deadline = time.monotonic() + 15
            while Message.objects.get(pk=started["message"]).status == "streaming":
                assert time.monotonic() < deadline, "still streaming: nobody settled it"
                time.sleep(0.1)
            assert Message.objects.get(pk=started["message"]).status == "interrupted"
            assert "settled as interrupted" in survivor.log()


# --- 13. Worker identity and clocks --------------------------------------------------------------


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "30"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_a_zombie_is_dead_and_a_live_process_alive(child: subprocess.Popen[bytes]) -> None:
    alive = identity.worker_id(child.pid)
    assert not identity.worker_dead(alive, include_self=False)
    child.kill()
    deadline = time.monotonic() + 5
    while (Path("/proc") / str(child.pid) / "stat").read_text().split(") ")[1][0] != "Z":  # not reaped
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert identity.worker_dead(alive, include_self=False)
    child.wait()
    assert identity.worker_dead(alive, include_self=False)
    assert identity.worker_dead(f"{identity.HOST}:{child.pid}", include_self=False)  # the older form


def test_a_reused_pid_is_not_the_dead_worker(child: subprocess.Popen[bytes]) -> None:
    host, pid, instance = identity.worker_id(child.pid).split(":")
    machine, _, start = instance.partition(".")
    earlier = f"{host}:{pid}:{machine}.{int(start) - 1000}"  # that pid, a process of another time
    assert identity.worker_dead(earlier, include_self=False)


def test_a_worker_of_another_container_with_our_host_name_is_judged_by_its_heartbeat(
    child: subprocess.Popen[bytes],
) -> None:
    dead_pid = 4_000_000  # no such pid here
    theirs = f"{identity.HOST}:{dead_pid}:{'0' * 8}.12345"  # same host name, another PID namespace
    assert not identity.worker_dead(theirs, include_self=False)
    ours_dead = f"{identity.HOST}:{dead_pid}:{identity.MACHINE}.12345"
    assert identity.worker_dead(ours_dead, include_self=False)
    assert not identity.worker_dead(identity.WORKER_ID, include_self=False)
    assert identity.worker_dead(identity.WORKER_ID, include_self=True)


def _skewed(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    real = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real() + timedelta(seconds=seconds))


def test_heartbeats_and_cutoffs_use_the_databases_clock(alice: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose clock is a minute behind writes heartbeats; one whose
    clock is a minute ahead looks for dead answers: neither sees a live
    answer as dead."""
    other_host = f"elsewhere:{os.getpid()}:deadbeef.1"  # only its heartbeat can tell
    _skewed(monkeypatch, -60)
    accepted = turns.accept_message(user=alice, conversation_id=None, content="hi", client_id=uuid.uuid4())
    Message.objects.filter(pk=accepted.answer.pk).update(worker=other_host)
    assert recovery.dead_answers(stale_after=15) == []
    runner._write_checkpoints({accepted.answer.pk: "so far"}, [accepted.answer.pk])
    assert recovery.dead_answers(stale_after=15) == []
    monkeypatch.undo()
    _skewed(monkeypatch, +60)
    assert recovery.dead_answers(stale_after=15) == []
    monkeypatch.undo()
    # A heartbeat that is really old is found, whatever the host's clock says.
    Message.objects.filter(pk=accepted.answer.pk).update(updated_at=timezone.now() - timedelta(seconds=60))
    _skewed(monkeypatch, -120)
    assert [d.pk for d in recovery.dead_answers(stale_after=15)] == [accepted.answer.pk]


# --- 14. Two sites on one Redis server ----------------------------------------------------------


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    from tests.cluster import start_redis

    server = start_redis(tmp_path / "redis")
    try:
        yield server.url
    finally:
        server.stop()


class _Heard:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    def deliver(self, frame: Any) -> None:
        self.frames.append(frame.data)

    def resync(self, conversation_id: str) -> None:
        pass

    def texts(self) -> list[str]:
        return [frame["text"] for frame in self.frames]


async def _site(settings: Any, url: str, prefix: str) -> fanout.Hub:
    """A hub of a site: its own REDIS_URL and REDIS_PREFIX, as if in a
    process of its own (a hub skips what its own process published)."""
    settings.REDIS_URL, settings.REDIS_PREFIX = url, prefix
    hub = fanout.Hub()
    assert hub.remote is not None
    hub.remote.origin = uuid.uuid4().hex.encode()
    return hub


async def _heard(follower: _Heard, text: str) -> None:
    deadline = time.monotonic() + 5
    while text not in follower.texts():
        assert time.monotonic() < deadline, follower.texts()
        await asyncio.sleep(0.01)


async def test_two_sites_sharing_a_redis_server_never_hear_each_other(redis_url: str, settings: Any) -> None:
    base = redis_url.rsplit("/", 1)[0]
    sites = {
        "one": (f"{base}/0", "site-one"),
        "two": (f"{base}/0", "site-two"),
        "three": (f"{base}/1", "site-one"),  # the same prefix, another database
    }
    publishers = {name: await _site(settings, *where) for name, where in sites.items()}
    listeners = {name: await _site(settings, *where) for name, where in sites.items()}
    conversation = str(uuid.uuid4())
    heard = {name: _Heard() for name in sites}
    for name, hub in listeners.items():
        await hub.follow(conversation, heard[name])

    def delta(text: str) -> dict[str, Any]:
        return {"type": "generation.delta", "message": str(uuid.uuid4()), "seq": 1, "text": text}

    publishers["one"].publish(conversation, delta("secret"))
    await publishers["one"].flush()
    await _heard(heard["one"], "secret")  # its own site hears it
    # Each other site's own word comes after the secret: had it been heard, it came first.
    for name in ("two", "three"):
        publishers[name].publish(conversation, delta(f"{name}'s own"))
        await publishers[name].flush()
        await _heard(heard[name], f"{name}'s own")
        assert heard[name].texts() == [f"{name}'s own"]
    # Every key is under its site's prefix.
    for name in sites:
        remote = publishers[name].remote
        assert remote is not None
        keys = cast(list[bytes], await remote.client.keys("*"))  # the client does not decode
        assert keys and all(key.split(b":")[0] in (b"site-one", b"site-two") for key in keys), keys
        assert await remote.client.keys(f"{sites[name][1]}:answer:*")
    for hub in [*publishers.values(), *listeners.values()]:
        remote = hub.remote
        assert remote is not None
        for task in (remote._reader, remote._writer):
            if task is not None:
                task.cancel()
        await remote.client.aclose()
