"""The pages of shared links: sharing and revoking (the owner's chat page),
the shared page itself, its files, "continue in your own chat", and the
account's list of links. They only parse, delegate to `sharing` and format."""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

from django.contrib.auth.decorators import login_required
from django.contrib.auth.views import redirect_to_login
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from files import serve

from . import refusals, sharing
from .models import Share
from .rendering import render_many
from .views import AuthenticatedHttpRequest, _posted


def link_json(request: HttpRequest, link: Share) -> dict[str, Any]:
    """A link as the page and the API return it."""
    return {
        "url": request.build_absolute_uri(reverse("chat:shared", kwargs={"token": link.token})),
        "token": link.token,
        "show_owner": link.show_owner,
        "created_at": link.created_at.isoformat(),
        "updated_at": link.updated_at.isoformat(),
    }


@login_required
@require_http_methods(["POST", "DELETE"])
def conversation_share(request: AuthenticatedHttpRequest, conversation_id: uuid.UUID) -> HttpResponseBase:
    """POST: share the conversation as it is now (again: update the link's
    snapshot; `show_owner` optional); DELETE: revoke its link."""
    # The account page's revoke button: a form can only POST.
    from_form = request.method == "POST" and request.POST.get("_method") == "DELETE"
    try:
        if from_form:  # gone already (another tab): the list shows what is left
            with contextlib.suppress(refusals.Refusal):
                sharing.revoke(user=request.user, conversation_id=conversation_id)
            return redirect("chat:shared_links")
        if request.method == "DELETE":
            sharing.revoke(user=request.user, conversation_id=conversation_id)
            return JsonResponse({"revoked": True})
        show = _posted(request).get("show_owner")
        link, made = sharing.share(
            user=request.user,
            conversation_id=conversation_id,
            show_owner=show if isinstance(show, bool) else None,
        )
    except sharing.SharingOff:
        return JsonResponse({"error": "Sharing is turned off on this site."}, status=403)
    except refusals.Refusal as refusal:
        return JsonResponse({"error": refusal.message}, status=404)
    return JsonResponse(link_json(request, link), status=201 if made else 200)


def _opened(request: HttpRequest, token: str) -> Share | HttpResponse:
    try:
        return sharing.opened(token, request.user)
    except sharing.SignInNeeded:
        return redirect_to_login(request.get_full_path())
    except refusals.Refusal:
        raise Http404("No such link.") from None


def _private(response: HttpResponseBase) -> HttpResponseBase:
    response["X-Robots-Tag"] = "noindex, nofollow"
    response["Cache-Control"] = "private, no-store"
    # The site's Referrer-Policy (same-origin) keeps the token out of any
    # other site's logs; `no-referrer` would make the browser send
    # `Origin: null` with the page's own form, which CSRF refuses.
    return response


@require_GET
@never_cache
def shared_page(request: HttpRequest, token: str) -> HttpResponseBase:
    found = _opened(request, token)
    if isinstance(found, HttpResponse):
        return found
    answers = [m for m in found.messages if m["role"] == "assistant"]
    for message, html in zip(answers, render_many([m["content"] for m in answers]), strict=True):
        message["html"] = html
    context = {
        "link": found,
        "messages": found.messages,
        "owner_name": sharing.owner_name(found),
        "can_continue": request.user.is_authenticated,
    }
    return _private(render(request, "conversations/shared.html", context))


@require_GET
def shared_file(request: HttpRequest, token: str, file_id: str) -> HttpResponseBase:
    found = _opened(request, token)
    if isinstance(found, HttpResponse):
        return found
    try:
        row = sharing.shared_file(found, file_id)
    except refusals.Refusal:
        raise Http404("No such file.") from None
    return _private(serve.download(row))


@require_POST
def shared_continue(request: HttpRequest, token: str) -> HttpResponseBase:
    if not request.user.is_authenticated:  # back to the shared page once signed in
        return redirect_to_login(reverse("chat:shared", kwargs={"token": token}))
    found = _opened(request, token)
    if isinstance(found, HttpResponse):
        return found
    copy = sharing.copy_for(found, request.user)
    return redirect("chat:conversation", conversation_id=copy.pk)


@login_required
@never_cache
def my_links(request: AuthenticatedHttpRequest) -> HttpResponse:
    """The account's shared links, each with its revoke button."""
    links = [{**link_json(request, link), "link": link} for link in sharing.links_of(request.user)]
    return render(request, "accounts/shares.html", {"links": links, "sharing": sharing.mode()})
