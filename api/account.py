"""The account page's API tokens: create one (shown once), list, revoke."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from . import tokens
from .models import ApiToken

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    class SignedInRequest(HttpRequest):
        """A request that `login_required` let through: its user is signed in."""

        user: User


EXPIRY_CHOICES = [("", "Never"), ("7d", "7 days"), ("30d", "30 days"), ("90d", "90 days"), ("365d", "1 year")]


class TokenForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="What the token is for, e.g. “laptop scripts”.")
    expires = forms.ChoiceField(choices=EXPIRY_CHOICES, required=False, initial="30d", label="Expires after")


@login_required
@never_cache
def tokens_page(request: SignedInRequest) -> HttpResponse:
    created = None
    if request.method == "POST":
        form = TokenForm(request.POST)
        if form.is_valid():
            expires = form.cleaned_data["expires"]
            _row, created = tokens.create(
                request.user,
                form.cleaned_data["name"],
                expires_in=tokens.parse_duration(expires) if expires else None,
            )
            form = TokenForm()
    else:
        form = TokenForm()
    context = {
        "form": form,
        "created": created,  # shown on this response only: never stored, never shown again
        "tokens": ApiToken.objects.filter(user=request.user),
        "api_allowed": tokens.allowed(request.user),
        "base_url": request.build_absolute_uri("/api/v1"),
    }
    response = render(request, "api/tokens.html", context)
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def revoke(request: SignedInRequest, token_id: int) -> HttpResponse:
    if tokens.revoke(request.user, token_id):
        messages.success(request, "The token was revoked: it no longer works.")
    return redirect("api:tokens")
