"""Response headers that Django 5.2 does not set by itself."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from django.conf import settings
from django.http import HttpRequest, HttpResponse


# No inline script anywhere: pages pass data through `json_script` blocks,
# which are JSON, not code, and the browser never executes them.
def content_security_policy(form_action: tuple[str, ...] = ()) -> str:
    """The site's policy; `form_action`: more origins a form may lead to (a
    sign-in button's POST is answered with a redirect to the identity
    provider, and browsers hold that redirect to `form-action` too)."""
    return "; ".join(
        [
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data: blob:",  # blob: a picture's preview before it is sent
            "connect-src 'self'",
            "object-src 'none'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
            " ".join(["form-action 'self'", *form_action]),
        ]
    )


CONTENT_SECURITY_POLICY = content_security_policy()


class ContentSecurityPolicyMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        # The admin ships inline scripts of its own; leave its pages alone.
        if request.path.startswith("/accounts/") and settings.OIDC_SERVER_URL:
            # The identity provider's sign-in pages (allauth's "Continue" form included).
            provider = urlsplit(settings.OIDC_SERVER_URL)
            origin = f"{provider.scheme}://{provider.netloc}"
            response.headers.setdefault("Content-Security-Policy", content_security_policy((origin,)))
        elif not request.path.startswith("/admin/"):
            response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("Referrer-Policy", "same-origin")
        return response
