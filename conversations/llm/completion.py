"""One short, non-streamed completion (titles, summaries), through the SDK;
its JSON read here (no object per reply)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import httpx2
import openai
from django.conf import settings

from . import demo
from .client import client
from .errors import LLMError, from_sdk
from .streaming import is_demo, usage_of
from .types import ChatMessage, Completion

log = logging.getLogger("conversations.llm")

# Models whose server refused `response_format` once: asked in plain text since.
no_json_output: set[tuple[str, str]] = set()


async def complete_chat(
    messages: Sequence[ChatMessage],
    *,
    model: str | None = None,
    max_tokens: int = 64,
    json_object: bool = False,
    demo_text: str | None = None,
) -> Completion:
    """`json_object`: ask for JSON output (`response_format`) where the server
    supports it; a server that refuses it (HTTP 400) is asked again in plain
    text, and remembered. A refused request costs nothing. `demo_text`: what
    the demo model answers (default: a title made of the question's first
    words)."""
    if is_demo():
        return demo.complete(messages, json_object=json_object, demo_text=demo_text)
    model = model or settings.OPENAI_MODEL
    key = (settings.OPENAI_BASE_URL, model)
    asked_json = json_object and key not in no_json_output
    try:
        try:
            reply = await _post(messages, model, max_tokens, json_output=asked_json)
        except openai.BadRequestError:
            if not asked_json:
                raise
            log.info("%s refused JSON output; asking in plain text from now on", model)
            no_json_output.add(key)
            reply = await _post(messages, model, max_tokens, json_output=False)
    except openai.APIError as exc:
        raise from_sdk(exc, model) from None
    if not isinstance(reply, dict):
        raise LLMError("The model service answered with something that is not a completion.")
    choices = reply.get("choices") or []
    message = (choices[0].get("message") if choices and isinstance(choices[0], dict) else None) or {}
    text = message.get("content") if isinstance(message, dict) else None
    usage = usage_of(reply["usage"]) if isinstance(reply.get("usage"), dict) else None
    return Completion((text if isinstance(text, str) else "").strip(), usage, reply.get("model") or model)


async def _post(messages: Sequence[ChatMessage], model: str, max_tokens: int, *, json_output: bool) -> Any:
    body: dict[str, Any] = {
        "model": model,
        "messages": list(messages),
        "max_tokens": max_tokens,
        "temperature": 0.2,
    }
    if json_output:
        body["response_format"] = {"type": "json_object"}
    # The SDK's request, its raw answer (see streaming.py).
    response = await client().post("/chat/completions", body=body, cast_to=httpx2.Response)
    try:
        return json.loads(response.content)
    except ValueError:
        raise LLMError("The model service answered with something that is not JSON.") from None
