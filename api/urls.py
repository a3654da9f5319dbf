from django.urls import path

from . import account, files, projects, views

app_name = "api"

urlpatterns = [
    path("api/v1/models", views.models, name="models"),
    path("api/v1/chat/completions", views.chat_completions, name="chat-completions"),
    path("api/v1/conversations", views.conversations, name="conversations"),
    path("api/v1/conversations/<uuid:conversation_id>", views.conversation, name="conversation"),
    path(
        "api/v1/conversations/<uuid:conversation_id>/messages",
        views.conversation_messages,
        name="conversation-messages",
    ),
    path(
        "api/v1/conversations/<uuid:conversation_id>/stream",
        views.conversation_stream,
        name="conversation-stream",
    ),
    path(
        "api/v1/conversations/<uuid:conversation_id>/share",
        views.conversation_share,
        name="conversation-share",
    ),
    path("api/v1/projects", projects.project_list, name="projects"),
    path("api/v1/projects/<uuid:project_id>", projects.project, name="project"),
    path("api/v1/files", files.files, name="files"),
    path("api/v1/files/<uuid:file_id>", files.file, name="file"),
    path("api/v1/files/<uuid:file_id>/content", files.file_content, name="file-content"),
    path("accounts/tokens/", account.tokens_page, name="tokens"),
    path("accounts/tokens/<int:token_id>/revoke/", account.revoke, name="token-revoke"),
]
