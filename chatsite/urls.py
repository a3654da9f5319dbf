from allauth.urls import build_provider_urlpatterns
from django.contrib import admin
from django.http import HttpRequest, HttpResponsePermanentRedirect
from django.templatetags.static import static
from django.urls import include, path

from accounts.views import admin_login
from conversations.views import healthz, usage


def favicon(request: HttpRequest) -> HttpResponsePermanentRedirect:
    return HttpResponsePermanentRedirect(static("favicon.svg"))


# The admin's login is the site's: the password, then the second factor (allauth.mfa).
admin.site.login = admin_login(admin.site.login)  # type: ignore[method-assign]

urlpatterns = [
    path("", include("api.urls")),
    path("", include("files.urls")),
    path("accounts/usage/", usage, name="usage"),  # what the user spent, and what is left
    path("accounts/", include("accounts.urls")),
    # django-allauth's sign-in through identity providers: /accounts/oidc/<id>/login/ and
    # its callback (the pages around it: accounts/urls.py).
    path("accounts/", include(build_provider_urlpatterns())),
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
    # Browsers ask for it whatever the page says.
    path("favicon.ico", favicon),
    path("", include("conversations.urls")),
]
