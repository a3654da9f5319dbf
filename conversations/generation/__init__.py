"""The life of one answer, one module per job:

- `events`: the contract's events and payloads;
- `turns`: accepting a turn with every rule (ownership, idempotency, rate
  limit, one streaming answer per conversation, budget) and its history;
- `batches`: database work that arrives together (sends, ends, titles),
  done in one call;
- `runner`: running an answer, its checkpoints, stop and finish;
- `fanout`: the answer's log and how frames reach every follower, in this
  process and in other workers;
- `ledger`: usage rows, prices and quota settlement;
- `titles`: model-made titles;
- `recovery`: answers whose process died;
- `process`: this worker: its caretaker (settles dead workers' answers) and
  its drain on SIGTERM.

Knows nothing of websockets or HTTP: interfaces call the names below.
"""

from __future__ import annotations

from ..database import in_database
from .events import Frame, message_payload, user_topic
from .fanout import get_hub, tell
from .follow import last_answer_finished
from .identity import WORKER_ID
from .process import draining, this_worker
from .recovery import sweep_interrupted
from .runner import accept_send, launch, release_connections, request_stop, wait_all
from .turns import (
    CONTINUE_INSTRUCTION,
    Accepted,
    accept_continue,
    accept_edit,
    accept_message,
    accept_regenerate,
    check_owner,
)

__all__ = [
    "CONTINUE_INSTRUCTION",
    "WORKER_ID",
    "Accepted",
    "Frame",
    "accept_continue",
    "accept_edit",
    "accept_message",
    "accept_regenerate",
    "accept_send",
    "check_owner",
    "draining",
    "get_hub",
    "in_database",
    "last_answer_finished",
    "launch",
    "message_payload",
    "release_connections",
    "request_stop",
    "sweep_interrupted",
    "tell",
    "this_worker",
    "user_topic",
    "wait_all",
]
