"""Database work that arrives together is done together.

A burst (a team opening new chats in the same second, and their answers
ending together two seconds later) used to be one database call per turn
and per end, each queued behind the others on the database threads, each
paying its round trips and the ORM's Python alone, and all of them holding
the GIL against the event loop that streams every other answer. Here the
calls that arrive while a batch is in the database wait, and go together
in the next one: one call, a few statements for the lot. A call that comes
alone goes at once, as before.

Three batches per process: accepting sends (`turns.accept_messages`),
saving answers' ends (`ledger.save_answers`) and titles
(`titles.save_titles`)."""

from __future__ import annotations

import asyncio
import contextvars
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from .database import in_database

Item = TypeVar("Item")
Result = TypeVar("Result")

MAX_BATCH = 100  # items per database call: a batch's transaction stays short
WAKE_AT_ONCE = 10  # callers woken per turn of the event loop


class Batches(Generic[Item, Result]):
    """`run(items) -> [result or exception, one per item]`, on the database
    thread, for items submitted together. `abandoned(item, result)`: what to
    do with a result nobody waits for any more (its socket went away)."""

    def __init__(
        self,
        run: Callable[[list[Item]], Sequence[Result | Exception]],
        abandoned: Callable[[Item, Result], Awaitable[None]] | None = None,
    ) -> None:
        self.run = run
        self.abandoned = abandoned
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._task: asyncio.Task[None] | None = None
        self._waking: asyncio.Task[None] | None = None  # the last batch's callers being woken

    async def submit(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        if self._task is not None and self._task.cancelling():
            # The loop is going down and the batches with it: an answer's
            # last save (settled `interrupted`) still goes, alone.
            outcome = (await in_database(self.run)([item]))[0]
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        future: asyncio.Future[Result] = loop.create_future()
        self._waiting.append((item, future))
        if self._task is None or self._task.done():
            # A context of its own: the batch outlives the request that
            # happened to start it, and must not run its database work on
            # that request's thread (gone with its response: "CurrentThread-
            # Executor already quit", measured under a burst of API sends).
            self._task = loop.create_task(
                self._drain(), name=f"batches-{self.run.__name__}", context=contextvars.Context()
            )
        return await future

    async def _drain(self) -> None:
        batch: list[tuple[Item, asyncio.Future[Result]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
                try:
                    outcomes: Sequence[Any] = await in_database(self.run)([item for item, _ in batch])
                except Exception as exc:  # the database is away: every item of the batch hears it
                    outcomes = [exc] * len(batch)
                # The next batch goes to the database at once, while this
                # one's callers are woken (a few per turn, after the previous
                # batch's): a burst's second hundred no longer waits for the
                # first hundred's answers to start.
                self._waking = asyncio.get_running_loop().create_task(
                    self._wake(batch, outcomes, after=self._waking), name=f"wake-{self.run.__name__}"
                )
                batch = []
        except asyncio.CancelledError:
            # Nobody waits forever on a batch that will not come: they hear
            # the cancellation (the loop is going down).
            for _item, future in [*batch, *self._waiting]:
                future.cancel()
            self._waiting = []
            if self._waking is not None:
                self._waking.cancel()
            raise

    async def _wake(
        self,
        batch: list[tuple[Item, asyncio.Future[Result]]],
        outcomes: Sequence[Any],
        after: asyncio.Task[None] | None,
    ) -> None:
        try:
            if after is not None:
                await asyncio.wait([after])  # callers hear their outcomes in the order they asked
            for n, ((item, future), outcome) in enumerate(zip(batch, outcomes, strict=True)):
                if n and n % WAKE_AT_ONCE == 0:
                    # What each caller does next (start an answer, send
                    # its end) runs in the next turn of the event loop: a
                    # hundred at once held it for 150 ms, and every
                    # socket's frames waited. A few per turn keep it moving.
                    await asyncio.sleep(0)
                if future.done():  # cancelled: its caller went away
                    if self.abandoned is not None and not isinstance(outcome, Exception):
                        await self.abandoned(item, outcome)
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
        except asyncio.CancelledError:
            if after is not None:
                after.cancel()
            for _item, future in batch:
                future.cancel()
            raise


_batches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, Batches[Any, Any]]] = (
    weakref.WeakKeyDictionary()
)


def batches_of(
    run: Callable[[list[Item]], Sequence[Result | Exception]],
    abandoned: Callable[[Item, Result], Awaitable[None]] | None = None,
) -> Batches[Item, Result]:
    """This event loop's batches of `run`."""
    found = _batches.setdefault(asyncio.get_running_loop(), {})
    if run not in found:
        found[run] = Batches(run, abandoned)
    return found[run]
