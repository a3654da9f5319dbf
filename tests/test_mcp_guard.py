"""The guard between a stdio MCP server and the worker
(conversations/tools/mcp_stdio_guard.py): lines pass as they are, however
they are cut into reads; a line over the limit is never kept, and becomes an
error for the request it answers, or nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

from conversations.tools import mcp_stdio_guard as guard
from conversations.tools.mcp import GUARD


def _relay(data: bytes, limit: int, chunk: int = 7) -> bytes:
    """`data` written in pieces of `chunk` bytes through the guard's relay."""
    source_r, source_w = os.pipe()
    sink_r, sink_w = os.pipe()
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(_read_all(sink_r)))
    reader.start()

    def write() -> None:
        for start in range(0, len(data), chunk):
            os.write(source_w, data[start : start + chunk])
        os.close(source_w)

    writer = threading.Thread(target=write)
    writer.start()
    guard.relay(source_r, sink_w, limit)
    os.close(sink_w)
    writer.join()
    reader.join()
    os.close(source_r)
    os.close(sink_r)
    return out[0]


def _read_all(fd: int) -> bytes:
    parts = []
    while part := os.read(fd, 65536):
        parts.append(part)
    return b"".join(parts)


def test_lines_within_the_limit_pass_whole_however_they_are_read() -> None:
    lines = [json.dumps({"jsonrpc": "2.0", "id": i, "result": {"n": "é" * i}}).encode() for i in range(20)]
    data = b"\n".join(lines) + b"\n"
    assert _relay(data, limit=200, chunk=3) == data
    assert _relay(b'{"last": true}', limit=200) == b'{"last": true}'  # no newline at the end


def test_a_long_answer_becomes_an_error_for_its_request_and_the_next_lines_pass() -> None:
    long = json.dumps({"jsonrpc": "2.0", "id": 7, "result": {"text": "x" * 5000}}).encode()
    after = b'{"jsonrpc": "2.0", "id": 8, "result": {}}'
    out = _relay(long + b"\n" + after + b"\n", limit=1000, chunk=333).split(b"\n")
    error = json.loads(out[0])
    assert error["id"] == 7 and error["error"]["code"] == -32603
    assert (
        error["error"]["message"] == f"the server's answer had {len(long):,} bytes, more than 1,000: not read"
    )
    assert out[1] == after and out[2] == b""


def test_an_answer_with_its_id_last_gets_its_error_too_and_an_id_inside_its_result_is_not_taken() -> None:
    """The TypeScript SDK writes `{result, jsonrpc, id}`; an "id" inside a
    result (a record the tool returned) is not the message's."""
    ts = json.dumps({"result": {"id": 99, "text": "x" * 5000}, "jsonrpc": "2.0", "id": 12})
    inner_only = json.dumps({"result": {"text": "x" * 5000, "id": 99}, "jsonrpc": "2.0"})
    bad_id = '{"jsonrpc": "2.0", "id": 01, "result": "' + "x" * 5000 + '"}'
    out = _relay(f"{ts}\n{inner_only}\n{bad_id}\n".encode(), limit=1000, chunk=4096)
    assert [json.loads(line)["id"] for line in out.splitlines()] == [12]


def test_a_long_line_that_answers_nothing_is_dropped() -> None:
    request = json.dumps({"jsonrpc": "2.0", "id": "s1", "method": "sampling/createMessage", "x": "y" * 3000})
    no_id = json.dumps({"jsonrpc": "2.0", "result": "z" * 3000})
    string_id = json.dumps({"jsonrpc": "2.0", "id": 'a"b', "result": "z" * 3000})
    out = _relay(f"{request}\n{no_id}\n{string_id}\n".encode(), limit=1000, chunk=512)
    assert [json.loads(line)["id"] for line in out.splitlines()] == ['a"b']


def test_the_guard_runs_the_server_and_says_when_it_cannot() -> None:
    echo = [
        sys.executable,
        "-c",
        # An answer to the request it reads, padded past the limit; then a short line.
        "import json, sys; request = json.loads(sys.stdin.readline()); "
        "print(json.dumps({'jsonrpc': '2.0', 'id': request['id'], 'result': 'x' * 2000}), flush=True); "
        "print('ok')",
    ]
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(GUARD), "100", "--", *echo],
        input=b'{"jsonrpc": "2.0", "id": 3, "method": "tools/call"}\n',
        capture_output=True,
    )
    assert done.returncode == 0
    assert [json.loads(line)["id"] for line in done.stdout.splitlines()[:1]] == [3]
    assert done.stdout.splitlines()[1] == b"ok"
    missing = subprocess.run(
        [sys.executable, str(GUARD), "100", "--", "/no/such/program"], capture_output=True
    )
    assert missing.returncode == 127 and b"cannot be started" in missing.stderr
