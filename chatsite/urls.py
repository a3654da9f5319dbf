from django.contrib import admin
from django.http import HttpRequest, HttpResponsePermanentRedirect
from django.templatetags.static import static
from django.urls import include, path

from conversations.views import healthz, usage


def favicon(request: HttpRequest) -> HttpResponsePermanentRedirect:
    return HttpResponsePermanentRedirect(static("favicon.svg"))


urlpatterns = [
    path("", include("api.urls")),
    path("", include("files.urls")),
    path("accounts/usage/", usage, name="usage"),  # what the user spent, and what is left
    path("accounts/", include("accounts.urls")),
    # django-allauth: the identity provider's sign-in (/accounts/oidc/<id>/login/ and its
    # callback) and allauth's own pages; the addresses above stay this site's.
    path("accounts/", include("allauth.urls")),
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
    # Browsers ask for it whatever the page says.
    path("favicon.ico", favicon),
    path("", include("conversations.urls")),
]
