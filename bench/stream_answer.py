"""Frames and database writes per streamed answer.

Runs real answers through `generation` against the fake OpenAI-compatible
server at several token rates and prints, per answer: tokens, duration,
websocket frames (deltas), frames per second, checkpoints and every SQL
write the answer caused (accept + checkpoints + finish).

    .venv/bin/python bench/stream_answer.py            # SQLite in a temp dir
    DATABASE_URL=postgres://... .venv/bin/python bench/stream_answer.py
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
os.environ.setdefault("DATABASE_URL", f"sqlite:///{tempfile.mkdtemp()}/bench.sqlite3")

import django  # noqa: E402

django.setup()

from asgiref.sync import sync_to_async  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db.backends import utils  # noqa: E402

from conversations import generation  # noqa: E402
from tests.fake_llm import FakeLLM, Reply  # noqa: E402

if TYPE_CHECKING:
    from django.contrib.auth.models import User

SCENARIOS = [  # (tokens, seconds between tokens)
    (50, 0.05),  # a slow model: 20 tokens/s
    (300, 0.01),  # 100 tokens/s
    (1000, 0.002),  # a fast local model: ~500 tokens/s
    (2000, 0.0),  # as fast as the server can write
]

writes: list[str] = []
_execute = utils.CursorWrapper.execute


def _counting_execute(self: utils.CursorWrapper, sql: str, params: Any = None) -> Any:
    if sql.lstrip().split(" ", 1)[0].upper() in {"INSERT", "UPDATE", "DELETE"}:
        writes.append(sql)
    return _execute(self, sql, params)


async def one_answer(user: User, tokens: int, delay: float) -> dict[str, Any]:
    accepted = await sync_to_async(generation.accept_message)(
        user=user, conversation_id=None, content="benchmark", client_id=uuid.uuid4()
    )
    frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    class Follower:
        def deliver(self, frame: generation.Frame) -> None:
            frames.put_nowait(frame.data)

        def resync(self, conversation_id: str) -> None:
            pass

    await generation.get_hub().follow(str(accepted.conversation.id), Follower())
    start = time.perf_counter()
    await generation.launch(accepted)
    deltas = 0
    while True:
        event = await frames.get()
        if event["type"] == "generation.delta":
            deltas += 1
        if event["type"] == "generation.finished":
            break
    duration = time.perf_counter() - start
    await generation.wait_all()
    assert len(event["content"]) == sum(len(f"t{i} ") for i in range(tokens))
    return {"deltas": deltas, "duration": duration, "status": event["status"]}


async def main() -> None:
    fake = FakeLLM().start()
    settings.OPENAI_API_KEY, settings.OPENAI_BASE_URL = "bench", fake.base_url
    user = await sync_to_async(get_user_model().objects.create_user)(f"bench-{uuid.uuid4().hex[:8]}")
    # Counting, for this run only; Django's ORM gives it a str (the stubs also allow a psycopg Composable).
    utils.CursorWrapper.execute = _counting_execute  # type: ignore[method-assign, assignment]
    print(f"database: {settings.DATABASES['default']['ENGINE'].rsplit('.', 1)[-1]}, ", end="")
    print(f"frame interval {settings.CHAT_DELTA_INTERVAL * 1000:.0f} ms, ", end="")
    print(f"checkpoint interval {settings.CHAT_CHECKPOINT_INTERVAL:.1f} s")
    columns = ("tokens", "tok/s", "seconds", "frames", "frames/s", "tok/frame", "writes")
    print(" ".join(f"{name:>9}" for name in columns))
    sys.stdout.flush()
    for tokens, delay in SCENARIOS:
        fake.script(Reply(chunks=[f"t{i} " for i in range(tokens)], delay=delay, usage=(50, tokens)))
        writes.clear()
        result = await one_answer(user, tokens, delay)
        seconds = result["duration"]
        print(
            f"{tokens:>9} {tokens / seconds:>9.0f} {seconds:>9.2f} {result['deltas']:>9} "
            f"{result['deltas'] / seconds:>9.1f} {tokens / result['deltas']:>9.1f} {len(writes):>9}"
        )
    fake.stop()


if __name__ == "__main__":
    logging.getLogger("conversations").setLevel(logging.WARNING)
    call_command("migrate", verbosity=0)
    asyncio.run(main())
