"""Per-user budgets: the limits staff set (`Quota`) and the counters that
enforce them (`QuotaCounter`, one row per user and window)."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import Group
from django.db import models
from django.db.models import Q


class Quota(models.Model):
    """Limits for one user, one group, or the site default. A blank limit is
    unlimited. A user's own quota wins; else the lowest limits among their
    groups' quotas; else the default."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="quota"
    )
    group = models.OneToOneField(Group, null=True, blank=True, on_delete=models.CASCADE, related_name="quota")
    is_default = models.BooleanField(
        default=False, help_text="The site default, for users with no quota of their own or of a group."
    )
    tokens_per_day = models.PositiveBigIntegerField(null=True, blank=True)
    tokens_per_month = models.PositiveBigIntegerField(null=True, blank=True)
    cost_per_day = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)
    cost_per_month = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)
    answers_per_minute = models.PositiveIntegerField(null=True, blank=True)
    file_storage_bytes = models.PositiveBigIntegerField(
        null=True,
        blank=True,
        help_text="Uploaded files kept at most, in bytes. Blank: CHAT_FILE_STORAGE_PER_USER.",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            # Exactly one of: a user, a group, the default.
            models.CheckConstraint(
                condition=(
                    Q(user__isnull=False, group__isnull=True, is_default=False)
                    | Q(user__isnull=True, group__isnull=False, is_default=False)
                    | Q(user__isnull=True, group__isnull=True, is_default=True)
                ),
                name="quota_one_subject",
            ),
            models.UniqueConstraint(
                fields=["is_default"], condition=Q(is_default=True), name="one_default_quota"
            ),
        ]

    def __str__(self) -> str:
        if self.user_id:
            return f"Quota of user {self.user}"
        if self.group_id:
            return f"Quota of group {self.group}"
        return "Site default quota"


class QuotaCounter(models.Model):
    """What one user used and has reserved in one window (a minute, a day or a
    month, from `start`). Reservations and their settling are conditional
    UPDATEs of this row, so concurrent answers cannot overspend."""

    class Window(models.TextChoices):
        MINUTE = "minute"
        DAY = "day"
        MONTH = "month"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    window = models.CharField(max_length=8, choices=Window.choices)
    start = models.DateTimeField()
    tokens_used = models.BigIntegerField(default=0)
    tokens_reserved = models.BigIntegerField(default=0)
    cost_used = models.DecimalField(max_digits=14, decimal_places=6, default=0)
    cost_reserved = models.DecimalField(max_digits=14, decimal_places=6, default=0)
    answers = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "window", "start"], name="unique_quota_counter")
        ]

    def __str__(self) -> str:
        return f"{self.user_id} {self.window} {self.start:%Y-%m-%d %H:%M}"


class ProviderMembership(models.Model):
    """A group the identity provider gave a user (accounts/sso.py): replaced
    on every sign-in through it, while groups staff gave by hand stay."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="provider_memberships"
    )
    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="+")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "group"], name="one_provider_membership")]

    def __str__(self) -> str:
        return f"{self.user} in {self.group} (from the identity provider)"
