"""Many answers at once through a real daphne (over Redis and PostgreSQL in
CI's second run): every answer's deltas, in `seq` order, equal its content in
`generation.finished` and in the database, with no gap and no duplicate; a
second tab that joins mid-answer gets a snapshot and then exactly the rest."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Origin

from conversations.models import Message
from tests.conftest import LiveServer
from tests.factories import make_user, session_cookie
from tests.fake_llm import Reply

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

ANSWERS = 100
JOINERS = 10  # of those users, how many open a second tab mid-answer
TOKENS = [f" w{i}" for i in range(40)]


async def _open(server: LiveServer, cookie: str) -> ClientConnection:
    return await connect(
        server.ws_url + "/ws/chat/",
        origin=Origin(server.url),
        additional_headers={"Cookie": f"sessionid={cookie}"},
        open_timeout=30,
        max_size=None,
    )


async def _until(ws: ClientConnection, kind: str, frames: list[dict[str, Any]]) -> dict[str, Any]:
    while True:
        try:
            frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 60))
        except TimeoutError:
            raise AssertionError(f"no {kind} after {[(f['type'], f.get('seq')) for f in frames]}") from None
        frames.append(frame)
        if frame["type"] == kind:
            return frame


def _deltas_in_order(frames: list[dict[str, Any]], after: int = 0) -> str:
    seqs = [f["seq"] for f in frames if f["type"] == "generation.delta"]
    assert seqs == list(range(after + 1, after + 1 + len(seqs))), f"gap or duplicate: {seqs}"
    return "".join(f["text"] for f in frames if f["type"] == "generation.delta")


async def _ask(server: LiveServer, cookie: str, start: asyncio.Event, joiner: bool) -> dict[str, Any]:
    ws = await _open(server, cookie)
    try:
        await start.wait()
        await ws.send(
            json.dumps(
                {
                    "type": "message.send",
                    "conversation": None,
                    "content": "count for me",
                    "client_id": str(uuid.uuid4()),
                }
            )
        )
        frames: list[dict[str, Any]] = []
        await _until(ws, "generation.delta", frames)
        conversation = frames[0]["conversation"]["id"]
        second = asyncio.create_task(_join(server, cookie, conversation)) if joiner else None
        finished = await _until(ws, "generation.finished", frames)
        return {"frames": frames, "finished": finished, "second": await second if second else None}
    finally:
        await ws.close()


async def _join(server: LiveServer, cookie: str, conversation: str) -> dict[str, Any]:
    ws = await _open(server, cookie)
    try:
        # `after`: if the answer ended before this join arrived, its end is replayed.
        await ws.send(json.dumps({"type": "conversation.join", "conversation": conversation, "after": 0}))
        frames: list[dict[str, Any]] = []
        finished = await _until(ws, "generation.finished", frames)
        return {"frames": frames, "finished": finished}
    finally:
        await ws.close()


async def test_a_hundred_concurrent_answers_are_each_exact(daphne_server: LiveServer, fake_llm: Any) -> None:
    fake_llm.default = Reply(chunks=TOKENS, delay=0.05, usage=(20, len(TOKENS)))
    users = await sync_to_async(lambda: [make_user(f"load{i}") for i in range(ANSWERS)])()
    cookies = await sync_to_async(lambda: [session_cookie(u) for u in users])()
    start = asyncio.Event()
    asks = [
        asyncio.create_task(_ask(daphne_server, cookie, start, joiner=i < JOINERS))
        for i, cookie in enumerate(cookies)
    ]
    start.set()
    results = await asyncio.wait_for(asyncio.gather(*asks), 120)

    expected = "".join(TOKENS)
    stored = await sync_to_async(
        lambda: dict(
            Message.objects.filter(pk__in=[r["finished"]["message"] for r in results]).values_list(
                "pk", "content"
            )
        )
    )()
    for result in results:
        finished = result["finished"]
        assert finished["status"] == "complete"
        assert _deltas_in_order(result["frames"]) == finished["content"] == expected
        assert stored[uuid.UUID(finished["message"])] == expected
    snapshots = 0
    for result in results[:JOINERS]:
        frames = result["second"]["frames"]
        assert frames[-1]["content"] == expected
        if frames[0]["type"] == "generation.snapshot":
            snapshots += 1
            rest = _deltas_in_order(frames, after=frames[0]["seq"])
            assert frames[0]["content"] + rest == expected
        else:  # joined after the end
            assert [f["type"] for f in frames] == ["generation.finished"]
    assert snapshots > 0
    assert "Traceback" not in daphne_server.log()
