"""Files people bring into a chat: stored through Django's storage API under
a name of the server's choosing, with the text extracted once, at upload."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models


def _blob_name(instance: File, _filename: str) -> str:
    # Never the uploader's name: it may hold anything (../, a script, a
    # thousand characters); the name people see is `filename`.
    return f"files/{instance.owner_id}/{instance.id.hex}"


class File(models.Model):
    class Kind(models.TextChoices):
        TEXT = "text"
        PDF = "pdf"
        IMAGE = "image"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="files")
    filename = models.CharField(max_length=255)
    content_type = models.CharField(max_length=100)  # decided from the bytes
    kind = models.CharField(max_length=8, choices=Kind.choices)
    bytes = models.PositiveBigIntegerField()
    blob = models.FileField(upload_to=_blob_name, max_length=255)
    text = models.TextField(blank=True)  # what the model reads of a text file or a PDF
    tokens = models.PositiveIntegerField(default=0)  # of `text`; an image's estimate
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["owner", "-created_at"])]

    def __str__(self) -> str:
        return self.filename

    def as_json(self) -> dict[str, object]:
        return {
            "id": str(self.id),
            "object": "file",
            "filename": self.filename,
            "bytes": self.bytes,
            "content_type": self.content_type,
            "tokens": self.tokens,
            "created_at": int(self.created_at.timestamp()),
        }
