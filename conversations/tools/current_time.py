"""`current_time`: the date and time now in a time zone (the model has no clock)."""

from __future__ import annotations

import functools
import zoneinfo
from datetime import UTC, datetime
from typing import Any

from .base import Tool, ToolContext, ToolError


def zone_named(name: str) -> zoneinfo.ZoneInfo:
    """The IANA zone `name` (case-insensitive: models write "asia/tokyo"), or ToolError."""
    key = name.strip()
    try:
        return zoneinfo.ZoneInfo(key)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, IsADirectoryError, OSError):
        pass  # not found, a malformed key ("../x", ""), or a directory ("Asia")
    spelled = _zones_by_lowercase().get(key.lower())
    if spelled is None:
        raise ToolError(f"unknown time zone {name!r}: give an IANA name such as 'Europe/Paris' or 'UTC'")
    return zoneinfo.ZoneInfo(spelled)


def described(now: datetime, zone: str) -> str:
    offset = now.strftime("%z")
    return (
        f"In {zone} it is {now:%A}, {now:%Y-%m-%d}, {now:%H:%M:%S} "
        f"({now.tzname()}, UTC{offset[:3]}:{offset[3:]}). ISO 8601: {now.isoformat(timespec='seconds')}"
    )


@functools.cache
def _zones_by_lowercase() -> dict[str, str]:
    return {zone.lower(): zone for zone in zoneinfo.available_timezones()}


def _run(context: ToolContext, arguments: dict[str, Any]) -> str:
    zone = zone_named(arguments["timezone"])
    return described(datetime.now(UTC).astimezone(zone), zone.key)


TOOL = Tool(
    name="current_time",
    description=(
        "The current date, time, weekday and UTC offset in a time zone. Use it whenever the "
        "answer depends on today's date or the time somewhere."
    ),
    parameters={
        "type": "object",
        "properties": {
            "timezone": {
                "type": "string",
                "description": "An IANA time zone name, e.g. 'Asia/Tokyo', 'Europe/Paris' or 'UTC'",
                "minLength": 1,
                "maxLength": 64,
            }
        },
        "required": ["timezone"],
        "additionalProperties": False,
    },
    function=_run,
    timeout=2.0,
)
