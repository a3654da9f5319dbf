"""End to end: a real daphne process on a free port, a real websocket client
(the `websockets` library), the fake model over HTTP, the test database."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect
from websockets.typing import Origin

from conversations.models import Message, TokenUsage
from tests.conftest import LiveServer
from tests.factories import session_cookie
from tests.fake_llm import Reply

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def open_socket(server: LiveServer, user: Any | None, origin: str | None = None) -> ClientConnection:
    headers = {}
    if user is not None:
        headers["Cookie"] = f"sessionid={session_cookie(user)}"
    return ws_connect(
        server.ws_url + "/ws/chat/",
        origin=Origin(origin or server.url),
        additional_headers=headers,
        open_timeout=10,
    )


def receive(ws: ClientConnection, timeout: float = 10) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(ws.recv(timeout=timeout))
    if frame["type"] != "frame.part":
        return frame
    parts = [frame["data"]]  # a long frame, in parts
    while frame["part"] < frame["parts"] - 1:
        frame = json.loads(ws.recv(timeout=timeout))
        parts.append(frame["data"])
    joined: dict[str, Any] = json.loads("".join(parts))
    return joined


def until(ws: ClientConnection, frame_type: str, timeout: float = 15) -> list[dict[str, Any]]:
    frames = []
    while True:
        frames.append(receive(ws, timeout))
        if frames[-1]["type"] == frame_type:
            return frames


def until_seq(ws: ClientConnection, seq: int) -> list[dict[str, Any]]:
    """Frames up to the delta with `seq`: some text has streamed."""
    frames: list[dict[str, Any]] = []
    while not frames or frames[-1].get("seq", 0) < seq:
        frames.append(receive(ws))
    return frames


def send_message(ws: ClientConnection, content: str, conversation: str | None = None) -> None:
    ws.send(
        json.dumps(
            {
                "type": "message.send",
                "conversation": conversation,
                "content": content,
                "client_id": str(uuid.uuid4()),
            }
        )
    )


def wait_until(condition: Callable[[], Any], timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def deltas_text(frames: list[dict[str, Any]]) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "generation.delta")


def test_healthz_checks_database_and_redis(daphne_server: LiveServer) -> None:
    with urllib.request.urlopen(daphne_server.url + "/healthz", timeout=5) as response:
        assert response.status == 200
        checks = {"database": "ok", "worker": "ok"}
        if os.environ.get("REDIS_URL"):
            checks["redis"] = "ok"
        assert json.load(response) == {"ok": True, "checks": checks}


def test_static_files_are_served_with_debug_off(daphne_server: LiveServer) -> None:
    with urllib.request.urlopen(daphne_server.url + "/static/js/socket.js", timeout=5) as response:
        assert response.status == 200
        assert b"WebSocket" in response.read()


def test_anonymous_socket_is_closed_with_4401(daphne_server: LiveServer) -> None:
    with open_socket(daphne_server, None) as ws, pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4401


def test_foreign_origin_handshake_is_refused(daphne_server: LiveServer, alice: Any) -> None:
    with pytest.raises(InvalidStatus) as refused:
        open_socket(daphne_server, alice, origin="http://evil.example")
    assert refused.value.response.status_code == 403


def test_closed_socket_mid_answer_the_complete_answer_is_saved(
    daphne_server: LiveServer, alice: Any, fake_llm: Any
) -> None:
    chunks = [f"word{i} " for i in range(60)]
    fake_llm.script(Reply(chunks=chunks, delay=0.02, usage=(30, 60)))
    with open_socket(daphne_server, alice) as ws:
        send_message(ws, "Tell me a long story")
        frames = until(ws, "generation.delta")
    # The socket is closed; the answer must go on and be saved.
    answer_id = frames[-1]["message"]
    answer = wait_until(
        lambda: Message.objects.filter(pk=answer_id).exclude(status="streaming").first(), timeout=20
    )
    assert answer.status == "complete"
    assert answer.content == "".join(chunks)
    usage = TokenUsage.objects.get(message=answer)
    assert (usage.prompt_tokens, usage.completion_tokens) == (30, 60)


def test_join_mid_answer_rebuilds_the_exact_text(
    daphne_server: LiveServer, alice: Any, fake_llm: Any
) -> None:
    chunks = [f"tok{i} " for i in range(80)]
    fake_llm.script(Reply(chunks=chunks, delay=0.02))
    with open_socket(daphne_server, alice) as tab1:
        send_message(tab1, "Stream a lot")
        frames = until(tab1, "generation.delta")
        conversation = frames[0]["conversation"]["id"]
        frames += until_seq(tab1, 5)  # well into the answer
        with open_socket(daphne_server, alice) as tab2:
            tab2.send(json.dumps({"type": "conversation.join", "conversation": conversation}))
            joined = until(tab2, "generation.finished")
        frames += until(tab1, "generation.finished")

    snapshot = joined[0]
    assert snapshot["type"] == "generation.snapshot"
    assert 0 < len(snapshot["content"]) < len("".join(chunks))
    later = [f for f in joined if f["type"] == "generation.delta"]
    assert all(f["seq"] > snapshot["seq"] for f in later)
    assert snapshot["content"] + deltas_text(later) == "".join(chunks)
    assert deltas_text(frames) == "".join(chunks) == joined[-1]["content"]
    assert Message.objects.get(pk=snapshot["message"]).content == "".join(chunks)


def test_stop_mid_answer_from_another_socket(daphne_server: LiveServer, alice: Any, fake_llm: Any) -> None:
    chunks = [f"x{i} " for i in range(300)]
    fake_llm.script(Reply(chunks=chunks, delay=0.02))
    with open_socket(daphne_server, alice) as tab1, open_socket(daphne_server, alice) as tab2:
        send_message(tab1, "Never stop")
        frames = until(tab1, "generation.delta")
        frames += until_seq(tab1, 5)
        tab2.send(json.dumps({"type": "generation.stop", "conversation": frames[0]["conversation"]["id"]}))
        frames += until(tab1, "generation.finished")

    finished = frames[-1]
    assert finished["status"] == "stopped"
    assert deltas_text(frames) == finished["content"]
    assert 0 < len(finished["content"]) < len("".join(chunks))
    answer = Message.objects.get(pk=finished["message"])
    assert (answer.status, answer.content) == ("stopped", finished["content"])
    # A stop that really stops: the upstream stream was closed, not drained.
    fake_llm.wait_for(lambda: fake_llm.disconnects == 1)
    assert fake_llm.completed == 0


def test_chat_page_needs_login(daphne_server: LiveServer) -> None:
    request = urllib.request.Request(daphne_server.url + "/")
    opener = urllib.request.build_opener(_NoRedirect())
    with pytest.raises(urllib.error.HTTPError) as redirect:
        opener.open(request, timeout=5)
    assert redirect.value.code == 302
    assert redirect.value.headers["Location"].startswith("/accounts/login/")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_an_answer_over_a_megabyte_reaches_the_page_and_a_later_join(
    daphne_server: LiveServer, alice: Any, fake_llm: Any
) -> None:
    """Daphne sends no websocket message over 1 MiB: a longer frame comes as
    `frame.part` messages (each under the cap of a default client too), and
    joining the conversation afterwards gets it again, socket still open."""
    chunks = [f"{i:04d}" + "x" * 65_532 for i in range(20)]  # 20 chunks of 64 KiB
    fake_llm.script(Reply(chunks=chunks))
    headers = {"Cookie": f"sessionid={session_cookie(alice)}"}
    url = daphne_server.ws_url + "/ws/chat/"
    with ws_connect(url, origin=Origin(daphne_server.url), additional_headers=headers) as ws:
        send_message(ws, "Write a lot")
        frames = until(ws, "generation.finished", timeout=30)
        finished = frames[-1]
        assert finished["status"] == "complete"
        assert deltas_text(frames) == "".join(chunks) == finished["content"]
        assert len(json.dumps(finished)) > 2**20
        conversation = frames[0]["conversation"]["id"]

    with ws_connect(url, origin=Origin(daphne_server.url), additional_headers=headers) as ws:
        for _ in range(2):  # twice: a join never kills the socket
            ws.send(json.dumps({"type": "conversation.join", "conversation": conversation, "after": 0}))
            again = until(ws, "generation.finished")
            assert again[-1]["content"] == "".join(chunks)
        assert Message.objects.get(pk=finished["message"]).content == "".join(chunks)


def test_an_upstream_that_hangs_fails_clearly_and_no_sweep_calls_it_dead(
    daphne_server: LiveServer, alice: Any, fake_llm: Any
) -> None:
    """The model stops sending mid-answer and keeps the connection open. The
    answer's heartbeat goes on meanwhile, so no sweep, however eager, takes
    it for dead; the read timeout (OPENAI_TIMEOUT, 5 s here) ends it with a
    clear error, the text so far kept."""
    from conversations import generation

    fake_llm.script(Reply(chunks=["Part", " one", " and"], hang_after=2))
    with open_socket(daphne_server, alice) as ws:
        send_message(ws, "Say something")
        frames = until_seq(ws, 2)
        answer = next(f["message"] for f in frames if f["type"] == "generation.started")
        hung_at = timezone.now()
        # Two heartbeats into the hang (a checkpoint a second), a sweep that
        # calls anything silent for 1 s dead finds nothing to do.
        wait_until(lambda: Message.objects.get(pk=answer).updated_at > hung_at + timedelta(seconds=2))
        assert generation.sweep_interrupted(stale_after=1) == 0
        assert Message.objects.get(pk=answer).status == "streaming"
        frames += until(ws, "generation.finished", timeout=15)
    fake_llm.release_hangs()

    error = next(f for f in frames if f["type"] == "error")
    assert error["code"] == "upstream_unavailable" and error["message"]
    finished = frames[-1]
    assert (finished["status"], finished["content"]) == ("failed", "Part one")
    row = Message.objects.get(pk=answer)
    assert (row.status, row.content) == ("failed", "Part one")
