from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.db.models import F, Window
from django.db.models.functions import RowNumber
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.text import slugify
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from . import inputs, llm, projects, quotas, refusals, selectors, services, sharing
from .health import health_report
from .models import ChatModel, Conversation, Project, SystemPrompt


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
        "project": reverse("chat:project", kwargs={"project_id": _ANY}).replace(str(_ANY), "{id}"),
    }


PROJECT_CHATS_SHOWN = 8  # of each project, in the sidebar (the project's page lists them all)
PROJECT_PAGE_CHATS = 200  # listed on a project's page


def _sidebar_projects(user: User, shown: Conversation | None = None) -> list[Project]:
    """The user's projects, each with its newest chats (`recent`) and how many
    it holds, in two queries however many projects there are. The chat
    `shown` is listed under its project even when older than the newest
    ones (the page moves it to the top when it gets a message)."""
    found = projects.listing(user, with_counts=True)
    if not found:
        return found
    newest = (
        Conversation.objects.filter(project__in=found)
        .annotate(rank=Window(RowNumber(), partition_by=F("project_id"), order_by=F("updated_at").desc()))
        .filter(rank__lte=PROJECT_CHATS_SHOWN)
        .only("id", "title", "updated_at", "project_id")
        .order_by("project_id", "rank")
    )
    recent: dict[Any, list[Conversation]] = {}
    for conversation in newest:
        recent.setdefault(conversation.project_id, []).append(conversation)
    for p in found:
        chats = recent.get(p.pk, [])
        if shown is not None and shown.project_id == p.pk and all(c.pk != shown.pk for c in chats):
            chats.append(shown)
        p.recent = chats  # type: ignore[attr-defined]
    return found


def _chat_page(
    request: AuthenticatedHttpRequest, conversation: Conversation | None, project: Project | None = None
) -> HttpResponse:
    if conversation is not None and conversation.project_id is not None:
        project = Project.objects.filter(pk=conversation.project_id).first()
    prompts = list(SystemPrompt.objects.only("id", "name", "is_default", "model"))
    default_prompt = next((p for p in prompts if p.is_default), None)
    if project is not None and project.prompt_id is not None:  # a new chat here starts with the project's
        default_prompt = next((p for p in prompts if p.pk == project.prompt_id), default_prompt)
    chat_models = ChatModel.choices()
    labels = {m.name: m.display for m in chat_models}
    default_model = llm.resolve_model(prompt_model=default_prompt.model if default_prompt else "")
    shown_model = conversation.chosen_model if conversation else ""
    sidebar, next_cursor = selectors.sidebar_page(user=request.user, outside_projects=True)
    project_files = projects.file_records(project) if project is not None else []
    project_chats = (
        list(
            Conversation.objects.filter(project=project)
            .only("id", "title", "updated_at")
            .order_by("-updated_at")[:PROJECT_PAGE_CHATS]
        )
        if project is not None and conversation is None
        else []
    )
    context = {
        "project": project,
        "project_files": project_files,
        "project_chats": project_chats,
        "projects": _sidebar_projects(request.user, conversation),
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
            # A new chat started here goes into this project (message.send `project`).
            "project": str(project.pk) if project is not None and conversation is None else None,
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
            outside_projects=True,  # the page lists a project's chats under the project
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


# --- Projects on the page -------------------------------------------------------------------


def _own_project_or_404(request: AuthenticatedHttpRequest, project_id: uuid.UUID) -> Project:
    try:
        return projects.own(request.user, project_id)
    except refusals.Refusal as refusal:
        raise Http404(refusal.message) from None


@login_required
@never_cache
def project_chat(request: AuthenticatedHttpRequest, project_id: uuid.UUID) -> HttpResponse:
    """A project's page: a new chat in it (the composer sends `project`), its
    instructions and files above, its chats in the sidebar."""
    return _chat_page(request, None, _own_project_or_404(request, project_id))


def _form_values(request: HttpRequest) -> dict[str, Any]:
    post = request.POST
    return {
        "name": post.get("name", ""),
        "instructions": post.get("instructions", ""),
        "file_ids": [uuid.UUID(v) for v in post.getlist("files")[:1000] if _is_uuid(v)],
        "model": post.get("model", ""),
        "prompt": post.get("prompt") or None,
    }


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _project_form(
    request: AuthenticatedHttpRequest, project: Project | None, *, error: str = "", status: int = 200
) -> HttpResponse:
    from files.models import File

    held = [f["id"] for f in projects.file_records(project)] if project else []
    chosen = set(request.POST.getlist("files")) if request.method == "POST" else set(held)
    documents = (
        File.objects.filter(owner=request.user)
        .exclude(kind=File.Kind.IMAGE)
        .defer("text")
        .order_by("-created_at")
    )
    # The newest documents, and always the project's own (however old: a save keeps them).
    shown = list(documents[:200])
    missing = set(held) - {str(f.pk) for f in shown}
    if missing:
        shown += list(documents.filter(pk__in=missing))
    context = {
        "project": project,
        "values": request.POST if request.method == "POST" else None,
        "documents": [(f, str(f.pk) in chosen) for f in shown],
        "chat_models": ChatModel.choices(),
        "prompts": SystemPrompt.objects.only("id", "name"),
        "error": error,
        "max_instructions": settings.CHAT_PROJECT_INSTRUCTIONS_CHARS,
        "context_tokens": settings.CHAT_PROJECT_CONTEXT_TOKENS,
    }
    return render(request, "conversations/project_form.html", context, status=status)


def _upload_into(request: AuthenticatedHttpRequest) -> list[uuid.UUID]:
    """Files chosen in the form's upload field: taken in as any upload is."""
    from asgiref.sync import async_to_sync

    from files import uploads
    from files.sniff import Refused

    ids = []
    for upload in request.FILES.getlist("upload"):
        try:
            made = async_to_sync(uploads.upload)(request.user, upload.name or "file", upload.read())
        except Refused as exc:
            raise refusals.invalid(f"{(upload.name or 'file')[:100]}: {exc.message}") from None
        ids.append(made.pk)
    return ids


@login_required
@never_cache
def project_new(request: AuthenticatedHttpRequest) -> HttpResponse:
    if request.method != "POST":
        return _project_form(request, None)
    try:
        values = _form_values(request)
        projects.check(request.user, **values)  # before any upload is stored
        values["file_ids"] = [*values["file_ids"], *_upload_into(request)]
        project = services.project_create(request.user, **values)
    except refusals.Refusal as refusal:
        return _project_form(request, None, error=refusal.message, status=400)
    return redirect("chat:project", project_id=project.pk)


@login_required
@never_cache
def project_edit(request: AuthenticatedHttpRequest, project_id: uuid.UUID) -> HttpResponse:
    project = _own_project_or_404(request, project_id)
    if request.method != "POST":
        return _project_form(request, project)
    try:
        values = _form_values(request)
        projects.check(request.user, **values)  # before any upload is stored
        values["file_ids"] = [*values["file_ids"], *_upload_into(request)]
        services.project_update(project, **values)
    except refusals.Refusal as refusal:
        return _project_form(request, project, error=refusal.message, status=400)
    return redirect("chat:project", project_id=project.pk)


@login_required
@require_POST
def project_delete(request: AuthenticatedHttpRequest, project_id: uuid.UUID) -> HttpResponse:
    """Delete a project; its chats go too only when the form says so."""
    project = _own_project_or_404(request, project_id)
    services.project_delete(project, with_chats=request.POST.get("chats") == "delete")
    return redirect("chat:new")


@login_required
@require_POST
def conversation_move(request: AuthenticatedHttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    """Move a chat into one of the user's projects, or out (`project` empty)."""
    conversation = _own_or_404(request, conversation_id)
    posted = _posted(request)
    if "project" not in posted:
        return JsonResponse({"error": "Say which project (`project`: an id, or empty for none)."}, status=400)
    try:
        services.conversation_move(request.user, conversation, posted["project"] or None)
    except refusals.Refusal as refusal:
        raise Http404(refusal.message) from None
    if request.content_type == "application/json":
        moved = str(conversation.project_id) if conversation.project_id else None
        return JsonResponse({"conversation": {"id": str(conversation.pk), "project": moved}})
    return redirect("chat:conversation", conversation_id=conversation.pk)
