"""System prompts and their versions: every saved change to what the model is
told becomes a new, never-edited `SystemPromptVersion`, and each conversation
points at the version it started with."""

from __future__ import annotations

from django.contrib.auth.models import AnonymousUser, User
from django.db import transaction

from .models import SystemPrompt, SystemPromptVersion

# The fields that change what the model receives: a save that changes one of
# them is a new version; renaming a prompt is not.
VERSIONED_FIELDS = ("text", "model", "temperature", "max_tokens")


def _differs(prompt: SystemPrompt, version: SystemPromptVersion | None) -> bool:
    if version is None:
        return True
    return any(getattr(prompt, name) != getattr(version, name) for name in VERSIONED_FIELDS)


def _new_version(
    prompt: SystemPrompt, *, by: User | AnonymousUser | None, after: SystemPromptVersion | None
) -> SystemPromptVersion:
    return SystemPromptVersion.objects.create(
        prompt=prompt,
        number=(after.number + 1) if after else 1,
        created_by=by if by is not None and by.is_authenticated else None,
        **{name: getattr(prompt, name) for name in VERSIONED_FIELDS},
    )


def latest_version(prompt: SystemPrompt) -> SystemPromptVersion | None:
    return prompt.versions.order_by("-number").first()


def save_prompt(prompt: SystemPrompt, *, by: User | AnonymousUser | None = None) -> SystemPromptVersion:
    """Save `prompt` and return its current version, a new one if the text,
    model, temperature or max tokens changed since the last.

    Exactly one default: saving a prompt as the default clears the flag on
    every other prompt in the same transaction; the first prompt ever saved
    becomes the default.
    """
    with transaction.atomic():
        if prompt.is_default:
            SystemPrompt.objects.filter(is_default=True).exclude(pk=prompt.pk).update(is_default=False)
        elif not SystemPrompt.objects.filter(is_default=True).exclude(pk=prompt.pk).exists():
            prompt.is_default = True
        prompt.save()
        return _current_version(prompt, by=by)


def _current_version(prompt: SystemPrompt, *, by: User | AnonymousUser | None) -> SystemPromptVersion:
    """The latest version if it matches the prompt's fields, else a new one.
    Locks the prompt row: two saves at once must not take the same number."""
    with transaction.atomic():
        SystemPrompt.objects.select_for_update().filter(pk=prompt.pk).first()
        latest = latest_version(prompt)
        if not _differs(prompt, latest):
            assert latest is not None
            return latest
        return _new_version(prompt, by=by, after=latest)


def version_for_new_conversation(prompt: SystemPrompt) -> SystemPromptVersion:
    """The version a conversation starting now records: the prompt's latest,
    or v1 made from its current fields if it has none yet. A prompt changed
    outside `save_prompt` (a shell, a data migration) gets a new version too,
    so the version always holds the text the conversation is given."""
    latest = latest_version(prompt)
    if not _differs(prompt, latest):  # the usual case: no lock needed
        assert latest is not None
        return latest
    return _current_version(prompt, by=None)


def make_default(prompt: SystemPrompt) -> None:
    with transaction.atomic():
        SystemPrompt.objects.filter(is_default=True).exclude(pk=prompt.pk).update(is_default=False)
        SystemPrompt.objects.filter(pk=prompt.pk).update(is_default=True)
    prompt.is_default = True
