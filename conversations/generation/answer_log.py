"""An answer's log in Redis: the one module that knows its keys, how a frame
is written there and how the log is read back.

Every delta is XADDed to a Redis Stream per answer (`<prefix>:answer:<id>`,
entry id `<seq>-0`, fields `s` = seq and `t` = text, capped with MAXLEN):
the id makes a write sent twice (a retry after a broken connection) a
refused no-op, never a duplicate; `<prefix>:running:<conversation>` names
the streaming answer. A follower in another worker takes its snapshot
there, and catches up after its last `seq` when it missed something:
nothing depends on a capacity. Every key and pub/sub channel is under
REDIS_PREFIX (`RedisNames`), so that two sites can share a Redis server.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any

from django.conf import settings

log = logging.getLogger(__name__)

LOG_MAXLEN = 100_000  # deltas kept per answer (about 4 MB of text at the default frame rate)
LOG_TTL = 24 * 3600  # s: the log of an answer that never finished (its worker died)
FINISHED_LOG_TTL = 300  # s: a late follower of a finished answer reads the database

Command = tuple[Any, ...]
Entries = Any  # XRANGE's answer: [(entry id, {b"s": seq, b"t": text}), ...] (redis-py types it loosely)


@dataclass(frozen=True)
class Snapshot:
    answer_id: str
    seq: int
    content: str
    local: bool = True  # from this process's running answer; else from Redis


@dataclass(frozen=True)
class RedisNames:
    """Every key and pub/sub channel of this site in Redis, under REDIS_PREFIX.
    Keys live in the database of REDIS_URL; pub/sub channels are one
    namespace for the whole server, so theirs also name that database (when
    it is not 0)."""

    prefix: str
    channel_prefix: str

    @classmethod
    def for_settings(cls) -> RedisNames:
        return _names(settings.REDIS_PREFIX, settings.REDIS_URL)

    def log(self, answer_id: str) -> str:
        return f"{self.prefix}:answer:{answer_id}"

    def running(self, conversation_id: str) -> str:
        return f"{self.prefix}:running:{conversation_id}"

    def sockets(self, user_id: Any) -> str:
        return f"{self.prefix}:sockets:{user_id}"

    @property
    def topics(self) -> str:
        return f"{self.channel_prefix}:topic:"

    def topic(self, topic: str) -> str:
        return self.topics + topic

    @property
    def control(self) -> str:
        return f"{self.channel_prefix}:ctl"


@functools.lru_cache(maxsize=8)
def _names(prefix: str, url: str) -> RedisNames:
    database = 0
    with contextlib.suppress(ValueError):
        path = urllib.parse.urlsplit(url).path.strip("/")
        database = int(path or 0)
    return RedisNames(prefix, prefix if database == 0 else f"{prefix}:db{database}")


# --- Writing ------------------------------------------------------------------------------


def frame_commands(names: RedisNames, conversation_id: str, data: dict[str, Any]) -> list[Command]:
    """What a published frame writes to the log (before its PUBLISH)."""
    kind = data["type"]
    if kind == "generation.delta":
        key, seq = names.log(data["message"]), data["seq"]
        add: Command = ("XADD", key, "MAXLEN", "~", LOG_MAXLEN, f"{seq}-0", "s", seq, "t", data["text"])
        return [add, ("EXPIRE", key, LOG_TTL)] if seq == 1 else [add]
    if kind == "generation.started":
        return [("SET", names.running(conversation_id), data["message"], "EX", LOG_TTL)]
    if kind == "generation.finished":
        return [
            ("EXPIRE", names.log(data["message"]), FINISHED_LOG_TTL),
            ("DEL", names.running(conversation_id)),
        ]
    return []


def rewrite_commands(
    names: RedisNames, conversation_id: str, answer_id: str, deltas: list[tuple[int, str]]
) -> list[Command]:
    """A running answer's whole log again, from memory (Redis restarted empty)."""
    key = names.log(answer_id)
    commands: list[Command] = [("DEL", key)]
    commands += [
        ("XADD", key, "MAXLEN", "~", LOG_MAXLEN, f"{seq}-0", "s", seq, "t", text) for seq, text in deltas
    ]
    commands += [("EXPIRE", key, LOG_TTL), ("SET", names.running(conversation_id), answer_id, "EX", LOG_TTL)]
    return commands


# --- Reading ------------------------------------------------------------------------------


def snapshot_of(answer_id: str, entries: Entries) -> Snapshot:
    seq, parts = 0, []
    for _id, fields in entries:
        seq = int(fields[b"s"])
        parts.append(fields[b"t"].decode())
    return Snapshot(answer_id, seq, "".join(parts), local=False)


def deltas_of(entries: Entries, after: int) -> list[tuple[int, str]]:
    deltas = [(int(fields[b"s"]), fields[b"t"].decode()) for _id, fields in entries]
    return [(seq, text) for seq, text in deltas if seq > after]


def log_text(entries: Entries) -> str | None:
    """The text of an answer's log, or None unless it holds every delta from
    seq 1 on, once each and in order."""
    parts = []
    for expected, (_id, fields) in enumerate(entries, start=1):
        if int(fields[b"s"]) != expected:
            return None
        parts.append(fields[b"t"].decode())
    return "".join(parts) if parts else None


def shown_text(answer_id: Any) -> str | None:
    """What an answer's followers were sent, read from its log without an
    event loop (`manage.py sweep_streaming`, start-up), if there is a whole one."""
    if not settings.REDIS_URL:
        return None
    import redis

    try:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=2)
        try:
            return log_text(client.xrange(RedisNames.for_settings().log(str(answer_id))))
        finally:
            client.close()
    except Exception as exc:  # Redis away: the checkpoint is what we have
        log.warning("answer log of %s unreadable: %s", answer_id, exc)
        return None
