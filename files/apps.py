from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_delete


class FilesConfig(AppConfig):
    name = "files"
    verbose_name = "Files"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from .models import File

        post_delete.connect(_delete_blob, sender=File, dispatch_uid="files.delete_blob")


def _delete_blob(sender: Any, instance: Any, **_kwargs: Any) -> None:
    """A file's row gone (deleted by its owner, with its account, by staff):
    its bytes go too."""
    import contextlib

    with contextlib.suppress(Exception):
        instance.blob.delete(save=False)
