"""Files over HTTP, for the API and the page alike: an upload read off the
event loop, and a stored file sent back to its owner always as a download
(never shown in the site's origin: an uploaded HTML page or SVG must not run
there), never sniffed, in a sandbox if a browser opens it anyway."""

from __future__ import annotations

import asyncio

from django.core.files.storage import default_storage
from django.http import FileResponse, HttpRequest

from .models import File
from .sniff import Refused


async def read_upload(request: HttpRequest) -> tuple[str, bytes]:
    """The multipart field `file`: its name and bytes (parsed off the event loop)."""
    files = await asyncio.to_thread(lambda: request.FILES)
    upload = files.get("file")
    if upload is None:
        raise Refused("Send the file as the multipart form field `file`.", code="invalid_request")
    data = await asyncio.to_thread(upload.read)
    return upload.name or "file", data


def download(row: File) -> FileResponse:
    content_type = "text/plain; charset=utf-8" if row.kind == File.Kind.TEXT else row.content_type
    response = FileResponse(
        default_storage.open(str(row.blob.name), "rb"),
        as_attachment=True,
        filename=row.filename,
        content_type=content_type,
    )
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    response["Cache-Control"] = "private, no-store"
    return response
