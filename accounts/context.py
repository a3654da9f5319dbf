"""What every page's account menu says of the sign-in."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest


def signed_in_with(request: HttpRequest) -> dict[str, str]:
    """`signed_in_with`: the identity provider this session signed in through
    (allauth's record of it in the session), or "" (a password)."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated or not hasattr(request, "session"):
        return {"signed_in_with": ""}
    records = request.session.get("account_authentication_methods")
    provider = ""
    for record in records if isinstance(records, list) else ():
        if isinstance(record, dict) and record.get("method") == "socialaccount":
            provider = str(record.get("provider") or "")
    if provider == "sso":
        provider = settings.OIDC_NAME
    return {"signed_in_with": provider}
