"""Files through the real server: uploads by the openai SDK and by the page,
the kind decided from the bytes, the text of a PDF the test writes itself
read by a child process, downloads that never render in the site's origin,
another person's file nowhere to be found, the limits, and a hostile PDF
that is refused in time while another answer keeps streaming."""

from __future__ import annotations

import contextlib
import io
import json
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from django.conf import settings
from django.test import Client

from api import tokens
from files.models import File
from tests.conftest import LiveServer, module_server
from tests.factories import make_user, session_cookie
from tests.fake_llm import FakeLLM, Reply

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"
    b"\x00\x00\x00\rIDATx\x9cc\xf8\xff\xff?\x00\x05\xfe\x02\xfe\xa7\x35\x81\x84\x00\x00\x00\x00IEND\xaeB`\x82"
)


def pdf(content: bytes, *, compress: bool = False) -> bytes:
    """A one-page PDF whose page draws `content` (a content stream) in Helvetica."""
    stream = zlib.compress(content) if compress else content
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d%s >>\nstream\n" % (len(stream), b" /Filter /FlateDecode" if compress else b"")
        + stream
        + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def text_pdf(*lines: str) -> bytes:
    drawn = b"".join(
        b"BT /F1 12 Tf 72 %d Td (%s) Tj ET\n" % (700 - 20 * i, line.encode()) for i, line in enumerate(lines)
    )
    return pdf(drawn)


def _bomb() -> bytes:
    """A small PDF (a 63 MB page squeezed to some 60 KB) whose page holds
    nine million text operations: reading it takes far longer than any
    time limit."""
    return pdf(b"BT /F1 12 Tf " + b"(a) Tj " * 9_000_000 + b"ET", compress=True)


def _client(server: LiveServer, token: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=token, base_url=server.url + "/api/v1", max_retries=0)


def _request(
    server: LiveServer, path: str, token: str, *, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        server.url + path, method=method, headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = "----chat-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _upload(server: LiveServer, token: str, name: str, data: bytes) -> tuple[int, dict[str, Any]]:
    body, content_type = _multipart(name, data)
    request = urllib.request.Request(
        server.url + "/api/v1/files",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": content_type},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_sdk_uploads_lists_and_deletes_and_a_download_is_the_same_bytes(
    daphne_server: LiveServer, fake_llm: FakeLLM
) -> None:
    alice = make_user("files_alice")
    token = tokens.create(alice, "files")[1]
    client = _client(daphne_server, token)
    notes = "# Notes\n\nThe launch is on Tuesday. ünïcödé\n".encode()

    first = client.files.create(file=("notes.md", notes), purpose="user_data")
    second = client.files.create(file=("table.csv", b"name,qty\nbolt,4\nnut,7\n"), purpose="user_data")

    assert first.filename == "notes.md" and first.bytes == len(notes)
    row = File.objects.get(pk=first.id)
    assert row.owner == alice and row.kind == "text" and row.content_type == "text/markdown"
    assert "launch is on Tuesday" in row.text and row.tokens > 0
    assert File.objects.get(pk=second.id).content_type == "text/csv"
    listed = [f.id for f in client.files.list()]
    assert listed == [second.id, first.id]  # newest first
    assert [f.id for f in client.files.list(limit=1)] == listed  # the SDK follows `after` to the end
    status, headers, body = _request(daphne_server, f"/api/v1/files/{first.id}/content", token)
    assert status == 200 and body == notes
    assert headers["Content-Disposition"].startswith("attachment")
    assert headers["X-Content-Type-Options"] == "nosniff"

    assert client.files.delete(first.id).deleted
    assert [f.id for f in client.files.list()] == [second.id]
    assert not (Path(settings.MEDIA_ROOT) / str(row.blob.name)).exists()  # its bytes went too


def test_the_kind_comes_from_the_bytes_and_html_only_ever_downloads(daphne_server: LiveServer) -> None:
    bob = make_user("files_bob")
    token = tokens.create(bob, "files")[1]

    status, picture = _upload(daphne_server, token, "notes.txt", PNG)  # a picture, whatever its name
    assert status == 201 and picture["content_type"] == "image/png"
    status, refused = _upload(
        daphne_server, token, "report.pdf", b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 8
    )
    assert status == 400 and refused["error"]["code"] == "unsupported_file"
    assert "PDF documents and images (PNG, JPEG, WebP, GIF)" in refused["error"]["message"]

    page = b"<html><body><script>alert(document.cookie)</script></body></html>"
    status, html = _upload(daphne_server, token, "page.html", page)
    assert status == 201 and html["content_type"] == "text/html"
    status, headers, body = _request(daphne_server, f"/api/v1/files/{html['id']}/content", token)
    assert body == page
    assert headers["Content-Type"].startswith("text/plain")  # never rendered as a page
    assert headers["Content-Disposition"].startswith("attachment")
    assert "sandbox" in headers["Content-Security-Policy"]


def test_a_pdf_the_test_writes_is_read_by_the_child_process(daphne_server: LiveServer) -> None:
    carol = make_user("files_carol")
    token = tokens.create(carol, "files")[1]

    status, found = _upload(
        daphne_server, token, "manual.pdf", text_pdf("Chapter one: the red button.", "Never press it.")
    )

    assert status == 201 and found["content_type"] == "application/pdf"
    row = File.objects.get(pk=found["id"])
    assert "the red button" in row.text and "Never press it." in row.text
    assert found["tokens"] == row.tokens > 0


def test_another_persons_file_is_not_found_anywhere(daphne_server: LiveServer) -> None:
    owner, other = make_user("files_owner"), make_user("files_other")
    mine = tokens.create(owner, "files")[1]
    theirs = tokens.create(other, "files")[1]
    _status, found = _upload(daphne_server, mine, "secret.txt", b"the vault code is 1234")
    file_id = found["id"]

    for path, method in (
        (f"/api/v1/files/{file_id}", "GET"),
        (f"/api/v1/files/{file_id}/content", "GET"),
        (f"/api/v1/files/{file_id}", "DELETE"),
    ):
        status, _headers, body = _request(daphne_server, path, theirs, method=method)
        assert status == 404, path
        assert b"1234" not in body
    assert json.loads(_request(daphne_server, "/api/v1/files", theirs)[2])["data"] == []

    page = Client()
    page.cookies["sessionid"] = session_cookie(other)
    assert page.get(f"/files/{file_id}/").status_code == 404
    assert page.delete(f"/files/{file_id}/").status_code == 404
    assert File.objects.filter(pk=file_id).exists()


def test_the_page_uploads_with_its_session_and_csrf(daphne_server: LiveServer) -> None:
    dora = make_user("files_dora")
    page = Client(enforce_csrf_checks=True)
    page.cookies["sessionid"] = session_cookie(dora)
    upload = io.BytesIO(b"2026-12-01 ERROR disk full\n")
    upload.name = "server.log"

    assert page.post("/files/", {"file": upload}).status_code == 403  # no CSRF token
    page.get("/")  # the page sets its CSRF cookie
    upload.seek(0)
    made = page.post("/files/", {"file": upload}, HTTP_X_CSRFTOKEN=page.cookies["csrftoken"].value)

    assert made.status_code == 201, made.content
    assert made.json()["filename"] == "server.log"
    download = page.get(f"/files/{made.json()['id']}/")
    assert b"".join(download.streaming_content) == b"2026-12-01 ERROR disk full\n"  # type: ignore[attr-defined]
    assert download["Content-Disposition"].startswith("attachment")


def test_a_body_larger_than_any_upload_is_refused_before_django_reads_it(strict_server: LiveServer) -> None:
    # Over the upload limit and the form's envelope: chatsite/bodylimit.py
    # answers before Django spools or parses it (nginx refuses it even
    # earlier in production: deploy/nginx.conf.template).
    token = tokens.create(make_user("files_huge"), "files")[1]
    status, refused = _upload(strict_server, token, "huge.txt", b"x" * (102400 + 1024 * 1024 + 10))
    assert status == 413 and refused["error"]["code"] == "too_large"


strict_server = module_server(
    "strict",
    "A server with small limits, and two seconds to read a PDF.",
    CHAT_FILE_MAX_BYTES="102400",
    CHAT_FILE_STORAGE_PER_USER="250000",
    CHAT_FILE_EXTRACT_SECONDS="2",
    CHAT_FILE_UPLOAD_RATE="8/h",
)


def test_the_size_and_storage_limits(strict_server: LiveServer) -> None:
    erin = make_user("files_erin")
    token = tokens.create(erin, "files")[1]

    status, too_big = _upload(strict_server, token, "big.txt", b"x" * 102401)
    assert status == 413 and too_big["error"]["code"] == "file_too_large"
    assert "at most 100 KB" in too_big["error"]["message"]
    assert _upload(strict_server, token, "a.txt", b"a" * 100_000)[0] == 201
    assert _upload(strict_server, token, "b.txt", b"b" * 100_000)[0] == 201
    status, full = _upload(strict_server, token, "c.txt", b"c" * 100_000)
    assert status == 413 and full["error"]["code"] == "storage_limit"
    assert "Delete some files first" in full["error"]["message"]

    from accounts.models import Quota

    Quota.objects.create(user=erin, file_storage_bytes=400_000)  # staff give her more room
    assert _upload(strict_server, token, "c.txt", b"c" * 100_000)[0] == 201


def test_a_pdf_that_never_finishes_is_refused_in_time_while_an_answer_streams(
    strict_server: LiveServer, fake_llm: FakeLLM, sockets: contextlib.ExitStack
) -> None:
    from tests.test_attacks import _send_frame, _until
    from tests.test_security import open_socket

    frank, gina = make_user("files_frank"), make_user("files_gina")
    token = tokens.create(frank, "files")[1]
    bomb = _bomb()
    assert len(bomb) < 102400  # it passes the size limit: only reading it is hard
    fake_llm.default = Reply(chunks=[f" w{i}" for i in range(80)], delay=0.05, usage=(10, 80))
    tab = open_socket(strict_server, session_cookie(gina), sockets)
    tab.send(_send_frame("keep talking")[1])
    _until(tab, lambda f: f["type"] == "generation.delta")

    def upload() -> tuple[int, dict[str, Any], float, float]:
        started = time.monotonic()
        status, body = _upload(strict_server, token, "bomb.pdf", bomb)
        return status, body, started, time.monotonic()

    deltas: list[float] = []

    def seen(frame: dict[str, Any]) -> bool:
        if frame["type"] == "generation.delta":
            deltas.append(time.monotonic())
        return bool(frame["type"] == "generation.finished")

    with ThreadPoolExecutor(1) as pool:
        refusing = pool.submit(upload)
        finished = _until(tab, seen)
        status, refused, started, answered = refusing.result(timeout=20)

    assert status == 400 and refused["error"]["code"] == "unreadable_file"
    assert "within 2 seconds" in refused["error"]["message"]
    assert answered - started < 6
    assert finished["status"] == "complete"
    # The answer went on while the PDF was being read: frames all along.
    during = [t for t in deltas if started < t < answered]
    assert len(during) >= 10, (len(during), answered - started)
    assert not File.objects.filter(owner=frank).exists()
    assert "Traceback" not in strict_server.log()


def test_uploads_have_a_rate_limit_of_their_own(strict_server: LiveServer) -> None:
    token = tokens.create(make_user("files_flood"), "files")[1]
    for i in range(8):
        assert _upload(strict_server, token, f"n{i}.txt", b"note %d" % i)[0] == 201
    body, content_type = _multipart("n8.txt", b"one too many")
    request = urllib.request.Request(
        strict_server.url + "/api/v1/files",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": content_type},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 429
    assert int(refused.value.headers["Retry-After"]) > 0
    assert json.loads(refused.value.read())["error"]["code"] == "rate_limit_exceeded"
    assert File.objects.filter(filename="n8.txt").count() == 0
