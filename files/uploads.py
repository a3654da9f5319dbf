"""Taking a file in: its kind from its bytes, its text extracted once, the
limits (size, storage per user), the blob stored through Django's storage
API. Every refusal says why, in words for a person."""

from __future__ import annotations

import asyncio
import contextlib
import unicodedata
import uuid
from typing import TYPE_CHECKING

from channels.db import database_sync_to_async
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import Sum

from .models import File
from .sniff import Refused, sniff

if TYPE_CHECKING:
    from django.contrib.auth.models import User

# What an image costs the model, about (OpenAI: a 1024x1024 picture in detail).
IMAGE_TOKENS = 765


class NotFound(Exception):
    """No such file, or another person's: never say which."""


def describe_bytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}".replace(".0 ", " ")
    return f"{n} bytes"


def clean_filename(name: str) -> str:
    """The name people see: no path, no control characters, at most 255."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in unicodedata.normalize("NFC", name) if unicodedata.category(ch)[0] != "C")
    name = name.strip().strip(".") or "file"
    if len(name) > 255:
        stem, dot, extension = name.rpartition(".")
        name = (stem[: 254 - len(extension)] + dot + extension) if dot and len(extension) < 20 else name[:255]
    return name


def storage_limit(user: User) -> int:
    """The user's file storage: their own quota's `file_storage_bytes`, else
    the lowest of their groups' quotas, else the site default quota's,
    else CHAT_FILE_STORAGE_PER_USER."""
    from accounts.models import Quota

    own = Quota.objects.filter(user=user).values_list("file_storage_bytes", flat=True).first()
    if own is not None:
        return int(own)
    groups = [
        value
        for value in Quota.objects.filter(group__user=user).values_list("file_storage_bytes", flat=True)
        if value is not None
    ]
    if groups:
        return int(min(groups))
    default = Quota.objects.filter(is_default=True).values_list("file_storage_bytes", flat=True).first()
    if default is not None:
        return int(default)
    return int(settings.CHAT_FILE_STORAGE_PER_USER)


def storage_left(user: User) -> int:
    """Bytes the user may still store (their files against `storage_limit`)."""
    used = File.objects.filter(owner=user).aggregate(total=Sum("bytes"))["total"] or 0
    return storage_limit(user) - int(used)


async def read(user: User, filename: str, data: bytes) -> File:
    """`data` taken in as the user's file, unsaved: the upload rate limit
    (counted before anything is read: a flood costs nothing), the size, the
    kind from the bytes, a PDF's text (extract.py). Raises Refused."""
    from accounts.limits import take_upload

    wait = await database_sync_to_async(take_upload)(user)
    if wait is not None:
        raise Refused(
            f"Too many uploads. Try again in {wait} s.",
            code="rate_limit_exceeded",
            status=429,
            retry_after=wait,
        )
    limit = int(settings.CHAT_FILE_MAX_BYTES)
    if len(data) > limit:
        raise Refused(
            f"This file is {describe_bytes(len(data))}; files may be at most {describe_bytes(limit)}.",
            code="file_too_large",
            status=413,
        )
    if not data:
        raise Refused("This file is empty.", code="empty_file")
    name = clean_filename(filename)
    found = sniff(data, name)
    max_chars = int(settings.CHAT_FILE_MAX_TEXT_CHARS)
    if found.kind == File.Kind.PDF:
        from .extract import pdf_text

        text = await pdf_text(data, max_chars=max_chars)
    else:
        text = (found.text or "")[:max_chars]
    # What the database can hold (PostgreSQL takes no NUL, no lone surrogate).
    text = text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    tokens = IMAGE_TOKENS if found.kind == File.Kind.IMAGE else (len(text) + 3) // 4
    return File(
        id=uuid.uuid4(),
        owner=user,
        filename=name,
        content_type=found.content_type,
        kind=found.kind,
        bytes=len(data),
        text=text,
        tokens=tokens,
    )


async def upload(user: User, filename: str, data: bytes) -> File:
    """Store `data` as the user's file, or raise Refused."""
    row = await read(user, filename, data)
    name = row.filename
    blob = row.blob.field.generate_filename(row, name)
    saved = await asyncio.to_thread(default_storage.save, blob, ContentFile(data))
    row.blob.name = saved
    try:
        await database_sync_to_async(_insert)(user, row)
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(default_storage.delete, saved)
        raise
    return row


def _insert(user: User, row: File) -> None:
    from django.contrib.auth.models import User as UserModel

    with transaction.atomic():
        # One upload of a user at a time decides the storage left.
        UserModel.objects.select_for_update().filter(pk=user.pk).exists()
        used = File.objects.filter(owner=user).aggregate(total=Sum("bytes"))["total"] or 0
        limit = storage_limit(user)
        if used + row.bytes > limit:
            raise Refused(
                f"Your files would take {describe_bytes(used + row.bytes)}; you may store "
                f"{describe_bytes(limit)}. Delete some files first.",
                code="storage_limit",
                status=413,
            )
        row.save(force_insert=True)


def owned(user: User, file_id: uuid.UUID | str) -> File:
    """The user's file, or NotFound (also for another person's)."""
    try:
        return File.objects.get(pk=file_id, owner=user)
    except (File.DoesNotExist, ValueError):
        raise NotFound from None


def delete(user: User, file_id: uuid.UUID | str) -> None:
    owned(user, file_id).delete()  # its bytes go with it (apps.py)
