"""This worker process: what it does besides serving, from its start to its
last request.

- The caretaker: every CHAT_SWEEP_INTERVAL seconds it settles the answers
  whose worker is gone (recovery.py): at once for a process of this machine
  that no longer exists, after CHAT_STALE_AFTER seconds without a heartbeat
  for any other. It judges heartbeats only once its own database access has
  been unbroken for CHAT_STALE_AFTER seconds, so that after a database
  outage it never takes live answers of other workers for dead before they
  could beat again. Its own running answers it never touches.
- The drain on SIGTERM (a deploy, `systemctl stop`): `/healthz` turns 503,
  every socket is closed with 4012, service restart (pages reconnect, via the proxy, to
  another worker and re-join their conversations, whose answers go on
  streaming to them from here through Redis), running answers get
  CHAT_DRAIN_SECONDS to finish, the rest are saved as `interrupted`, then
  the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import sys
import threading
import time
import weakref
from typing import Any, Protocol, cast

from django.conf import settings

from ..database import in_database
from .fanout import get_hub
from .identity import WORKER_ID
from .recovery import dead_answers, settle_dead
from .runner import running_tasks

log = logging.getLogger(__name__)


class Socket(Protocol):
    async def close_for_restart(self) -> None:
        """Close with 4012 (service restart): the client reconnects elsewhere."""


class Worker:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.draining = False
        self.sockets: weakref.WeakSet[Any] = weakref.WeakSet()
        self._caretaker: asyncio.Task[None] | None = None
        self._database_ok_since: float | None = None
        self._drain: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the caretaker and take over SIGTERM, when this loop is a
        server's (daphne's, in the main thread; not a test's)."""
        if self._caretaker is None and _served_by_daphne():
            self._caretaker = self.loop.create_task(self._care(), name="caretaker")
            signal.signal(signal.SIGTERM, self._on_sigterm)
            log.info("worker %s: caretaker started", WORKER_ID)

    # --- the caretaker -------------------------------------------------------------------

    async def _care(self) -> None:
        while not self.draining:
            # Jitter: the workers of a deployment do not all look at once.
            await asyncio.sleep(settings.CHAT_SWEEP_INTERVAL * random.uniform(0.75, 1.25))
            try:
                await self.sweep()
            except Exception as exc:  # the database is away: judge nothing until it is back
                self._database_ok_since = None
                log.warning("sweep failed: %s", exc)

    async def sweep(self) -> int:
        """Settle the dead answers found now; returns how many."""
        now = time.monotonic()
        stale_after = settings.CHAT_STALE_AFTER
        trusted = self._database_ok_since is not None and now - self._database_ok_since >= stale_after
        found = await in_database(dead_answers)(stale_after=stale_after if trusted else None)
        if self._database_ok_since is None:
            self._database_ok_since = now
        hub = get_hub()
        ours = {answer.answer_id for answer in hub.running.values()}
        settled = 0
        for dead in found:
            if str(dead.pk) in ours:
                continue  # running here, so alive (a busy loop may have delayed its heartbeat)
            try:
                shown = await hub.shown_text(str(dead.pk))
                event = await in_database(settle_dead)(dead.pk, shown)
            except Exception:  # one answer that cannot be settled must not stop the others
                log.exception("could not settle answer %s", dead.pk)
                continue
            if event is not None:
                hub.publish(str(dead.conversation_id), event)
                settled += 1
        return settled

    # --- the drain -----------------------------------------------------------------------

    def _on_sigterm(self, _signum: int, _frame: Any) -> None:
        self.loop.call_soon_threadsafe(self.start_drain)

    def start_drain(self) -> None:
        if self._drain is None:
            self._drain = self.loop.create_task(self.drain(), name="drain")

    async def drain(self, *, stop_server: bool = True) -> None:
        self.draining = True
        sockets = list(self.sockets)
        tasks = running_tasks()
        log.warning(
            "SIGTERM: closing %d socket(s) with 4012; %d answer(s) get %.0f s to finish",
            len(sockets),
            len(tasks),
            settings.CHAT_DRAIN_SECONDS,
        )
        for socket in sockets:
            with contextlib.suppress(Exception):
                await socket.close_for_restart()
        deadline = time.monotonic() + settings.CHAT_DRAIN_SECONDS
        while tasks and time.monotonic() < deadline:  # also answers that began meanwhile
            await asyncio.wait(tasks, timeout=deadline - time.monotonic())
            tasks = running_tasks()
        if tasks:
            for task in tasks:
                task.cancel()  # each saves itself as `interrupted`, with what was shown
            log.warning("drain: %d answer(s) did not finish in time; saved as interrupted", len(tasks))
            await asyncio.wait(tasks, timeout=10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(get_hub().flush(), 5)
        log.warning("drain done; stopping")
        if stop_server:
            _stop_server()


def _served_by_daphne() -> bool:
    if threading.current_thread() is not threading.main_thread():
        return False
    reactor = sys.modules.get("twisted.internet.reactor")
    return bool(reactor is not None and getattr(reactor, "running", False))


def _stop_server() -> None:
    from twisted.internet import reactor

    cast(Any, reactor).stop()  # twisted's stubs type the installed reactor as a module


_workers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Worker] = weakref.WeakKeyDictionary()


def this_worker() -> Worker:
    loop = asyncio.get_running_loop()
    worker = _workers.get(loop)
    if worker is None:
        worker = _workers[loop] = Worker(loop)
    return worker


def draining() -> bool:
    try:
        return this_worker().draining
    except RuntimeError:  # no running loop: not serving
        return False


async def sweep_dead() -> int:
    """Settle the answers whose worker is gone, now (a socket found one)."""
    return await this_worker().sweep()
