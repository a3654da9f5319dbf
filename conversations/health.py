"""What /healthz checks: the database answers, the answer's log (Redis, when
several workers share it) answers, and this worker is not shutting down.

Nothing here depends on what the sockets do: a worker with a thousand open
tabs is as healthy as an idle one."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TypedDict

from django.conf import settings
from django.db import connection

from .generation import draining, get_hub

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 3.0  # seconds: a load balancer's probe must not hang


# The database probe runs on threads of its own: while PostgreSQL is away a
# probe can block in the pool for DATABASE_POOL_TIMEOUT; on the request's
# thread that would hold the response too (a 503 ten seconds late). Two
# threads bound what a long outage can pile up; a probe that finds both busy
# times out like any other.
_probes = ThreadPoolExecutor(max_workers=2, thread_name_prefix="healthz")


def _database() -> None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    finally:
        connection.close()


async def _database_probe() -> None:
    await asyncio.get_running_loop().run_in_executor(_probes, _database)


async def _redis() -> None:
    hub = get_hub()
    if hub.remote is not None:
        await hub.remote.client.ping()


class HealthReport(TypedDict):
    ok: bool
    checks: dict[str, str]  # each probe's "ok" or "error"; the worker's "ok" or "draining"


async def health_report() -> HealthReport:
    probes = [("database", _database_probe)]
    if settings.REDIS_URL:  # the answers' logs and the rate limits live there
        probes.append(("redis", _redis))
    checks: dict[str, str] = {}
    for name, check in probes:
        try:
            await asyncio.wait_for(check(), CHECK_TIMEOUT)
            checks[name] = "ok"
        except Exception as exc:  # report, never raise: this is the health page
            log.warning("health check %s failed: %s", name, exc)
            checks[name] = "error"
    checks["worker"] = "draining" if draining() else "ok"
    return {"ok": all(v == "ok" for v in checks.values()), "checks": checks}
