"""Websocket clients of bench/load.py, run as a subprocess of it.

Reads its plan as one JSON line on stdin, opens its sockets, writes
{"ready": ...} on stdout, waits for {"go": <time.monotonic() instant>} on
stdin (CLOCK_MONOTONIC is the same clock in every process of the machine),
runs its answers and writes {"answers": [...], ...} on stdout. Not meant to be
run by hand.

Plan: {"url", "origin", "sessions": [session key per socket], "active": [socket indexes that
send], "mode": "burst" | "steady", "offsets": [seconds after go, steady only], "timeout",
"connect_concurrency", "seed"}.

Per answer it checks what the client can see: seqs exactly 1..K, deltas ==
`generation.finished`.content, status complete, content == what the fake
upstream sent. The orchestrator then checks the database.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import sys
import time
import uuid
from typing import Any

from load_common import log, percentile, send_line
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin

monotonic = time.monotonic


class Answer:
    __slots__ = (
        "conversation",
        "done",
        "error",
        "finished",
        "first",
        "gaps",
        "index",
        "last",
        "late",
        "message",
        "reason",
        "ref",
        "sent",
        "seqs",
        "socket",
        "started",
        "started_at",
        "texts",
    )

    def __init__(self, index: int, socket: int, ref: float) -> None:
        self.index = index
        self.socket = socket
        self.ref = ref  # TTFT is measured from here: the send (burst) or the scheduled time (steady)
        self.sent: float | None = None
        self.late = 0.0  # how long after its due time the frame was sent (client lag)
        self.conversation: str | None = None
        self.message: str | None = None
        self.started = False
        self.started_at: float | None = None
        self.first: float | None = None
        self.last = 0.0
        self.gaps: list[float] = []
        self.seqs: list[int] = []
        self.texts: list[str] = []
        self.finished: dict[str, Any] | None = None
        self.error: str | None = None
        self.reason: str | None = None
        self.done = asyncio.Event()


class Socket:
    def __init__(self, index: int, session: str) -> None:
        self.index = index
        self.session = session
        self.ws: ClientConnection | None = None
        self.current: Answer | None = None
        self.client_id: str | None = None
        self.retired = False  # closed, or an answer timed out on it: never used again
        self.reader: asyncio.Task[None] | None = None

    async def open(self, url: str, origin: str) -> None:
        self.ws = await connect(
            url,
            origin=Origin(origin),
            additional_headers={"Cookie": f"sessionid={self.session}"},
            max_size=None,
            compression=None,
            ping_interval=None,  # no keepalive pings: a busy server must not get the socket closed by us
            open_timeout=120,
            close_timeout=2,
        )
        self.reader = asyncio.create_task(self.read())

    async def read(self) -> None:
        ws = self.ws
        assert ws is not None
        loads = json.loads
        try:
            async for raw in ws:
                answer = self.current
                if answer is None:
                    continue  # e.g. the title of an earlier conversation
                now = monotonic()
                frame = loads(raw)
                kind = frame.get("type")
                conversation = frame.get("conversation")
                if isinstance(conversation, str) and answer.conversation not in (None, conversation):
                    continue  # another conversation's frame
                if kind == "generation.delta":
                    if answer.first is None:
                        answer.first = now
                    else:
                        answer.gaps.append(now - answer.last)
                    answer.last = now
                    answer.seqs.append(frame.get("seq"))
                    answer.texts.append(frame.get("text"))
                    if answer.message is None:
                        answer.message = frame.get("message")
                elif kind == "message.created":
                    if frame.get("client_id") == self.client_id:
                        answer.conversation = (frame.get("message") or {}).get("conversation")
                elif kind == "generation.started":
                    answer.started = True
                    answer.started_at = now
                    answer.message = frame.get("message")
                elif kind == "generation.finished":
                    if answer.message in (None, frame.get("message")):
                        answer.finished = frame
                        answer.done.set()
                elif kind == "error":
                    answer.error = str(frame.get("code"))
                    if not answer.started:  # refused: no generation.finished will follow
                        answer.done.set()
        except ConnectionClosed:
            pass
        finally:
            self.retired = True
            if self.current is not None and not self.current.done.is_set():
                self.current.reason = "socket_closed"
                self.current.done.set()


def judge(answer: Answer, expected: str) -> str | None:
    """The first reason this answer is not exact, or None."""
    if answer.reason:
        return answer.reason
    if answer.error:
        return f"error:{answer.error}"
    finished = answer.finished
    if finished is None:
        return "timeout_mid_stream" if answer.first else ("timeout_no_delta" if answer.started else "timeout")
    ordered = sorted(zip(answer.seqs, answer.texts, strict=True), key=lambda pair: pair[0])
    if [seq for seq, _ in ordered] != list(range(1, len(ordered) + 1)):
        return "seq_dup" if len(set(answer.seqs)) != len(answer.seqs) else "seq_gap"
    shown = "".join(text for _, text in ordered)
    content = finished.get("content")
    if shown != content:
        # The usual case: the last deltas never came (no gap can show it).
        tail = isinstance(content, str) and content.startswith(shown)
        return "deltas_ne_finished:tail_missing" if tail else "deltas_ne_finished"
    if finished.get("status") != "complete":
        return f"status:{finished.get('status')}"
    if finished.get("content") != expected:
        return "content_ne_upstream"
    return None


async def run_answer(sock: Socket, answer: Answer, timeout: float, content: str, *, from_send: bool) -> None:
    sock.current = answer
    sock.client_id = str(uuid.uuid4())
    frame = json.dumps(
        {"type": "message.send", "conversation": None, "content": content, "client_id": sock.client_id}
    )
    answer.sent = monotonic()
    answer.late = answer.sent - answer.ref
    if from_send:
        answer.ref = answer.sent
    try:
        assert sock.ws is not None
        await sock.ws.send(frame)
    except ConnectionClosed:
        answer.reason = "socket_closed"
        answer.done.set()
    remaining = answer.ref + timeout - monotonic()
    try:
        await asyncio.wait_for(answer.done.wait(), max(0.0, remaining))
    except TimeoutError:
        sock.retired = True  # its late frames must not land in a next answer
    sock.current = None


async def lag_monitor(lags: list[float], stop: asyncio.Event) -> None:
    """How late the event loop wakes up: this process's own saturation."""
    while not stop.is_set():
        before = monotonic()
        await asyncio.sleep(0.01)
        lags.append(monotonic() - before - 0.01)


async def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    plan = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
    timeout = float(plan["timeout"])
    expected = plan["expected"]
    sockets = [Socket(i, key) for i, key in enumerate(plan["sessions"])]
    limit = asyncio.Semaphore(int(plan.get("connect_concurrency", 64)))
    connect_errors: dict[str, int] = {}

    async def open_one(sock: Socket) -> None:
        async with limit:
            try:
                await sock.open(plan["url"], plan["origin"])
            except Exception as exc:
                sock.retired = True
                name = type(exc).__name__
                connect_errors[name] = connect_errors.get(name, 0) + 1

    started = monotonic()
    await asyncio.gather(*(open_one(s) for s in sockets))
    connect_s = monotonic() - started
    await asyncio.sleep(0.3)  # let the server finish its side of the handshakes
    open_count = sum(1 for s in sockets if not s.retired)
    send_line({"ready": True, "open": open_count, "connect_errors": connect_errors, "connect_s": connect_s})

    go = json.loads(await loop.run_in_executor(None, sys.stdin.readline))["go"]
    stop_lag = asyncio.Event()
    lags: list[float] = []
    lag_task = asyncio.create_task(lag_monitor(lags, stop_lag))
    answers: list[Answer] = []
    tasks: list[asyncio.Task[None]] = []
    content = "Benchmark question: please answer."
    active = [sockets[i] for i in plan["active"]]

    if plan["mode"] == "burst":
        await asyncio.sleep(max(0.0, go - monotonic()))
        for sock in active:
            answer = Answer(len(answers), sock.index, go)
            answers.append(answer)
            if sock.retired:
                answer.reason = "connect_failed"
                continue
            tasks.append(asyncio.create_task(run_answer(sock, answer, timeout, content, from_send=True)))
    else:
        rng = random.Random(plan.get("seed", 0))
        for offset in plan["offsets"]:
            scheduled = go + offset
            await asyncio.sleep(max(0.0, scheduled - monotonic()))
            answer = Answer(len(answers), -1, scheduled)
            answers.append(answer)
            free = [s for s in active if s.current is None and not s.retired]
            if not free:
                answer.reason = "skipped_no_free_socket"
                continue
            sock = rng.choice(free)
            answer.socket = sock.index
            sock.current = answer  # taken now, before the task runs
            tasks.append(asyncio.create_task(run_answer(sock, answer, timeout, content, from_send=False)))
    if tasks:
        await asyncio.gather(*tasks)
    end = monotonic()
    stop_lag.set()
    await lag_task

    results = []
    for answer in answers:
        reason = judge(answer, expected)
        ttft = None if answer.first is None else answer.first - answer.ref
        results.append(
            {
                "socket": answer.socket,
                "reason": reason,
                "message": answer.message,
                "ttft": ttft,
                "started": None if answer.started_at is None else answer.started_at - answer.ref,
                "gaps": [round(g, 5) for g in answer.gaps],
                "frames": len(answer.seqs),
                "content": (answer.finished or {}).get("content") if reason is None else None,
            }
        )
    send_line(
        {
            "answers": results,
            "send_late_max": max((a.late for a in answers if a.sent is not None), default=None),
            "end": end,
            "loop_lag_p99": percentile(lags, 99),
            "loop_lag_max": max(lags) if lags else None,
        }
    )
    closes = [s.ws.close() for s in sockets if s.ws is not None]
    try:
        await asyncio.wait_for(asyncio.gather(*closes, return_exceptions=True), 10)
    except TimeoutError:
        log("clients: some sockets did not close in 10 s")


if __name__ == "__main__":
    asyncio.run(main())
