"""Work to do once per process before it serves anyone, and what runs for
the life of the process.

Daphne has no lifespan events, but its process has a start: when the
application is loaded by daphne, this runs as soon as daphne's reactor
runs, before any request (a worker that nobody has reached yet, just
restarted or the quiet one, settles a dead worker's answers all the same).
Under another ASGI server, the first connection of any kind runs it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from typing import Any

from channels.db import database_sync_to_async

from conversations.generation import sweep_interrupted, this_worker
from conversations.tools import mcp

log = logging.getLogger(__name__)
_background: set[asyncio.Future[None]] = set()  # tasks kept until they end


class SweepOnStartup:
    """ASGI middleware: before the first request, settle the answers that a
    dead process left `streaming`, then start this worker's caretaker (which
    does so every few seconds for every worker) and its drain on SIGTERM."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._done = False
        self._lock: asyncio.Lock | None = None
        _when_daphne_runs(self._run_once)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if not self._done and scope["type"] in ("http", "websocket"):
            await self._run_once()
        return await self.app(scope, receive, send)

    async def _run_once(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._done:
                return
            try:
                await database_sync_to_async(sweep_interrupted)(at_startup=True)
            except Exception:  # a missing table must not take the site down
                log.exception("start-up sweep of streaming answers failed")
            this_worker().start()
            # The MCP servers are reached in the background: startup never waits for them.
            warming = asyncio.ensure_future(mcp.warm())
            _background.add(warming)
            warming.add_done_callback(_background.discard)
            settle_heap()
            self._done = True


def settle_heap() -> None:
    """The garbage collector tuned for a server that holds many objects.

    What the process holds once it is set up (Django, the models, the
    openai SDK's classes: some 150,000 objects) never becomes garbage:
    frozen, the collector stops walking it. The youngest generation is
    collected every 5,000 allocations instead of 700 (a burst allocates
    millions), so fewer objects of requests still in flight are promoted,
    and the oldest generation, which walks every live socket's objects,
    runs less often. Measured (a burst of 200, one worker): Python's
    defaults paused the loop for 225 ms in the middle of the burst and for
    115 ms of youngest-generation collections in its first 3.5 s; with 1,000
    sockets open, full collections took 115 to 208 ms. Tuned: 26 ms in the
    burst; at most 79 ms with 1,000 sockets."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(5_000, 5, 10)


def _when_daphne_runs(start: Any) -> None:
    """Run `start()` (a coroutine function) on daphne's event loop as soon as
    its reactor runs, if this process is daphne's."""
    if "daphne.server" not in sys.modules:
        return  # a test, a command, another server: the first connection runs it
    from daphne.server import twisted_loop
    from twisted.internet import reactor

    def schedule() -> None:
        # The reactor is starting; its asyncio loop runs from the next tick.
        twisted_loop.call_soon(lambda: asyncio.ensure_future(start()))

    reactor.callWhenRunning(schedule)
