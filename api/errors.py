"""Errors in OpenAI's shape: `{"error": {"message", "type", "code"}}` with
the status a client of the OpenAI API expects."""

from __future__ import annotations

import math

from django.http import JsonResponse

from conversations import llm, refusals
from conversations.generation.events import upstream_code

TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "api_error",
    503: "api_error",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        *,
        retry_after: float | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after
        self.param = param

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": TYPES.get(self.status, "api_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JsonResponse:
        response = JsonResponse(self.body(), status=self.status)
        if self.retry_after is not None:
            response["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return response


# A refusal of the rules (conversations/refusals.py) as OpenAI's clients expect it.
REFUSALS = {
    refusals.NOT_FOUND: (404, "not_found"),
    refusals.RATE_LIMITED: (429, "rate_limit_exceeded"),
    refusals.QUOTA_EXCEEDED: (429, "insufficient_quota"),
    refusals.BUSY: (409, "busy"),
    refusals.INVALID: (400, "invalid_request"),
    refusals.RESENT: (409, "duplicate"),
    refusals.SIGNED_OUT: (401, "invalid_api_key"),  # not for tokens; for completeness
}


def from_refusal(refusal: refusals.Refusal) -> ApiError:
    status, code = REFUSALS[refusal.code]
    return ApiError(status, refusal.message, code, retry_after=refusal.retry_after)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request", param=param)


def from_llm(exc: llm.LLMError) -> ApiError:
    """A failed model call: the client's fault (400) only when the model
    service refused the request itself; otherwise the upstream's (502/503)."""
    if isinstance(exc, llm.ContextTooLong):
        return ApiError(400, exc.user_message, "context_length_exceeded")
    if isinstance(exc, llm.UpstreamBadRequest) and not exc.fallback:
        return ApiError(400, exc.user_message, "upstream_rejected")
    if isinstance(exc, llm.UpstreamRateLimited | llm.UpstreamUnavailable):
        return ApiError(503, exc.user_message, upstream_code(exc), retry_after=exc.retry_after)
    return ApiError(502, exc.user_message, upstream_code(exc))
