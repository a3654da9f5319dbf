from django.urls import path, re_path

from . import share_views, views

app_name = "chat"

urlpatterns = [
    path("", views.new_chat, name="new"),
    path("c/<uuid:conversation_id>/", views.conversation_detail, name="conversation"),
    path("conversations/", views.conversation_list, name="list"),
    path("c/<uuid:conversation_id>/rename", views.conversation_rename, name="rename"),
    path("c/<uuid:conversation_id>/delete", views.conversation_delete, name="delete"),
    path("c/<uuid:conversation_id>/export.md", views.conversation_export, {"fmt": "md"}, name="export_md"),
    path(
        "c/<uuid:conversation_id>/export.json", views.conversation_export, {"fmt": "json"}, name="export_json"
    ),
    path("c/<uuid:conversation_id>/share/", share_views.conversation_share, name="share"),
    path("c/<uuid:conversation_id>/project/", views.conversation_move, name="move"),
    path("projects/new/", views.project_new, name="project_new"),
    path("p/<uuid:project_id>/", views.project_chat, name="project"),
    path("p/<uuid:project_id>/edit/", views.project_edit, name="project_edit"),
    path("p/<uuid:project_id>/delete/", views.project_delete, name="project_delete"),
    # A link's token: what secrets.token_urlsafe makes (anything else is 404 before a query).
    re_path(r"^s/(?P<token>[A-Za-z0-9_-]{20,64})/$", share_views.shared_page, name="shared"),
    re_path(
        r"^s/(?P<token>[A-Za-z0-9_-]{20,64})/continue/$", share_views.shared_continue, name="shared_continue"
    ),
    re_path(
        r"^s/(?P<token>[A-Za-z0-9_-]{20,64})/files/(?P<file_id>[0-9a-f-]{36})/$",
        share_views.shared_file,
        name="shared_file",
    ),
    path("accounts/shared-links/", share_views.my_links, name="shared_links"),
]
