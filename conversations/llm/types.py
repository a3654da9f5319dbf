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
