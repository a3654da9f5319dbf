"""Memory of a long chat: when older turns no longer fit the context budget,
a non-streamed model call folds them into the conversation's summary (its
own ledger row, kind `summary`), which is sent upstream in their place.

The summary grows incrementally: each call gets the summary so far and the
turns that overflowed since, never the whole chat again. A failed call costs
the answer nothing but memory: the overflowing turns are dropped as before,
and the log says so."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.db import transaction

from .. import llm
from ..database import in_database
from ..history import History, summary_reserve, transcript
from ..models import Conversation, TokenUsage
from .ledger import record_model_call

log = logging.getLogger(__name__)

SUMMARY_INSTRUCTION = (
    "You keep the memory of a long conversation between a user and an assistant. "
    "Rewrite the summary so far to also cover the new part of the conversation. "
    "Keep every fact the assistant may need later: names, numbers, code words, decisions, "
    "the user's preferences and open questions. Write plain sentences, in the conversation's "
    "language, at most {words} words. Reply with the summary only."
)


def summary_request(summary: str, pending: list[llm.ChatMessage], max_tokens: int) -> list[llm.ChatMessage]:
    words = max(30, max_tokens * 3 // 4)
    so_far = summary or "(none yet: this is the start of the conversation)"
    return [
        {"role": "system", "content": SUMMARY_INSTRUCTION.format(words=words)},
        {
            "role": "user",
            "content": f"Summary so far:\n{so_far}\n\nNew part of the conversation:\n{transcript(pending)}",
        },
    ]


def demo_summary(summary: str, pending: list[llm.ChatMessage], max_tokens: int) -> str:
    """The demo model's summary: the first words of each user turn, kept
    newest last within the length limit (no model, but the same life)."""
    lines = [line for line in summary.splitlines() if line]
    for message in pending:
        if message["role"] == "user" and message.get("content"):
            words = llm.content_text(message["content"]).split()
            lines.append("The user said: " + " ".join(words[:30]) + ("…" if len(words) > 30 else ""))
    while len(lines) > 1 and llm.estimate_tokens("\n".join(lines)) > max_tokens:
        lines.pop(0)
    return "\n".join(lines)


async def refresh(
    conversation: Conversation, history: History, *, answer_id: Any, limited: bool
) -> str | None:
    """Fold `history.pending` into the conversation's summary; the new
    summary, or None when the call failed (then the turns are dropped)."""
    max_tokens = max(16, summary_reserve(settings.CHAT_CONTEXT_TOKENS))
    request = summary_request(history.summary, history.pending, max_tokens)
    try:
        completion = await llm.complete_chat(
            request,
            model=conversation.chosen_model,
            max_tokens=max_tokens,
            demo_text=demo_summary(history.summary, history.pending, max_tokens),
        )
    except llm.LLMError as exc:
        log.warning(
            "summary of conversation %s failed (%s): %d older messages dropped instead",
            conversation.pk, exc, len(history.pending),
        )  # fmt: skip
        return None
    text = completion.text.strip()
    if not text:
        log.warning("summary of conversation %s came back empty: older messages dropped", conversation.pk)
        return None
    await in_database(_store)(conversation, history, text, completion, request, answer_id, limited)
    return text


def _store(
    conversation: Conversation,
    history: History,
    text: str,
    completion: llm.Completion,
    request: list[llm.ChatMessage],
    answer_id: Any,
    limited: bool,
) -> None:
    with transaction.atomic():
        record_model_call(
            user_id=conversation.owner_id,
            kind=TokenUsage.Kind.SUMMARY,
            model=completion.model,
            usage=completion.usage,
            messages=request,
            text=text,
            limited=limited,
            conversation_id=conversation.pk,
            message_id=answer_id,
        )
        Conversation.objects.filter(pk=conversation.pk).update(summary=text, summary_through=history.through)
    conversation.summary = text
    conversation.summary_through_id = history.through
