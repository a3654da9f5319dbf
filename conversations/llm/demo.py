"""The offline demo model: what answers when no model is configured (no
OPENAI_API_KEY and no OPENAI_BASE_URL). A clearly labelled canned reply,
streamed like a real one; no network. A backend of `llm` like the real one:
callers never ask which of the two they talk to."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Sequence

from .types import (
    ChatMessage,
    Completion,
    StreamEnd,
    StreamEvent,
    TextDelta,
    Usage,
    content_text,
    content_tokens,
    estimate_tokens,
)

DEMO_MODEL = "demo"
DEMO_DELAY = 0.02  # seconds between demo tokens: enough to watch it stream


def demo_answer(question: str, parts: int = 0) -> str:
    """`parts`: how many content parts the question came with (its files)."""
    excerpt = " ".join(question.split())[:200]
    files = f"It came with {parts} content parts: your files, as a model reads them.\n\n" if parts else ""
    return (
        "**Demo mode.** No model is configured, so this is a canned answer from the "
        "offline demo model, not an AI.\n\n"
        f"You wrote: _{excerpt}_\n\n"
        f"{files}"
        "To chat with a real model, set `OPENAI_API_KEY` (and `OPENAI_MODEL`), or "
        "`OPENAI_BASE_URL` for any OpenAI-compatible server such as Ollama or vLLM, "
        "then restart the server. For example:\n\n"
        "```sh\nOPENAI_BASE_URL=http://127.0.0.1:11434/v1 OPENAI_MODEL=llama3.2 make run\n```\n"
    )


def demo_title(question: str) -> str:
    """The demo model's title: the question's first words, as a person would."""
    words = question.split()
    title = " ".join(words[:6]).strip(" .,:;!?")
    return (title[:1].upper() + title[1:] + ("…" if len(words) > 6 else "")) or "New chat"


def _prompt_tokens(messages: Sequence[ChatMessage]) -> int:
    return sum(content_tokens(message.get("content")) + 4 for message in messages)


async def stream(messages: Sequence[ChatMessage]) -> AsyncGenerator[StreamEvent, None]:
    """The demo's answer, a word at a time (it offers no tools and calls none)."""
    content = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    answer = demo_answer(content_text(content), 0 if isinstance(content, str) else len(content))
    words = answer.split(" ")
    for i, word in enumerate(words):
        await asyncio.sleep(DEMO_DELAY)
        yield TextDelta(word if i == len(words) - 1 else word + " ")
    yield StreamEnd(
        finish_reason="stop",
        usage=Usage(prompt_tokens=_prompt_tokens(messages), completion_tokens=estimate_tokens(answer)),
        model=DEMO_MODEL,
    )


def complete(messages: Sequence[ChatMessage], *, json_object: bool, demo_text: str | None) -> Completion:
    """A short completion: `demo_text`, or a title made of the question's first words."""
    question = next((content_text(m["content"]) for m in messages if m["role"] == "user"), "")
    text = demo_text if demo_text is not None else demo_title(question)
    if json_object:
        text = json.dumps({"title": text}, ensure_ascii=False)
    return Completion(text, Usage(_prompt_tokens(messages), estimate_tokens(text)), DEMO_MODEL)
