from __future__ import annotations

from django.contrib import admin

from .models import Conversation, Message, ModelPrice, SystemPrompt, TokenUsage


@admin.register(SystemPrompt)
class SystemPromptAdmin(admin.ModelAdmin):
    list_display = ["name", "is_default", "model", "temperature", "updated_at"]
    list_filter = ["is_default"]
    search_fields = ["name", "text"]


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    list_display = ["model", "input_per_million", "output_per_million", "updated_at"]
    search_fields = ["model"]


@admin.register(TokenUsage)
class TokenUsageAdmin(admin.ModelAdmin):
    list_display = ["created_at", "user", "model", "prompt_tokens", "completion_tokens", "cost", "estimated"]
    list_filter = ["model", "estimated", "created_at"]
    list_select_related = ["user"]
    search_fields = ["user__username", "model"]
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in TokenUsage._meta.fields]

    def has_add_permission(self, request) -> bool:  # a ledger is written by the code only
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


class MessageInline(admin.TabularInline):
    model = Message
    fields = ["created_at", "role", "status", "finish_reason", "model", "content"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ["display_title", "owner", "created_at", "updated_at"]
    list_select_related = ["owner"]
    search_fields = ["title", "owner__username"]
    readonly_fields = ["id", "owner", "prompt", "prompt_text", "created_at", "updated_at"]
    inlines = [MessageInline]
