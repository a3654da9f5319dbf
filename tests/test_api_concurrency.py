"""A hundred scripts calling the HTTP API at the same instant, through a real
daphne and the real openai SDK as their client (over PostgreSQL and Redis
in CI's second run): every stream is exact, and every call is accounted
once, in the ledger and, for users with a quota, in their counters, with
nothing left reserved. Half the users have a quota (their calls are
reserved one by one), half have none (their calls go together)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2
import openai
import pytest
from asgiref.sync import sync_to_async
from django.db.models import Sum

from accounts.models import Quota, QuotaCounter
from api import tokens
from conversations.models import TokenUsage
from tests.conftest import LiveServer
from tests.factories import make_user
from tests.fake_llm import Reply

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CALLS = 100
TOKENS = [f" t{i}" for i in range(30)]
PROMPT_TOKENS = 17


def _users_and_tokens() -> list[tuple[Any, str]]:
    made = []
    for i in range(CALLS):
        user = make_user(f"script{i}")
        if i % 2:
            Quota.objects.create(user=user, tokens_per_day=1_000_000)
        made.append((user, tokens.create(user, "load")[1]))
    return made


async def _stream(client: openai.AsyncOpenAI, start: asyncio.Event) -> dict[str, Any]:
    await start.wait()
    stream = await client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "count for me"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    texts: list[str] = []
    finish: str | None = None
    usage: Any = None
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                texts.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    return {"text": "".join(texts), "finish": finish, "usage": usage}


async def test_a_hundred_simultaneous_api_streams_are_each_exact_and_accounted_once(
    daphne_server: LiveServer, fake_llm: Any
) -> None:
    fake_llm.default = Reply(chunks=TOKENS, delay=0.03, usage=(PROMPT_TOKENS, len(TOKENS)))
    made = await sync_to_async(_users_and_tokens)()
    shared = httpx2.AsyncClient(limits=httpx2.Limits(max_connections=CALLS), timeout=60)
    clients = [
        openai.AsyncOpenAI(
            api_key=token, base_url=daphne_server.url + "/api/v1", max_retries=0, http_client=shared
        )
        for _user, token in made
    ]
    start = asyncio.Event()
    try:
        calls = [asyncio.create_task(_stream(client, start)) for client in clients]
        start.set()
        results = await asyncio.wait_for(asyncio.gather(*calls), 120)
    finally:
        await shared.aclose()

    expected = "".join(TOKENS)
    for result in results:
        assert result["text"] == expected
        assert result["finish"] == "stop"
        assert (result["usage"].prompt_tokens, result["usage"].completion_tokens) == (
            PROMPT_TOKENS,
            len(TOKENS),
        )
    assert len(fake_llm.streamed_requests) == CALLS

    def accounts() -> tuple[dict[int | None, list[tuple[int, int]]], dict[int, Any]]:
        ledger: dict[int | None, list[tuple[int, int]]] = {}
        for row in TokenUsage.objects.filter(kind=TokenUsage.Kind.API):
            ledger.setdefault(row.user_id, []).append((row.prompt_tokens, row.completion_tokens))
        counters: dict[int, Any] = {
            row["user_id"]: row
            for row in QuotaCounter.objects.filter(window="day")
            .values("user_id")
            .annotate(used=Sum("tokens_used"), reserved=Sum("tokens_reserved"), answers=Sum("answers"))
        }
        return ledger, counters

    ledger, counters = await sync_to_async(accounts)()
    for i, (user, _token) in enumerate(made):
        assert ledger[user.pk] == [(PROMPT_TOKENS, len(TOKENS))]  # once, with the upstream's usage
        if i % 2:
            counter = counters[user.pk]
            assert (counter["used"], counter["reserved"], counter["answers"]) == (
                PROMPT_TOKENS + len(TOKENS),
                0,
                1,
            )
        else:
            assert user.pk not in counters  # no quota: nothing to count
    assert "Traceback" not in daphne_server.log()


async def test_simultaneous_sends_to_conversations_each_get_their_events(
    daphne_server: LiveServer, fake_llm: Any
) -> None:
    """A burst of `POST /api/v1/conversations/{id}/messages` with their
    server-sent events: the batch that accepts them must not run on the
    thread of the request that happened to start it (that thread ends with
    its response: every later send of the batch failed with 500)."""
    import json

    import aiohttp

    fake_llm.default = Reply(chunks=TOKENS, delay=0.02, usage=(PROMPT_TOKENS, len(TOKENS)))
    users = (await sync_to_async(_users_and_tokens)())[:40]

    ready: list[str] = []
    all_ready = asyncio.Event()

    async def send(session: aiohttp.ClientSession, token: str, start: asyncio.Event) -> dict[str, Any]:
        auth = {"Authorization": f"Bearer {token}"}
        async with session.post(daphne_server.url + "/api/v1/conversations", json={}, headers=auth) as made:
            conversation = (await made.json())["id"]
        ready.append(conversation)
        if len(ready) == len(users):
            all_ready.set()
        await start.wait()
        texts: list[str] = []
        async with session.post(
            f"{daphne_server.url}/api/v1/conversations/{conversation}/messages",
            json={"content": "count for me"},
            headers={**auth, "Accept": "text/event-stream"},
        ) as response:
            assert response.status == 200, await response.text()
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if event["type"] == "generation.delta":
                    texts.append(event["text"])
                elif event["type"] == "generation.finished":
                    return {"deltas": "".join(texts), "finished": event}
        raise AssertionError("the stream ended without generation.finished")

    start = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        sends = [asyncio.create_task(send(session, token, start)) for _user, token in users]
        await asyncio.wait_for(all_ready.wait(), 60)  # every conversation made, then all at once
        start.set()
        results = await asyncio.gather(*sends)

    for result in results:
        assert result["finished"]["status"] == "complete"
        assert result["deltas"] == result["finished"]["content"] == "".join(TOKENS)
    assert "Traceback" not in daphne_server.log()
