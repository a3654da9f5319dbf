"""What is sent upstream for one answer: the system prompt, then the most
recent turns of THIS conversation that fit the context budget.

The conversation is read newest-first, a page at a time, and reading stops
as soon as the budget is spent: a turn costs the same whether the chat has
ten messages or ten thousand."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django.conf import settings

from .llm import ChatMessage, estimate_tokens
from .models import Conversation, Message

# Every message costs a few tokens of framing on top of its text.
PER_MESSAGE_OVERHEAD = 4
FIRST_PAGE = 32  # most turns fit in the first page; later pages grow


def message_tokens(content: str | None) -> int:
    return estimate_tokens(content or "") + PER_MESSAGE_OVERHEAD


def _tokens(message: ChatMessage) -> int:
    calls = message.get("tool_calls") or ()
    extra = sum(estimate_tokens(c["function"]["name"] + c["function"]["arguments"]) for c in calls)
    return message_tokens(message.get("content")) + extra


def messages_tokens(messages: Iterable[ChatMessage]) -> int:
    return sum(_tokens(m) for m in messages)


def _fit_newest_first(
    system_prompt: str, newest_first: Iterable[list[ChatMessage]], budget: int
) -> list[ChatMessage]:
    """`newest_first`: units, each kept or dropped whole (an answer with its
    tool rounds: a `tool_calls` message without its results is refused)."""
    head: list[ChatMessage] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    used = messages_tokens(head)
    kept: list[list[ChatMessage]] = []
    for unit in newest_first:
        cost = messages_tokens(unit)
        if kept and used + cost > budget:  # the newest turn is always kept
            break
        used += cost
        kept.append(unit)
    kept.reverse()
    # An answer without the question that prompted it only confuses the model.
    while len(kept) > 1 and kept[0][0]["role"] == "assistant":
        kept.pop(0)
    return head + [message for unit in kept for message in unit]


def fit_history(system_prompt: str, turns: Sequence[ChatMessage], budget: int) -> list[ChatMessage]:
    """Keep the system prompt and the newest turn always; add older turns,
    newest first, while they fit in `budget` tokens."""
    return _fit_newest_first(system_prompt, ([turn] for turn in reversed(turns)), budget)


def with_tool_rounds(content: str, tool_rounds: list[dict[str, Any]] | None) -> list[ChatMessage]:
    """An answer as the Chat Completions API wants it back: for each tool
    round, the `assistant` message with its `tool_calls` and one `tool`
    message per call (with its `tool_call_id`); then the answer's text."""
    messages: list[ChatMessage] = []
    for round_ in tool_rounds or ():
        messages.append(
            {
                "role": "assistant",
                "content": round_.get("text") or None,
                "tool_calls": [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["name"], "arguments": c["arguments"]},
                    }
                    for c in round_["calls"]
                ],
            }
        )
        messages.extend(
            {"role": "tool", "tool_call_id": r["call_id"], "content": r["content"]} for r in round_["results"]
        )
    if content:
        messages.append({"role": "assistant", "content": content})
    return messages


def _newest_first(conversation: Conversation, upto: Message) -> Iterable[list[ChatMessage]]:
    """The active, non-empty, settled messages up to `upto`, newest first, a
    page at a time (keyset on created_at, pk): stops reading when the caller
    stops iterating."""
    rows = (
        Message.objects.filter(conversation=conversation, is_active=True)
        .exclude(status=Message.Status.STREAMING)
        .exclude(content="", tool_rounds__isnull=True)
        .order_by("-created_at", "-pk")
        .values_list("role", "content", "tool_rounds", "created_at", "pk")
    )
    page = rows.filter(created_at__lte=upto.created_at)
    size = FIRST_PAGE
    while True:
        batch = list(page[:size])
        for role, content, tool_rounds, _created, _pk in batch:
            if tool_rounds:
                yield with_tool_rounds(content, tool_rounds)
            else:
                yield [{"role": role, "content": content}]
        if len(batch) < size:
            return
        _, _, _, created, pk = batch[-1]
        page = rows.filter(created_at__lte=created).exclude(created_at=created, pk__gte=pk)
        size *= 4


def build_messages(
    conversation: Conversation, *, upto: Message, budget: int | None = None
) -> list[ChatMessage]:
    """The messages for the answer that follows `upto` (the question, or the
    truncated answer being continued): it and every earlier message of this
    conversation on the active path that has text; replaced versions and the
    answer being written are left out."""
    return _fit_newest_first(
        conversation.prompt_text,
        _newest_first(conversation, upto),
        settings.CHAT_CONTEXT_TOKENS if budget is None else budget,
    )
