"""ASGI entry point: HTTP goes to Django; websockets pass the origin check
(chatsite/origin.py: scheme, host and port, as Django's CSRF check), then
session authentication, then the router."""

from __future__ import annotations

import os
import sys

from django.core.asgi import get_asgi_application

# The database thread (every ORM call of sockets and answers) gives up the
# GIL on each query and must win it back from the event loop: with Python's
# default 5 ms switch interval a busy loop made every query wait up to 5 ms
# (a convoy: accepting 200 turns took seconds). 0.5 ms keeps both moving.
sys.setswitchinterval(float(os.environ.get("PYTHON_SWITCH_INTERVAL", "0.0005")))

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
# Set up Django (apps, models) before anything imports a model.
django_asgi_app = get_asgi_application()

from django.urls import get_resolver  # noqa: E402

# Import the URLconf now, not in the first HTTP request: with allauth's
# URLs it takes 150 ms of imports with the GIL held, which a burst's first
# requests (an API burst after a socket-only start) all waited for.
get_resolver().url_patterns  # noqa: B018

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from chatsite.bodylimit import BodyLimit  # noqa: E402
from chatsite.origin import SameOriginValidator  # noqa: E402
from chatsite.startup import SweepOnStartup  # noqa: E402
from conversations.routing import websocket_urlpatterns  # noqa: E402

application = SweepOnStartup(
    ProtocolTypeRouter(
        {
            "http": BodyLimit(django_asgi_app),
            "websocket": SameOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
        }
    )
)
