from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from . import llm
from .health import health_report
from .models import Conversation, Message, SystemPrompt, TokenUsage
from .rendering import render_markdown

SIDEBAR_SIZE = 50


@login_required
@never_cache
def new_chat(request: HttpRequest) -> HttpResponse:
    return _chat_page(request, None)


@login_required
@never_cache
def conversation_detail(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    conversation = get_object_or_404(Conversation, pk=conversation_id, owner=request.user)
    return _chat_page(request, conversation)


def _chat_page(request: HttpRequest, conversation: Conversation | None) -> HttpResponse:
    prompts = list(SystemPrompt.objects.only("id", "name", "is_default"))
    messages = _messages(conversation) if conversation else []
    context = {
        "conversation": conversation,
        "conversations": Conversation.objects.filter(owner=request.user).only("id", "title", "updated_at")[
            :SIDEBAR_SIZE
        ],
        "messages": messages,
        "prompts": prompts,
        "default_prompt": next((p for p in prompts if p.is_default), None),
        "demo_mode": llm.is_demo(),
        "chat_config": {
            "wsPath": "/ws/chat/",
            "conversation": str(conversation.id) if conversation else None,
            "maxChars": settings.CHAT_MAX_MESSAGE_CHARS,
            "demo": llm.is_demo(),
        },
    }
    return render(request, "conversations/chat.html", context)


def _messages(conversation: Conversation) -> list[Message]:
    messages = list(conversation.messages.all())
    usage = {
        row.message_id: row
        for row in TokenUsage.objects.filter(conversation=conversation, message__isnull=False)
    }
    for message in messages:
        message.html = render_markdown(message.content)
        message.usage = usage.get(message.id)
    return messages


@require_GET
async def healthz(request: HttpRequest) -> JsonResponse:
    report: dict[str, Any] = await health_report()
    return JsonResponse(report, status=200 if report["ok"] else 503)
