"""What a newcomer meets first: `make run` on a busy port, its log, the
favicon, the empty chat."""

from __future__ import annotations

import logging
import logging.config
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from django.conf import settings

from tests.conftest import BASE_DIR
from tests.test_admin import client_for


def test_make_run_on_a_busy_port_exits_at_once_and_says_what_to_do() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        command = ["make", "--no-print-directory", "run", f"PORT={port}", f"PYTHON={sys.executable}"]
        result = subprocess.run(command, cwd=BASE_DIR, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and time.monotonic() - started < 10
    assert f"Port {port} on 127.0.0.1 is not free" in result.stderr
    assert f"make run PORT={port + 1}" in result.stderr


def test_a_django_log_line_is_printed_once() -> None:
    logging.config.dictConfig(settings.LOGGING)
    assert logging.getLogger("django").handlers == []  # its lines go to the root's one handler
    assert len(logging.getLogger().handlers) == 1


@pytest.mark.django_db
def test_the_favicon_is_served_and_the_empty_chat_says_things_once(alice: Any) -> None:
    client = client_for(alice)
    response = client.get("/favicon.ico")
    assert response.status_code == 301 and response["Location"].endswith(".svg")
    page = client.get("/").content.decode()
    assert page.count("for a new line") == 1
    assert "favicon" in page
