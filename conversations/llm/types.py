"""What the rest of the project sees of a model call: plain frozen records,
never an SDK or HTTP type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# {"role": ..., "content": ...}; an assistant message that called tools has
# "tool_calls" (and content None), a tool result "tool_call_id".
ChatMessage = dict[str, Any]


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cached_tokens + other.cached_tokens,
        )


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text exactly as the model streamed it


@dataclass(frozen=True)
class StreamEnd:
    finish_reason: str
    usage: Usage | None
    model: str
    # The model asks for tools instead of (or after) text: finish_reason
    # "tool_calls". Assembled from the streamed deltas; arguments untrusted.
    tool_calls: tuple[ToolCall, ...] = ()


StreamEvent = TextDelta | StreamEnd


@dataclass(frozen=True)
class Completion:
    text: str
    usage: Usage | None
    model: str


def estimate_tokens(text: str) -> int:
    """A download-free token estimate: about four characters a token in English."""
    return (len(text) + 3) // 4


# What one image costs the model, about (OpenAI: a 1024x1024 picture in
# detail); files.uploads.IMAGE_TOKENS, the same estimate, is stored with an
# uploaded image.
IMAGE_TOKENS = 765


def content_tokens(content: str | list[dict[str, Any]] | None) -> int:
    """A message's content, estimated: a string, or content parts (text
    parts by their text, an image by IMAGE_TOKENS)."""
    if not content:
        return 0
    if isinstance(content, str):
        return estimate_tokens(content)
    return sum(
        estimate_tokens(part.get("text") or "") if part.get("type") == "text" else IMAGE_TOKENS
        for part in content
    )


def content_text(content: str | list[dict[str, Any]] | None) -> str:
    """A message's text: a string, or its text parts one after the other."""
    if not content:
        return ""
    if isinstance(content, str):
        return content
    return "\n\n".join(part.get("text") or "" for part in content if part.get("type") == "text")
