"""Personal API tokens (only their hash is stored) and the staff's switch
for the HTTP API."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import Group
from django.db import models


class ApiToken(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    # The first characters of the token, to tell tokens apart; never enough to use one.
    prefix = models.CharField(max_length=16, editable=False)
    digest = models.CharField(max_length=64, unique=True, editable=False)  # sha256 of the token
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Blank: never expires.")
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None


class ApiAccess(models.Model):
    """One row: whether the HTTP API is on, and the groups it is off for."""

    enabled = models.BooleanField(default=True, help_text="Off: every API call is refused (403).")
    disabled_groups = models.ManyToManyField(
        Group, blank=True, related_name="+", help_text="Members of these groups may not use the API."
    )

    class Meta:
        verbose_name = verbose_name_plural = "API access"

    def __str__(self) -> str:
        return "API access"

    @classmethod
    def current(cls) -> ApiAccess:
        found = cls.objects.first()
        return found if found is not None else cls(enabled=True)
