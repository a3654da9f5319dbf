from __future__ import annotations

from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.debug import sensitive_post_parameters

from .forms import SignupForm
from .quotas import usage_summary


@sensitive_post_parameters("password1", "password2")
def signup(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        return redirect("chat:new")
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("chat:new")
    return render(request, "accounts/signup.html", {"form": form})


@login_required
def usage(request: HttpRequest) -> HttpResponse:
    """What the user spent today and this month, and what is left."""
    limits, windows = usage_summary(request.user)
    return render(
        request,
        "accounts/usage.html",
        {"limits": limits, "windows": windows, "now": timezone.now()},
    )
