from django.contrib import admin
from django.urls import include, path

from conversations.views import healthz

urlpatterns = [
    path("", include("api.urls")),
    path("accounts/", include("accounts.urls")),
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
    path("", include("conversations.urls")),
]
