"""A refusal: what the rules say when they refuse a turn, a call or a look
at a conversation. One type for every rule, with a `code` (the contract's
error code), a message for a person (written once, here) and, where
waiting helps, `retry_after` in seconds. Each interface has one small table
from code to its own shape: the socket's `error` frame (consumers.py),
an HTTP status (api/errors.py), a line in the terminal (`manage.py chat`).
"""

from __future__ import annotations

from typing import Any

# The codes, as the websocket contract names its errors (and one that is no
# error there: a frame sent again is shown, not refused).
RESENT = "resent"  # the same client_id again: nothing new is stored (`sent`: the stored question)
NOT_FOUND = "not_found"  # also someone else's: never reveal that it exists
RATE_LIMITED = "rate_limited"
BUSY = "busy"  # an answer is still being written in this conversation
INVALID = "invalid_request"  # a well-formed request that cannot be done
QUOTA_EXCEEDED = "quota_exceeded"
SIGNED_OUT = "signed_out"  # a socket's sign-in ended: the socket is closed (4401), no frame
CODES = (RESENT, NOT_FOUND, RATE_LIMITED, BUSY, INVALID, QUOTA_EXCEEDED, SIGNED_OUT)


class Refusal(Exception):
    def __init__(self, code: str, message: str, *, retry_after: int | None = None, sent: Any = None) -> None:
        super().__init__(message)
        assert code in CODES, code
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.sent = sent  # RESENT: the question stored the first time

    def __repr__(self) -> str:
        return f"Refusal({self.code!r}, {self.message!r})"


def resent(message: Any) -> Refusal:
    return Refusal(RESENT, "Already sent.", sent=message)


def not_found(what: str = "conversation") -> Refusal:
    return Refusal(NOT_FOUND, f"No such {what}.")


def rate_limited(retry_after: int) -> Refusal:
    return Refusal(RATE_LIMITED, f"Too many messages. Try again in {retry_after} s.", retry_after=retry_after)


def busy() -> Refusal:
    return Refusal(BUSY, "An answer is still being written in this conversation.")


def invalid(message: str) -> Refusal:
    return Refusal(INVALID, message)


def over_quota(message: str, retry_after: int) -> Refusal:
    return Refusal(QUOTA_EXCEEDED, message, retry_after=retry_after)


def signed_out() -> Refusal:
    return Refusal(SIGNED_OUT, "You are signed out. Log in again.")
