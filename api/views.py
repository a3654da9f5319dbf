"""The HTTP API under /api/v1/: OpenAI-compatible model listing and chat
completions, and the product's conversations for scripts. Every view only
parses, delegates to `conversations.generation` (the same rules and the same
ledger as the page) and formats; authentication is a personal token
(`Authorization: Bearer <token>`), never the session cookie."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeAlias, cast

from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from conversations import attachments, generation, llm, projects, refusals, selectors, services, sharing
from conversations.batches import batches_of
from conversations.generation import stateless, turns
from conversations.generation.events import Event
from conversations.generation.follow import Reader
from conversations.models import ChatModel, Conversation, SystemPrompt
from conversations.share_views import link_json
from conversations.tools import mcp
from files.sniff import Refused

from . import parsing, tokens
from .errors import ApiError, bad_request, from_llm, from_refusal

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

P = ParamSpec("P")

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    # What `endpoint` wraps: a view of the request, the token's user and the URL's arguments ...
    UserView: TypeAlias = Callable[Concatenate[HttpRequest, User, P], Awaitable[HttpResponseBase]]
    # ... and what it makes of it: a Django async view.
    AsyncView: TypeAlias = Callable[Concatenate[HttpRequest, P], Coroutine[Any, Any, HttpResponseBase]]


def endpoint(*methods: str) -> Callable[[UserView[P]], AsyncView[P]]:
    """An API view: the allowed methods, the token's user, errors in OpenAI's shape."""

    def wrap(view: UserView[P]) -> AsyncView[P]:
        @csrf_exempt
        async def run(request: HttpRequest, *args: P.args, **kwargs: P.kwargs) -> HttpResponseBase:
            if request.method not in methods:
                error = ApiError(405, f"Use {' or '.join(methods)} here.", "method_not_allowed")
                response = error.response()
                response["Allow"] = ", ".join(methods)
                return response
            try:
                # Requests that arrive together are authenticated together (batches.py).
                user = await batches_of(tokens.authenticate_all).submit(request.headers.get("Authorization"))
            except tokens.Refused as exc:
                return ApiError(exc.status, str(exc), exc.code).response()
            try:
                return await view(request, user, *args, **kwargs)
            except ApiError as exc:
                return exc.response()
            except refusals.Refusal as refusal:
                return from_refusal(refusal).response()

        return run

    return wrap


# --- OpenAI-compatible ------------------------------------------------------------------


@endpoint("GET")
async def models(request: HttpRequest, user: User) -> HttpResponse:
    usable = await generation.in_database(selectors.usable_models)()
    return JsonResponse(
        {
            "object": "list",
            "data": [
                {"id": m.name, "object": "model", "created": 0, "owned_by": "chatsite", "label": m.display}
                for m in usable
            ],
        }
    )


def _call_of(user: User, body: dict[str, Any]) -> stateless.Call:
    """The call a request asks for, parsed (the model and the staff's
    default prompt are the rules' to settle: `stateless.accept`)."""
    messages = parsing.messages_of(body)
    model = parsing.optional_string(body, "model") or ""
    client_tools, builtin = parsing.tools_of(body)
    return stateless.Call(
        user_id=user.pk,
        model=model,
        messages=messages,
        temperature=parsing.number(body, "temperature", 0, 2),
        max_tokens=parsing.max_tokens_of(body),
        response_format=parsing.response_format_of(body),
        client_tools=client_tools,
        builtin=builtin,
    )


@endpoint("POST")
async def chat_completions(request: HttpRequest, user: User) -> HttpResponse | StreamingHttpResponse:
    body = parsing.body_of(request, inline_files=True)
    stream = parsing.flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("`stream_options` must be an object.", "stream_options")
    include_usage = parsing.flag(options, "include_usage")
    call = _call_of(user, body)
    wanted = parsing.mcp_named(call.client_tools)
    if wanted:  # an MCP server's tools, by the built-in tools' rule: run here when this user may
        found = await mcp.named(user_id=user.pk, names=wanted)
        names = {tool.name for tool in found}
        call.builtin = [*call.builtin, *found]
        call.client_tools = [t for t in call.client_tools if t["function"]["name"] not in names]
    try:
        call.messages = await attachments.read_parts(user, call.messages)
    except Refused as exc:
        raise ApiError(exc.status, str(exc), exc.code, retry_after=exc.retry_after) from None
    try:
        call = await stateless.accept(user, call)
    except stateless.UnknownModel as exc:
        raise ApiError(404, str(exc), "model_not_found", param="model") from None
    events = stateless.run_call(call)
    try:
        first = await anext(events)  # a failure before the first token is an HTTP error
    except llm.LLMError as exc:
        await events.aclose()
        return from_llm(exc).response()
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    if stream:
        chunks = _completion_chunks(completion_id, call.model, first, stateless.paced(events), include_usage)
        return StreamingHttpResponse(chunks, content_type="text/event-stream", headers=SSE_HEADERS)
    texts: list[str] = []
    event = first
    try:
        while True:
            if type(event) is llm.TextDelta:
                texts.append(event.text)
            else:
                break
            event = await anext(events)
    except llm.LLMError as exc:
        return from_llm(exc).response()
    finally:
        await events.aclose()
    end = cast(llm.StreamEnd, event)  # run_call yields text deltas, then one StreamEnd
    message: dict[str, object] = {"role": "assistant", "content": "".join(texts) or None}
    if end.tool_calls:
        message["tool_calls"] = _tool_calls(end)
    return JsonResponse(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": end.model,
            "choices": [
                {"index": 0, "message": message, "finish_reason": end.finish_reason, "logprobs": None}
            ],
            "usage": _usage(end.usage),
        }
    )


def _tool_calls(end: llm.StreamEnd, *, indexed: bool = False) -> list[dict[str, object]]:
    return [
        {
            **({"index": i} if indexed else {}),
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for i, call in enumerate(end.tool_calls)
    ]


def _usage(usage: llm.Usage | None) -> dict[str, int]:
    usage = usage or llm.Usage(0, 0)
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


async def _completion_chunks(
    completion_id: str,
    model: str,
    first: llm.StreamEvent,
    events: AsyncGenerator[llm.StreamEvent, None],
    include_usage: bool,
) -> AsyncIterator[str]:
    """The stream exactly as OpenAI sends it: `data: {chunk}` lines, the
    usage chunk if asked for, `data: [DONE]`."""
    created = int(time.time())

    def chunk(delta: dict[str, object], finish_reason: str | None = None, **extra: object) -> str:
        payload = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": extra.pop("model", model),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
            **extra,
        }
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    event = first
    try:
        while type(event) is llm.TextDelta:
            yield chunk({"content": event.text})
            event = await anext(events)
        end = cast(llm.StreamEnd, event)  # run_call yields text deltas, then one StreamEnd
        if end.tool_calls:
            yield chunk({"tool_calls": _tool_calls(end, indexed=True)}, model=end.model)
        yield chunk({}, end.finish_reason, model=end.model)
        if include_usage:
            payload = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": end.model,
                "choices": [],
                "usage": _usage(end.usage),
            }
            yield f"data: {json.dumps(payload)}\n\n"
        yield "data: [DONE]\n\n"
    except llm.LLMError as exc:  # after the first token: an error event ends the stream
        yield f"data: {json.dumps(from_llm(exc).body(), ensure_ascii=False)}\n\n"
    finally:
        await events.aclose()


# --- Conversations ----------------------------------------------------------------------


def _conversation_json(conversation: Conversation) -> dict[str, object]:
    return {
        "id": str(conversation.pk),
        "title": conversation.display_title,
        "model": conversation.chosen_model,
        "prompt": conversation.prompt.name if conversation.prompt else None,
        "project": str(conversation.project_id) if conversation.project_id else None,
        "created_at": conversation.created_at.isoformat(),
        "updated_at": conversation.updated_at.isoformat(),
    }


def _create_conversation(user: User, body: dict[str, Any]) -> Conversation:
    prompt_name = parsing.optional_string(body, "prompt")
    model = parsing.optional_string(body, "model")
    project_id = parsing.optional_uuid(body, "project")
    # In a project (the user's own): its prompt and model unless the request names its own.
    project = projects.own(user, project_id) if project_id else None
    if prompt_name:
        prompt = SystemPrompt.objects.filter(name=prompt_name).first()
        if prompt is None:
            raise ApiError(404, f"No system prompt named `{prompt_name}`.", "not_found", param="prompt")
    elif project is not None and project.prompt is not None:
        prompt = project.prompt
    else:
        prompt = SystemPrompt.objects.filter(is_default=True).first()
    if model and not ChatModel.is_pickable(model):
        raise ApiError(
            404, f"The model `{model}` does not exist or you do not have access to it.", "model_not_found"
        )
    if not model and project is not None and project.model and ChatModel.is_pickable(project.model):
        model = project.model
    return turns.new_conversation(user, prompt, model=model, project=project)


def _move_conversation(user: User, conversation_id: uuid.UUID, body: dict[str, Any]) -> dict[str, object]:
    """PATCH: `project`, a project id to move the conversation into, or null to take it out."""
    unknown = sorted(set(body) - {"project"})
    if unknown or "project" not in body:
        raise bad_request("A conversation's PATCH takes `project` (an id, or null).", "project")
    conversation = selectors.conversation_for_user(
        user=user, conversation_id=conversation_id, with_prompt=True
    )
    services.conversation_move(user, conversation, parsing.optional_uuid(body, "project"))
    return _conversation_json(conversation)


def _conversation_list(user: User, cursor: str | None) -> dict[str, object]:
    try:
        page, next_cursor = selectors.sidebar_page(user=user, cursor=cursor)
    except selectors.BadCursor:
        raise bad_request("Bad cursor.", "cursor") from None
    return {"object": "list", "data": [selectors.sidebar_item(c) for c in page], "next_cursor": next_cursor}


def _conversation_detail(user: User, conversation_id: uuid.UUID) -> dict[str, object]:
    conversation = selectors.conversation_for_user(
        user=user, conversation_id=conversation_id, with_prompt=True
    )
    usage = selectors.answers_usage(conversation)
    messages: list[dict[str, object]] = []
    for message in conversation.messages.filter(is_active=True).order_by("created_at"):
        row = usage.get(message.pk)
        messages.append(
            {
                **generation.message_payload(message),
                "model": message.model,
                "finish_reason": message.finish_reason,
                "usage": {
                    "prompt_tokens": row["prompt_tokens"],
                    "completion_tokens": row["completion_tokens"],
                    "cost": str(row["cost"]),
                }
                if row
                else None,
            }
        )
    return {**_conversation_json(conversation), "messages": messages}


@endpoint("GET", "POST")
async def conversations(request: HttpRequest, user: User) -> HttpResponse:
    if request.method == "POST":
        body = parsing.body_of(request)
        conversation = await generation.in_database(_create_conversation)(user, body)
        return JsonResponse(_conversation_json(conversation), status=201)
    listing = await generation.in_database(_conversation_list)(user, request.GET.get("cursor") or None)
    return JsonResponse(listing)


@endpoint("GET", "PATCH")
async def conversation(request: HttpRequest, user: User, conversation_id: uuid.UUID) -> HttpResponse:
    if request.method == "PATCH":
        body = parsing.body_of(request)
        return JsonResponse(await generation.in_database(_move_conversation)(user, conversation_id, body))
    return JsonResponse(await generation.in_database(_conversation_detail)(user, conversation_id))


def _wants_events(request: HttpRequest) -> bool:
    return "text/event-stream" in request.headers.get("Accept", "")


def _sse(event: Event) -> str:
    if event["type"] == "_keepalive":
        return ": keep-alive\n\n"
    seq = event.get("seq")
    head = f"event: {event['type']}\n" + (f"id: {seq}\n" if isinstance(seq, int) else "")
    return head + f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


@endpoint("POST")
async def conversation_messages(
    request: HttpRequest, user: User, conversation_id: uuid.UUID
) -> HttpResponse | StreamingHttpResponse:
    """Send a message: with `Accept: text/event-stream` the answer's events
    as they happen (the websocket's frames), else the finished answer as
    JSON. Closing the connection does not stop the answer."""
    body = parsing.body_of(request)
    files = parsing.attachments_of(body)
    content = parsing.content_of(body, files=bool(files))
    client_id = parsing.optional_uuid(body, "client_id") or uuid.uuid4()
    topic = str(conversation_id)
    reader = await Reader(topic).open()  # before the answer starts: nothing is missed
    try:
        accepted = await generation.accept_send(
            user=user,
            conversation_id=conversation_id,
            content=content,
            client_id=client_id,
            attachments=files,
        )
    except refusals.Refusal as refusal:
        await reader.close()
        if refusal.code == refusals.RESENT:
            raise ApiError(409, "This client_id was sent already.", "duplicate", param="client_id") from None
        raise
    except BaseException:
        await reader.close()
        raise
    await generation.launch(accepted)
    answer_id = str(accepted.answer.id)
    events = reader.answer_events(answer_id)
    if _wants_events(request):
        return StreamingHttpResponse(
            (_sse(event) async for event in events), content_type="text/event-stream", headers=SSE_HEADERS
        )
    finished: Event = {}
    async with contextlib.aclosing(events):
        async for event in events:
            if event["type"] == "generation.finished":
                finished = event
    return JsonResponse(
        {
            "conversation": topic,
            "message": generation.message_payload(accepted.question),
            "answer": {
                "id": answer_id,
                "status": finished.get("status"),
                "finish_reason": finished.get("finish_reason"),
                "content": finished.get("content"),
                "model": finished.get("model"),
                "usage": finished.get("usage"),
            },
        }
    )


@endpoint("GET")
async def conversation_stream(
    request: HttpRequest, user: User, conversation_id: uuid.UUID
) -> StreamingHttpResponse:
    """Follow the conversation's streaming answer (its events as SSE), from
    `Last-Event-ID` (the last `seq` the client has) on; an answer that has
    ended gives its `generation.finished` at once."""
    raw = request.headers.get("Last-Event-ID") or request.GET.get("after") or "0"
    try:
        after = max(0, int(raw))
    except ValueError:
        raise bad_request("`Last-Event-ID` must be a seq (an integer).") from None
    await generation.in_database(generation.check_owner)(user=user, conversation_id=conversation_id)
    topic = str(conversation_id)
    reader = await Reader(topic).open()
    try:
        snapshot = await reader.hub.snapshot(topic)
        first: list[Event] = []
        if snapshot is None:
            ended = await generation.in_database(generation.last_answer_finished)(topic)
            if ended is None:
                raise ApiError(404, "This conversation has no answer.", "not_found")
            first.append(ended)
            answer_id: str | None = ended["message"]
        else:
            answer_id = snapshot.answer_id
            await reader.resume(answer_id, after)  # the deltas after `after`, then live ones
    except BaseException:
        await reader.close()
        raise
    events = reader.answer_events(answer_id, first=first)
    return StreamingHttpResponse(
        (_sse(event) async for event in events), content_type="text/event-stream", headers=SSE_HEADERS
    )


@endpoint("POST", "DELETE")
async def conversation_share(request: HttpRequest, user: User, conversation_id: uuid.UUID) -> HttpResponse:
    """POST: share the conversation as it is now, or update its link's
    snapshot (`show_owner` optional); DELETE: revoke its link."""
    if request.method == "DELETE":
        await generation.in_database(sharing.revoke)(user=user, conversation_id=conversation_id)
        return JsonResponse({"revoked": True})
    show = parsing.body_of(request).get("show_owner")
    if show is not None and not isinstance(show, bool):
        raise bad_request("`show_owner` must be true or false.", "show_owner")
    try:
        link, made = await generation.in_database(sharing.share)(
            user=user, conversation_id=conversation_id, show_owner=show
        )
    except sharing.SharingOff:
        raise ApiError(403, "Sharing is turned off on this site.", "sharing_off") from None
    return JsonResponse(link_json(request, link), status=201 if made else 200)
