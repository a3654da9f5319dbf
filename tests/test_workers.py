"""Two real daphne workers behind a real nginx (deploy/nginx.conf.template),
sharing PostgreSQL and their own redis-server: a socket on the other worker
joins an answer mid-stream and gets exactly the rest, stops it, and counts
against the same per-user rate limit; nginx serves /healthz and the static
files. One cluster for the module: starting daphnes costs seconds."""

from __future__ import annotations

import http.cookiejar
import json
import re
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection

from conversations.models import Message
from tests.cluster import BASE_DIR, Cluster, cluster, need_cluster, recv_until
from tests.conftest import _wait_quiet, database_url
from tests.factories import PASSWORD, make_user, session_cookie
from tests.fake_llm import FakeLLM, Reply

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

RATE_LIMIT = 3  # per minute, for the cluster's workers


@pytest.fixture(scope="module")
def workers(
    django_db_setup: None, django_db_blocker: Any, fake_llm_server: FakeLLM, tmp_path_factory: Any
) -> Iterator[Cluster]:
    with django_db_blocker.unblock():
        vendor, url = connection.vendor, database_url()
    need_cluster(vendor)
    with cluster(
        tmp_path_factory.mktemp("workers"),
        workers=2,
        database_url=url,
        llm_base_url=fake_llm_server.base_url,
        env={"CHAT_RATE_LIMIT": f"{RATE_LIMIT}/m", "CHAT_LOGIN_RATE": "10/h", "CHAT_TRUSTED_PROXIES": "1"},
    ) as started:
        yield started


@pytest.fixture(autouse=True)
def _quiet_before_flush(request: pytest.FixtureRequest, fake_llm_server: FakeLLM) -> Iterator[None]:
    """As conftest's for `daphne_server`: the workers may still be writing (a
    title after the answer) when a test ends; flush the database after."""
    request.getfixturevalue("transactional_db")  # so that this teardown comes first
    yield
    _wait_quiet(fake_llm_server)


async def _login(username: str) -> str:
    return await sync_to_async(lambda: session_cookie(make_user(username)))()


def _send(content: str, conversation: str | None = None) -> tuple[str, str]:
    client_id = str(uuid.uuid4())
    frame = {"type": "message.send", "conversation": conversation, "content": content, "client_id": client_id}
    return client_id, json.dumps(frame)


def _deltas(frames: list[dict[str, Any]], answer: str, after: int = 0) -> str:
    """The text of the answer's deltas in `frames`, which must be exactly after+1, after+2, ..."""
    deltas = [f for f in frames if f["type"] == "generation.delta" and f["message"] == answer]
    seqs = [f["seq"] for f in deltas]
    assert seqs == list(range(after + 1, after + 1 + len(seqs))), f"gap or duplicate after {after}: {seqs}"
    return "".join(f["text"] for f in deltas)


def _is(kind: str, answer: str | None = None) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f["type"] == kind and (answer is None or f.get("message") == answer)


async def _row(answer: str) -> Message:
    return await sync_to_async(Message.objects.get)(pk=answer)


def test_nginx_serves_health_and_static_files(workers: Cluster) -> None:
    status, _, body = workers.get("/healthz")
    assert status == 200, body
    assert json.loads(body)["ok"] is True
    status, headers, body = workers.get("/static/js/chat.js")
    assert status == 200
    assert body == (BASE_DIR / "static" / "js" / "chat.js").read_bytes()
    assert headers["Content-Type"].startswith("text/javascript")
    assert headers["Cache-Control"] == "public, max-age=3600"  # nginx's, not a worker's WhiteNoise
    assert workers.get("/static/js/no-such-file.js")[0] == 404


def test_a_login_form_posts_through_nginx(workers: Cluster) -> None:
    """nginx passes the Host with its port: Django's CSRF check compares it with the Origin."""
    make_user("dave")
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(workers.url + "/accounts/login/", timeout=10).read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert token is not None
    form = {"csrfmiddlewaretoken": token[1], "username": "dave", "password": PASSWORD}
    request = urllib.request.Request(
        workers.url + "/accounts/login/",
        data=urllib.parse.urlencode(form).encode(),
        headers={"Origin": workers.url, "Referer": workers.url + "/accounts/login/"},
    )
    with opener.open(request, timeout=10) as response:
        assert response.status == 200
        assert response.url == workers.url + "/"  # redirected to the chat: logged in
    assert settings.SESSION_COOKIE_NAME in {cookie.name for cookie in jar}


def test_failed_logins_count_on_every_worker(workers: Cluster) -> None:
    """Five wrong passwords on one worker, five on the other: the eleventh
    attempt is refused by both, the right password too (the counters are in
    Redis)."""
    from tests.test_security import Visitor

    make_user("target")
    for worker in workers.workers[:2]:
        guesser = Visitor(worker)  # straight to the worker, from an address of its own
        for _ in range(5):
            assert guesser.log_in("target", "wrong-password")[0] == 200
    for worker in workers.workers[:2]:
        assert Visitor(worker).log_in("target", PASSWORD)[0] == 429


async def test_a_socket_on_the_other_worker_joins_mid_answer(workers: Cluster, fake_llm: FakeLLM) -> None:
    tokens = [f" t{i}" for i in range(60)]  # 3 s of stream
    fake_llm.default = Reply(chunks=tokens, delay=0.05, usage=(20, len(tokens)))
    cookie = await _login("alice")
    a = await workers.connect(cookie)
    b = None
    try:
        await a.send(_send("count for me")[1])
        frames_a: list[dict[str, Any]] = []
        started = await recv_until(a, _is("generation.started"), frames_a)
        conversation, answer = started["conversation"], started["message"]
        answer_worker = workers.worker_by_id((await _row(answer)).worker)
        assert workers.worker_of(a) is answer_worker  # an answer runs where it was asked
        # Well into the stream (its worker writes the answer's log to Redis in batches).
        await recv_until(a, lambda f: _is("generation.delta", answer)(f) and f["seq"] >= 5, frames_a)

        b = await workers.connect(cookie, not_on=answer_worker)
        assert workers.worker_of(b) is not answer_worker
        await b.send(json.dumps({"type": "conversation.join", "conversation": conversation}))
        frames_b: list[dict[str, Any]] = []
        first = await recv_until(
            b, lambda f: f["type"] in ("generation.snapshot", "generation.finished"), frames_b
        )
        assert first["type"] == "generation.snapshot", (
            f"a join mid-answer got {first['type']} (status {first.get('status')!r}, "
            f"{len(first.get('content') or '')} characters) instead of a snapshot\n{workers.logs()}"
        )
        assert first["message"] == answer
        finished_b = await recv_until(b, _is("generation.finished", answer), frames_b)
        finished_a = await recv_until(a, _is("generation.finished", answer), frames_a)
    finally:
        await a.close()
        if b is not None:
            await b.close()

    expected = "".join(tokens)
    rest = _deltas(frames_b, answer, after=first["seq"])
    assert rest, "no live delta after the snapshot: the join came too late to show the live tail"
    assert first["content"] + rest == finished_b["content"] == expected
    assert _deltas(frames_a, answer) == finished_a["content"] == expected
    assert finished_b["status"] == finished_a["status"] == "complete"
    row = await _row(answer)
    assert (row.status, row.content) == ("complete", expected)
    assert "Traceback" not in workers.logs()


async def test_a_stop_on_the_other_worker_stops_the_answer(workers: Cluster, fake_llm: FakeLLM) -> None:
    tokens = [f" s{i}" for i in range(200)]  # 10 s of stream
    fake_llm.default = Reply(chunks=tokens, delay=0.05, usage=(20, len(tokens)))
    cookie = await _login("bob")
    a = await workers.connect(cookie)
    b = None
    try:
        await a.send(_send("talk for a long time")[1])
        frames_a: list[dict[str, Any]] = []
        started = await recv_until(a, _is("generation.started"), frames_a)
        conversation, answer = started["conversation"], started["message"]
        await recv_until(a, lambda f: _is("generation.delta", answer)(f) and f["seq"] >= 2, frames_a)
        answer_worker = workers.worker_by_id((await _row(answer)).worker)
        b = await workers.connect(cookie, not_on=answer_worker)
        stop_sent = time.monotonic()
        await b.send(json.dumps({"type": "generation.stop", "conversation": conversation}))
        finished = await recv_until(a, _is("generation.finished", answer), frames_a, timeout=15)
        took = time.monotonic() - stop_sent
    finally:
        await a.close()
        if b is not None:
            await b.close()

    assert finished["status"] == "stopped"
    assert took < 2.0, f"the stop took {took:.2f} s (the stream had about 9 s to go)"
    shown = _deltas(frames_a, answer)
    assert shown and finished["content"] == shown  # the text so far is kept
    assert "".join(tokens).startswith(shown) and len(shown) < len("".join(tokens))
    row = await _row(answer)
    assert (row.status, row.content) == ("stopped", shown)
    # The upstream request really ended (the fake model saw its client go).
    fake_llm.wait_for(lambda: fake_llm.disconnects >= 1, timeout=5)


async def test_the_rate_limit_is_shared_by_the_workers(workers: Cluster, fake_llm: FakeLLM) -> None:
    fake_llm.default = Reply(chunks=["Fine."], usage=(5, 1))
    cookie = await _login("carol")
    first = await workers.connect(cookie)
    second = await workers.connect(cookie, not_on=workers.worker_of(first))
    sockets = [first, second]
    outcomes = []
    try:
        for i in range(RATE_LIMIT + 1):
            ws = sockets[i % 2]  # alternately on each worker
            client_id, frame = _send(f"question {i}")
            await ws.send(frame)

            def is_reply(f: dict[str, Any], c: str = client_id) -> bool:
                return f.get("client_id") == c and f["type"] in ("message.created", "error")

            reply = await recv_until(ws, is_reply)
            outcomes.append((workers.worker_of(ws).port, reply["type"], reply.get("code")))
    finally:
        for ws in sockets:
            await ws.close()

    assert len({port for port, _, _ in outcomes}) == 2
    assert [kind for _, kind, _ in outcomes] == ["message.created"] * RATE_LIMIT + ["error"], outcomes
    assert outcomes[-1][2] == "rate_limited"
    questions = await sync_to_async(
        Message.objects.filter(role="user", conversation__owner__username="carol").count
    )()
    assert questions == RATE_LIMIT


def test_the_apis_server_sent_events_pass_nginx_unbuffered(
    workers: Cluster, fake_llm_server: FakeLLM
) -> None:
    """deploy/'s nginx hands each SSE chunk on as it comes: the first one
    arrives while the model is still streaming the rest."""
    from api import tokens

    fake_llm_server.reset()
    fake_llm_server.script(Reply(chunks=[f"w{i} " for i in range(30)], delay=0.1))
    token = tokens.create(make_user("sse-user"), "nginx")[1]
    request = urllib.request.Request(
        workers.url + "/api/v1/chat/completions",
        data=json.dumps({"messages": [{"role": "user", "content": "Go"}], "stream": True}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=20) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        lines = (line.decode().strip() for line in response)
        first = next(line for line in lines if '"content": "w0 "' in line)
        still_streaming = fake_llm_server.in_flight > 0 and fake_llm_server.completed == 0
        rest = [line for line in lines if line]
    assert first.startswith("data: ") and still_streaming
    assert rest[-1] == "data: [DONE]"
