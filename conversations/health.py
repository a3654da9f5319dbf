"""What /healthz checks: the database answers and the channel layer carries
a message."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db import connection

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 5.0  # seconds


def _database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


async def _channel_layer_round_trip() -> None:
    layer = get_channel_layer()
    channel = await layer.new_channel("healthz.")
    token = uuid.uuid4().hex
    await layer.send(channel, {"type": "healthz.ping", "token": token})
    reply = await layer.receive(channel)
    if reply.get("token") != token:
        raise RuntimeError("channel layer returned another message")


async def health_report() -> dict[str, Any]:
    checks: dict[str, str] = {}
    for name, check in (
        ("database", database_sync_to_async(_database)),
        ("channel_layer", _channel_layer_round_trip),
    ):
        try:
            await asyncio.wait_for(check(), CHECK_TIMEOUT)
            checks[name] = "ok"
        except Exception as exc:  # report, never raise: this is the health page
            log.warning("health check %s failed: %s", name, exc)
            checks[name] = "error"
    return {"ok": all(v == "ok" for v in checks.values()), "checks": checks}
