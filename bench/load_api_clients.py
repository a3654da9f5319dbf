"""HTTP API clients of bench/load.py (`--client api`), run as a subprocess of
it, with the same pipe protocol as load_clients.py: a plan on stdin,
{"ready": ...}, {"go": <monotonic instant>}, then {"answers": [...], ...}.

Plan: {"base", "tokens": [API token per user], "active": [user indexes that ask],
"mode": "burst" | "steady", "offsets": [seconds after go, steady only], "timeout",
"expected", "endpoint": "completions" | "messages", "seed"}.

`completions`: a streamed `POST /api/v1/chat/completions` per answer, read
with raw aiohttp (the cheapest client); the answer is exact when its content
deltas, joined, equal what the fake upstream sent and it finished `stop`.
`messages`: each user's conversation is made before `go`; a `POST
/api/v1/conversations/{id}/messages` with `Accept: text/event-stream` per
answer; exact when its `generation.delta` events have seq 1..K, their text
equals `generation.finished`'s content and the upstream's, status complete
(the orchestrator then checks the database).
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import sys
import time
from typing import Any

import aiohttp
from load_common import percentile, send_line

monotonic = time.monotonic
QUESTION = "Benchmark question: please answer."


class Answer:
    def __init__(self, user: int, ref: float) -> None:
        self.user = user
        self.ref = ref  # when it was due: burst `go`, steady its arrival
        self.first: float | None = None
        self.last = 0.0
        self.started: float | None = None
        self.gaps: list[float] = []
        self.texts: list[str] = []
        self.seqs: list[int] = []
        self.reason: str | None = None
        self.message: str | None = None
        self.content: str | None = None

    def text(self, piece: str) -> None:
        now = monotonic()
        if self.first is None:
            self.first = now
        else:
            self.gaps.append(now - self.last)
        self.last = now
        self.texts.append(piece)


async def events(response: aiohttp.ClientResponse) -> Any:
    """(event name, data) of a server-sent event stream."""
    name = "message"
    data: list[str] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


async def completion(
    session: aiohttp.ClientSession, base: str, token: str, answer: Answer, expected: str
) -> None:
    body = {
        "messages": [{"role": "user", "content": QUESTION}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    finish = None
    async with session.post(
        base + "/api/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"}
    ) as response:
        if response.status != 200:
            answer.reason = f"status:{response.status}"
            return
        async for _name, data in events(response):
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("error"):
                answer.reason = f"error:{chunk['error'].get('code')}"
                return
            for choice in chunk.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    answer.text(piece)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
    content = "".join(answer.texts)
    if finish != "stop":
        answer.reason = f"finish:{finish}"
    elif content != expected:
        answer.reason = "content_ne_upstream"
    else:
        answer.content = content


async def message(
    session: aiohttp.ClientSession, base: str, token: str, conversation: str, answer: Answer, expected: str
) -> None:
    finished: dict[str, Any] | None = None
    async with session.post(
        f"{base}/api/v1/conversations/{conversation}/messages",
        json={"content": QUESTION},
        headers={"Authorization": f"Bearer {token}", "Accept": "text/event-stream"},
    ) as response:
        if response.status != 200:
            answer.reason = f"status:{response.status}"
            return
        async for name, data in events(response):
            event = json.loads(data)
            if name == "generation.started":
                answer.started = monotonic()
            elif name == "generation.delta":
                answer.seqs.append(event["seq"])
                answer.text(event["text"])
            elif name == "generation.finished":
                finished = event
                break
            elif name == "error":
                answer.reason = f"error:{event.get('code')}"
                return
    if finished is None:
        answer.reason = "timeout_mid_stream"
        return
    answer.message = finished.get("message")
    deltas = "".join(answer.texts)
    if answer.seqs != list(range(1, len(answer.seqs) + 1)):
        answer.reason = "seq_gap"
    elif finished.get("status") != "complete":
        answer.reason = f"status:{finished.get('status')}"
    elif deltas != finished.get("content"):
        answer.reason = "deltas_ne_finished"
    elif deltas != expected:
        answer.reason = "content_ne_upstream"
    else:
        answer.content = deltas


async def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    plan = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
    base, tokens, expected = plan["base"], plan["tokens"], plan["expected"]
    timeout = float(plan["timeout"])
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=timeout),
    )
    conversations: dict[int, str] = {}
    if plan["endpoint"] == "messages":

        async def make(user: int) -> None:
            async with session.post(
                base + "/api/v1/conversations",
                json={},
                headers={"Authorization": f"Bearer {tokens[user]}"},
            ) as response:
                conversations[user] = (await response.json())["id"]

        await asyncio.gather(*(make(user) for user in plan["active"]))
    send_line({"ready": True, "open": len(plan["active"]), "connect_errors": {}, "connect_s": 0.0})

    go = json.loads(await loop.run_in_executor(None, sys.stdin.readline))["go"]
    answers: list[Answer] = []
    tasks: list[asyncio.Task[None]] = []
    late: list[float] = []

    async def run(answer: Answer) -> None:
        late.append(monotonic() - answer.ref)
        try:
            if plan["endpoint"] == "messages":
                coro = message(
                    session, base, tokens[answer.user], conversations[answer.user], answer, expected
                )
            else:
                coro = completion(session, base, tokens[answer.user], answer, expected)
            await asyncio.wait_for(coro, timeout)
        except TimeoutError:
            answer.reason = "timeout" if answer.first is None else "timeout_mid_stream"
        except Exception as exc:
            answer.reason = f"error:{type(exc).__name__}"

    async def run_then_free(answer: Answer, busy: set[int]) -> None:
        try:
            await run(answer)
        finally:
            busy.discard(answer.user)

    if plan["mode"] == "burst":
        await asyncio.sleep(max(0.0, go - monotonic()))
        for user in plan["active"]:
            answer = Answer(user, go)
            answers.append(answer)
            tasks.append(asyncio.create_task(run(answer)))
    else:
        rng = random.Random(plan.get("seed", 0))
        busy: set[int] = set()
        for offset in plan["offsets"]:
            scheduled = go + offset
            await asyncio.sleep(max(0.0, scheduled - monotonic()))
            free = [user for user in plan["active"] if user not in busy]
            answer = Answer(rng.choice(free) if free else -1, scheduled)
            answers.append(answer)
            if not free:
                answer.reason = "skipped_no_free_socket"
                continue
            busy.add(answer.user)
            tasks.append(asyncio.create_task(run_then_free(answer, busy)))
    if tasks:
        await asyncio.gather(*tasks)
    end = monotonic()
    await session.close()
    send_line(
        {
            "answers": [
                {
                    "socket": answer.user,
                    "reason": answer.reason,
                    "message": answer.message,
                    "ttft": None if answer.first is None else answer.first - answer.ref,
                    "started": None if answer.started is None else answer.started - answer.ref,
                    "gaps": [round(g, 5) for g in answer.gaps],
                    "frames": len(answer.texts),
                    "content": answer.content,
                }
                for answer in answers
            ],
            "send_late_max": max(late, default=None),
            "end": end,
            "loop_lag_p99": percentile([], 99),
            "loop_lag_max": None,
        }
    )


if __name__ == "__main__":
    asyncio.run(main())
