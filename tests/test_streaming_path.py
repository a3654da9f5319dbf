"""What keeps the streaming path moving under load: frames paced by how
late the event loop runs, a collector that does not stop the loop for
the process's own objects, and the answer log's writer sending bounded
pipelines to Redis without ever starving a flush."""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from chatsite.startup import settle_heap
from conversations.generation import answer_log, fanout
from conversations.generation.pace import Pace
from tests.cluster import RedisServer, start_redis


def test_frames_come_every_interval_and_less_often_while_the_loop_is_late(settings: Any) -> None:
    settings.CHAT_DELTA_INTERVAL = 0.04
    pace = Pace()
    assert pace.interval() == pytest.approx(0.04)

    for _ in range(200):  # timers firing 30 ms late, again and again
        pace.observe(0.03)
    assert 0.08 >= pace.interval() > 0.07

    for _ in range(200):  # far behind: never more than MAX_INTERVAL
        pace.observe(1.0)
    assert pace.interval() == pytest.approx(Pace.MAX_INTERVAL)

    for _ in range(300):  # on time again
        pace.observe(-0.001)
    assert pace.interval() == pytest.approx(0.04, abs=0.002)


def test_a_started_worker_leaves_what_it_set_up_out_of_the_collectors_walks() -> None:
    before = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_freeze_count() > 10_000  # Django, the models, the SDK's classes
        assert gc.get_threshold() == (5_000, 5, 10)
        garbage: list[object] = []
        garbage.append(garbage)  # a cycle made after start-up is still collected
        del garbage
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def hub(redis_server: RedisServer, settings: Any) -> AsyncIterator[fanout.Hub]:
    settings.REDIS_URL = redis_server.url
    hub = fanout.Hub()
    assert hub.remote is not None
    yield hub
    await hub.remote.client.aclose()


async def test_a_long_queue_goes_in_bounded_pipelines_and_flush_waits_for_all_of_it(hub: fanout.Hub) -> None:
    assert hub.remote is not None
    conversation, answer = str(uuid.uuid4()), str(uuid.uuid4())
    sizes: list[int] = []
    write = hub.remote._write

    async def counting(batch: list[Any]) -> None:
        sizes.append(len(batch))
        await write(batch)

    hub.remote._write = counting  # type: ignore[method-assign]
    deltas = 1200  # an XADD and a PUBLISH each: 2,400 commands
    for seq in range(1, deltas + 1):
        hub.publish(
            conversation, {"type": "generation.delta", "message": answer, "seq": seq, "text": f"w{seq} "}
        )

    await asyncio.wait_for(hub.flush(), 10)

    assert max(sizes) <= fanout.MAX_PIPELINE
    assert sum(sizes) >= 2 * deltas
    entries = await hub.remote.client.xrange(f"chat:answer:{answer}")
    assert answer_log.log_text(entries) == "".join(f"w{seq} " for seq in range(1, deltas + 1))


async def test_a_flush_ends_while_other_answers_keep_publishing(
    redis_server: RedisServer, settings: Any
) -> None:
    settings.REDIS_URL = redis_server.url
    hub = fanout.Hub()
    assert hub.remote is not None
    busy = asyncio.Event()

    async def keep_publishing() -> None:
        seq = 0
        while True:
            for _ in range(fanout.MAX_PIPELINE):
                seq += 1
                hub.publish("other", {"type": "generation.delta", "message": "busy", "seq": seq, "text": "x"})
            busy.set()
            await asyncio.sleep(0)

    flood = asyncio.create_task(keep_publishing())
    try:
        await busy.wait()
        hub.publish("mine", {"type": "conversation.updated", "conversation": {"id": "mine", "title": "T"}})
        await asyncio.wait_for(hub.flush(), 10)  # never starved by what comes after it
    finally:
        flood.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flood
