from django.urls import path

from . import views

app_name = "files"

urlpatterns = [
    path("files/", views.upload, name="upload"),
    path("files/<uuid:file_id>/", views.content, name="content"),
]
