from __future__ import annotations

from typing import TYPE_CHECKING

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from .models import ApiAccess, ApiToken

if TYPE_CHECKING:
    # Django's admin classes are not subscriptable at run time (no django_stubs_ext here).
    _ApiTokenAdmin = admin.ModelAdmin[ApiToken]
    _ApiAccessAdmin = admin.ModelAdmin[ApiAccess]
else:
    _ApiTokenAdmin = _ApiAccessAdmin = admin.ModelAdmin


@admin.register(ApiToken)
class ApiTokenAdmin(_ApiTokenAdmin):
    """Staff see every token (never the token itself: only its hash is
    stored) and revoke them; users create their own on their account page."""

    list_display = ["name", "user", "prefix", "created_at", "expires_at", "last_used_at", "revoked_at"]
    list_filter = ["revoked_at"]
    list_select_related = ["user"]
    search_fields = ["name", "user__username", "prefix"]
    readonly_fields = ["user", "name", "prefix", "created_at", "last_used_at", "revoked_at"]
    fields = ["user", "name", "prefix", "created_at", "expires_at", "last_used_at", "revoked_at"]
    actions = ["revoke"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # a token is shown once, to its owner: users (or `manage.py api_token`) create them

    @admin.action(description="Revoke the selected tokens")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"{count} token(s) revoked.", messages.SUCCESS)


@admin.register(ApiAccess)
class ApiAccessAdmin(_ApiAccessAdmin):
    list_display = ["__str__", "enabled"]
    filter_horizontal = ["disabled_groups"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return not ApiAccess.objects.exists()

    def has_delete_permission(self, request: HttpRequest, obj: ApiAccess | None = None) -> bool:
        return False
