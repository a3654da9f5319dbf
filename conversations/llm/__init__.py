"""The model boundary: the ONLY package that talks to the model, through the
openai SDK (`AsyncOpenAI` on its aiohttp backend, raw lines, no object per
chunk), split by job:

- `types`: what the rest of the project sees (deltas, the stream's end,
  usage, tool calls, completions);
- `errors`: how a call goes wrong, with reasons of this package's own (the
  interfaces map them to their codes); the SDK's exceptions mapped once;
- `client`: the SDK's client, one per event loop;
- `streaming`: one streamed chat completion, with fallback models;
- `completion`: one short completion (titles, summaries);
- `demo`: the offline demo model, a backend like the real one: without an
  API key and without a base URL it answers, and callers never ask which;
- `redaction`: upstream words made safe for a page and a log.

`resolve_model` is the one answer to "which model answers here".
"""

from __future__ import annotations

from django.conf import settings

from .client import close
from .completion import complete_chat, no_json_output
from .demo import DEMO_MODEL
from .errors import (
    REASONS,
    ContextTooLong,
    IncompleteStream,
    LLMError,
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from .redaction import redact
from .streaming import is_demo, no_tools, stream_chat
from .types import (
    IMAGE_TOKENS,
    ChatMessage,
    Completion,
    StreamEnd,
    StreamEvent,
    TextDelta,
    ToolCall,
    Usage,
    content_text,
    content_tokens,
    estimate_tokens,
)

__all__ = [
    "DEMO_MODEL",
    "IMAGE_TOKENS",
    "REASONS",
    "ChatMessage",
    "Completion",
    "ContextTooLong",
    "IncompleteStream",
    "LLMError",
    "StreamEnd",
    "StreamEvent",
    "TextDelta",
    "ToolCall",
    "UpstreamAuthError",
    "UpstreamBadRequest",
    "UpstreamRateLimited",
    "UpstreamUnavailable",
    "Usage",
    "close",
    "complete_chat",
    "content_text",
    "content_tokens",
    "estimate_tokens",
    "forget_refusals",
    "is_demo",
    "redact",
    "resolve_model",
    "stream_chat",
]


def resolve_model(chosen: str = "", prompt_model: str = "") -> str:
    """The model that answers: the one picked (for a chat, a request), else
    its system prompt's, else OPENAI_MODEL; the demo model when none is
    configured."""
    if is_demo():
        return DEMO_MODEL
    return chosen or prompt_model or settings.OPENAI_MODEL


def forget_refusals() -> None:
    """Ask every server again for tools and JSON output it refused (tests)."""
    no_tools.clear()
    no_json_output.clear()
