from django.urls import path

from . import views

app_name = "chat"

urlpatterns = [
    path("", views.new_chat, name="new"),
    path("c/<uuid:conversation_id>/", views.conversation_detail, name="conversation"),
]
