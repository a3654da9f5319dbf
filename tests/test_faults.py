"""The faults of a real deployment, each played for real on two daphne
workers behind nginx (tests/cluster.py), on PostgreSQL and a redis-server of
the test's own: a worker killed (SIGKILL) or stopped for a deploy (SIGTERM),
Redis restarted, an upstream that hangs, idle sockets and /healthz. What a
user saw is never lost, no budget leaks, every tab is told.

(PostgreSQL restarted mid-answer: tests/test_pg_restart.py, on a PostgreSQL
cluster of its own. An answer over 1 MiB: tests/test_e2e.py.)"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.db import connection
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from accounts.models import Quota, QuotaCounter
from conversations.models import TokenUsage
from tests.cluster import Cluster, RedisServer, cluster, need_cluster, recv_until, start_redis
from tests.conftest import _wait_quiet, database_url
from tests.fake_llm import FakeLLM, Reply
from tests.test_workers import _deltas, _is, _login, _row, _send

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

FAST = {
    # The caretaker looks often, so that a test waits little.
    "CHAT_SWEEP_INTERVAL": "0.3",
    "CHAT_CHECKPOINT_INTERVAL": "0.3",
}


@pytest.fixture
def make_cluster(
    request: pytest.FixtureRequest, fake_llm_server: FakeLLM, tmp_path: Path, django_db_blocker: Any
) -> Iterator[Any]:
    """Start a cluster: `make_cluster(env=..., redis=...)`; all stopped at the end."""
    need_cluster(connection.vendor)
    started: list[Any] = []

    def make(
        *, env: dict[str, str] | None = None, redis: RedisServer | None = None, workers: int = 2
    ) -> Cluster:
        manager = cluster(
            tmp_path / f"cluster{len(started)}",
            workers=workers,
            database_url=database_url(),
            llm_base_url=fake_llm_server.base_url,
            env={**FAST, **(env or {})},
            redis=redis,
        )
        made = manager.__enter__()
        started.append(manager)
        return made

    yield make
    for manager in reversed(started):
        manager.__exit__(None, None, None)
    _wait_quiet(fake_llm_server)


def _page_text(frames: list[dict[str, Any]], answer: str) -> str:
    """What a page shows of an answer from the frames it got: a snapshot
    replaces the text, then deltas after its seq are appended; a gap or a
    duplicate fails."""
    text, last = "", 0
    for frame in frames:
        if frame.get("message") != answer:
            continue
        if frame["type"] == "generation.snapshot":
            text, last = frame["content"], frame["seq"]
        elif frame["type"] == "generation.delta" and frame["seq"] > last:
            assert frame["seq"] == last + 1, f"gap: {last} then {frame['seq']}"
            text, last = text + frame["text"], frame["seq"]
    return text


def _health(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


async def _quota(username: str, tokens_per_day: int = 1_000_000) -> None:
    def create() -> None:
        Quota.objects.create(
            user=get_user_model().objects.get(username=username), tokens_per_day=tokens_per_day
        )

    await sync_to_async(create)()


async def _close_code(ws: ClientConnection, timeout: float) -> int | None:
    """Read until the socket closes; its close code."""
    deadline = time.monotonic() + timeout
    with pytest.raises(ConnectionClosed):
        while time.monotonic() < deadline:
            await asyncio.wait_for(ws.recv(), deadline - time.monotonic())
    return ws.close_code


async def _day_counter(username: str) -> QuotaCounter:
    return await sync_to_async(QuotaCounter.objects.get)(user__username=username, window="day")


async def _start_long_answer(
    workers: Cluster, fake_llm: FakeLLM, username: str, *, chunks: int = 400, delay: float = 0.03
) -> tuple[Any, Any, str, str, list[str], list[dict[str, Any]], list[dict[str, Any]]]:
    """Socket A asks (its answer runs on A's worker); socket B, on the other
    worker, joins mid-answer. Returns a, b, conversation, answer, tokens,
    frames of a, frames of b."""
    tokens = [f" w{i}" for i in range(chunks)]
    fake_llm.default = Reply(chunks=tokens, delay=delay, usage=(20, len(tokens)))
    cookie = await _login(username)
    await _quota(username)
    a = await workers.connect(cookie)
    frames_a: list[dict[str, Any]] = []
    await a.send(_send("a long one, please")[1])
    started = await recv_until(a, _is("generation.started"), frames_a)
    conversation, answer = started["conversation"], started["message"]
    await recv_until(a, lambda f: _is("generation.delta", answer)(f) and f["seq"] >= 3, frames_a)
    b = await workers.connect(cookie, not_on=workers.worker_of(a))
    frames_b: list[dict[str, Any]] = []
    await b.send(json.dumps({"type": "conversation.join", "conversation": conversation}))
    await recv_until(b, _is("generation.snapshot", answer), frames_b)
    await recv_until(b, _is("generation.delta", answer), frames_b)
    return a, b, conversation, answer, tokens, frames_a, frames_b


async def test_sigkill_of_the_answers_worker_settles_it_on_the_survivor(
    make_cluster: Any, fake_llm: FakeLLM
) -> None:
    workers = make_cluster()
    a, b, conversation, answer, tokens, _frames_a, frames_b = await _start_long_answer(
        workers, fake_llm, "kim"
    )
    doomed = workers.worker_of(a)
    assert workers.worker_by_id((await _row(answer)).worker) is doomed
    held = (await _day_counter("kim")).tokens_reserved
    assert held > 0  # the answer's budget is held while it runs

    doomed.kill(signal.SIGKILL)
    killed = time.monotonic()
    doomed.wait_exit(10)
    # The other tab is told, within seconds, with the text it was shown.
    finished = await recv_until(b, _is("generation.finished", answer), frames_b, timeout=15)
    took = time.monotonic() - killed
    assert finished["status"] == "interrupted"
    shown = _page_text(frames_b, answer)
    assert shown and finished["content"] == shown
    assert "".join(tokens).startswith(shown)
    assert took < 5, f"settled {took:.1f} s after the kill"
    await a.close()

    row = await _row(answer)
    assert (row.status, row.content, row.worker) == ("interrupted", shown, "")
    usage = await sync_to_async(TokenUsage.objects.get)(message_id=answer)
    assert usage.estimated and usage.completion_tokens > 0 and usage.prompt_tokens > 0
    day = await _day_counter("kim")
    assert day.tokens_reserved == 0  # the reservation went back
    assert day.tokens_used == usage.prompt_tokens + usage.completion_tokens
    assert finished["usage"]["completion_tokens"] == usage.completion_tokens

    # The conversation is not `busy`: the next question is answered (on the survivor).
    fake_llm.default = Reply(chunks=["Back", " again."], usage=(30, 2))
    _client_id, frame = _send("are you there?", conversation)
    await b.send(frame)
    again = await recv_until(
        b, lambda f: f["type"] == "generation.finished" and f["message"] != answer, frames_b
    )
    assert (again["status"], again["content"]) == ("complete", "Back again.")
    await b.close()


async def test_sigterm_drains_the_worker_and_its_answer_finishes(
    make_cluster: Any, fake_llm: FakeLLM
) -> None:
    workers = make_cluster(env={"CHAT_DRAIN_SECONDS": "30"})
    a, b, _conversation, answer, tokens, _frames_a, frames_b = await _start_long_answer(
        workers, fake_llm, "lee", chunks=60, delay=0.05
    )
    leaving = workers.worker_of(a)
    leaving.kill(signal.SIGTERM)
    # Its sockets are closed at once with 4012 (service restart): pages reconnect elsewhere.
    assert await _close_code(a, timeout=5) == 4012
    assert _health(leaving.url)[0] == 503  # out of the balancer's rotation while it drains
    # New sockets through nginx reach the other worker (the leaving one
    # refuses handshakes; nginx tries the next).
    cookie = await _login("lee2")
    for _ in range(3):
        ws = await workers.connect(cookie)
        assert workers.worker_of(ws) is not leaving
        await ws.close()
    # The answer goes on to its end on the leaving worker; the other tab sees it all.
    finished = await recv_until(b, _is("generation.finished", answer), frames_b, timeout=20)
    assert finished["status"] == "complete"
    assert _page_text(frames_b, answer) == finished["content"] == "".join(tokens)
    assert leaving.wait_exit(15) == 0
    await b.close()
    row = await _row(answer)
    assert (row.status, row.content) == ("complete", "".join(tokens))
    assert (await _day_counter("lee")).tokens_reserved == 0


async def test_sigterm_saves_an_answer_that_outlasts_the_grace(make_cluster: Any, fake_llm: FakeLLM) -> None:
    workers = make_cluster(env={"CHAT_DRAIN_SECONDS": "1"})
    a, b, _conversation, answer, tokens, _frames_a, frames_b = await _start_long_answer(
        workers, fake_llm, "max"
    )
    leaving = workers.worker_of(a)
    leaving.kill(signal.SIGTERM)
    finished = await recv_until(b, _is("generation.finished", answer), frames_b, timeout=15)
    assert finished["status"] == "interrupted"
    shown = _page_text(frames_b, answer)
    assert shown and finished["content"] == shown and "".join(tokens).startswith(shown)
    leaving.wait_exit(15)
    await a.close()
    await b.close()
    row = await _row(answer)
    assert (row.status, row.content) == ("interrupted", shown)
    usage = await sync_to_async(TokenUsage.objects.get)(message_id=answer)
    assert usage.estimated
    assert (await _day_counter("max")).tokens_reserved == 0


async def test_redis_restarted_mid_answer_loses_nothing(
    make_cluster: Any, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    redis = start_redis(tmp_path / "own-redis")
    try:
        workers = make_cluster(redis=redis)
        a, b, conversation, answer, tokens, frames_a, frames_b = await _start_long_answer(
            workers, fake_llm, "ned", chunks=200, delay=0.03
        )
        here = workers.worker_of(a)
        seq_at_stop = max(f.get("seq", 0) for f in frames_a)
        redis.stop(signal.SIGKILL)  # a crash: it comes back empty
        # The answer goes on: its own worker's socket keeps getting deltas.
        await recv_until(
            a, lambda f: _is("generation.delta", answer)(f) and f["seq"] >= seq_at_stop + 10, frames_a
        )
        status, report = _health(here.url)
        assert status == 503 and report["checks"]["redis"] == "error", report
        # A join while Redis is away does not kill the socket: it is answered once Redis is back.
        await b.send(json.dumps({"type": "conversation.join", "conversation": conversation}))
        redis.start()  # same port, empty
        finished_a = await recv_until(a, _is("generation.finished", answer), frames_a, timeout=30)
        finished_b = await recv_until(b, _is("generation.finished", answer), frames_b, timeout=30)
        expected = "".join(tokens)
        assert finished_a["status"] == finished_b["status"] == "complete"
        assert _deltas(frames_a, answer) == finished_a["content"] == expected
        # The other worker's tab caught up from the rewritten log: exact.
        assert _page_text(frames_b, answer) == finished_b["content"] == expected
        row = await _row(answer)
        assert (row.status, row.content) == ("complete", expected)
        usage = await sync_to_async(TokenUsage.objects.get)(message_id=answer)
        assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (20, len(tokens), False)
        assert _health(here.url)[0] == 200
        await a.close()
        await b.close()
    finally:
        redis.stop()


async def test_idle_sockets_never_make_a_worker_unhealthy(make_cluster: Any) -> None:
    workers = make_cluster()
    cookie = await _login("olga")
    sockets = [await workers.connect(cookie) for _ in range(4)]
    try:
        assert {workers.worker_of(ws).port for ws in sockets} == {w.port for w in workers.workers}
        for worker in workers.workers:
            for _ in range(3):
                status, report = _health(worker.url)
                assert status == 200, report
                assert report["checks"] == {"database": "ok", "redis": "ok", "worker": "ok"}
    finally:
        for ws in sockets:
            await ws.close()
