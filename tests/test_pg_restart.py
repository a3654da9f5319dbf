"""PostgreSQL restarted mid-answer (the issue row): two real daphne workers
behind nginx, on a throwaway PostgreSQL cluster of their own (tests/pg_cluster.py;
never the machine's shared server), which the test stops and starts again
while an answer streams to a websocket.

Seen before: the answer's task died on an OperationalError in a checkpoint,
stayed `streaming` for minutes with no ledger row and its quota reservation
leaked; after PostgreSQL was back each worker answered ~7 HTTP 500s (dead
pooled connections). Must be: the deltas go on while the database is away,
checkpoints retry, the answer's end is saved once the database is back
(`complete`, exactly its text, one ledger row, nothing left reserved),
`/healthz` says 503 while it is away, and pages answer 200 at once after.

The test has its own database, so it runs in both CI passes (SQLite and
PostgreSQL test databases) and never touches the suite's.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from django.conf import settings
from websockets.asyncio.client import ClientConnection

from deploy.nginx import find_nginx
from tests.cluster import Cluster, Worker, cluster
from tests.conftest import REQUIRE_POSTGRES, REQUIRE_REDIS
from tests.fake_llm import FakeLLM, Reply
from tests.pg_cluster import PostgresCluster, find_bindir, make_logged_in_user, migrate, postgres_cluster

pytestmark = [pytest.mark.e2e]

DATABASE = "chat"
CHUNK_DELAY = 0.05  # s between the fake model's chunks
TOKENS_PER_DAY = 1_000_000  # the user's quota: its answers hold a reservation
# s: a /healthz sent while PostgreSQL is down answers 503 this fast (its check has a 3 s timeout)
HEALTH_503_WITHIN = 5.0
SAVED_WITHIN = 10.0  # s after PostgreSQL is back: the answer's end is saved (retries back off to 2 s)
PAGE_ROUNDS = 3  # rounds of page requests to each worker after the restart
PAGE_WITHIN = 5.0  # s: a page that takes longer after the restart did not recover "at once"


@dataclass(frozen=True)
class Scenario:
    id: str
    stop_mode: str  # pg_ctl stop -m ...
    # How long PostgreSQL stays down: the deliberate outage, the fault under
    # test (the one fixed wait of the test).
    outage: float
    chunks: int  # the answer's length, at CHUNK_DELAY s each
    ends_while_down: bool  # the model's stream ends before PostgreSQL is back


SCENARIOS = [
    # A clean restart (`-m fast`: every session is ended) in the middle of
    # the answer; the stream goes on for seconds after PostgreSQL is back,
    # so that the checkpoints must pick up again.
    Scenario("fast-answer-outlasts-outage", "fast", outage=3.0, chunks=120, ends_while_down=False),
    # The issue row's 6 s, as a crash (`-m immediate`): the model finishes
    # while the database is away, and the end is saved when it is back.
    Scenario("immediate-answer-ends-while-down", "immediate", outage=6.0, chunks=80, ends_while_down=True),
    # Down longer than a worker waits for a pooled connection (DATABASE_POOL_TIMEOUT,
    # 10 s by default): a shorter outage only makes the database work wait;
    # here the checkpoints and the answer's end (its stream ends ~1.5 s into
    # the outage) fail with OperationalError and must be retried, and
    # psycopg's pool has backed off its reconnect attempts by the time
    # PostgreSQL is back.
    Scenario("fast-outage-longer-than-pool-wait", "fast", outage=13.0, chunks=30, ends_while_down=True),
]


# --- Fixtures: a PostgreSQL of the test's own, two workers on it ------------------------


def _missing(what: str, required: bool) -> None:
    message = f"{what} not installed: the PostgreSQL restart test needs it"
    if required:  # CI: fail, never skip
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresCluster]:
    bindir = find_bindir()
    if bindir is None:
        _missing("PostgreSQL's initdb", REQUIRE_POSTGRES)
    for name, path in {"nginx": find_nginx(), "redis-server": shutil.which("redis-server")}.items():
        if path is None:
            _missing(name, REQUIRE_POSTGRES or REQUIRE_REDIS)
    with postgres_cluster(bindir) as server:
        server.create_database(DATABASE)
        migrate(server.url(DATABASE))
        yield server


@pytest.fixture(scope="module")
def chat(pg: PostgresCluster, fake_llm_server: FakeLLM, tmp_path_factory: Any) -> Iterator[Cluster]:
    with cluster(
        tmp_path_factory.mktemp("pg-restart"),
        workers=2,
        database_url=pg.url(DATABASE),
        llm_base_url=fake_llm_server.base_url,
        env={"CHAT_CHECKPOINT_INTERVAL": "0.2"},
    ) as started:
        yield started


# --- A websocket read in the background, every frame with its arrival time --------------


@dataclass
class Follower:
    ws: ClientConnection
    frames: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self) -> Follower:
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        try:
            while True:
                frame = json.loads(await self.ws.recv())
                if frame.get("type") == "frame.part":  # a long frame, in parts
                    parts = [frame["data"]]
                    while frame["part"] < frame["parts"] - 1:
                        frame = json.loads(await self.ws.recv())
                        parts.append(frame["data"])
                    frame = json.loads("".join(parts))
                self.frames.append((time.monotonic(), frame))
                self._arrived.set()
        finally:
            self._arrived.set()

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        """The first frame (of all read) for which predicate is true."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            while seen < len(self.frames):
                frame = self.frames[seen][1]
                seen += 1
                if predicate(frame):
                    return frame
            assert self._task is not None
            if self._task.done():
                raise AssertionError(
                    f"the socket ended before {what}: {self._task.exception()!r}; {self.last()}"
                )
            self._arrived.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {timeout} s; {self.last()}")
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                pass

    def arrival(self, frame: dict[str, Any]) -> float:
        return next(at for at, f in self.frames if f is frame)

    def deltas(self, answer: str) -> list[tuple[float, dict[str, Any]]]:
        return [
            (at, f) for at, f in self.frames if f["type"] == "generation.delta" and f["message"] == answer
        ]

    def last(self, n: int = 12) -> str:
        return f"last frames: {[(f.get('type'), f.get('seq'), f.get('status')) for _, f in self.frames[-n:]]}"

    async def close(self) -> None:
        await self.ws.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def _is(kind: str, answer: str | None = None) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f["type"] == kind and (answer is None or f.get("message") == answer)


def _send(content: str, conversation: str | None = None) -> str:
    return json.dumps(
        {
            "type": "message.send",
            "conversation": conversation,
            "content": content,
            "client_id": str(uuid.uuid4()),
        }
    )


# --- HTTP to one worker, without following redirects (a lost session must not pass) ------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


@dataclass
class Answered:
    url: str
    status: int  # 0: no answer (connection error, timeout)
    body: bytes
    took: float
    sent: float  # time.monotonic() when it was sent

    def brief(self) -> str:
        return f"{self.url} -> {self.status} in {self.took:.2f} s ({self.body[:200]!r})"


def http_get(url: str, cookie: str | None = None, timeout: float = 15) -> Answered:
    headers = {"Cookie": f"{settings.SESSION_COOKIE_NAME}={cookie}"} if cookie else {}
    sent = time.monotonic()
    try:
        with _opener.open(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read()
    except OSError as error:
        status, body = 0, repr(error).encode()
    return Answered(url, status, body, time.monotonic() - sent, sent)


def database_error_reported(answered: Answered) -> bool:
    if answered.status != 503:
        return False
    try:
        return bool(json.loads(answered.body)["checks"]["database"] == "error")
    except (ValueError, KeyError, TypeError):
        return False


def probe_health(worker: Worker, until: float) -> list[Answered]:
    """/healthz of `worker`, again and again, until it answers 503 with the
    database in error (the last item) or `until` (time.monotonic(): when
    PostgreSQL is started again) passes."""
    answers = []
    while True:
        answered = http_get(worker.url + "/healthz", timeout=15)
        answers.append(answered)
        if database_error_reported(answered) or time.monotonic() >= until:
            return answers
        time.sleep(0.1)  # poll interval


def pages(worker: Worker, cookie: str, conversation: str) -> list[Answered]:
    """Rounds of the pages a user reloads, and the probe a balancer sends."""
    answers = []
    for _ in range(PAGE_ROUNDS):
        for path, with_cookie in (("/", True), (f"/c/{conversation}/", True), ("/healthz", False)):
            answers.append(http_get(worker.url + path, cookie if with_cookie else None))
    return answers


# --- The database, read directly ----------------------------------------------------------


def read_answer(url: str, answer: str) -> dict[str, Any]:
    with psycopg.connect(url, connect_timeout=5) as connection:
        row = connection.execute(
            "SELECT status, content, finish_reason FROM conversations_message WHERE id = %s", [answer]
        ).fetchone()
        usage = connection.execute(
            "SELECT kind, prompt_tokens, completion_tokens, estimated FROM conversations_tokenusage"
            " WHERE message_id = %s",
            [answer],
        ).fetchall()
    assert row is not None, f"answer {answer} is not in the database"
    return {"status": row[0], "content": row[1], "finish_reason": row[2], "usage": usage}


def read_budget(url: str, user_id: int) -> dict[str, Any]:
    with psycopg.connect(url, connect_timeout=5) as connection:
        counters = connection.execute(
            'SELECT "window", tokens_used, tokens_reserved FROM accounts_quotacounter WHERE user_id = %s',
            [user_id],
        ).fetchall()
        row = connection.execute(
            "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM conversations_tokenusage"
            " WHERE user_id = %s",
            [user_id],
        ).fetchone()
        assert row is not None  # an aggregate: always one row
        (ledger,) = row
    return {"counters": counters, "ledger_tokens": int(ledger)}


async def wait_checkpointed(
    url: str, answer: str, longer_than: int, follower: Follower, timeout: float = 10
) -> dict[str, Any] | None:
    """The answer's row once a checkpoint stored more than `longer_than`
    characters while it still streams; None if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = await asyncio.to_thread(read_answer, url, answer)
        if row["status"] == "streaming" and len(row["content"]) > longer_than:
            return row
        if row["status"] != "streaming" or any(
            _is("generation.finished", answer)(f) for _, f in follower.frames
        ):
            return None
        await asyncio.sleep(0.05)  # poll interval
    return None


async def wait_budget_settled(url: str, user_id: int, timeout: float = 15) -> dict[str, Any]:
    """The user's counters once nothing is reserved and the day's use equals
    the ledger (a title may still be on its way when the answer ends)."""
    deadline = time.monotonic() + timeout
    while True:
        budget = await asyncio.to_thread(read_budget, url, user_id)
        day = [c for c in budget["counters"] if c[0] == "day"]
        if day and all(c[2] == 0 for c in budget["counters"]) and day[0][1] == budget["ledger_tokens"]:
            return budget
        if time.monotonic() > deadline:
            return budget  # the caller's assertions say what is wrong
        await asyncio.sleep(0.1)  # poll interval


# --- The test ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
async def test_postgres_restart_mid_answer(
    scenario: Scenario, pg: PostgresCluster, chat: Cluster, fake_llm: FakeLLM
) -> None:
    url = pg.url(DATABASE)
    user_id, cookie = await asyncio.to_thread(
        make_logged_in_user, url, f"pat-{scenario.id}", tokens_per_day=TOKENS_PER_DAY
    )
    tokens = [f" w{i}" for i in range(scenario.chunks)]
    expected = "".join(tokens)
    fake_llm.script(
        Reply(chunks=tokens, delay=CHUNK_DELAY, usage=(20, len(tokens))),
        Reply(chunks=[" back", " to", " normal"], usage=(40, 3)),
    )
    follower = Follower(await chat.connect(cookie)).start()
    checkpoints: asyncio.Task[dict[str, Any] | None] | None = None
    try:
        await follower.ws.send(_send("talk through the restart"))
        started = await follower.wait_for(_is("generation.started"), 30, "generation.started")
        conversation, answer = started["conversation"], started["message"]
        await follower.wait_for(
            lambda f: _is("generation.delta", answer)(f) and f["seq"] >= 3, 15, "the answer's third delta"
        )

        # --- PostgreSQL goes away -----------------------------------------------------
        await asyncio.to_thread(pg.stop, scenario.stop_mode)
        stopped_at = time.monotonic()
        probes = asyncio.gather(
            *(asyncio.to_thread(probe_health, w, stopped_at + scenario.outage) for w in chat.workers)
        )
        await asyncio.sleep(scenario.outage)  # the deliberate outage (see SCENARIOS)
        restart_at = time.monotonic()
        await asyncio.to_thread(pg.start)
        back_at = time.monotonic()
        if not scenario.ends_while_down:  # the answer streams on: its checkpoints must resume
            shown_before = sum(len(f["text"]) for at, f in follower.deltas(answer) if at < restart_at)
            checkpoints = asyncio.create_task(wait_checkpointed(url, answer, shown_before, follower))
        # --- and is back: pages must answer at once ------------------------------------
        pages_at_once = await asyncio.gather(
            *(asyncio.to_thread(pages, w, cookie, conversation) for w in chat.workers)
        )
        health_during_outage = await probes
        checkpoint_after = await checkpoints if checkpoints is not None else None

        finished = await follower.wait_for(
            _is("generation.finished", answer), SAVED_WITHIN + 30, "the answer's generation.finished"
        )
        finished_at = follower.arrival(finished)
        deltas = follower.deltas(answer)
        pages_after = await asyncio.gather(
            *(asyncio.to_thread(pages, w, cookie, conversation) for w in chat.workers)
        )

        # A next question in the same conversation is answered normally.
        await follower.ws.send(_send("and now?", conversation))
        next_started = await follower.wait_for(
            lambda f: _is("generation.started")(f) and f["message"] != answer,
            30,
            "the next generation.started",
        )
        next_answer = next_started["message"]
        next_finished = await follower.wait_for(
            _is("generation.finished", next_answer), 30, "the next answer's generation.finished"
        )
        next_deltas = follower.deltas(next_answer)
    except AssertionError as exc:  # a wait ran out: say what the processes said
        raise AssertionError(f"{exc}\n{chat.logs()}\n--- postgres ---\n{pg.log()[-3000:]}") from None
    finally:
        if checkpoints is not None:
            checkpoints.cancel()
        await follower.close()
        if not pg.running:  # failed mid-outage: the next test needs it
            await asyncio.to_thread(pg.start)

    logs = f"\n{chat.logs()}\n--- postgres ---\n{pg.log()[-3000:]}"
    timeline = (
        f"stop at 0, start at {restart_at - stopped_at:.2f} s, back at {back_at - stopped_at:.2f} s, "
        f"finished at {finished_at - stopped_at:.2f} s"
    )
    # Every expectation is checked, and all that failed are told together.
    problems: list[str] = []

    def expect(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    # While PostgreSQL was down the answer went on: deltas kept coming.
    while_down = [f for at, f in deltas if stopped_at < at < restart_at]
    expect(len(while_down) >= 10, f"only {len(while_down)} deltas while PostgreSQL was down")
    if scenario.ends_while_down:
        text_while_down = "".join(f["text"] for at, f in deltas if at < restart_at)
        expect(
            text_while_down == expected, "the model's whole text did not stream while the database was down"
        )
        expect(finished_at > restart_at, f"a generation.finished while the database was down: {finished}")
    else:  # it streamed on after the restart: checkpoints resumed meanwhile
        expect(
            checkpoint_after is not None and expected.startswith(checkpoint_after["content"]),
            "no checkpoint after the restart while the answer still streamed "
            f"(the row: {checkpoint_after or 'ended first'})",
        )

    # The end: saved once PostgreSQL was back, exactly what the socket was shown.
    expect(
        (finished["status"], finished["finish_reason"]) == ("complete", "stop"),
        f"the answer ended {finished['status']!r} / {finished['finish_reason']!r}, not complete / stop",
    )
    expect(
        finished_at - back_at < SAVED_WITHIN,
        f"the end was saved more than {SAVED_WITHIN} s after the restart",
    )
    seqs = [f["seq"] for _, f in deltas]
    expect(seqs == list(range(1, len(seqs) + 1)), f"gap or duplicate in the deltas: {seqs}")
    shown = "".join(f["text"] for _, f in deltas)
    expect(shown == expected, f"the deltas are not the model's text: {shown!r}")
    expect(finished["content"] == expected, f"generation.finished has {finished['content']!r}")
    row = await asyncio.to_thread(read_answer, url, answer)
    expect(
        (row["status"], row["content"], row["finish_reason"]) == ("complete", expected, "stop"),
        f"database row: {row['status']!r} / {row['finish_reason']!r}, {len(row['content'])} characters"
        f"{'' if row['content'] == expected else ' (not the text shown)'}",
    )
    expect(row["usage"] == [("answer", 20, len(tokens), False)], f"the answer's ledger rows: {row['usage']}")

    # Pages recovered at once on every worker, and stayed so.
    for label, rounds in (("right after the restart", pages_at_once), ("after the answer", pages_after)):
        for worker, answers in zip(chat.workers, rounds, strict=True):
            bad = [a.brief() for a in answers if a.status != 200 or a.took > PAGE_WITHIN]
            expect(not bad, f"worker {worker.port} {label}: {bad}")

    # The next answer, normal.
    normal = " back to normal"
    expect(
        (next_finished["status"], next_finished["content"]) == ("complete", normal),
        f"the next answer: {next_finished['status']!r}, {next_finished['content']!r}",
    )
    expect(
        [f["seq"] for _, f in next_deltas] == list(range(1, len(next_deltas) + 1))
        and "".join(f["text"] for _, f in next_deltas) == normal,
        f"the next answer's deltas: {[(f['seq'], f['text']) for _, f in next_deltas]}",
    )
    next_row = await asyncio.to_thread(read_answer, url, next_answer)
    expect(
        (next_row["status"], next_row["content"], next_row["usage"])
        == ("complete", normal, [("answer", 40, 3, False)]),
        f"the next answer's row: {next_row}",
    )

    # No budget leaked: nothing reserved, the day's use equals the ledger.
    budget = await wait_budget_settled(url, user_id)
    day = [c for c in budget["counters"] if c[0] == "day"]
    expect(bool(day), f"no day counter: {budget}")
    expect(all(c[2] == 0 for c in budget["counters"]), f"a reservation leaked: {budget}")
    expect(
        bool(day) and day[0][1] == budget["ledger_tokens"] >= 20 + len(tokens) + 40 + 3,
        f"the day's counter should equal the ledger, at least {20 + len(tokens) + 40 + 3} tokens: {budget}",
    )

    # /healthz told the truth while PostgreSQL was down, within seconds.
    for worker, answers in zip(chat.workers, health_during_outage, strict=True):
        expect(
            any(
                database_error_reported(a) and a.sent < restart_at and a.took <= HEALTH_503_WITHIN
                for a in answers
            ),
            f"worker {worker.port}: no /healthz sent while PostgreSQL was down answered 503 with "
            f"checks.database 'error' within {HEALTH_503_WITHIN} s: "
            + "; ".join(f"sent at {a.sent - stopped_at:.2f} s: {a.brief()}" for a in answers),
        )

    assert not problems, (
        f"after PostgreSQL restarted ({scenario.id}; {timeline}):\n- " + "\n- ".join(problems) + logs
    )
