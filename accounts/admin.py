"""Quotas in the admin: per user, per group, and the site default."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from .models import Quota, QuotaCounter


@admin.register(Quota)
class QuotaAdmin(admin.ModelAdmin):
    list_display = [
        "__str__", "tokens_per_day", "tokens_per_month", "cost_per_day", "cost_per_month",
        "answers_per_minute", "updated_at",
    ]  # fmt: skip
    list_filter = ["is_default"]
    list_select_related = ["user", "group"]
    search_fields = ["user__username", "group__name"]
    autocomplete_fields = ["user", "group"]
    fieldsets = [
        ("Applies to (exactly one)", {"fields": ["user", "group", "is_default"]}),
        ("Tokens (blank = unlimited)", {"fields": ["tokens_per_day", "tokens_per_month"]}),
        ("Cost (blank = unlimited)", {"fields": ["cost_per_day", "cost_per_month"]}),
        ("Pace", {"fields": ["answers_per_minute"]}),
    ]


@admin.register(QuotaCounter)
class QuotaCounterAdmin(admin.ModelAdmin):
    """Read only: what the quota check sees for each user and window."""

    list_display = [
        "user", "window", "start", "tokens_used", "tokens_reserved", "cost_used", "cost_reserved", "answers",
    ]  # fmt: skip
    list_filter = ["window"]
    list_select_related = ["user"]
    search_fields = ["user__username"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
