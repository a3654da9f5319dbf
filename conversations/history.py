"""What is sent upstream for one answer: the system prompt, then the most
recent turns of THIS conversation that fit the context budget."""

from __future__ import annotations

from collections.abc import Sequence

from django.conf import settings

from .llm import ChatMessage, estimate_tokens
from .models import Conversation, Message

# Every message costs a few tokens of framing on top of its text.
PER_MESSAGE_OVERHEAD = 4


def message_tokens(content: str) -> int:
    return estimate_tokens(content) + PER_MESSAGE_OVERHEAD


def fit_history(system_prompt: str, turns: Sequence[ChatMessage], budget: int) -> list[ChatMessage]:
    """Keep the system prompt and the newest turn always; add older turns,
    newest first, while they fit in `budget` tokens."""
    head: list[ChatMessage] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if not turns:
        return head
    used = sum(message_tokens(m["content"]) for m in head) + message_tokens(turns[-1]["content"])
    kept = [turns[-1]]
    for turn in reversed(turns[:-1]):
        cost = message_tokens(turn["content"])
        if used + cost > budget:
            break
        used += cost
        kept.append(turn)
    kept.reverse()
    # An answer without the question that prompted it only confuses the model.
    while len(kept) > 1 and kept[0]["role"] == "assistant":
        kept.pop(0)
    return head + kept


def build_messages(
    conversation: Conversation, *, upto: Message, budget: int | None = None
) -> list[ChatMessage]:
    """The messages for the answer that follows `upto` (the question, or the
    truncated answer being continued): it and every earlier message of this
    conversation on the active path that has text; replaced versions and the
    answer being written are left out."""
    rows = (
        Message.objects.filter(conversation=conversation, is_active=True, created_at__lte=upto.created_at)
        .exclude(status=Message.Status.STREAMING)
        .exclude(content="")
        .order_by("created_at")
        .values_list("role", "content")
    )
    turns = [{"role": role, "content": content} for role, content in rows]
    return fit_history(
        conversation.prompt_text,
        turns,
        settings.CHAT_CONTEXT_TOKENS if budget is None else budget,
    )
