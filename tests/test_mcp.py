"""Company tools through MCP, against real servers the tests start:
`mcp-server-time` (PyPI, stdio: the worker runs it) and the reference
"everything" server (npm, streamable HTTP, tests/mcp). The fake model,
scripted to call their tools, gets their real results in its next request;
a killed stdio server is started again; an unreachable or hanging server
leaves the answer complete with the others' tools; a server kept to a
prompt is offered with that prompt only; bad arguments never reach the
server; the HTTP API runs them by the built-in tools' rule."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api import tokens
from conversations.models import McpServer, SystemPrompt
from tests.conftest import LiveServer, database_url, free_port, module_server, run_daphne
from tests.factories import make_user, session_cookie
from tests.fake_llm import FakeLLM, Reply
from tests.test_attacks import _until
from tests.test_security import open_socket

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

EVERYTHING = Path(__file__).parent / "mcp" / "node_modules" / "@modelcontextprotocol" / "server-everything"
TIME_SERVER = {"command": sys.executable, "args": ["-m", "mcp_server_time", "--local-timezone", "UTC"]}
HOSTILE = Path(__file__).parent / "mcp_hostile.py"
MESSAGE_BYTES = 200_000  # CHAT_MCP_MESSAGE_BYTES of the module's worker


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the MCP server exited"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


@contextlib.contextmanager
def _serving(command: list[str], port: int, **popen: Any) -> Iterator[str]:
    """An MCP server of the test's own, listening on `port`: its /mcp address."""
    process = subprocess.Popen(command, start_new_session=True, **popen)
    try:
        _wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def everything(tmp_path_factory: Any) -> Iterator[str]:
    """The reference server over streamable HTTP: its /mcp address."""
    assert (EVERYTHING / "dist" / "index.js").is_file(), "npm ci --prefix tests/mcp (make test does it)"
    port = free_port()
    with (
        (tmp_path_factory.mktemp("everything") / "everything.log").open("wb") as log,
        _serving(
            ["node", str(EVERYTHING / "dist" / "index.js"), "streamableHttp"],
            port,
            env={**os.environ, "PORT": str(port)},
            stdout=log,
            stderr=subprocess.STDOUT,
        ) as url,
    ):
        yield url


@pytest.fixture(scope="module")
def hanging() -> Iterator[str]:
    """An address that takes the connection and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/mcp"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()


@pytest.fixture(scope="module")
def hostile_http() -> Iterator[str]:
    """tests/mcp_hostile.py over HTTP: its /mcp address."""
    port = free_port()
    with _serving([sys.executable, str(HOSTILE), "http", str(port)], port) as url:
        yield url


server = module_server(
    "mcp",
    CHAT_MCP_CONFIG_TTL="0",  # each answer reads the servers' rows: a test's changes count at once
    CHAT_MCP_CONNECT_WAIT="6",  # a stdio server's first start (Python, the SDK) takes seconds here
    CHAT_MCP_RESULT_CHARS="600",
    CHAT_MCP_MESSAGE_BYTES=str(MESSAGE_BYTES),
)


@pytest.fixture(autouse=True)
def _no_servers() -> Iterator[None]:
    McpServer.objects.all().delete()
    yield
    McpServer.objects.all().delete()


def _servers(everything: str, **more: dict[str, Any]) -> None:
    McpServer.objects.create(name="time", transport="stdio", **TIME_SERVER, timeout=15)
    McpServer.objects.create(name="everything", transport="http", url=everything, timeout=10)
    for name, fields in more.items():
        McpServer.objects.create(name=name, **fields)


def _offered(request: Any) -> list[str]:
    return [t["function"]["name"] for t in request.body.get("tools") or []]


def _tool_messages(request: Any) -> dict[str, str]:
    messages = request.body["messages"]
    by_id = {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls") or []}
    return {by_id[m["tool_call_id"]]: m["content"] for m in messages if m["role"] == "tool"}


def _ask(ws: Any, content: str, **extra: Any) -> list[dict[str, Any]]:
    ws.send(json.dumps({"type": "message.send", "content": content, "client_id": str(uuid.uuid4()), **extra}))
    frames: list[dict[str, Any]] = []

    def seen(frame: dict[str, Any]) -> bool:
        frames.append(frame)
        return frame["type"] in ("generation.finished", "error")

    _until(ws, seen, 60)
    return frames


def test_the_model_calls_a_stdio_and_an_http_servers_tools_and_reads_their_real_results(
    server: LiveServer, fake_llm: FakeLLM, everything: str, sockets: contextlib.ExitStack
) -> None:
    _servers(everything)
    user = make_user(f"mcp_{uuid.uuid4().hex[:6]}")
    calls = [
        {"id": "call_time", "name": "time__get_current_time", "arguments": '{"timezone": "Asia/Tokyo"}'},
        {"id": "call_sum", "name": "everything__get-sum", "arguments": '{"a": 2, "b": 3}'},
        {"id": "call_image", "name": "everything__get-tiny-image", "arguments": "{}"},
    ]
    fake_llm.script(
        Reply(chunks=["Let me check. "], finish_reason="tool_calls", tool_calls=calls),
        Reply(chunks=["It is late in Tokyo, and 2 + 3 = 5."]),
    )
    ws = open_socket(server, session_cookie(user), sockets)
    frames = _ask(ws, "What time is it in Tokyo, and what is 2 + 3?")
    assert frames[-1]["type"] == "generation.finished" and frames[-1]["status"] == "complete"
    first, second = fake_llm.streamed_requests[-2:]
    offered = _offered(first)
    assert {"time__get_current_time", "time__convert_time", "everything__echo", "everything__get-sum"} <= set(
        offered
    )
    schema = next(t for t in first.body["tools"] if t["function"]["name"] == "time__get_current_time")
    assert "timezone" in schema["function"]["parameters"]["properties"]  # the server's own schema
    results = _tool_messages(second)
    assert '"timezone": "Asia/Tokyo"' in results["time__get_current_time"]  # mcp-server-time's real answer
    assert "+09:00" in results["time__get_current_time"]
    assert results["everything__get-sum"] == "The sum of 2 and 3 is 5."
    assert "[an image (image/png" in results["everything__get-tiny-image"]  # named, not dropped
    chips = [f for f in frames if f["type"] == "generation.tool"]
    assert [c["name"] for c in chips] == [c["name"] for c in calls] and all(c["ok"] for c in chips)
    # The admin's status: each answered, with its tools.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and McpServer.objects.filter(listed_at__isnull=True).exists():
        time.sleep(0.1)
    listed = {s.name: [t["name"] for t in s.listed_tools] for s in McpServer.objects.all()}
    assert "get_current_time" in listed["time"] and "get-sum" in listed["everything"]


def _under(parent: int) -> dict[int, str]:
    """The processes under `parent`, at any depth, by pid: their command lines."""
    parents: dict[int, int] = {}
    lines: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, StopIteration):
            status = (entry / "status").read_text()
            parents[int(entry.name)] = int(
                next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:"))
            )
            lines[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")

    def below(pid: int) -> bool:
        while pid in parents and pid != parent:
            pid = parents[pid]
        return pid == parent

    return {pid: line for pid, line in lines.items() if pid != parent and below(pid)}


def _children(parent: int, marker: str) -> list[int]:
    """The processes under `parent` running `marker`: the servers themselves,
    not the guards between them and the worker."""
    return [pid for pid, line in _under(parent).items() if marker in line and "mcp_stdio_guard" not in line]


def test_a_stdio_server_killed_between_two_answers_is_started_again(
    server: LiveServer, fake_llm: FakeLLM, everything: str, sockets: contextlib.ExitStack
) -> None:
    _servers(everything)
    user = make_user(f"mcp_kill_{uuid.uuid4().hex[:6]}")
    call = {"id": "call_1", "name": "time__get_current_time", "arguments": '{"timezone": "Europe/Paris"}'}
    ws = open_socket(server, session_cookie(user), sockets)
    for _round in range(2):
        fake_llm.script(
            Reply(chunks=[], finish_reason="tool_calls", tool_calls=[call]), Reply(chunks=["Done."])
        )
        frames = _ask(ws, "The time in Paris?")
        assert frames[-1]["status"] == "complete"
        assert (
            '"timezone": "Europe/Paris"'
            in _tool_messages(fake_llm.streamed_requests[-1])["time__get_current_time"]
        )
        running = _children(server.process.pid, "mcp_server_time")
        assert len(running) == 1, running
        os.kill(running[0], signal.SIGKILL)  # between two answers


def _alive(pid: int) -> bool:
    try:
        status = (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return False
    state = next(line.split()[1] for line in status.splitlines() if line.startswith("State:"))
    return state not in ("Z", "X")  # a zombie nobody reaped is gone too


@pytest.mark.parametrize("end", [signal.SIGTERM, signal.SIGKILL])
def test_a_stdio_server_ends_with_its_worker(
    django_db_setup: None, fake_llm_server: FakeLLM, tmp_path: Path, end: signal.Signals
) -> None:
    """A worker stopped (a deploy) or killed leaves no server behind: the
    server reads the end of its stdin."""
    McpServer.objects.create(name="time", transport="stdio", **TIME_SERVER, timeout=15)
    with run_daphne(database_url(), fake_llm_server.base_url, tmp_path / "daphne.log") as live:
        deadline = time.monotonic() + 30
        running: list[int] = []
        while time.monotonic() < deadline and not running:  # started at the worker's start
            running = _children(live.process.pid, "mcp_server_time")
            time.sleep(0.05)
        guards = [pid for pid, line in _under(live.process.pid).items() if "mcp_stdio_guard" in line]
        assert len(running) == 1 and len(guards) == 1, (running, guards)
        live.process.send_signal(end)
        live.process.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in running + guards):
            time.sleep(0.05)
        assert not [pid for pid in running + guards if _alive(pid)]


def test_an_unreachable_or_hanging_server_leaves_the_answer_complete_with_the_others(
    server: LiveServer, fake_llm: FakeLLM, everything: str, hanging: str, sockets: contextlib.ExitStack
) -> None:
    closed = free_port()
    _servers(
        everything,
        down={"transport": "http", "url": f"http://127.0.0.1:{closed}/mcp", "timeout": 2},
        hangs={"transport": "http", "url": hanging, "timeout": 2},
        broken={"transport": "stdio", "command": "/no/such/program", "timeout": 2},
    )
    user = make_user(f"mcp_down_{uuid.uuid4().hex[:6]}")
    fake_llm.script(Reply(chunks=["Fine without them."]))
    ws = open_socket(server, session_cookie(user), sockets)
    started = time.monotonic()
    frames = _ask(ws, "Hello")
    assert frames[-1]["status"] == "complete" and time.monotonic() - started < 15
    offered = _offered(fake_llm.streamed_requests[-1])
    assert "time__get_current_time" in offered and "everything__echo" in offered
    assert not [name for name in offered if name.split("__")[0] in ("down", "hangs", "broken")]
    # A call to a server that went away meanwhile: an error result, within its timeout.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and McpServer.objects.filter(name="down", last_error="").exists():
        time.sleep(0.1)
    assert McpServer.objects.get(name="down").last_error  # the admin says why


def test_a_server_answering_with_too_much_fails_that_call_at_once_and_keeps_its_session(
    server: LiveServer, fake_llm: FakeLLM, hostile_http: str, sockets: contextlib.ExitStack
) -> None:
    """A line of 30 MB (stdio, its id first or last), a body of 30 MB with or
    without its length, or gzipped (HTTP): never read whole
    (CHAT_MCP_MESSAGE_BYTES), each an error result at once, not at the
    call's timeout; the next calls on the same sessions work."""
    McpServer.objects.create(
        name="flood_stdio",
        transport="stdio",
        command=sys.executable,
        args=[str(HOSTILE), "stdio"],
        timeout=30,
    )
    McpServer.objects.create(name="flood_http", transport="http", url=hostile_http, timeout=30)
    size = 30_000_000
    floods = [
        {"id": "c_stdio", "name": "flood_stdio__flood", "arguments": json.dumps({"size": size})},
        {"id": "c_http", "name": "flood_http__flood", "arguments": json.dumps({"size": size})},
        {
            "id": "c_chunked",
            "name": "flood_http__flood",
            "arguments": json.dumps({"size": size, "declare": False}),
        },
        {"id": "c_last", "name": "flood_stdio__flood", "arguments": json.dumps({"size": size, "last": True})},
        {"id": "c_gzip", "name": "flood_http__flood", "arguments": json.dumps({"size": size, "gzip": True})},
        {"id": "c_fits", "name": "flood_http__flood", "arguments": json.dumps({"size": 1000})},
    ]
    echoes = [
        {"id": "e_stdio", "name": "flood_stdio__echo", "arguments": '{"message": "still here"}'},
        {"id": "e_http", "name": "flood_http__echo", "arguments": '{"message": "still here"}'},
    ]
    fake_llm.script(
        Reply(chunks=[], finish_reason="tool_calls", tool_calls=floods),
        Reply(chunks=[], finish_reason="tool_calls", tool_calls=echoes),
        Reply(chunks=["Done."]),
    )
    user = make_user(f"mcp_flood_{uuid.uuid4().hex[:6]}")
    ws = open_socket(server, session_cookie(user), sockets)
    started = time.monotonic()
    frames = _ask(ws, "Flood me")
    assert frames[-1]["status"] == "complete"
    assert time.monotonic() - started < 20  # the calls' timeout is 30 s
    results = {
        m["tool_call_id"]: m["content"]
        for m in fake_llm.streamed_requests[-1].body["messages"]
        if m["role"] == "tool"
    }
    for call in ("c_stdio", "c_http", "c_chunked", "c_last"):
        assert results[call].startswith("error: the flood_"), results[call][:300]
        assert f"{MESSAGE_BYTES:,}" in results[call] and results[call].endswith("not read")
    # 30 MB of x in some 30 KB: never decoded.
    assert results["c_gzip"].endswith(
        "the server's answer is compressed (gzip), though asked not to be: not read"
    )
    assert results["c_fits"].startswith("xxx")  # cut to CHAT_MCP_RESULT_CHARS, as any result
    assert results["e_stdio"] == results["e_http"] == "echo: still here"


def test_a_server_kept_to_a_prompt_is_offered_with_that_prompt_only(
    server: LiveServer, fake_llm: FakeLLM, everything: str, sockets: contextlib.ExitStack
) -> None:
    SystemPrompt.objects.update(is_default=False)
    allowed = SystemPrompt.objects.create(name=f"ops-{uuid.uuid4().hex[:6]}", text="Ops.")
    other = SystemPrompt.objects.create(name=f"plain-{uuid.uuid4().hex[:6]}", text="Plain.")
    _servers(everything)
    McpServer.objects.get(name="everything").prompts.set([allowed])
    user = make_user(f"mcp_prompt_{uuid.uuid4().hex[:6]}")
    ws = open_socket(server, session_cookie(user), sockets)
    fake_llm.script(Reply(chunks=["Plain."]), Reply(chunks=["Ops."]))
    _ask(ws, "Hi", prompt=str(other.pk))
    offered = _offered(fake_llm.streamed_requests[-1])
    assert "time__get_current_time" in offered and not [n for n in offered if n.startswith("everything__")]
    _ask(ws, "Hi", prompt=str(allowed.pk))
    assert "everything__echo" in _offered(fake_llm.streamed_requests[-1])


def test_bad_arguments_are_refused_before_the_call_and_a_long_result_is_cut(
    server: LiveServer, fake_llm: FakeLLM, everything: str, sockets: contextlib.ExitStack
) -> None:
    _servers(everything)
    user = make_user(f"mcp_bad_{uuid.uuid4().hex[:6]}")
    calls = [
        {"id": "call_bad", "name": "everything__get-sum", "arguments": '{"a": "two", "b": 3}'},
        {"id": "call_long", "name": "everything__echo", "arguments": json.dumps({"message": "x" * 2000})},
    ]
    fake_llm.script(Reply(chunks=[], finish_reason="tool_calls", tool_calls=calls), Reply(chunks=["Sorry."]))
    ws = open_socket(server, session_cookie(user), sockets)
    frames = _ask(ws, "Add two and three")
    assert frames[-1]["status"] == "complete"
    results = _tool_messages(fake_llm.streamed_requests[-1])
    # Our check, in words the model can act on (the server's would say "MCP error -32602").
    assert results["everything__get-sum"].startswith(
        "error: invalid arguments: a: 'two' is not of type 'number'"
    )
    assert results["everything__echo"].startswith("Echo: xxx")
    assert results["everything__echo"].endswith(
        "[cut: the result had 2006 characters]"
    )  # CHAT_MCP_RESULT_CHARS
    chips = {c["name"]: c["ok"] for c in frames if c["type"] == "generation.tool"}
    assert chips == {"everything__get-sum": False, "everything__echo": True}


def test_the_http_api_runs_a_servers_tool_by_the_built_in_tools_rule(
    server: LiveServer, fake_llm: FakeLLM, everything: str
) -> None:
    _servers(everything)
    user = make_user(f"mcp_api_{uuid.uuid4().hex[:6]}")
    token = tokens.create(user, "mcp")[1]
    call = {"id": "call_api", "name": "time__get_current_time", "arguments": '{"timezone": "UTC"}'}
    fake_llm.script(
        Reply(chunks=[], finish_reason="tool_calls", tool_calls=[call]), Reply(chunks=["It is now."])
    )
    response = httpx.post(
        server.url + "/api/v1/chat/completions",
        headers={"Authorization": f"Bearer {token}"},
        json={
            "model": "fake-model",
            "messages": [{"role": "user", "content": "What time is it?"}],
            "tools": [{"type": "function", "function": {"name": "time__get_current_time"}}],
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "It is now."
    assert '"timezone": "UTC"' in _tool_messages(fake_llm.streamed_requests[-1])["time__get_current_time"]


@pytest.mark.browser
def test_the_page_shows_the_chips_of_a_servers_tools(
    server: LiveServer, fake_llm: FakeLLM, everything: str, browser: Any
) -> None:
    from playwright.sync_api import expect

    from tests.test_browser import SHOTS, ask, finished, in_thread, open_chat, open_tabs

    _servers(everything)
    user = make_user(f"mcp_page_{uuid.uuid4().hex[:6]}")
    calls = [
        {"id": "call_t", "name": "time__get_current_time", "arguments": '{"timezone": "Asia/Tokyo"}'},
        {"id": "call_s", "name": "everything__get-sum", "arguments": '{"a": 40, "b": 2}'},
    ]
    fake_llm.script(
        Reply(chunks=["Checking. "], finish_reason="tool_calls", tool_calls=calls),
        Reply(chunks=["It is evening in Tokyo; 40 + 2 = 42."]),
    )
    tabs_ = open_tabs(browser, server)
    tabs = next(tabs_)
    try:
        page = tabs.new(user)
        open_chat(page, server)
        ask(page, "Time in Tokyo, and 40 + 2?")
        expect(finished(page).last).to_contain_text("40 + 2 = 42")
        chips = page.locator(".tool-chip")
        expect(chips).to_have_count(2)
        expect(chips.first).to_contain_text("time__get_current_time (Asia/Tokyo)")
        expect(chips.nth(1)).to_contain_text("everything__get-sum")
        chips.nth(1).locator("summary").click()
        expect(chips.nth(1)).to_contain_text("The sum of 40 and 2 is 42.")
        page.screenshot(path=str(SHOTS / "mcp-chips.png"))
        assert in_thread(lambda: McpServer.objects.count()) == 2
    finally:
        with contextlib.suppress(StopIteration):
            next(tabs_)


@pytest.mark.django_db(transaction=False)
def test_servers_as_configuration_are_written_for_the_admin_and_groups_keep_a_server(settings: Any) -> None:
    from django.contrib.auth.models import Group

    from conversations.tools import mcp

    ops = Group.objects.create(name="ops-team")
    settings.CHAT_MCP_SERVERS = [
        {
            "name": "wiki",
            "url": "http://127.0.0.1:9/mcp",
            "headers": {"Authorization": "Bearer x"},
            "groups": ["ops-team"],
        },
        {"name": "local_time", **TIME_SERVER, "tools": ["get_current_time"], "timeout": 4},
        {"name": "Bad Name!", "url": "http://127.0.0.1:9/mcp"},
    ]
    mcp.sync_settings()
    rows = {s.name: s for s in McpServer.objects.all()}
    assert set(rows) == {"wiki", "local_time"} and all(s.from_settings for s in rows.values())
    assert rows["wiki"].headers == {"Authorization": "Bearer x"} and rows["local_time"].transport == "stdio"
    servers = {s.name: s for s in mcp._read_servers()}
    assert (
        servers["local_time"].tools == frozenset({"get_current_time"}) and servers["local_time"].timeout == 4
    )
    assert not servers["wiki"].may_offer(None, frozenset())
    assert servers["wiki"].may_offer(None, frozenset({ops.pk}))
    assert servers["local_time"].may_offer("any-prompt", frozenset())


def test_a_stop_during_a_call_stops_it_and_a_slow_call_ends_at_its_timeout(
    server: LiveServer, fake_llm: FakeLLM, everything: str, sockets: contextlib.ExitStack
) -> None:
    _servers(everything)
    McpServer.objects.filter(name="everything").update(timeout=3)
    user = make_user(f"mcp_stop_{uuid.uuid4().hex[:6]}")
    ws = open_socket(server, session_cookie(user), sockets)
    slow = {
        "id": "call_slow",
        "name": "everything__trigger-long-running-operation",
        "arguments": '{"duration": 60}',
    }
    # Stopped while the call runs: the answer ends at once, not after a minute.
    fake_llm.script(Reply(chunks=["Working. "], finish_reason="tool_calls", tool_calls=[slow]))
    ws.send(json.dumps({"type": "message.send", "content": "Run it", "client_id": str(uuid.uuid4())}))
    delta = _until(ws, lambda f: f["type"] == "generation.delta", 30)
    started = time.monotonic()
    ws.send(json.dumps({"type": "generation.stop", "conversation": delta["conversation"]}))
    seen: list[tuple[float, str]] = []

    def finished(frame: dict[str, Any]) -> bool:
        seen.append((round(time.monotonic() - started, 2), frame["type"]))
        return bool(frame["type"] == "generation.finished")

    ended = _until(ws, finished, 30)
    assert ended["status"] == "stopped" and time.monotonic() - started < 2.5, seen
    # Past the server's timeout: an error result the model reads, and the answer goes on.
    fake_llm.script(
        Reply(chunks=[], finish_reason="tool_calls", tool_calls=[{**slow, "arguments": '{"duration": 8}'}]),
        Reply(chunks=["It took too long."]),
    )
    frames = _ask(ws, "Run it again", conversation=delta["conversation"])
    assert frames[-1]["status"] == "complete"
    result = _tool_messages(fake_llm.streamed_requests[-1])["everything__trigger-long-running-operation"]
    assert result == "error: the tool took longer than 3 s"
    # The session survived both: the next call is answered.
    sums = {"id": "call_sum2", "name": "everything__get-sum", "arguments": '{"a": 1, "b": 1}'}
    fake_llm.script(Reply(chunks=[], finish_reason="tool_calls", tool_calls=[sums]), Reply(chunks=["Two."]))
    _ask(ws, "1 + 1?", conversation=delta["conversation"])
    assert _tool_messages(fake_llm.streamed_requests[-1])["everything__get-sum"] == "The sum of 1 and 1 is 2."


@pytest.mark.django_db(transaction=False)
def test_the_admin_lets_only_a_superuser_add_a_stdio_server_and_hides_tokens_from_viewers() -> None:
    from django.contrib.auth.models import Permission
    from django.test import Client

    staff = make_user("mcp_staff", is_staff=True)
    staff.user_permissions.set(
        Permission.objects.filter(codename__in=["add_mcpserver", "change_mcpserver", "view_mcpserver"])
    )
    client = Client()
    client.force_login(staff)
    form = {"name": "runner", "enabled": "on", "transport": "stdio", "timeout": "10", "command": "/bin/sh",
            "args": '["-c", "id"]', "headers": "{}", "env": "{}", "url": "", "tools": ""}  # fmt: skip
    refused = client.post("/admin/conversations/mcpserver/add/", form)
    assert refused.status_code == 200 and "Only a superuser" in refused.content.decode()
    assert not McpServer.objects.filter(name="runner").exists()
    http = {**form, "name": "wiki", "transport": "http", "url": "http://127.0.0.1:9/mcp", "command": "",
            "headers": '{"Authorization": "Bearer secret-token-123"}'}  # fmt: skip
    assert client.post("/admin/conversations/mcpserver/add/", http).status_code == 302
    bad_name = client.post("/admin/conversations/mcpserver/add/", {**http, "name": "two__parts"})
    assert "single _ between them" in bad_name.content.decode()
    root = make_user("mcp_root", is_staff=True, is_superuser=True)
    client.force_login(root)
    assert client.post("/admin/conversations/mcpserver/add/", form).status_code == 302
    viewer = make_user("mcp_viewer", is_staff=True)
    viewer.user_permissions.set(Permission.objects.filter(codename="view_mcpserver"))
    client.force_login(viewer)
    wiki = McpServer.objects.get(name="wiki")
    page = client.get(f"/admin/conversations/mcpserver/{wiki.pk}/change/").content.decode()
    assert "wiki" in page and "secret-token-123" not in page
    assert "secret-token-123" not in client.get("/admin/conversations/mcpserver/").content.decode()
