"""Projects: a user's folder of chats that share instructions and files.

What a chat in a project sends upstream, in this order (history.head_of):
the staff's system prompt (always first: a project adds to it, never
replaces it), the project's instructions as a second system message, the
project's files (read whole, together up to CHAT_PROJECT_CONTEXT_TOKENS;
the file that crosses it is cut and the model is told so, as the page
shows), then the summary and the turns. They are read at every answer:
changing the instructions or the files changes the chat's next answer.

A project and everything about it belongs to its owner: another user's
project is "not found" everywhere. Interfaces (the API, the page) parse
and call these; the rules live here.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count
from django.db.models.functions import Substr

from files.models import File

from . import attachments, inputs, refusals
from .attachments import CHARS_PER_TOKEN, FILE_HEADING, AttachmentRecord, cut_text
from .models import ChatModel, Project, ProjectFile, SystemPrompt

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    from .llm import ChatMessage

MAX_NAME_CHARS = 100


# A project's file as its chats read it: the same record as a question's file.
ProjectFileRecord = AttachmentRecord


def own(user: User, project_id: Any) -> Project:
    """The user's project, or `not_found` (another user's too)."""
    try:
        key = uuid.UUID(str(project_id))
    except ValueError:
        raise refusals.not_found("project") from None
    project = Project.objects.filter(pk=key, owner=user).select_related("prompt").first()
    if project is None:
        raise refusals.not_found("project")
    return project


def listing(user: User, *, with_counts: bool = False) -> list[Project]:
    """The user's projects by name; `with_counts`: each with `chats`, how many it holds."""
    found = Project.objects.filter(owner=user).select_related("prompt")
    if with_counts:
        found = found.annotate(chats=Count("conversations"))
    # By name whatever its case, the same on every database (and on the page: sidebar.js).
    return sorted(found, key=lambda p: (p.name.lower(), p.created_at))


def _name(raw: str) -> str:
    name = " ".join(str(raw).split())
    if not name:
        raise refusals.invalid("A project needs a name.")
    if len(name) > MAX_NAME_CHARS:
        raise refusals.invalid(f"A project's name is at most {MAX_NAME_CHARS} characters.")
    problem = inputs.text_problem(name)
    if problem:
        raise refusals.invalid(f"The name {problem}.")
    return name


def _instructions(raw: str) -> str:
    raw = raw.replace("\r\n", "\n")  # a form's line breaks, counted as one as the browser does
    limit = settings.CHAT_PROJECT_INSTRUCTIONS_CHARS
    if len(raw) > limit:
        raise refusals.invalid(f"A project's instructions are at most {limit:,} characters.")
    problem = inputs.text_problem(raw)
    if problem:
        raise refusals.invalid(f"The instructions {problem}.")
    return raw.strip()


def _model(raw: str) -> str:
    if inputs.text_problem(raw) or len(raw) > 100:
        raise refusals.invalid("No such model.")
    if raw and not ChatModel.is_pickable(raw):
        raise refusals.invalid(f"The model “{raw[:100]}” is not available.")
    return raw


def _prompt(name: str | None) -> SystemPrompt | None:
    if not name:
        return None
    if inputs.text_problem(name) or len(name) > 100:
        raise refusals.not_found("system prompt")
    prompt = SystemPrompt.objects.filter(name=name).first()
    if prompt is None:
        raise refusals.not_found("system prompt")
    return prompt


def _files(user: User, file_ids: Sequence[uuid.UUID]) -> list[File]:
    """The user's files, in the order given; someone else's or an unknown id
    is `not_found`; pictures are refused (a project's files are read as text
    by every chat in it, whichever model answers)."""
    ids = list(dict.fromkeys(file_ids))
    if len(ids) > settings.CHAT_PROJECT_MAX_FILES:
        raise refusals.invalid(f"A project holds at most {settings.CHAT_PROJECT_MAX_FILES} files.")
    # Locked (and their text left in the database): a prune deleting one meanwhile
    # either went first (it is not found) or waits and then sees the project hold it.
    rows = File.objects.select_for_update().filter(owner=user, pk__in=ids).defer("text")
    found = {f.pk: f for f in rows}
    if len(found) != len(ids):
        raise refusals.not_found("file")
    files = [found[pk] for pk in ids]
    for f in files:
        if f.kind == File.Kind.IMAGE:
            raise refusals.invalid(
                f"“{f.filename[:100]}” is a picture: a project's files are documents (text or PDF)."
            )
    return files


def _set_files(project: Project, files: list[File]) -> None:
    ProjectFile.objects.filter(project=project).delete()
    ProjectFile.objects.bulk_create(
        [ProjectFile(project=project, file=f, position=i) for i, f in enumerate(files)]
    )


def check(
    user: User,
    *,
    name: str,
    instructions: str = "",
    file_ids: Sequence[uuid.UUID] = (),
    model: str = "",
    prompt: str | None = None,
) -> None:
    """Refuse what `create` or `update` would refuse, storing nothing (the page
    checks before it stores the files uploaded with the form)."""
    _name(name)
    _instructions(instructions)
    _model(model)
    _prompt(prompt)
    if len(set(file_ids)) > settings.CHAT_PROJECT_MAX_FILES:
        raise refusals.invalid(f"A project holds at most {settings.CHAT_PROJECT_MAX_FILES} files.")


def create(
    user: User,
    *,
    name: str,
    instructions: str = "",
    file_ids: Sequence[uuid.UUID] = (),
    model: str = "",
    prompt: str | None = None,
) -> Project:
    with transaction.atomic():
        if Project.objects.filter(owner=user).count() >= settings.CHAT_PROJECT_MAX_PER_USER:
            raise refusals.invalid(
                f"You have {settings.CHAT_PROJECT_MAX_PER_USER} projects already: the most one may."
            )
        project = Project.objects.create(
            owner=user,
            name=_name(name),
            instructions=_instructions(instructions),
            model=_model(model),
            prompt=_prompt(prompt),
        )
        _set_files(project, _files(user, file_ids))
    return project


_UNSET: Any = object()


def update(
    project: Project,
    *,
    name: str = _UNSET,
    instructions: str = _UNSET,
    file_ids: Sequence[uuid.UUID] = _UNSET,
    model: str = _UNSET,
    prompt: str | None = _UNSET,
) -> Project:
    """Change what is given (the rest stays); the chats in it read the new
    instructions and files at their next answer."""
    with transaction.atomic():
        locked = Project.objects.select_for_update().get(pk=project.pk)
        if name is not _UNSET:
            locked.name = _name(name)
        if instructions is not _UNSET:
            locked.instructions = _instructions(instructions)
        if model is not _UNSET:
            locked.model = _model(model)
        if prompt is not _UNSET:
            locked.prompt = _prompt(prompt)
        locked.save()
        if file_ids is not _UNSET:
            _set_files(locked, _files(locked.owner, file_ids))
    return locked


# --- What a chat in a project is told ------------------------------------------------------


def _ordered_files(project: Project) -> list[File]:
    """The project's files in order, without their text (read only where it is sent)."""
    rows = ProjectFile.objects.filter(project=project).select_related("file").defer("file__text")
    return [pf.file for pf in rows]


def file_records(project: Project, files: list[File] | None = None) -> list[ProjectFileRecord]:
    """Each file with what a chat reads of it: in order, until
    CHAT_PROJECT_CONTEXT_TOKENS are spent (the one that crosses it is cut).
    They come on top of CHAT_CONTEXT_TOKENS, the turns' own room."""
    room = settings.CHAT_PROJECT_CONTEXT_TOKENS
    records: list[ProjectFileRecord] = []
    for f in _ordered_files(project) if files is None else files:
        read = max(0, min(f.tokens, room))
        room -= read
        records.append(
            {
                "id": str(f.pk),
                "filename": f.filename,
                "bytes": f.bytes,
                "content_type": f.content_type,
                "tokens": f.tokens,
                "read_tokens": read,
            }
        )
    return records


def cut_note(record: ProjectFileRecord) -> str:
    return attachments.cut_note(record, "the project's files")


def context(project: Project) -> list[ChatMessage]:
    """The system messages a chat in the project gets after the staff's
    prompt: its instructions, then its files."""
    messages: list[ChatMessage] = []
    if project.instructions:
        messages.append(
            {
                "role": "system",
                "content": f"Instructions for the project “{project.name}”:\n\n{project.instructions}",
            }
        )
    files = _ordered_files(project)
    records = file_records(project, files)
    # Only what is read, of only the files read: one query, each text cut in the database.
    chars = (settings.CHAT_PROJECT_CONTEXT_TOKENS + 100) * CHARS_PER_TOKEN
    wanted = [f.pk for f, r in zip(files, records, strict=True) if r["read_tokens"]]
    heads = dict(
        File.objects.filter(pk__in=wanted).annotate(head=Substr("text", 1, chars)).values_list("pk", "head")
    )
    parts = []
    for f, record in zip(files, records, strict=True):
        if record["read_tokens"] == 0 and record["tokens"]:
            parts.append(f"{FILE_HEADING}{f.filename}\n\n[{cut_note(record)}]")
            continue
        note = cut_note(record)
        text = cut_text(heads.get(f.pk) or "", record["read_tokens"])
        parts.append(f"{FILE_HEADING}{f.filename}\n\n{text}" + (f"\n\n[{note}]" if note else ""))
    if parts:
        messages.append(
            {"role": "system", "content": f"Files of the project “{project.name}”:\n\n" + "\n\n".join(parts)}
        )
    return messages


def payload(project: Project, *, chats: int | None = None) -> dict[str, Any]:
    """A project as the API and the page give it."""
    data: dict[str, Any] = {
        "id": str(project.pk),
        "object": "project",
        "name": project.name,
        "instructions": project.instructions,
        "files": file_records(project),
        "model": project.model or None,
        "prompt": project.prompt.name if project.prompt else None,
        "created_at": project.created_at.isoformat(),
        "updated_at": project.updated_at.isoformat(),
    }
    if chats is not None:
        data["conversations"] = chats
    return data
