"""The HTTP API's projects: list, make, look at, change, delete
(conversations/projects.py holds the rules). Another user's project is 404
on every route.

    GET    /api/v1/projects                   the user's, by name
    POST   /api/v1/projects                   {"name", "instructions", "files": [ids], "model", "prompt"}
    GET    /api/v1/projects/{id}              with its files (and what a chat reads of each)
    PATCH  /api/v1/projects/{id}              any of the fields above
    DELETE /api/v1/projects/{id}[?conversations=delete]   its chats stay (out of it) unless asked
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from conversations import attachments, generation, projects, services
from conversations.models import Conversation

from . import parsing
from .errors import bad_request
from .views import endpoint

if TYPE_CHECKING:
    from django.contrib.auth.models import User

FIELDS = {"name", "instructions", "files", "model", "prompt"}


def _fields(body: dict[str, Any], *, creating: bool) -> dict[str, Any]:
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise bad_request(f"Unknown field `{unknown[0][:40]}`: a project has {', '.join(sorted(FIELDS))}.")
    fields: dict[str, Any] = {}
    if "name" in body or creating:
        name = body.get("name")
        if not isinstance(name, str):
            raise bad_request("`name` must be a string.", "name")
        fields["name"] = name
    if "instructions" in body:
        instructions = body["instructions"]
        if instructions is not None and not isinstance(instructions, str):
            raise bad_request("`instructions` must be a string.", "instructions")
        fields["instructions"] = instructions or ""
    if "files" in body:
        ids = attachments.parse_ids(body["files"], limit=settings.CHAT_PROJECT_MAX_FILES, field="files")
        if isinstance(ids, str):
            raise bad_request(ids, "files")
        fields["file_ids"] = ids
    if "model" in body:
        fields["model"] = parsing.optional_string(body, "model") or ""
    if "prompt" in body:
        fields["prompt"] = parsing.optional_string(body, "prompt")
    return fields


def _chats(project: Any) -> int:
    return Conversation.objects.filter(project=project).count()


def _list(user: User) -> dict[str, object]:
    found = projects.listing(user, with_counts=True)
    return {"object": "list", "data": [projects.payload(p, chats=p.chats) for p in found]}  # type: ignore[attr-defined]


def _create(user: User, body: dict[str, Any]) -> dict[str, Any]:
    project = services.project_create(user, **_fields(body, creating=True))
    return projects.payload(project, chats=0)


def _detail(user: User, project_id: uuid.UUID) -> dict[str, Any]:
    project = projects.own(user, project_id)
    return projects.payload(project, chats=_chats(project))


def _update(user: User, project_id: uuid.UUID, body: dict[str, Any]) -> dict[str, Any]:
    project = services.project_update(projects.own(user, project_id), **_fields(body, creating=False))
    return projects.payload(project, chats=_chats(project))


def _delete(user: User, project_id: uuid.UUID, with_chats: bool) -> dict[str, Any]:
    gone = services.project_delete(projects.own(user, project_id), with_chats=with_chats)
    return {"id": str(project_id), "object": "project", "deleted": True, "conversations_deleted": gone}


@endpoint("GET", "POST")
async def project_list(request: HttpRequest, user: User) -> HttpResponse:
    if request.method == "POST":
        body = parsing.body_of(request)
        return JsonResponse(await generation.in_database(_create)(user, body), status=201)
    return JsonResponse(await generation.in_database(_list)(user))


@endpoint("GET", "PATCH", "DELETE")
async def project(request: HttpRequest, user: User, project_id: uuid.UUID) -> HttpResponse:
    if request.method == "PATCH":
        body = parsing.body_of(request)
        return JsonResponse(await generation.in_database(_update)(user, project_id, body))
    if request.method == "DELETE":
        choice = request.GET.get("conversations", "keep")
        if choice not in ("keep", "delete"):
            raise bad_request("`conversations` is `keep` (the default) or `delete`.", "conversations")
        return JsonResponse(await generation.in_database(_delete)(user, project_id, choice == "delete"))
    return JsonResponse(await generation.in_database(_detail)(user, project_id))
