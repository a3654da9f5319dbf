"""Quotas in the admin: per user, per group, and the site default."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse

from . import security
from .models import Quota, QuotaCounter
from .signals import accounts_changed
from .views import invitable, send_invitation

if TYPE_CHECKING:
    from django.contrib.auth.models import User as AuthUser

    # Django's admin classes are not subscriptable at run time (no django_stubs_ext here).
    _QuotaAdmin = admin.ModelAdmin[Quota]
    _QuotaCounterAdmin = admin.ModelAdmin[QuotaCounter]
    _UserAdmin = UserAdmin[AuthUser]
else:
    _QuotaAdmin = _QuotaCounterAdmin = admin.ModelAdmin
    _UserAdmin = UserAdmin


@admin.register(Quota)
class QuotaAdmin(_QuotaAdmin):
    list_display = [
        "__str__", "tokens_per_day", "tokens_per_month", "cost_per_day", "cost_per_month",
        "answers_per_minute", "file_storage_bytes", "updated_at",
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
        ("Files", {"fields": ["file_storage_bytes"]}),
    ]


@admin.register(QuotaCounter)
class QuotaCounterAdmin(_QuotaCounterAdmin):
    """Read only: what the quota check sees for each user and window."""

    list_display = [
        "user", "window", "start", "tokens_used", "tokens_reserved", "cost_used", "cost_reserved", "answers",
    ]  # fmt: skip
    list_filter = ["window"]
    list_select_related = ["user"]
    search_fields = ["user__username"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: QuotaCounter | None = None) -> bool:
        return False


# --- Users: activate the sign-ups that wait for approval; invite by e-mail ----------------

User = get_user_model()
log = logging.getLogger(__name__)


def _may_change(request: HttpRequest, queryset: QuerySet[AuthUser]) -> QuerySet[AuthUser]:
    """The users of `queryset` this staff member may (de)activate: a
    superuser's account only a superuser; never their own."""
    staff = cast("AuthUser", request.user)  # the admin lets staff in only, never AnonymousUser
    allowed = queryset.exclude(pk=staff.pk)
    if not staff.is_superuser:
        allowed = allowed.exclude(is_superuser=True)
    return allowed


def _refused(
    modeladmin: admin.ModelAdmin[AuthUser],
    request: HttpRequest,
    queryset: QuerySet[AuthUser],
    allowed: QuerySet[AuthUser],
    action: str,
) -> None:
    left_out = queryset.exclude(pk__in=allowed.values("pk"))
    names = [user.username for user in left_out]
    if names:
        security.event(
            "admin_action_refused",
            user=request.user,
            address=security.request_address(request),
            action=action,
            targets=",".join(names)[:500],
        )
        modeladmin.message_user(
            request,
            f"Left as they are: {', '.join(names)} (your own account, or a superuser's).",
            messages.WARNING,
        )


def _set_active(
    modeladmin: admin.ModelAdmin[AuthUser],
    request: HttpRequest,
    queryset: QuerySet[AuthUser],
    *,
    active: bool,
    action: str,
    event: str,
) -> int:
    """(De)activate the selected users this staff member may change; the
    others are named and logged. How many changed."""
    allowed = _may_change(request, queryset)
    _refused(modeladmin, request, queryset.filter(is_active=not active), allowed, action)
    changed = list(allowed.filter(is_active=not active).values_list("pk", "username"))
    User.objects.filter(pk__in=[pk for pk, _ in changed]).update(is_active=active)
    address = security.request_address(request)
    for _pk, username in changed:
        security.event(event, user=username, address=address, by=request.user.username)
    if not active:  # their open sockets close now (an UPDATE sends no post_save)
        accounts_changed.send(sender=User, user_ids=[pk for pk, _ in changed])
    return len(changed)


@admin.action(description="Activate the selected users (approve their sign-up)", permissions=["change"])
def activate_users(
    modeladmin: admin.ModelAdmin[AuthUser], request: HttpRequest, queryset: QuerySet[AuthUser]
) -> None:
    count = _set_active(
        modeladmin, request, queryset, active=True, action="activate_users", event="user_activated"
    )
    modeladmin.message_user(request, f"{count} user(s) activated: they can log in now.", messages.SUCCESS)


@admin.action(description="Deactivate the selected users (they can no longer log in)", permissions=["change"])
def deactivate_users(
    modeladmin: admin.ModelAdmin[AuthUser], request: HttpRequest, queryset: QuerySet[AuthUser]
) -> None:
    count = _set_active(
        modeladmin, request, queryset, active=False, action="deactivate_users", event="user_deactivated"
    )
    modeladmin.message_user(request, f"{count} user(s) deactivated.", messages.SUCCESS)


@admin.action(
    description="Send a new invitation (to invited users who have not set a password yet)",
    permissions=["add"],
)
def invite_again(
    modeladmin: admin.ModelAdmin[AuthUser], request: HttpRequest, queryset: QuerySet[AuthUser]
) -> None:
    """An invitation that was lost or ran out: a new one-time link, to the
    selected users who are still waiting for theirs (`views.invitable`:
    active, no password, no sign-in through the company's provider) and
    have an address. The others are named; a mail that fails is said."""
    allowed = _may_change(request, queryset)
    _refused(modeladmin, request, queryset, allowed, "invite_again")
    waiting = [user for user in allowed.exclude(email="") if invitable(user)]
    sent, failed = [], []
    for user in waiting:
        try:
            send_invitation(request, user, event="invited_again")
        except Exception:  # the mail server refused: the others still go
            log.exception("the invitation to %s could not be sent", user.username)
            failed.append(user.username)
        else:
            sent.append(user.username)
    left = sorted(u.username for u in allowed.exclude(pk__in=[u.pk for u in waiting]))
    if sent:
        modeladmin.message_user(request, f"{len(sent)} new invitation(s) sent.", messages.SUCCESS)
    if failed:
        modeladmin.message_user(
            request, f"The mail to {', '.join(failed)} could not be sent: see the log.", messages.ERROR
        )
    if left:
        modeladmin.message_user(
            request,
            f"No invitation for {', '.join(left)}: they have a password or sign in through the company's "
            "provider, have no e-mail address or are inactive (or the site takes no passwords).",
            messages.WARNING,
        )


if admin.site.is_registered(User):
    admin.site.unregister(User)


@admin.register(User)
class ChatUserAdmin(_UserAdmin):
    """Django's user admin, with the sign-ups waiting for approval first, an
    "Invite by e-mail" button, and a new invitation for one that was lost.
    Activating and deactivating need the permission to change users, a new
    invitation the permission to add them (Django offers an action to
    whoever may see the list unless it says which permission it needs)."""

    actions = [activate_users, deactivate_users, invite_again]
    list_display = ("username", "email", "is_active", "is_staff", "date_joined", "last_login")
    list_filter = ("is_active", "is_staff", "is_superuser", "groups")
    ordering = ("is_active", "-date_joined")
    change_list_template = "admin/auth/user/change_list_invite.html"

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        action = request.POST.get("action", "") if request.method == "POST" else ""
        if action and action not in self.get_actions(request):
            # Django ignores an action it did not offer; the attempt is worth a line.
            security.event(
                "admin_action_refused",
                user=request.user,
                address=security.request_address(request),
                action=action[:100],
                why="no_permission",
            )
        return super().changelist_view(request, extra_context)
