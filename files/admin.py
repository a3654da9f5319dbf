from __future__ import annotations

from typing import TYPE_CHECKING

from django.contrib import admin
from django.http import HttpRequest

from .models import File
from .uploads import describe_bytes

if TYPE_CHECKING:
    _FileAdmin = admin.ModelAdmin[File]  # not subscriptable at run time
else:
    _FileAdmin = admin.ModelAdmin


@admin.register(File)
class FileAdmin(_FileAdmin):
    """Files per user with their size; staff may delete, never edit or read them here."""

    list_display = ["filename", "owner", "kind", "size", "tokens", "created_at"]
    list_filter = ["kind"]
    list_select_related = ["owner"]
    search_fields = ["owner__username", "filename"]
    readonly_fields = ["id", "owner", "filename", "content_type", "kind", "bytes", "tokens", "created_at"]
    exclude = ["blob", "text"]

    @admin.display(description="size", ordering="bytes")
    def size(self, row: File) -> str:
        return describe_bytes(row.bytes)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: File | None = None) -> bool:
        return False
