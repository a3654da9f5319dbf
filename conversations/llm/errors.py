"""How a model call goes wrong, in this package's own words.

Each error has a `reason` (REASONS) and a `user_message` for a person; the
interfaces above map the reason to their own codes (the websocket's error
codes, HTTP statuses). The openai SDK's exceptions are mapped here, once
(`from_sdk`, `from_broken_stream`); none of them, nor their messages (which
quote the upstream's body, a key included), leave this package.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Mapping
from typing import Any

import httpx2
import openai

from .redaction import redact

log = logging.getLogger("conversations.llm")

REASONS = (
    "failed",  # something else went wrong
    "unauthorized",  # the upstream refused our credentials
    "rate_limited",  # the upstream is rate limiting us
    "unavailable",  # unreachable, too slow, 5xx
    "rejected",  # the upstream refused this request (a bad parameter, an unknown model)
    "context_too_long",  # ... because the conversation is too long for the model
    "incomplete",  # the stream broke off, or ended without a finish_reason
)


class LLMError(Exception):
    """A model call went wrong; `reason` says how (one of REASONS)."""

    reason = "failed"
    user_message = "The model service returned an error."
    fallback = False  # another model may do better (OPENAI_FALLBACK_MODELS)

    def __init__(
        self, detail: str = "", *, retry_after: float | None = None, user_message: str | None = None
    ) -> None:
        super().__init__(detail or user_message or self.user_message)
        self.retry_after = retry_after
        if user_message:
            self.user_message = user_message  # this error's own words, e.g. with the upstream's reason


class UpstreamAuthError(LLMError):
    reason = "unauthorized"
    user_message = "The model service refused our credentials. An administrator must fix the API key."


class UpstreamRateLimited(LLMError):
    reason = "rate_limited"
    fallback = True
    user_message = "The model service is rate limiting us. Try again shortly."


class UpstreamUnavailable(LLMError):
    reason = "unavailable"
    fallback = True
    user_message = "The model service is unreachable or too slow right now. Try again shortly."


class UpstreamBadRequest(LLMError):
    reason = "rejected"
    user_message = "The model service rejected the request."


class ContextTooLong(UpstreamBadRequest):
    reason = "context_too_long"
    user_message = "This conversation is too long for the model. Start a new chat."


class IncompleteStream(LLMError):
    reason = "incomplete"
    user_message = "The model's answer was cut off before it finished."


# --- The SDK's exceptions, mapped once ------------------------------------------------


def from_sdk(exc: openai.APIError, model: str = "") -> LLMError:
    """The error to show for a failed call; the upstream's reason goes to
    the log for staff and, where the person can act on it, to the page."""
    if not isinstance(exc, openai.APIStatusError):
        timed_out = isinstance(exc, openai.APITimeoutError)
        log.warning("model call failed: %s", "timed out" if timed_out else f"{type(exc.__cause__).__name__}")
        if timed_out:
            return UpstreamUnavailable("The model service timed out.")
        return UpstreamUnavailable("Could not connect to the model service.")
    status, headers = exc.status_code, exc.response.headers
    error = _error_object(exc.body)
    reason = redact(error["message"]) if isinstance(error.get("message"), str) and error["message"] else ""
    log.warning("model call failed: HTTP %s%s", status, f": {reason}" if reason else "")
    if status in (401, 403):
        return UpstreamAuthError()
    if status == 429:
        return UpstreamRateLimited(retry_after=retry_after(headers))
    if status in (400, 422):
        if _is_context_error(error):
            return ContextTooLong()
        if reason:
            return UpstreamBadRequest(
                reason, user_message=f"The model service rejected the request: {reason}"
            )
        return UpstreamBadRequest()
    if status == 404:
        known = f"the model “{model}”" if model else "this model"
        unknown = f"The model service does not know {known}. An administrator must pick another model."
        error_404 = UpstreamBadRequest(reason or "model not found", user_message=unknown)
        error_404.fallback = True
        return error_404
    if status >= 500:
        return UpstreamUnavailable(
            f"The model service failed (HTTP {status}).", retry_after=retry_after(headers)
        )
    return LLMError(f"HTTP {status}")


def from_broken_stream(exc: Exception) -> LLMError:
    """The body of a stream broke off midway (nothing came for OPENAI_TIMEOUT,
    a reset connection, a truncated chunk)."""
    if isinstance(exc, httpx2.TimeoutException):
        return UpstreamUnavailable("The model stopped sending mid-answer.")
    return IncompleteStream(f"The stream was cut: {type(exc).__name__}")


def from_stream_event(error: Any) -> LLMError:
    """An error event inside an otherwise good stream."""
    message = redact(error.get("message", "") if isinstance(error, dict) else str(error))
    log.warning("model stream sent an error: %s", message)
    if "context" in message.lower() and "length" in message.lower():
        return ContextTooLong()
    return LLMError(message, user_message=f"The model service reported an error: {message}")


def _error_object(body: Any) -> dict[str, Any]:
    """The JSON error a server sent (the SDK hands its `error` object, or the body)."""
    if isinstance(body, dict):
        return body["error"] if isinstance(body.get("error"), dict) else body
    return {"message": body[:1000]} if isinstance(body, str) else {}


def _is_context_error(error: dict[str, Any]) -> bool:
    text = f"{error.get('code') or ''} {error.get('message') or ''}".lower()
    return "context_length" in text or "context length" in text or "maximum context" in text


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The server's `Retry-After` (or `retry-after-ms`) in seconds, if any."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        moment = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, moment.timestamp() - time.time()) if moment else None
