"""The HTTP API against a real daphne process: the openai SDK (sync and
async, streamed and not), curl, raw SSE; tokens; every error status; the
same ledger and limits as the page; conversations over HTTP."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.error
import urllib.request
from datetime import timedelta
from io import StringIO
from typing import Any, cast

import openai
import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.utils import timezone
from openai.types.chat import (
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
)

from accounts.models import Quota
from api import tokens
from api.models import ApiAccess, ApiToken
from conversations.models import ChatModel, Conversation, Message, SystemPrompt, TokenUsage
from tests.conftest import LiveServer
from tests.fake_llm import Reply

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def token(alice: Any) -> str:
    return tokens.create(alice, "tests")[1]


def sdk(server: LiveServer, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/api/v1", api_key=token, max_retries=0, timeout=20)


def http(
    server: LiveServer, method: str, path: str, token: str | None, body: Any = None, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(server.url + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    for name, value in headers.items():
        request.add_header(name.replace("_", "-"), value)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def error_of(status_headers_body: tuple[int, dict[str, str], bytes]) -> tuple[int, str, str]:
    status, _headers, body = status_headers_body
    error = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "code"}
    return status, error["type"], error["code"]


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    """`event:`/`id:`/`data:` blocks of a text/event-stream body."""
    events = []
    for block in raw.decode().split("\n\n"):
        event: dict[str, Any] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            event[name] = value
        if event:
            events.append(event)
    return events


# --- Tokens ---------------------------------------------------------------------------------


def test_the_command_prints_a_token_on_its_last_line_and_stores_only_its_hash(alice: Any) -> None:
    out = StringIO()
    call_command("api_token", "--user", "alice", "--name", "laptop", "--expires", "30d", stdout=out)
    token = out.getvalue().strip().splitlines()[-1]

    row = ApiToken.objects.get(user=alice)
    assert token.startswith("chat_") and len(token) > 40
    assert (
        row.name == "laptop" and row.digest == tokens.digest(token) and token not in row.prefix + row.digest
    )
    assert row.expires_at is not None
    assert timedelta(days=29) < row.expires_at - timezone.now() <= timedelta(days=30)
    assert tokens.authenticate(f"Bearer {token}") == alice


def test_the_account_page_shows_a_new_token_once_lists_and_revokes(alice: Any) -> None:
    from tests.test_admin import client_for

    client = client_for(alice)
    page = client.post("/accounts/tokens/", {"name": "notebook", "expires": "7d"}).content.decode()
    token = page.split('id="new-token" value="')[1].split('"')[0]
    assert tokens.authenticate(f"Bearer {token}") == alice
    again = client.get("/accounts/tokens/").content.decode()
    assert token not in again and "notebook" in again and token[:11] in again  # its prefix only
    row = ApiToken.objects.get(user=alice)
    client.post(f"/accounts/tokens/{row.pk}/revoke/")
    with pytest.raises(tokens.Refused, match="revoked"):
        tokens.authenticate(f"Bearer {token}")


# --- OpenAI-compatible -------------------------------------------------------------------


def test_models_lists_what_users_may_use(daphne_server: LiveServer, token: str) -> None:
    ChatModel.objects.create(name="fake-fast", label="Fast")
    ChatModel.objects.create(name="fake-off", enabled=False)

    listed = sdk(daphne_server, token).models.list()

    assert [m.id for m in listed.data] == ["fake-model", "fake-fast"]


def test_the_sdk_gets_a_streamed_answer_with_usage_on_the_ledger(
    daphne_server: LiveServer, alice: Any, token: str, fake_llm: Any
) -> None:
    SystemPrompt.objects.create(name="Assistant", text="Be helpful.", is_default=True)
    fake_llm.script(Reply(chunks=["Hel", "lo", " there."], usage=(21, 3)))

    stream = sdk(daphne_server, token).chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello there."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (21, 3)
    # The staff's default prompt came first; the call is on the ledger as `api`.
    assert fake_llm.streamed_requests[-1].body["messages"] == [
        {"role": "system", "content": "Be helpful."},
        {"role": "user", "content": "Hi"},
    ]
    row = TokenUsage.objects.get(kind="api")
    assert (row.user, row.model, row.prompt_tokens, row.completion_tokens, row.conversation) == (
        alice,
        "fake-model",
        21,
        3,
        None,
    )
    assert not Conversation.objects.exists()  # stateless: nothing stored but the ledger


def test_the_sdk_without_streaming_and_its_own_system_message(
    daphne_server: LiveServer, token: str, fake_llm: Any
) -> None:
    SystemPrompt.objects.create(name="Assistant", text="Be helpful.", is_default=True)
    fake_llm.script(Reply(chunks=['{"ok": ', "true}"], usage=(9, 4)))

    completion = sdk(daphne_server, token).chat.completions.create(
        model="fake-model",
        messages=[{"role": "system", "content": "Reply in JSON."}, {"role": "user", "content": "ok?"}],
        temperature=0.1,
        max_tokens=50,
        response_format={"type": "json_object"},
    )

    assert completion.choices[0].message.content == '{"ok": true}'
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (9, 4)
    sent = fake_llm.streamed_requests[-1].body
    assert sent["messages"][0] == {"role": "system", "content": "Reply in JSON."}
    assert len(sent["messages"]) == 2  # no default prompt on top of the request's own
    assert (sent["temperature"], sent["max_tokens"], sent["response_format"]) == (
        0.1,
        50,
        {"type": "json_object"},
    )


def test_the_async_sdk_streams(daphne_server: LiveServer, token: str, fake_llm: Any) -> None:
    fake_llm.script(Reply(chunks=["One ", "two ", "three."], delay=0.01))

    async def run() -> str:
        client = openai.AsyncOpenAI(base_url=daphne_server.url + "/api/v1", api_key=token, max_retries=0)
        stream = await client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "Count"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return text

    assert asyncio.run(run()) == "One two three."


def test_curl_streams_server_sent_events_unbuffered(
    daphne_server: LiveServer, token: str, fake_llm: Any
) -> None:
    fake_llm.script(Reply(chunks=["a", "b", "c"]))
    body = json.dumps({"messages": [{"role": "user", "content": "abc"}], "stream": True})
    url = daphne_server.url + "/api/v1/chat/completions"
    auth = f"Authorization: Bearer {token}"
    command = ["curl", "-sS", "-N", "-i", "-H", auth, "-H", "Content-Type: application/json", "-d", body, url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)

    head, _, raw = result.stdout.partition("\n\n")  # (text mode: CRLF read as LF)
    assert "content-type: text/event-stream" in head.lower() and "x-accel-buffering: no" in head.lower()
    lines = [line for line in raw.split("\n") if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "abc"
    assert not any("usage" in c for c in chunks)  # not asked for
    assert fake_llm.streamed_requests[-1].body["model"] == "fake-model"  # no `model`: the default one


def test_the_clients_own_tools_come_back_to_it(daphne_server: LiveServer, token: str, fake_llm: Any) -> None:
    call = {"id": "call_w", "name": "get_weather", "arguments": '{"city": "Oslo"}'}
    fake_llm.script(Reply(chunks=[], finish_reason="tool_calls", tool_calls=[call]))
    weather: ChatCompletionFunctionToolParam = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }

    completion = sdk(daphne_server, token).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[weather]
    )

    assert completion.choices[0].finish_reason == "tool_calls"
    tool_calls = completion.choices[0].message.tool_calls
    assert tool_calls is not None
    [tool_call] = cast(list[ChatCompletionMessageFunctionToolCall], tool_calls)
    assert (tool_call.id, tool_call.function.name, tool_call.function.arguments) == (
        "call_w",
        "get_weather",
        '{"city": "Oslo"}',
    )
    assert [t["function"]["name"] for t in fake_llm.streamed_requests[-1].body["tools"]] == ["get_weather"]


def test_a_builtin_tool_named_by_the_request_runs_here(
    daphne_server: LiveServer, token: str, fake_llm: Any
) -> None:
    call = {"id": "call_c", "name": "calculator", "arguments": '{"expression": "6 * 7"}'}
    fake_llm.script(
        Reply(chunks=[], finish_reason="tool_calls", tool_calls=[call], usage=(30, 5)),
        Reply(chunks=["It is 42."], usage=(50, 4)),
    )

    completion = sdk(daphne_server, token).chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "6*7?"}],
        tools=[{"type": "function", "function": {"name": "calculator"}}],
    )

    assert completion.choices[0].message.content == "It is 42."
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (80, 9)
    second = fake_llm.streamed_requests[-1].body["messages"]
    assert second[-1] == {"role": "tool", "tool_call_id": "call_c", "content": "42"}
    assert TokenUsage.objects.filter(kind="api").count() == 2  # one row per model call


# --- Errors ---------------------------------------------------------------------------------


def test_every_refusal_has_openais_shape_and_status(
    daphne_server: LiveServer, alice: Any, fake_llm: Any
) -> None:
    ask = {"messages": [{"role": "user", "content": "hi"}]}
    path = "/api/v1/chat/completions"
    good = tokens.create(alice, "good")[1]
    revoked_row, revoked = tokens.create(alice, "revoked")
    tokens.revoke(alice, revoked_row.pk)
    expired_row, expired = tokens.create(alice, "old", expires_in=timedelta(days=1))
    ApiToken.objects.filter(pk=expired_row.pk).update(expires_at=timezone.now() - timedelta(seconds=1))

    assert error_of(http(daphne_server, "POST", path, None, ask))[0] == 401
    assert error_of(http(daphne_server, "POST", path, "chat_nonsense", ask)) == (
        401,
        "invalid_request_error",
        "invalid_api_key",
    )
    assert error_of(http(daphne_server, "POST", path, revoked, ask))[0] == 401
    assert error_of(http(daphne_server, "POST", path, expired, ask))[0] == 401
    assert error_of(http(daphne_server, "POST", path, good, {**ask, "model": "gpt-9"}))[:1] == (404,)
    assert error_of(http(daphne_server, "POST", path, good, b"{not json")) == (
        400,
        "invalid_request_error",
        "invalid_request",
    )
    assert error_of(http(daphne_server, "POST", path, good, {"messages": []}))[0] == 400
    assert error_of(http(daphne_server, "POST", path, good, {**ask, "temperature": 7}))[0] == 400
    assert error_of(http(daphne_server, "GET", path, good))[0] == 405
    # The API turned off for a group, then for everyone.
    access = ApiAccess.objects.create(enabled=True)
    group = Group.objects.create(name="interns")
    access.disabled_groups.add(group)
    alice.groups.add(group)
    assert error_of(http(daphne_server, "POST", path, good, ask)) == (403, "permission_error", "api_disabled")
    alice.groups.clear()
    assert http(daphne_server, "GET", "/api/v1/models", good)[0] == 200
    ApiAccess.objects.update(enabled=False)
    assert error_of(http(daphne_server, "GET", "/api/v1/models", good))[0] == 403
    assert fake_llm.requests == []  # nothing reached the model
    assert ApiToken.objects.get(pk=revoked_row.pk).last_used_at is None


def test_upstream_failures_are_502_or_503_and_cost_nothing(
    daphne_server: LiveServer, token: str, fake_llm: Any
) -> None:
    fake_llm.script(Reply.error_reply(503, "overloaded", headers={"Retry-After": "7"}))
    status, headers, body = http(daphne_server, "POST", "/api/v1/chat/completions", token,
                                 {"messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert (status, json.loads(body)["error"]["type"]) == (503, "api_error")
    assert headers["Retry-After"] == "7"
    fake_llm.script(Reply.error_reply(401, "bad key"))
    with pytest.raises(openai.APIStatusError) as caught:
        sdk(daphne_server, token).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.status_code == 502
    assert not TokenUsage.objects.exists()


def test_limits_and_quota_give_429_with_retry_after(
    daphne_server: LiveServer, alice: Any, token: str, fake_llm: Any
) -> None:
    Quota.objects.create(user=alice, tokens_per_day=400)
    fake_llm.script(Reply(usage=(300, 200)))
    client = sdk(daphne_server, token)
    client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=50
    )

    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "again"}], max_tokens=50
        )

    assert caught.value.status_code == 429 and caught.value.code == "insufficient_quota"
    assert int(caught.value.response.headers["Retry-After"]) > 0
    # Answers a minute (counted from now: the earlier windows had no such limit).
    Quota.objects.filter(user=alice).update(tokens_per_day=None, answers_per_minute=1)
    one: list[ChatCompletionMessageParam] = [{"role": "user", "content": "one"}]
    client.chat.completions.create(model="fake-model", messages=one, max_tokens=50)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "more"}], max_tokens=50
        )


# --- Conversations over HTTP ------------------------------------------------------------------


def test_a_conversation_over_http_streams_the_websockets_events(
    daphne_server: LiveServer, alice: Any, bob: Any, token: str, fake_llm: Any
) -> None:
    fake_llm.script(Reply(chunks=["First ", "answer."]), Reply(chunks=["Second ", "answer."]))
    status, _h, body = http(daphne_server, "POST", "/api/v1/conversations", token, {})
    assert status == 201
    conversation_id = json.loads(body)["id"]
    path = f"/api/v1/conversations/{conversation_id}/messages"

    status, headers, raw = http(
        daphne_server, "POST", path, token, {"content": "Hi"}, Accept="text/event-stream"
    )
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(raw)
    kinds = [e["event"] for e in events]
    assert (
        kinds[0] == "message.created" and kinds[-1] == "generation.finished" and "generation.started" in kinds
    )
    deltas = [json.loads(e["data"]) for e in events if e["event"] == "generation.delta"]
    assert [int(e["id"]) for e in events if e["event"] == "generation.delta"] == [d["seq"] for d in deltas]
    assert "".join(d["text"] for d in deltas) == json.loads(events[-1]["data"])["content"] == "First answer."

    status, _h, body = http(
        daphne_server, "POST", path, token, {"content": "Again"}
    )  # JSON: waits for the end
    answer = json.loads(body)["answer"]
    assert (status, answer["status"], answer["content"]) == (200, "complete", "Second answer.")

    detail = json.loads(http(daphne_server, "GET", f"/api/v1/conversations/{conversation_id}", token)[2])
    assert [m["content"] for m in detail["messages"]] == ["Hi", "First answer.", "Again", "Second answer."]
    listing = json.loads(http(daphne_server, "GET", "/api/v1/conversations", token)[2])
    assert [c["id"] for c in listing["data"]] == [conversation_id]
    # Named like a chat begun in the page: its first question, then the model's title.
    assert listing["data"][0]["title"] in ("Hi", "A fake title")
    # Someone else's conversation does not exist for them.
    bobs = tokens.create(bob, "bob")[1]
    assert http(daphne_server, "GET", f"/api/v1/conversations/{conversation_id}", bobs)[0] == 404
    assert http(daphne_server, "POST", path, bobs, {"content": "mine?"})[0] == 404
    assert TokenUsage.objects.filter(kind="answer", user=alice).count() == 2


def test_a_closed_connection_does_not_stop_the_answer_and_last_event_id_resumes(
    daphne_server: LiveServer, alice: Any, token: str, fake_llm: Any
) -> None:
    chunks = [f"w{i} " for i in range(40)]
    fake_llm.script(Reply(chunks=chunks, delay=0.05))
    conversation_id = json.loads(http(daphne_server, "POST", "/api/v1/conversations", token, {})[2])["id"]
    request = urllib.request.Request(
        daphne_server.url + f"/api/v1/conversations/{conversation_id}/messages",
        data=json.dumps({"content": "Talk"}).encode(),
        method="POST",
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": "text/event-stream",
            "Content-Type": "application/json",
        },
    )
    seen: list[dict[str, Any]] = []
    with urllib.request.urlopen(request, timeout=20) as response:  # read a few deltas, then hang up
        block: dict[str, str] = {}
        for line in response:
            text = line.decode().rstrip("\n")
            if text:
                name, _, value = text.partition(": ")
                block[name] = value
                continue
            if block.get("event") == "generation.delta":
                seen.append(json.loads(block["data"]))
            block = {}
            if len(seen) == 3:
                break
    last = seen[-1]["seq"]

    status, _h, raw = http(
        daphne_server,
        "GET",
        f"/api/v1/conversations/{conversation_id}/stream",
        token,
        Last_Event_ID=str(last),
    )
    events = sse_events(raw)
    rest = [json.loads(e["data"]) for e in events if e["event"] == "generation.delta"]
    assert status == 200 and rest[0]["seq"] == last + 1
    assert [d["seq"] for d in rest] == list(range(last + 1, last + 1 + len(rest)))
    full = "".join(d["text"] for d in seen) + "".join(d["text"] for d in rest)
    assert full == "".join(chunks) == json.loads(events[-1]["data"])["content"]
    # The answer was saved in full although its first reader left.
    deadline = time.monotonic() + 10
    while (
        Message.objects.filter(role="assistant", status="streaming").exists() and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert Message.objects.get(role="assistant").content == "".join(chunks)
    # A finished answer's stream is its end at once.
    events = sse_events(
        http(daphne_server, "GET", f"/api/v1/conversations/{conversation_id}/stream", token)[2]
    )
    assert [e["event"] for e in events] == ["generation.finished"]


def test_staff_see_and_revoke_tokens_but_never_the_token(alice: Any, fake_llm: Any) -> None:
    from tests.factories import make_user
    from tests.test_admin import client_for

    root = make_user("root", is_staff=True, is_superuser=True)
    row, token = tokens.create(alice, "scripts")
    admin = client_for(root)
    listing = admin.get("/admin/api/apitoken/").content.decode()
    assert "scripts" in listing and row.prefix in listing and token not in listing
    assert admin.get("/admin/api/apitoken/add/").status_code == 403
    admin.post("/admin/api/apitoken/", {"action": "revoke", "_selected_action": [row.pk]})
    assert ApiToken.objects.get(pk=row.pk).is_revoked
    assert admin.get("/admin/api/apiaccess/add/").status_code == 200


def test_a_client_that_hangs_up_mid_stream_is_charged_an_estimate(
    daphne_server: LiveServer, alice: Any, token: str, fake_llm: Any
) -> None:
    fake_llm.script(Reply(chunks=[f"w{i} " for i in range(200)], delay=0.02, usage=(40, 200)))
    request = urllib.request.Request(
        daphne_server.url + "/api/v1/chat/completions",
        data=json.dumps({"messages": [{"role": "user", "content": "Go"}], "stream": True}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=20) as response:
        for line in response:
            if b"w3 " in line:  # a chunk may hold several tokens
                break  # hang up

    deadline = time.monotonic() + 10
    while not TokenUsage.objects.filter(kind="api").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    row = TokenUsage.objects.get(kind="api")
    assert row.estimated and row.user == alice and 0 < row.completion_tokens < 200
    fake_llm.wait_for(lambda: fake_llm.disconnects == 1)  # the model was stopped too
