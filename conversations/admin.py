"""The staff side: system prompts (versioned, one default, with a preview),
model prices, the token ledger with its totals and the spend report, and
conversation review behind its own permission."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict, cast

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.http import urlencode

from . import llm, prompts, reports
from .models import (
    ChatModel,
    Conversation,
    McpServer,
    Message,
    ModelPrice,
    Share,
    SystemPrompt,
    SystemPromptVersion,
    TokenUsage,
)
from .money import money

if TYPE_CHECKING:
    from decimal import Decimal

    from django.contrib.admin.filters import _ListFilterChoices
    from django.contrib.admin.views.main import ChangeList
    from django.urls import URLPattern
    from django_stubs_ext import WithAnnotations

    # Generic in django-stubs only: at run time these classes take no type
    # arguments (the settings do not call django_stubs_ext.monkeypatch()).
    _SystemPromptFormBase = forms.ModelForm[SystemPrompt]
    _SystemPromptAdminBase = admin.ModelAdmin[SystemPrompt]
    _SystemPromptVersionInlineBase = admin.TabularInline[SystemPromptVersion, SystemPrompt]
    _SystemPromptVersionAdminBase = admin.ModelAdmin[SystemPromptVersion]
    _ModelPriceAdminBase = admin.ModelAdmin[ModelPrice]
    _ChatModelAdminBase = admin.ModelAdmin[ChatModel]
    _TokenUsageAdminBase = admin.ModelAdmin[TokenUsage]
    _MessageInlineBase = admin.TabularInline[Message, Conversation]
    _ConversationAdminBase = admin.ModelAdmin[Conversation]
    _ShareAdminBase = admin.ModelAdmin[Share]
    _McpServerAdminBase = admin.ModelAdmin[McpServer]

    class _InputFilterChoice(_ListFilterChoices):
        others: list[tuple[str, str]]

    class _PriceAnnotations(TypedDict):
        price_pk: int | None
        price_in: Decimal
        price_out: Decimal
else:
    _SystemPromptFormBase = forms.ModelForm
    _SystemPromptAdminBase = _SystemPromptVersionAdminBase = _ModelPriceAdminBase = admin.ModelAdmin
    _ChatModelAdminBase = _TokenUsageAdminBase = _ConversationAdminBase = _ShareAdminBase = admin.ModelAdmin
    _McpServerAdminBase = admin.ModelAdmin
    _SystemPromptVersionInlineBase = _MessageInlineBase = admin.TabularInline

REVIEW_PERMISSION = "conversations.review_conversation"


# --- System prompts ----------------------------------------------------------------------


class SystemPromptForm(_SystemPromptFormBase):
    class Meta:
        model = SystemPrompt
        fields = [
            "name",
            "text",
            "is_default",
            "model",
            "temperature",
            "max_tokens",
            "tools",
            "fallback_models",
        ]

    def clean_is_default(self) -> bool:
        value: bool = self.cleaned_data["is_default"]
        was_default = (
            self.instance.pk is not None
            and SystemPrompt.objects.filter(pk=self.instance.pk, is_default=True).exists()
        )
        if was_default and not value:
            raise ValidationError(
                "One prompt is always the default: make another prompt the default instead."
            )
        return value

    def _get_validation_exclusions(self) -> set[str]:
        # `one_default_prompt` would refuse a second default; `save_prompt`
        # moves the flag instead, in one transaction.
        # A private hook of Django's ModelForm, not in django-stubs.
        exclusions: set[str] = super()._get_validation_exclusions()  # type: ignore[misc]
        return exclusions | {"is_default"}

    def clean_tools(self) -> str:
        from . import tools

        value = ", ".join(name.strip() for name in self.cleaned_data["tools"].split(",") if name.strip())
        unknown = [n for n in value.split(", ") if n and n != "none" and n not in tools.REGISTRY]
        if unknown:
            known = ", ".join(tools.REGISTRY)
            raise ValidationError(
                f"Unknown tool(s): {', '.join(unknown)}. The tools are: {known}, or “none”."
            )
        return value

    def clean_temperature(self) -> float | None:
        value: float | None = self.cleaned_data["temperature"]
        if value is not None and not 0 <= value <= 2:
            raise ValidationError("Temperature goes from 0 to 2.")
        return value


class PromptPreview(TypedDict):
    request: str  # the request as JSON
    characters: int
    tokens: int
    previous: SystemPromptVersion | None
    diff: str


def prompt_preview(prompt: SystemPrompt, *, previous: SystemPromptVersion | None) -> PromptPreview:
    """What the model receives with this prompt: the request a new conversation
    would send (with a sample question), its size, and the change since the
    last saved version."""
    request = {
        "model": prompt.model or settings.OPENAI_MODEL,
        "temperature": prompt.temperature if prompt.temperature is not None else settings.OPENAI_TEMPERATURE,
        "max_tokens": prompt.max_tokens or settings.OPENAI_MAX_TOKENS,
        "messages": [
            {"role": "system", "content": prompt.text},
            {"role": "user", "content": "(the user's first message)"},
        ],
    }
    diff = ""
    if previous is not None:
        diff = "\n".join(
            difflib.unified_diff(
                previous.text.splitlines(),
                prompt.text.splitlines(),
                fromfile=f"v{previous.number}",
                tofile="this edit",
                lineterm="",
            )
        )
    return {
        "request": json.dumps(request, indent=2, ensure_ascii=False),
        "characters": len(prompt.text),
        "tokens": llm.estimate_tokens(prompt.text),
        "previous": previous,
        "diff": diff,
    }


class SystemPromptVersionInline(_SystemPromptVersionInlineBase):
    model = SystemPromptVersion
    fields = ["number", "created_at", "created_by", "model", "temperature", "max_tokens", "text"]
    readonly_fields = cast("list[str]", fields)  # names only, no groups
    ordering = ["-number"]
    extra = 0
    can_delete = False
    verbose_name_plural = "Versions (each save that changed the text or settings)"

    def has_add_permission(self, request: HttpRequest, obj: SystemPrompt | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: SystemPrompt | None = None) -> bool:
        return False


@admin.register(SystemPrompt)
class SystemPromptAdmin(_SystemPromptAdminBase):
    form = SystemPromptForm
    list_display = [
        "name",
        "is_default",
        "model",
        "temperature",
        "max_tokens",
        "current_version",
        "updated_at",
    ]
    list_filter = ["is_default"]
    search_fields = ["name", "text"]
    readonly_fields = ["current_version"]
    inlines = [SystemPromptVersionInline]
    actions = ["make_default"]
    change_form_template = "admin/conversations/systemprompt/change_form.html"

    def get_queryset(self, request: HttpRequest) -> QuerySet[SystemPrompt]:
        return super().get_queryset(request).prefetch_related("versions")

    @admin.display(description="Version")
    def current_version(self, prompt: SystemPrompt) -> str:
        numbers = [version.number for version in prompt.versions.all()]
        return f"v{max(numbers)}" if numbers else "—"

    def save_model(
        self, request: HttpRequest, obj: SystemPrompt, form: SystemPromptForm, change: bool
    ) -> None:
        previous = (
            SystemPrompt.objects.filter(is_default=True).exclude(pk=obj.pk).first()
            if obj.is_default
            else None
        )
        version = prompts.save_prompt(obj, by=request.user)
        messages.info(request, f"“{obj}” is at version {version.number}.")
        if previous is not None:
            messages.warning(
                request, f"“{obj}” is now the default prompt for new chats, instead of “{previous}”."
            )

    def has_delete_permission(self, request: HttpRequest, obj: SystemPrompt | None = None) -> bool:
        if obj is not None and (obj.is_default or _prompt_in_use(obj)):
            return False  # keep the default, and every prompt a conversation was given
        return super().has_delete_permission(request, obj)

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # one by one, through the checks above
        return actions

    @admin.action(description="Make the selected prompt the default", permissions=["change"])
    def make_default(self, request: HttpRequest, queryset: QuerySet[SystemPrompt]) -> None:
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one prompt.", messages.ERROR)
            return
        prompt = queryset.get()
        prompts.make_default(prompt)
        self.message_user(request, f"“{prompt}” is now the default prompt.")

    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        if request.method == "POST" and "_preview" in request.POST:
            return self._preview_view(request, object_id, form_url)
        extra_context = extra_context or {}
        if object_id:
            prompt = self.get_object(request, unquote(object_id))
            if prompt is not None:
                extra_context["preview"] = prompt_preview(prompt, previous=None)
        return super().changeform_view(request, object_id, form_url, extra_context)

    def _preview_view(self, request: HttpRequest, object_id: str | None, form_url: str) -> HttpResponse:
        """The form as edited, not saved, with the preview of the edited prompt."""
        prompt = self.get_object(request, unquote(object_id)) if object_id else None
        add = prompt is None
        if object_id and prompt is None:
            # A private helper of Django's ModelAdmin, not in django-stubs.
            redirect: HttpResponse = self._get_obj_does_not_exist_redirect(  # type: ignore[attr-defined]
                request, self.opts, object_id
            )
            return redirect
        allowed = self.has_add_permission(request) if add else self.has_change_permission(request, prompt)
        if not allowed:
            raise PermissionDenied
        previous = None if prompt is None else prompts.latest_version(prompt)
        form = self.get_form(request, prompt, change=not add)(request.POST, instance=prompt)
        form.is_valid()  # fills the instance with the edited fields; errors are shown
        edited = form.instance
        admin_form = helpers.AdminForm(
            form,
            # The fieldsets as the admin gives them; django-stubs types AdminForm's narrower.
            cast("list[tuple[Any, dict[str, list[str]]]]", list(self.get_fieldsets(request, prompt))),
            self.get_prepopulated_fields(request, prompt),
            self.get_readonly_fields(request, prompt),
            model_admin=self,
        )
        context = {
            **self.admin_site.each_context(request),
            "title": f"Preview of {edited.name or 'a new prompt'}",
            "subtitle": None,
            "adminform": admin_form,
            "object_id": object_id,
            "original": prompt,
            "is_popup": False,
            "to_field": None,
            "media": self.media + admin_form.media,
            "inline_admin_formsets": [],
            "errors": helpers.AdminErrorList(form, []),
            "preserved_filters": self.get_preserved_filters(request),
            "preview": prompt_preview(edited, previous=previous),
            "previewing": True,
        }
        return self.render_change_form(
            request, context, add=add, change=not add, obj=prompt, form_url=form_url
        )


def _prompt_in_use(prompt: SystemPrompt) -> bool:
    return Conversation.objects.filter(prompt_version__prompt=prompt).exists()


@admin.register(SystemPromptVersion)
class SystemPromptVersionAdmin(_SystemPromptVersionAdminBase):
    """Read only: where a conversation's `prompt_version` link leads."""

    list_display = ["prompt", "number", "model", "temperature", "max_tokens", "created_by", "created_at"]
    list_select_related = ["prompt", "created_by"]
    list_filter = ["prompt"]
    search_fields = ["prompt__name", "text"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: SystemPromptVersion | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: SystemPromptVersion | None = None) -> bool:
        return False


@admin.register(ModelPrice)
class ModelPriceAdmin(_ModelPriceAdminBase):
    list_display = ["model", "input_per_million", "output_per_million", "updated_at"]
    search_fields = ["model"]


# --- The models users may pick -----------------------------------------------------------


@admin.register(ChatModel)
class ChatModelAdmin(_ChatModelAdminBase):
    """The models users may pick for a new chat, each with a link to its
    price (a model without one is accounted at cost 0, which the list says)."""

    list_display = ["name", "label", "enabled", "vision", "position", "price"]
    list_editable = ["enabled", "vision", "position"]
    list_filter = ["enabled", "vision"]
    search_fields = ["name", "label"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[ChatModel]:
        prices = ModelPrice.objects.filter(model=OuterRef("name"))
        return (
            super()
            .get_queryset(request)
            .annotate(
                price_pk=Subquery(prices.values("pk")[:1]),
                price_in=Subquery(prices.values("input_per_million")[:1]),
                price_out=Subquery(prices.values("output_per_million")[:1]),
            )
        )

    @admin.display(description="Price per 1M tokens (in / out)")
    def price(self, obj: WithAnnotations[ChatModel, _PriceAnnotations]) -> str:
        if getattr(obj, "price_pk", None) is None:
            add = reverse("admin:conversations_modelprice_add") + "?" + urlencode({"model": obj.name})
            return format_html('<a href="{}" class="no-price">No price set: calls cost 0. Add one</a>', add)
        change = reverse("admin:conversations_modelprice_change", args=[obj.price_pk])
        return format_html(
            '<a href="{}">{} / {}</a>', change, obj.price_in.normalize(), obj.price_out.normalize()
        )


# --- The token ledger --------------------------------------------------------------------


class InputFilter(admin.SimpleListFilter):
    """A text box in the filter sidebar: no query over the ledger to list
    the choices, which a million rows would make slow."""

    template = "admin/input_filter.html"
    parameter_name: str  # each filter's own

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin[Any]) -> list[tuple[str, str]]:
        return [("", "")]  # the filter shows only if there is a lookup

    def choices(self, changelist: ChangeList) -> Iterator[_InputFilterChoice]:
        others = []
        for name, value in changelist.get_filters_params().items():
            if name == self.parameter_name:
                continue
            for one in value if isinstance(value, list) else [value]:
                others.append((name, one))
        yield {
            "selected": self.value() is None,
            "query_string": changelist.get_query_string(remove=[self.parameter_name]),
            "others": others,
            "display": "All",
        }


class UserFilter(InputFilter):
    title = "username"
    parameter_name = "username"

    def queryset(self, request: HttpRequest, queryset: QuerySet[TokenUsage]) -> QuerySet[TokenUsage]:
        value = self.value()
        return queryset.filter(user__username=value.strip()) if value else queryset


class ModelFilter(InputFilter):
    title = "model"
    parameter_name = "model_name"

    def queryset(self, request: HttpRequest, queryset: QuerySet[TokenUsage]) -> QuerySet[TokenUsage]:
        value = self.value()
        return queryset.filter(model=value.strip()) if value else queryset


class SpendReportForm(forms.Form):
    by = forms.ChoiceField(choices=[(name, name.title()) for name in reports.GROUPINGS], initial="day")
    since = forms.DateField(widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(widget=forms.DateInput(attrs={"type": "date"}))
    metric = forms.ChoiceField(choices=[("cost", "Cost"), ("tokens", "Tokens")], initial="cost")
    user = forms.CharField(required=False, label="Username")
    model = forms.CharField(required=False)

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        assert cleaned is not None  # Form.clean returns cleaned_data
        since, until = cleaned.get("since"), cleaned.get("until")
        if since and until and since > until:
            raise ValidationError("The range starts after it ends.")
        return cleaned


class ReportParams(TypedDict):
    by: str
    since: date
    until: date
    metric: str
    user: NotRequired[str]
    model: NotRequired[str]


def report_defaults() -> ReportParams:
    today = timezone.localdate()
    return {"by": "day", "since": today - timedelta(days=29), "until": today, "metric": "cost"}


@admin.register(TokenUsage)
class TokenUsageAdmin(_TokenUsageAdminBase):
    list_display = [
        "created_at", "user", "kind", "model", "tokens_in", "tokens_out", "tokens_cached", "cost_shown",
        "estimated",
    ]  # fmt: skip
    list_filter = [UserFilter, ModelFilter, "estimated", "kind", ("created_at", admin.DateFieldListFilter)]
    list_select_related = ["user"]
    fields = [
        "created_at", "user", "kind", "model", "prompt_tokens", "completion_tokens", "cached_tokens",
        "cost", "estimated", "conversation_ref", "message_ref",
    ]  # fmt: skip
    readonly_fields = cast("list[str]", fields)  # names only, no groups
    # A million rows: count the filtered set once, never the whole table again.
    show_full_result_count = False
    change_list_template = "admin/conversations/tokenusage/change_list.html"

    # Short headings: the list fits a 1280 px screen beside the filters.
    @admin.display(description="In", ordering="prompt_tokens")
    def tokens_in(self, usage: TokenUsage) -> int:
        return usage.prompt_tokens

    @admin.display(description="Out", ordering="completion_tokens")
    def tokens_out(self, usage: TokenUsage) -> int:
        return usage.completion_tokens

    @admin.display(description="Cached", ordering="cached_tokens")
    def tokens_cached(self, usage: TokenUsage) -> int:
        return usage.cached_tokens

    @admin.display(description="Cost", ordering="cost")
    def cost_shown(self, usage: TokenUsage) -> str:
        return money(usage.cost)

    # The ids only: a conversation's title is content, for reviewers only.
    @admin.display(description="Conversation")
    def conversation_ref(self, usage: TokenUsage) -> str:
        return str(usage.conversation_id or "— (pruned)")

    @admin.display(description="Message")
    def message_ref(self, usage: TokenUsage) -> str:
        return str(usage.message_id or "— (pruned)")

    def has_add_permission(self, request: HttpRequest) -> bool:  # a ledger is written by the code only
        return False

    def has_change_permission(self, request: HttpRequest, obj: TokenUsage | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: TokenUsage | None = None) -> bool:
        return False

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        response = super().changelist_view(request, extra_context)
        context = getattr(response, "context_data", None)
        if context and "cl" in context:
            context["spend_total"] = reports.spend_totals(context["cl"].queryset)
            context["unpriced"] = reports.unpriced_models(context["cl"].queryset)
        return response

    def get_urls(self) -> list[URLPattern]:
        report = path(
            "report/", self.admin_site.admin_view(self.report_view), name="conversations_tokenusage_report"
        )
        return [report, *super().get_urls()]

    def report_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        form = SpendReportForm(request.GET if "by" in request.GET else None, initial=dict(report_defaults()))
        params = (
            cast(ReportParams, form.cleaned_data) if form.is_bound and form.is_valid() else report_defaults()
        )
        context: dict[str, Any] = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Spend report",
            "form": form,
            "params": params,
        }
        if not form.is_bound or form.is_valid():
            rows = reports.ledger(
                since=params["since"],
                until=params["until"],
                user=params.get("user") or None,
                model=params.get("model") or None,
            )
            spend = reports.spend_by(rows, params["by"])
            if request.GET.get("format") == "csv":
                return self._csv(spend, params)
            context.update(
                unpriced=reports.unpriced_models(rows),
                spend=spend,
                total=reports.total_of(spend),
                chart=reports.spend_chart_svg(spend, metric=params["metric"]),
                csv_query=_with_csv(request),
            )
        return TemplateResponse(request, "admin/conversations/tokenusage/report.html", context)

    def _csv(self, spend: list[reports.SpendRow], params: ReportParams) -> HttpResponse:
        name = f"spend-by-{params['by']}-{params['since']}-{params['until']}.csv"
        response = HttpResponse(content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{name}"'
        reports.write_csv(spend, params["by"], response)
        return response


def _with_csv(request: HttpRequest) -> str:
    query = request.GET.copy()
    query["format"] = "csv"
    if "by" not in query:
        query.update({key: str(value) for key, value in report_defaults().items()})
    return query.urlencode()


# --- Conversation review -----------------------------------------------------------------


def _may_review(request: HttpRequest) -> bool:
    return request.user.is_active and request.user.is_staff and request.user.has_perm(REVIEW_PERMISSION)


class MessageInline(_MessageInlineBase):
    model = Message
    fields = ["created_at", "role", "status", "finish_reason", "model", "is_active", "content"]
    readonly_fields = cast("list[str]", fields)  # names only, no groups
    extra = 0
    can_delete = False
    show_change_link = False

    def has_view_permission(self, request: HttpRequest, obj: Conversation | None = None) -> bool:
        return _may_review(request)

    def has_add_permission(self, request: HttpRequest, obj: Conversation | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Conversation | None = None) -> bool:
        return False


@admin.register(Conversation)
class ConversationAdmin(_ConversationAdminBase):
    """Read only, and only for staff with the `review_conversation`
    permission: the plain view/change permissions are not enough."""

    list_display = ["display_title", "owner", "pinned", "prompt_version", "created_at", "updated_at"]
    list_select_related = ["owner", "prompt_version__prompt"]
    list_filter = ["pinned"]
    search_fields = ["title", "owner__username"]
    fields = [
        "id",
        "owner",
        "title",
        "pinned",
        "prompt",
        "prompt_version",
        "prompt_text",
        "model",
        "summary",
        "summary_through",
        "created_at",
        "updated_at",
    ]
    readonly_fields = cast("list[str]", fields)  # names only, no groups
    inlines = [MessageInline]

    def has_module_permission(self, request: HttpRequest) -> bool:
        return _may_review(request)

    def has_view_permission(self, request: HttpRequest, obj: Conversation | None = None) -> bool:
        return _may_review(request)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Conversation | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Conversation | None = None) -> bool:
        return False  # history is pruned by `manage.py prune_history`, not by hand


@admin.register(Share)
class ShareAdmin(_ShareAdminBase):
    """Every shared link; deleting one revokes it (its address is then 404)."""

    list_display = ["title", "owner", "show_owner", "created_at", "updated_at"]
    list_select_related = ["conversation__owner"]
    search_fields = ["title", "conversation__owner__username"]
    fields = ["conversation", "title", "show_owner", "created_at", "updated_at"]
    readonly_fields = cast("list[str]", fields)  # names only, no groups
    actions = ["delete_selected"]

    @admin.display(description="owner", ordering="conversation__owner__username")
    def owner(self, link: Share) -> str:
        return link.conversation.owner.get_username()

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Share | None = None) -> bool:
        return False


# --- MCP servers ----------------------------------------------------------------------------


class McpServerForm(forms.ModelForm):  # type: ignore[type-arg]
    superuser = False  # set per request (McpServerAdmin.get_form)
    url = forms.URLField(
        required=False,
        max_length=500,
        assume_scheme="https",
        help_text="Streamable HTTP: the server's endpoint.",
    )

    class Meta:
        model = McpServer
        fields = [
            "name", "enabled", "transport", "timeout", "url", "headers", "command", "args", "env",
            "prompts", "groups", "tools",
        ]  # fmt: skip

    def clean_name(self) -> str:
        from .tools.mcp import SERVER_NAME

        name: str = self.cleaned_data["name"]
        if not SERVER_NAME.match(name):
            raise ValidationError(
                "Lowercase letters and digits, single _ between them, at most 30 characters."
            )
        return name

    def clean(self) -> dict[str, Any]:
        data: dict[str, Any] = super().clean() or {}
        transport = data.get("transport")
        if transport == McpServer.Transport.STDIO:
            if not self.superuser:
                raise ValidationError(
                    "Only a superuser registers a stdio server: it runs a program on this host."
                )
            if not data.get("command"):
                self.add_error("command", "A stdio server needs the program to run.")
        elif transport == McpServer.Transport.HTTP and not data.get("url"):
            self.add_error("url", "A streamable HTTP server needs its address.")
        for name, kind in (("headers", dict), ("env", dict), ("args", list)):
            if name in data and not isinstance(data[name], kind):
                self.add_error(name, f"A JSON {'object' if kind is dict else 'list'}.")
        return data


@admin.register(McpServer)
class McpServerAdmin(_McpServerAdminBase):
    """Company tools (conversations/tools/mcp.py): each server, with its
    tools as last listed by a worker and whether it answered. A change is
    seen by every worker within seconds (a changed server gets a new session)."""

    list_display = ["name", "transport", "enabled", "answered", "tool_count", "listed_at", "from_settings"]
    list_filter = ["enabled", "transport"]
    search_fields = ["name", "url", "command"]
    filter_horizontal = ["prompts", "groups"]
    readonly_fields = ["from_settings", "tool_list", "listed_at", "last_error", "created_at", "updated_at"]
    fieldsets = [
        (None, {"fields": ["name", "enabled", "transport", "timeout"]}),
        ("Streamable HTTP", {"fields": ["url", "headers"]}),
        ("stdio", {"fields": ["command", "args", "env"]}),
        ("Who may use it", {"fields": ["prompts", "groups", "tools"]}),
        ("What it answered", {"fields": ["tool_list", "listed_at", "last_error", "from_settings"]}),
    ]

    form = McpServerForm

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        form = super().get_form(request, obj, change=change, **kwargs)
        form.superuser = bool(request.user.is_superuser)  # type: ignore[attr-defined]
        return form

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        """Staff who may only look see no header or environment (a bearer token)."""
        fieldsets = super().get_fieldsets(request, obj)
        if self.has_change_permission(request, obj):
            return fieldsets
        hidden = {"headers", "env"}
        return [
            (title, {**opts, "fields": [f for f in opts["fields"] if f not in hidden]})
            for title, opts in fieldsets
        ]

    @admin.display(description="answered", boolean=True)
    def answered(self, server: McpServer) -> bool | None:
        if server.listed_at is None and not server.last_error:
            return None  # not asked yet
        return not server.last_error

    @admin.display(description="tools")
    def tool_count(self, server: McpServer) -> int:
        return len(server.listed_tools or [])

    @admin.display(description="tools as last listed")
    def tool_list(self, server: McpServer) -> str:
        tools = server.listed_tools or []
        if not tools:
            return "none listed yet"
        return "\n".join(f"{server.name}__{t.get('name', '?')}: {t.get('description', '')}" for t in tools)
