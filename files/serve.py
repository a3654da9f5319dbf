"""A stored file, sent back to its owner: always as a download (never shown
in the site's origin: an uploaded HTML page or SVG must not run there),
never sniffed, in a sandbox if a browser opens it anyway."""

from __future__ import annotations

from django.core.files.storage import default_storage
from django.http import FileResponse

from .models import File


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
