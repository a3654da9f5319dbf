"""The HTTP API's files (OpenAI's shapes): upload, list, look at, download,
delete. Another person's file is 404 on every route."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from channels.db import database_sync_to_async
from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse

from files import serve, uploads
from files.models import File
from files.sniff import Refused

from .errors import ApiError
from .views import endpoint

if TYPE_CHECKING:
    from django.contrib.auth.models import User


def _not_found() -> ApiError:
    return ApiError(404, "No such file.", "not_found")


def _page(user: User, after: str | None, limit: int) -> dict[str, object]:
    """OpenAI's list shape, newest first; `after` (a file id) for the next page."""
    rows = File.objects.filter(owner=user)
    if after:
        try:
            last = File.objects.get(pk=uuid.UUID(after), owner=user)
        except (ValueError, File.DoesNotExist):
            message = "`after` is not one of your files."
            raise ApiError(400, message, "invalid_request", param="after") from None
        rows = rows.filter(created_at__lt=last.created_at)
    found = list(rows[: limit + 1])
    data = [row.as_json() for row in found[:limit]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(found) > limit,
    }


@endpoint("GET", "POST")
async def files(request: HttpRequest, user: User) -> HttpResponse:
    if request.method == "GET":
        try:
            limit = min(10_000, max(1, int(request.GET.get("limit", "10000"))))
        except ValueError:
            raise ApiError(400, "`limit` must be a number.", "invalid_request", param="limit") from None
        page = await database_sync_to_async(_page)(user, request.GET.get("after"), limit)
        return JsonResponse(page)
    try:
        name, data = await serve.read_upload(request)
        row = await uploads.upload(user, name, data)
    except Refused as exc:
        raise ApiError(exc.status, exc.message, exc.code, param="file", retry_after=exc.retry_after) from None
    return JsonResponse(row.as_json(), status=201)


@endpoint("GET", "DELETE")
async def file(request: HttpRequest, user: User, file_id: uuid.UUID) -> HttpResponse:
    try:
        if request.method == "DELETE":
            await database_sync_to_async(uploads.delete)(user, file_id)
            return JsonResponse({"id": str(file_id), "object": "file", "deleted": True})
        row = await database_sync_to_async(uploads.owned)(user, file_id)
    except uploads.NotFound:
        raise _not_found() from None
    return JsonResponse(row.as_json())


@endpoint("GET")
async def file_content(request: HttpRequest, user: User, file_id: uuid.UUID) -> FileResponse:
    try:
        row = await database_sync_to_async(uploads.owned)(user, file_id)
    except uploads.NotFound:
        raise _not_found() from None
    return serve.download(row)
