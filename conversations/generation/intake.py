"""Sends that arrive together are accepted together.

A burst (a team opening new chats in the same second) used to be one
database call per send, each queued behind the others on the database
thread and each paying its round trips and the ORM's Python on its own:
under a burst of 200, accepting the turns was most of the time to the first
token. Here the sends that arrive while a batch is being accepted wait, and
go together in the next one (`turns.accept_messages`): one call, a few
statements for the lot. A send that arrives alone is accepted at once, as
before."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from .database import in_database
from .runner import launch
from .turns import Accepted, Send, accept_messages

MAX_BATCH = 100  # sends per database call: a batch's transaction stays short


class Intake:
    def __init__(self) -> None:
        self._waiting: list[tuple[Send, asyncio.Future[Accepted]]] = []
        self._task: asyncio.Task[None] | None = None

    async def accept(self, send: Send) -> Accepted:
        future: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()
        self._waiting.append((send, future))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="send-intake")
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
            try:
                outcomes: list[Any] = await in_database(accept_messages)([send for send, _ in batch])
            except Exception as exc:  # the database is away: every send of the batch hears it
                outcomes = [exc] * len(batch)
            for (_send, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():  # its socket went away meanwhile: the answer is written all the same
                    if isinstance(outcome, Accepted):
                        await launch(outcome)
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)


_intakes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Intake] = weakref.WeakKeyDictionary()


async def accept_send(**send: Any) -> Accepted:
    """`accept_message(**send)`, together with whatever else arrives."""
    loop = asyncio.get_running_loop()
    intake = _intakes.get(loop)
    if intake is None:
        intake = _intakes[loop] = Intake()
    return await intake.accept(Send(**send))
