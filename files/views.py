"""The page's files, with the session (and CSRF for the upload): the same
rules and shapes as the API's /api/v1/files."""

from __future__ import annotations

import uuid

from channels.db import database_sync_to_async
from django.http import FileResponse, HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.views.decorators.http import require_http_methods

from . import serve, uploads
from .sniff import Refused


async def _signed_in(request: HttpRequest) -> object | None:
    user = await request.auser()
    return user if user.is_authenticated and user.is_active else None


def _error(status: int, message: str, code: str) -> JsonResponse:
    return JsonResponse({"error": {"message": message, "code": code}}, status=status)


@require_http_methods(["POST"])
async def upload(request: HttpRequest) -> HttpResponse:
    user = await _signed_in(request)
    if user is None:
        return _error(401, "You are signed out. Log in again.", "signed_out")
    try:
        name, data = await serve.read_upload(request)
        row = await uploads.upload(user, name, data)  # type: ignore[arg-type]
    except Refused as exc:
        refused = _error(exc.status, exc.message, exc.code)
        if exc.retry_after is not None:
            refused["Retry-After"] = str(exc.retry_after)
        return refused
    return JsonResponse(row.as_json(), status=201)


@require_http_methods(["GET", "DELETE"])
async def content(request: HttpRequest, file_id: uuid.UUID) -> HttpResponseBase:
    user = await _signed_in(request)
    if user is None:
        return _error(401, "You are signed out. Log in again.", "signed_out")
    try:
        if request.method == "DELETE":
            await database_sync_to_async(uploads.delete)(user, file_id)
            return JsonResponse({"id": str(file_id), "deleted": True})
        row = await database_sync_to_async(uploads.owned)(user, file_id)
    except uploads.NotFound:
        return _error(404, "No such file.", "not_found")
    response: FileResponse = serve.download(row)
    return response
