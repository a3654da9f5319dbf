from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.text import slugify
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from . import inputs, llm, quotas, refusals, selectors, services, sharing
from .health import health_report
from .models import ChatModel, Conversation, SystemPrompt


class AuthenticatedHttpRequest(HttpRequest):
    """The request of a `login_required` view: its user is signed in."""

    user: User


@login_required
@never_cache
def new_chat(request: AuthenticatedHttpRequest) -> HttpResponse:
    return _chat_page(request, None)


@login_required
@never_cache
def conversation_detail(request: AuthenticatedHttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    conversation = _own_or_404(request, conversation_id)
    return _chat_page(request, conversation)


def _own_or_404(request: AuthenticatedHttpRequest, conversation_id: uuid.UUID) -> Conversation:
    try:
        return selectors.conversation_for_user(user=request.user, conversation_id=conversation_id)
    except refusals.Refusal as refusal:
        raise Http404(refusal.message) from None


# The page's script builds no address itself: "{id}" stands for a conversation.
_ANY = uuid.UUID(int=0)


def _page_urls() -> dict[str, str]:
    def per_conversation(name: str) -> str:
        return reverse(f"chat:{name}", kwargs={"conversation_id": _ANY}).replace(str(_ANY), "{id}")

    return {
        "home": reverse("chat:new"),
        "login": reverse("login"),
        "list": reverse("chat:list"),
        "conversation": per_conversation("conversation"),
        "rename": per_conversation("rename"),
        "delete": per_conversation("delete"),
        "exportMd": per_conversation("export_md"),
        "exportJson": per_conversation("export_json"),
        "share": per_conversation("share"),
        "files": reverse("files:upload"),
        "file": reverse("files:content", kwargs={"file_id": _ANY}).replace(str(_ANY), "{id}"),
    }


def _chat_page(request: AuthenticatedHttpRequest, conversation: Conversation | None) -> HttpResponse:
    prompts = list(SystemPrompt.objects.only("id", "name", "is_default", "model"))
    default_prompt = next((p for p in prompts if p.is_default), None)
    chat_models = ChatModel.choices()
    labels = {m.name: m.display for m in chat_models}
    default_model = llm.resolve_model(prompt_model=default_prompt.model if default_prompt else "")
    shown_model = conversation.chosen_model if conversation else ""
    sidebar, next_cursor = selectors.sidebar_page(user=request.user)
    context = {
        "conversation": conversation,
        "conversations": sidebar,
        "conversations_next": next_cursor,
        "messages": selectors.messages_for_page(conversation) if conversation else [],
        "prompts": prompts,
        "default_prompt": default_prompt,
        "chat_models": chat_models,
        "default_model": labels.get(default_model, default_model),
        "conversation_model": ChatModel.label_of(shown_model) if shown_model else "",
        "demo_mode": llm.is_demo(),
        "sharing_on": sharing.mode() != "off",
        "chat_config": {
            "wsPath": "/ws/chat/",
            "urls": _page_urls(),
            "conversation": str(conversation.id) if conversation else None,
            "maxChars": settings.CHAT_MAX_MESSAGE_CHARS,
            "demo": llm.is_demo(),
            "currency": settings.CHAT_CURRENCY,
            "sharing": sharing.mode() != "off",
            "conversationsNext": next_cursor,
            "files": {
                "maxBytes": settings.CHAT_FILE_MAX_BYTES,
                "maxPerMessage": settings.CHAT_FILE_MAX_PER_MESSAGE,
            },
        },
    }
    return render(request, "conversations/chat.html", context)


@login_required
@require_GET
def conversation_list(request: AuthenticatedHttpRequest) -> JsonResponse:
    """The sidebar, a page at a time: `?cursor=` from the previous page's
    `next`, `?q=` to search titles and message text."""
    try:
        page, next_cursor = selectors.sidebar_page(
            user=request.user,
            cursor=request.GET.get("cursor") or None,
            query=request.GET.get("q", "")[:200],
        )
    except selectors.BadCursor:
        return JsonResponse({"error": "Bad cursor."}, status=400)
    return JsonResponse({"conversations": [selectors.sidebar_item(c) for c in page], "next": next_cursor})


@login_required
@require_POST
def conversation_rename(request: AuthenticatedHttpRequest, conversation_id: uuid.UUID) -> JsonResponse:
    conversation = _own_or_404(request, conversation_id)
    title = _posted(request).get("title")
    try:
        services.conversation_rename(conversation=conversation, title=title if isinstance(title, str) else "")
    except services.InvalidTitle as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    return JsonResponse({"conversation": {"id": str(conversation.pk), "title": conversation.title}})


@login_required
@require_POST
def conversation_delete(request: AuthenticatedHttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    conversation = _own_or_404(request, conversation_id)
    services.conversation_delete(conversation=conversation)
    if (
        request.headers.get("Accept", "").startswith("application/json")
        or request.content_type == "application/json"
    ):
        return JsonResponse({"deleted": str(conversation_id)})
    return redirect("chat:new")


def _posted(request: HttpRequest) -> dict[str, Any]:
    if request.content_type == "application/json":
        try:
            body = inputs.load_json(request.body or b"{}")
        except inputs.BadInput:
            return {}
        return body if isinstance(body, dict) else {}
    return request.POST.dict()


@login_required
@require_GET
def conversation_export(
    request: AuthenticatedHttpRequest, conversation_id: uuid.UUID, fmt: str
) -> HttpResponse:
    conversation = _own_or_404(request, conversation_id)
    name = slugify(conversation.display_title)[:60] or "conversation"
    if fmt == "md":
        response = HttpResponse(
            selectors.export_markdown(conversation), content_type="text/markdown; charset=utf-8"
        )
    else:
        response = JsonResponse(selectors.export_json(conversation), json_dumps_params={"indent": 2})
    response["Content-Disposition"] = f'attachment; filename="{name}.{fmt}"'
    return response


@require_GET
async def healthz(request: HttpRequest) -> JsonResponse:
    report = await health_report()
    return JsonResponse(report, status=200 if report["ok"] else 503)


@login_required
def usage(request: AuthenticatedHttpRequest) -> HttpResponse:
    """What the user spent today and this month, and what is left."""
    limits, windows = quotas.usage_summary(request.user)
    return render(
        request,
        "accounts/usage.html",
        {"limits": limits, "windows": windows, "now": timezone.now()},
    )
