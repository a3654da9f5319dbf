"""Answers whose process died: found by their worker id (a process of this
machine that no longer exists) or by staleness, and marked `interrupted`."""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from ..models import Message

log = logging.getLogger(__name__)

# Which process runs an answer: lets a restarted process tell its own dead
# answers from the live answers of another worker.
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"[:100]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worker_dead(worker: str, *, include_self: bool) -> bool:
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's worker: only staleness can tell
    if worker == WORKER_ID:
        return include_self
    return not _pid_alive(int(pid))


def sweep_interrupted(*, stale_after: float | None = None, at_startup: bool = False) -> int:
    """Mark answers left `streaming` by a dead process as `interrupted`.

    Dead means: run by a process of this machine that no longer exists (at
    start-up this process's own id counts too, as it has run nothing yet), or
    not checkpointed for `stale_after` seconds, whoever ran it.
    """
    stale_after = settings.CHAT_STALE_AFTER if stale_after is None else stale_after
    streaming = Message.objects.filter(status=Message.Status.STREAMING)
    cutoff = timezone.now() - timedelta(seconds=stale_after)
    ids = set(streaming.filter(updated_at__lt=cutoff).values_list("pk", flat=True))
    for pk, worker in streaming.exclude(pk__in=ids).values_list("pk", "worker"):
        if _worker_dead(worker, include_self=at_startup):
            ids.add(pk)
    if not ids:
        return 0
    count = Message.objects.filter(pk__in=ids, status=Message.Status.STREAMING).update(
        status=Message.Status.INTERRUPTED, worker="", updated_at=timezone.now()
    )
    log.warning("marked %d answer(s) left streaming by a dead process as interrupted", count)
    return count
