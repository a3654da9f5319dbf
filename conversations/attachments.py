"""Files sent with a question: the rules a send's files pass, what the model
reads of them (the question as content parts), and the files nobody holds
any more.

What the model reads of a message's text files and PDFs is cut, together,
at CHAT_FILE_CONTEXT_TOKENS; the cut is decided once, when the question is
stored (`records`), marked in the text the model reads and shown to the
person (`read_tokens` beside `tokens`)."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

from django.conf import settings
from django.db import transaction

from files.models import File
from files.sniff import Refused, sniff

from . import refusals
from .models import Attachment, ChatModel, Message, ProjectFile

if TYPE_CHECKING:
    from django.contrib.auth.models import User

# Each file's text part starts with its name; an image follows a text part
# that names it (summaries name a dropped turn's files from them).
FILE_HEADING = "File: "
IMAGE_HEADING = "Image: "
CHARS_PER_TOKEN = 4  # llm.estimate_tokens, the other way round


class AttachmentRecord(TypedDict):
    """A file as a question holds it (`Message.attachments`, the contract's `attachments`)."""

    id: str
    filename: str
    bytes: int
    content_type: str
    tokens: int
    read_tokens: int  # what the model reads of it: less than `tokens` when cut


def parse_ids(raw: object, *, limit: int | None = None, field: str = "attachments") -> list[uuid.UUID] | str:
    """A send's `attachments` (or a project's `files`, with its own `limit`):
    a list of file ids, each once, in order; or what is wrong with it, in
    words for a person."""
    if raw is None:
        return []
    most = settings.CHAT_FILE_MAX_PER_MESSAGE if limit is None else limit
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        return f"`{field}` must be a list of file ids."
    ids: list[uuid.UUID] = []
    for item in raw[: most + 1]:
        try:
            file_id = uuid.UUID(item)
        except ValueError:
            return f"`{field}` must be a list of file ids."
        if file_id not in ids:
            ids.append(file_id)
    if len(ids) > most or len(raw) > 10 * most:
        where = "with one message" if limit is None else f"in `{field}`"
        return f"At most {most} files can go {where}."
    return ids


def files_for_send(
    user: User, file_ids: Sequence[uuid.UUID], model: str, *, missing_ok: bool = False
) -> list[File]:
    """The user's files for a question answered by `model`, in order, locked
    until the turn commits (a prune waits: `delete_unattached`). Refuses
    `not_found` for a file that is not theirs (never saying whose), unless
    `missing_ok` (an edit keeping its question's files, one deleted since);
    `invalid_request` past CHAT_FILE_MAX_PER_MESSAGE or for an image to a
    model that cannot see."""
    if not file_ids:
        return []
    limit = settings.CHAT_FILE_MAX_PER_MESSAGE
    if len(file_ids) > limit:
        raise refusals.invalid(f"At most {limit} files can go with one message.")
    rows = File.objects.select_for_update().filter(owner=user, pk__in=file_ids).defer("text")
    found = {f.pk: f for f in rows}
    if len(found) < len(set(file_ids)) and not missing_ok:
        raise refusals.not_found("file")
    files = [found[file_id] for file_id in file_ids if file_id in found]
    images = [f.filename for f in files if f.kind == File.Kind.IMAGE]
    if images and not ChatModel.can_see(model):
        raise refusals.invalid(
            f"The model “{model[:100]}” cannot see images: send {', '.join(images)} "
            "in a chat with a model that can, or leave it out."
        )
    return files


def records(files: Sequence[File]) -> list[AttachmentRecord]:
    """What the question holds of its files, with what the model reads of
    each: text files and PDFs, in order, until CHAT_FILE_CONTEXT_TOKENS are
    spent (the one that crosses it is cut); an image whole."""
    room = settings.CHAT_FILE_CONTEXT_TOKENS
    held: list[AttachmentRecord] = []
    for f in files:
        if f.kind == File.Kind.IMAGE:
            read = f.tokens
        else:
            read = max(0, min(f.tokens, room))
            room -= read
        held.append(
            {
                "id": str(f.pk),
                "filename": f.filename,
                "bytes": f.bytes,
                "content_type": f.content_type,
                "tokens": f.tokens,
                "read_tokens": read,
            }
        )
    return held


def attach(question: Message, files: Sequence[File]) -> None:
    """Record that the (stored) question holds these files."""
    if files:
        Attachment.objects.bulk_create([Attachment(message=question, file=f) for f in files])


def cut_note(record: AttachmentRecord, files: str = "the message's files") -> str:
    """What a person and the model are told of a cut file ("" when read
    whole); `files`: whose room it shared (a project's files have their own)."""
    if record["read_tokens"] >= record["tokens"]:
        return ""
    if record["read_tokens"] == 0:
        return f"None of {record['filename']} was read: {files} had used up their room."
    return f"Only the first {record['read_tokens']:,} of {record['tokens']:,} tokens were read."


@dataclass(frozen=True)
class Loaded:
    """What the model reads of one file."""

    kind: str
    text: str
    data_url: str  # an image's, else ""


# An image's `image_url` until `fill_images` reads its bytes: only the turns
# the history keeps are read from storage, never the ones it drops.
PLACEHOLDER = "chat-file:"


def load(held: Iterable[Sequence[AttachmentRecord] | None]) -> dict[str, Loaded]:
    """The files of these questions, by id, in one query (an image's bytes
    are read later, by `fill_images`); a file deleted since is absent."""
    ids = {record["id"] for records_ in held for record in records_ or ()}
    if not ids:
        return {}
    return {
        str(f.pk): Loaded(
            kind=f.kind, text=f.text, data_url=PLACEHOLDER + str(f.pk) if f.kind == "image" else ""
        )
        for f in File.objects.filter(pk__in=ids)
    }


def fill_images(messages: list[dict[str, Any]]) -> None:
    """Read the images these messages show (their placeholders) from
    storage, each once, as data URLs; one whose bytes are gone is said to be."""
    read: dict[str, str | None] = {}
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for index, part in enumerate(content):
            url = part.get("image_url", {}).get("url", "") if part.get("type") == "image_url" else ""
            if not url.startswith(PLACEHOLDER):
                continue
            file_id = url.removeprefix(PLACEHOLDER)
            if file_id not in read:
                read[file_id] = _data_url(file_id)
            found = read[file_id]
            content[index] = (
                {"type": "image_url", "image_url": {**part["image_url"], "url": found}}
                if found
                else {"type": "text", "text": "(This picture was deleted since.)"}
            )


def _data_url(file_id: str) -> str | None:
    f = File.objects.filter(pk=file_id).only("blob", "content_type").first()
    if f is None:
        return None
    try:
        with f.blob.open("rb") as blob:
            data = blob.read()
    except OSError:
        return None
    return f"data:{f.content_type};base64,{base64.b64encode(data).decode('ascii')}"


def cut_text(text: str, tokens: int) -> str:
    """The first `tokens` (estimated) of `text`, ended at a line break where one is near."""
    chars = tokens * CHARS_PER_TOKEN
    if len(text) <= chars:
        return text
    cut = text[:chars]
    space = cut.rfind("\n", chars - 400)
    return cut[:space] if space > 0 else cut


def user_content(
    text: str, held: Sequence[AttachmentRecord] | None, loaded: dict[str, Loaded], *, sees: bool
) -> str | list[dict[str, Any]]:
    """A question as the model reads it: its text alone, or (with files) as
    content parts: the text, then each text file or PDF as a text part
    headed with its name (cut as `records` decided, and saying so), each
    image as an `image_url` part (a data URL) after a part naming it, or
    named only when the model cannot see."""
    if not held:
        return text
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    for record in held:
        name = record["filename"]
        found = loaded.get(record["id"])
        if found is None:
            parts.append({"type": "text", "text": f"{FILE_HEADING}{name}\n\n(This file was deleted since.)"})
        elif found.kind == File.Kind.IMAGE:
            if sees:
                parts.append({"type": "text", "text": f"{IMAGE_HEADING}{name}"})
                parts.append({"type": "image_url", "image_url": {"url": found.data_url}})
            else:
                parts.append(
                    {
                        "type": "text",
                        "text": f"{IMAGE_HEADING}{name} (not shown: this model cannot see images)",
                    }
                )
        else:
            note = cut_note(record)
            body = cut_text(found.text, record["read_tokens"])
            parts.append(
                {
                    "type": "text",
                    "text": f"{FILE_HEADING}{name}\n\n{body}" + (f"\n\n[{note}]" if note else ""),
                }
            )
    return parts


def named_files(content: str | list[dict[str, Any]] | None) -> tuple[str, list[str]]:
    """A question's own text and the names of its files, from its content
    parts (`user_content`): what a summary says of a turn."""
    if not isinstance(content, list):
        return content or "", []
    texts: list[str] = []
    names: list[str] = []
    for part in content:
        value = part.get("text") if part.get("type") == "text" else None
        if not isinstance(value, str):
            continue
        if value.startswith(FILE_HEADING) or value.startswith(IMAGE_HEADING):
            names.append(
                value.split("\n", 1)[0]
                .split(": ", 1)[1]
                .removesuffix(" (not shown: this model cannot see images)")
            )
        else:
            texts.append(value)
    return "\n\n".join(texts), names


def delete_unattached(file_ids: Iterable[Any]) -> int:
    """Delete these files where no message (nor project) holds them any more (their blobs
    go with them: files.apps); how many went."""
    ids = set(file_ids)
    if not ids:
        return 0
    gone = 0
    with transaction.atomic():
        # Locked first: a send attaching one of them meanwhile either commits
        # before (and is seen below) or waits and then finds it gone.
        locked = list(File.objects.select_for_update().filter(pk__in=ids).values_list("pk", flat=True))
        held = set(Attachment.objects.filter(file_id__in=locked).values_list("file_id", flat=True))
        held |= set(ProjectFile.objects.filter(file_id__in=locked).values_list("file_id", flat=True))
        for f in File.objects.filter(pk__in=[pk for pk in locked if pk not in held]):
            f.delete()
            gone += 1
    return gone


def held_by(messages: Any) -> list[Any]:
    """The ids of the files these messages (a queryset) hold."""
    return list(Attachment.objects.filter(message__in=messages).values_list("file_id", flat=True).distinct())


# --- Files inline in a stateless call (the API's chat completions) --------------------


def _decoded(url: str) -> bytes:
    """The bytes of a `data:` URL (base64), or Refused."""
    head, comma, body = url.partition(",")
    if not comma or not head.endswith(";base64"):
        raise Refused("A data: URL must hold base64 (data:<type>;base64,<data>).", code="invalid_file")
    try:
        return base64.b64decode(body, validate=True)
    except ValueError:
        raise Refused("This data: URL is not valid base64.", code="invalid_file") from None


def _is_image(data: bytes) -> bool:
    if len(data) > settings.CHAT_FILE_MAX_BYTES:
        return False
    try:
        return sniff(data, "image").kind == File.Kind.IMAGE
    except Refused:
        return False


def _file_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise refusals.not_found("file") from None


def _owned_files(user: User, file_ids: list[uuid.UUID]) -> dict[uuid.UUID, File]:
    """The user's files by id (someone else's: `not_found`)."""
    found = {f.pk: f for f in File.objects.filter(owner=user, pk__in=file_ids)}
    if len(found) < len(set(file_ids)):
        raise refusals.not_found("file")
    return found


def _inline_image(f: File, data: bytes) -> str:
    return f"data:{f.content_type};base64,{base64.b64encode(data).decode('ascii')}"


async def read_parts(user: User, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with every file part of a user message read, as the
    model reads an attached file (`user_content`): `file_id` the user's
    uploaded file (another's: `not_found`), `file_data` a file sent inline
    (taken in as an upload is, never stored: files.uploads.read), an inline
    image checked to be one. Raises Refused (the file's fault) or a Refusal."""
    from channels.db import database_sync_to_async

    from files.uploads import read

    result = []
    uploaded_images = False
    for message in messages:
        content = message.get("content")
        if message.get("role") != "user" or not isinstance(content, list):
            result.append(message)
            continue
        ids = [
            _file_id(p["file"]["file_id"]) for p in content if p["type"] == "file" and "file_id" in p["file"]
        ]
        owned = await database_sync_to_async(_owned_files)(user, ids) if ids else {}
        files: list[tuple[File, bytes | None]] = []  # each file part's, in order
        for part in content:
            if part["type"] == "file" and "file_id" in part["file"]:
                files.append((owned[_file_id(part["file"]["file_id"])], None))
            elif part["type"] == "file":
                data = _decoded(part["file"]["file_data"])
                files.append((await read(user, part["file"]["filename"] or "file", data), data))
            elif part["type"] == "image_url" and part["image_url"]["url"].startswith("data:"):
                if not _is_image(_decoded(part["image_url"]["url"])):
                    raise Refused(
                        "An image part must be a picture (PNG, JPEG, WebP or GIF) of at most "
                        f"{settings.CHAT_FILE_MAX_BYTES:,} bytes.",
                        code="invalid_file",
                    )
        read_files = iter(zip(files, records([f for f, _data in files]), strict=True))
        parts: list[dict[str, Any]] = []
        for part in content:
            if part["type"] != "file":
                parts.append(part)
                continue
            (f, inline), record = next(read_files)
            url = ""
            if f.kind == File.Kind.IMAGE:  # an uploaded one is read below, each once
                url = _inline_image(f, inline) if inline is not None else PLACEHOLDER + str(f.pk)
            loaded = {record["id"]: Loaded(kind=f.kind, text=f.text, data_url=url)}
            made = user_content("", [record], loaded, sees=True)
            parts.extend(made if isinstance(made, list) else [])
        result.append({**message, "content": parts})
        uploaded_images = uploaded_images or any(
            str(p.get("image_url", {}).get("url", "")).startswith(PLACEHOLDER) for p in parts
        )
    if uploaded_images:  # no database call for a request without uploaded images (most of them)
        await database_sync_to_async(fill_images)(result)
    return result


def has_images(messages: Sequence[dict[str, Any]]) -> bool:
    return any(
        isinstance(m.get("content"), list) and any(p.get("type") == "image_url" for p in m["content"])
        for m in messages
    )
