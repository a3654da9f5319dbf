"""Company tools through the Model Context Protocol, with the official `mcp`
SDK: the servers staff registered (the admin's "MCP servers", or
CHAT_MCP_SERVERS), their tools offered to the model beside the built-in
ones as `<server>__<tool>`, a call run through the same tool rounds.

Each worker keeps one session per server (`Hub`, on the worker's event
loop), opened when an answer first needs it and reused; a session that
broke (a stdio server's process died, an HTTP server restarted) is opened
again at its next use, and a call it broke is tried once more on the new
one. A server's tool list is kept for CHAT_MCP_TOOLS_TTL seconds, or until
the server says it changed (`notifications/tools/list_changed`).

A server that is down, slow or failing never blocks or fails an answer:
while an answer is being prepared a server gets CHAT_MCP_CONNECT_WAIT
seconds to be reached (it goes on connecting meanwhile, for the next
answers), after which its tools are left out (a log line; the admin shows
the error); a call gets the server's `timeout` and becomes an error result
the model reads. One server's trouble never touches another's tools.

The SDK's transports are anyio task groups, which must be entered and left
in one task: each session lives in a task of its own (`_Session._run`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import shutil
import sys
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
from django.conf import settings
from django.utils import timezone

from ..database import in_database
from .base import Tool, ToolContext, ToolError

log = logging.getLogger(__name__)

SEPARATOR = "__"
# No "__" inside: `<server>__<tool>` must split one way only.
SERVER_NAME = re.compile(r"^(?=.{1,30}$)[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
MAX_TOOLS_PER_SERVER = 64
MAX_TOOLS_OFFERED = 100  # of every server together (the Chat Completions API takes 128 in all)
MAX_SCHEMA_CHARS = 20_000  # of one tool's schema, as JSON
RETRY_AFTER_FAILURE = 30.0  # seconds before a server whose listing failed is asked again
GUARD = Path(__file__).with_name("mcp_stdio_guard.py")  # a stdio server's lines, bounded


@dataclass(frozen=True)
class Server:
    """A server's configuration, as read from its row."""

    pk: int
    name: str
    transport: str
    url: str
    headers: tuple[tuple[str, str], ...] = field(repr=False)  # a bearer token: never in a traceback
    command: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = field(repr=False)
    prompt_ids: frozenset[str]
    group_ids: frozenset[int]
    tools: frozenset[str] | None  # None: all of them
    timeout: float
    # Equal configurations are one session: a row saved without a change keeps it.

    def may_offer(self, prompt_id: str | None, user_groups: frozenset[int]) -> bool:
        if self.prompt_ids and prompt_id not in self.prompt_ids:
            return False
        return not self.group_ids or bool(self.group_ids & user_groups)


# --- The servers' rows ------------------------------------------------------------------


def _strings(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def sync_settings() -> None:
    """CHAT_MCP_SERVERS, written into the table (by name, `from_settings`):
    one place the admin shows and every worker reads. A listed server that
    is invalid is logged and left out."""
    from django.contrib.auth.models import Group

    from ..models import McpServer, SystemPrompt

    for entry in settings.CHAT_MCP_SERVERS or ():
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not SERVER_NAME.match(name):
            log.warning("CHAT_MCP_SERVERS: an entry without a valid name (%r) is left out", name)
            continue
        fields = {
            "transport": McpServer.Transport.STDIO if entry.get("command") else McpServer.Transport.HTTP,
            "url": str(entry.get("url") or ""),
            "headers": _strings(entry.get("headers")),
            "command": str(entry.get("command") or ""),
            "args": [str(a) for a in entry.get("args") or []],
            "env": _strings(entry.get("env")),
            "enabled": bool(entry.get("enabled", True)),
            "tools": ",".join(str(t) for t in entry.get("tools") or []),
            "timeout": float(entry.get("timeout") or 10.0),
            "from_settings": True,
        }
        row = McpServer.objects.filter(name=name).first()
        if row is None:
            row = McpServer.objects.create(name=name, **fields)
        elif any(getattr(row, key) != value for key, value in fields.items()):
            # Only a real change: every worker opens a new session for a changed server.
            for key, value in fields.items():
                setattr(row, key, value)
            row.save()
        prompts = set(
            SystemPrompt.objects.filter(name__in=entry.get("prompts") or []).values_list("pk", flat=True)
        )
        if set(row.prompts.values_list("pk", flat=True)) != prompts:
            row.prompts.set(list(SystemPrompt.objects.filter(pk__in=prompts)))
        groups = set(Group.objects.filter(name__in=entry.get("groups") or []).values_list("pk", flat=True))
        if set(row.groups.values_list("pk", flat=True)) != groups:
            row.groups.set(groups)


def _read_servers() -> list[Server]:
    from ..models import McpServer

    servers = []
    for row in McpServer.objects.filter(enabled=True).prefetch_related("prompts", "groups"):
        if not SERVER_NAME.match(row.name):
            log.warning("MCP server %r: its name must match %s; left out", row.name, SERVER_NAME.pattern)
            continue
        chosen = {t.strip() for t in row.tools.split(",") if t.strip()}
        servers.append(
            Server(
                pk=row.pk,
                name=row.name,
                transport=row.transport,
                url=row.url,
                headers=tuple(sorted(_strings(row.headers).items())),
                command=row.command,
                args=tuple(str(a) for a in row.args or []),
                env=tuple(sorted(_strings(row.env).items())),
                prompt_ids=frozenset(str(p.pk) for p in row.prompts.all()),
                group_ids=frozenset(g.pk for g in row.groups.all()),
                tools=frozenset(chosen) if chosen else None,
                timeout=max(0.5, float(row.timeout or 10.0)),
            )
        )
    return servers


def _save_status(pk: int, tools: list[dict[str, Any]] | None, error: str) -> None:
    """What the server answered, for the admin (any worker writes it)."""
    from ..models import McpServer

    fields: dict[str, Any] = {"last_error": error[:2000]}
    if tools is not None:
        fields.update(listed_tools=tools, listed_at=timezone.now())
    McpServer.objects.filter(pk=pk).update(**fields)


def _user_groups(user_id: int) -> frozenset[int]:
    from django.contrib.auth.models import Group

    return frozenset(Group.objects.filter(user__id=user_id).values_list("pk", flat=True))


# --- One session ---------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions[:3])
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:500]


class _Session:
    """One session with one server, in a task of its own."""

    def __init__(self, server: Server, hub: Hub) -> None:
        self.server = server
        self.hub = hub
        self.session: Any = None
        self.error = ""
        self.ready = asyncio.Event()  # reached (or failed: then `session` is None)
        self.ended = asyncio.Event()
        self._stop = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"mcp-{server.name}")

    @property
    def alive(self) -> bool:
        return not self.ended.is_set() and not self._stop.is_set()

    def close(self) -> None:
        self._stop.set()

    async def _run(self) -> None:
        from mcp.client.session import ClientSession

        try:
            async with contextlib.AsyncExitStack() as stack:
                read, write = await stack.enter_async_context(self._transport())
                session = await stack.enter_async_context(
                    ClientSession(read, write, message_handler=self._notice)
                )
                await asyncio.wait_for(session.initialize(), self.server.timeout)
                self.session = session
                self.ready.set()
                await self._stop.wait()
        except asyncio.CancelledError:
            pass
        except (Exception, BaseExceptionGroup) as exc:  # a server's failure is reported, never raised
            self.error = _describe(exc)
            log.warning("MCP server %s: %s", self.server.name, self.error)
        finally:
            self.session = None
            self.ready.set()
            self.ended.set()

    def _transport(self) -> Any:
        server = self.server
        limit = settings.CHAT_MCP_MESSAGE_BYTES
        if server.transport == "stdio":
            from mcp.client.stdio import StdioServerParameters, get_default_environment, stdio_client

            env = dict(server.env)
            path = env.get("PATH") or get_default_environment().get("PATH")
            if shutil.which(server.command, path=path) is None:
                raise FileNotFoundError(f"no program {server.command!r} to run")
            # Its lines pass through the guard, none longer than the limit.
            params = StdioServerParameters(
                command=sys.executable,
                args=["-I", "-S", str(GUARD), str(limit), "--", server.command, *server.args],
                env=env,
            )
            return stdio_client(params)  # its stderr: the worker's
        from mcp.client.streamable_http import streamable_http_client

        client = httpx2.AsyncClient(
            # Uncompressed: what is counted is what is read (a small gzip body can be gigabytes).
            headers={**dict(server.headers), "Accept-Encoding": "identity"},
            timeout=httpx2.Timeout(server.timeout, read=300.0),
            event_hooks={"response": [functools.partial(_bound_body, limit=limit)]},
        )
        return _with_client(
            client, streamable_http_client(server.url, http_client=client, max_sse_event_size=limit)
        )

    async def _notice(self, message: Any) -> None:
        """The server's notifications; a transport's failure arrives here too."""
        if isinstance(message, Exception):
            # A line or event it could not read: said, and the session kept (a dead
            # connection ends the transport, and a call on it is opened again).
            log.warning("MCP server %s sent what cannot be read: %s", self.server.name, _describe(message))
            return
        method = getattr(getattr(message, "root", message), "method", "")
        if method == "notifications/tools/list_changed":
            self.hub.forget_tools(self.server.name)


class MessageTooLarge(httpx2.StreamError):
    """A server's answer over CHAT_MCP_MESSAGE_BYTES. The SDK takes a stream
    error as the answer to its request: that request fails at once, the
    session goes on."""


async def _bound_body(response: httpx2.Response, *, limit: int) -> None:
    """An HTTP server's answer read up to `limit` bytes, never more: the SDK
    bounds an SSE event (`max_sse_event_size`) but reads a JSON body, or a
    redirect's, whole. Nothing compressed is read: a small gzip body can be
    gigabytes once decoded (the client asks for none)."""
    events = response.headers.get("content-type", "").lower().startswith("text/event-stream")
    stream = response.stream

    async def bounded() -> AsyncGenerator[bytes, None]:
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise MessageTooLarge(
                f"the server's answer is compressed ({encoding[:40]}), though asked not to be: not read"
            )
        declared = response.headers.get("content-length", "")
        if not events and declared.isdigit() and int(declared) > limit:
            raise MessageTooLarge(
                f"the server's answer has {int(declared):,} bytes, more than {limit:,}: not read"
            )
        read = 0
        async for chunk in stream:  # type: ignore[union-attr]  # an async byte stream
            read += len(chunk)
            if read > limit and not events:  # a stream of events: each is bounded by the SDK
                raise MessageTooLarge(f"the server's answer was larger than {limit:,} bytes: not read")
            yield chunk

    response.stream = _Stream(bounded(), stream)


class _Stream(httpx2.AsyncByteStream):
    """An async byte stream made of a generator; closing it closes the original."""

    def __init__(self, chunks: AsyncGenerator[bytes, None], original: Any) -> None:
        self._chunks = chunks
        self._original = original

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks.__aiter__()

    async def aclose(self) -> None:
        await self._chunks.aclose()
        await self._original.aclose()


@contextlib.asynccontextmanager
async def _with_client(client: Any, transport: Any) -> Any:
    async with client, transport as streams:
        yield streams


# --- The hub: sessions, tool lists, calls ---------------------------------------------------


@dataclass
class _Listed:
    tools: list[Tool]
    at: float


class Hub:
    """A worker's sessions and tool lists (one per event loop)."""

    def __init__(self) -> None:
        self._sessions: dict[str, _Session] = {}
        self._listed: dict[str, _Listed] = {}
        self._servers: list[Server] | None = None
        self._servers_at = 0.0
        self._synced = False
        self._status: dict[str, tuple[Any, str]] = {}  # what was last saved, per server
        self._listing: dict[str, asyncio.Task[list[Tool]]] = {}  # one listing per server at a time
        self._failed: dict[str, float] = {}  # when its listing last failed
        self._reading = asyncio.Lock()
        self._refreshing: asyncio.Task[None] | None = None

    # The servers ------------------------------------------------------------

    def _fresh(self) -> bool:
        age = time.monotonic() - self._servers_at
        return self._servers is not None and age <= settings.CHAT_MCP_CONFIG_TTL

    async def servers(self) -> list[Server]:
        """The enabled servers. Past CHAT_MCP_CONFIG_TTL the rows as last read
        are used while they are read again in the background: a burst of
        answers never queues behind that read (only the worker's first does)."""
        if self._fresh():
            return self._servers or []
        if self._servers is not None and settings.CHAT_MCP_CONFIG_TTL > 0:
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
            return self._servers
        await self._refresh()
        return self._servers or []

    async def _refresh(self) -> None:
        async with self._reading:  # read once, however many ask
            if self._fresh():
                return
            now = time.monotonic()
            if not self._synced:
                self._synced = True
                try:
                    await in_database(sync_settings)()
                except Exception:
                    log.exception("CHAT_MCP_SERVERS could not be written")
            try:
                self._servers = await in_database(_read_servers)()
            except Exception:
                log.exception(
                    "MCP servers could not be read: none offered for %g s", settings.CHAT_MCP_CONFIG_TTL
                )
                self._servers = self._servers or []
            self._servers_at = now
            known = {s.name: s for s in self._servers}
            for name, session in list(self._sessions.items()):
                if known.get(name) != session.server:  # removed, turned off or changed
                    session.close()
                    del self._sessions[name]
                    self._listed.pop(name, None)

    # Sessions ---------------------------------------------------------------

    def _session(self, server: Server) -> _Session:
        session = self._sessions.get(server.name)
        if session is None or not session.alive or session.server != server:
            if session is not None:
                session.close()
            session = self._sessions[server.name] = _Session(server, self)
        return session

    async def _reached(self, server: Server, wait: float) -> _Session | None:
        """The server's live session, waiting at most `wait` s; None if not reached."""
        session = self._session(server)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(session.ready.wait()), wait)
        if session.session is None:
            if session.ended.is_set():
                self._remember(server, None, session.error or "it closed the connection")
            return None
        return session

    def _drop(self, session: _Session) -> None:
        """Close this session (only it: another caller may have opened the next one)."""
        session.close()
        if self._sessions.get(session.server.name) is session:
            del self._sessions[session.server.name]

    def forget_tools(self, name: str) -> None:
        self._listed.pop(name, None)

    # Tool lists ---------------------------------------------------------------

    async def tools_of(self, server: Server, wait: float) -> list[Tool]:
        """The server's tools: the list kept (fresh, its session alive), else
        one listing shared by every answer asking meanwhile, within `wait` s;
        a server that just failed is not asked again for a while."""
        listed = self._listed.get(server.name)
        current = self._sessions.get(server.name)
        fresh = listed is not None and time.monotonic() - listed.at < settings.CHAT_MCP_TOOLS_TTL
        if fresh and listed is not None and current is not None and current.alive:
            return listed.tools
        recently = (
            time.monotonic() - self._failed.get(server.name, -RETRY_AFTER_FAILURE) < RETRY_AFTER_FAILURE
        )
        if recently and not (current is not None and current.alive and current.session is not None):
            return listed.tools if listed is not None else []  # failed just now, and not reached since
        task = self._listing.get(server.name)
        if task is None:
            task = self._listing[server.name] = asyncio.get_running_loop().create_task(
                self._list(server, wait)
            )
            task.add_done_callback(functools.partial(self._listed_done, server.name))
        try:
            return await asyncio.wait_for(asyncio.shield(task), wait + 0.1)
        except TimeoutError:
            log.warning(
                "MCP server %s did not answer in time: its tools are left out of this answer", server.name
            )
            return listed.tools if listed is not None else []

    def _listed_done(self, name: str, _task: asyncio.Task[list[Tool]]) -> None:
        self._listing.pop(name, None)

    async def _list(self, server: Server, wait: float) -> list[Tool]:
        listed = self._listed.get(server.name)
        started = time.monotonic()
        session = await self._reached(server, wait)
        if session is None or session.session is None:
            log.warning("MCP server %s is not reached: its tools are left out", server.name)
            self._failed[server.name] = time.monotonic()
            return listed.tools if listed is not None else []
        try:
            left = max(0.5, min(server.timeout, wait - (time.monotonic() - started)))
            found = await asyncio.wait_for(_list_all(session.session), left)
        except Exception as exc:
            error = _describe(exc)
            log.warning("MCP server %s: listing its tools failed (%s): left out", server.name, error)
            self._remember(server, None, error)
            self._failed[server.name] = time.monotonic()
            if _broken(exc):
                self._drop(session)
            return listed.tools if listed is not None else []
        self._failed.pop(server.name, None)
        tools: list[Tool] = []
        seen: set[str] = set()
        for item in found:
            tool = _tool(self, server, item)
            if tool is None or tool.name in seen:
                continue  # not chosen, unusable, or a name it listed twice
            if len(tools) >= MAX_TOOLS_PER_SERVER:
                log.warning(
                    "MCP server %s lists more than %d tools: the rest are left out", server.name, len(tools)
                )
                break
            seen.add(tool.name)
            tools.append(tool)
        self._listed[server.name] = _Listed(tools, time.monotonic())
        self._remember(
            server,
            [
                {"name": str(item.name)[:200], "description": (item.description or "")[:300]}
                for item in found[:200]
            ],
            "",
        )
        return tools

    def _remember(self, server: Server, tools: list[dict[str, Any]] | None, error: str) -> None:
        """The admin's status of the server, written when it changed (off the answer's path)."""
        status = (tools, error)
        if self._status.get(server.name) == status:
            return
        self._status[server.name] = status
        task = asyncio.get_running_loop().create_task(_saved(server, tools, error))
        _pending.add(task)
        task.add_done_callback(_pending.discard)

    async def offered(self, *, user_id: int, prompt_id: str | None) -> list[Tool]:
        """The MCP tools this user may use with this prompt, from every server
        reached within CHAT_MCP_CONNECT_WAIT (together, not one after another)."""
        servers = await self.servers()
        if not servers:
            return []
        groups = (
            await in_database(_user_groups)(user_id) if any(s.group_ids for s in servers) else frozenset()
        )
        allowed = [s for s in servers if s.may_offer(prompt_id, groups)]
        wait = settings.CHAT_MCP_CONNECT_WAIT
        lists = await asyncio.gather(*(self.tools_of(s, wait) for s in allowed), return_exceptions=True)
        offered: list[Tool] = []
        for server, found in zip(allowed, lists, strict=True):
            if isinstance(found, BaseException):
                log.warning("MCP server %s: %s: left out", server.name, _describe(found))
                continue
            room = MAX_TOOLS_OFFERED - len(offered)
            if len(found) > room:
                log.warning(
                    "More than %d MCP tools: %s's last ones are left out", MAX_TOOLS_OFFERED, server.name
                )
            offered += found[: max(0, room)]
        return offered

    # Calls ------------------------------------------------------------------------

    async def call(self, listed_with: Server, tool_name: str, arguments: dict[str, Any]) -> str:
        """One call, on the server as it is configured now (a tool keeps the
        configuration it was listed with); a session that broke is opened again
        and the call tried once more."""
        server = next((s for s in self._servers or () if s.name == listed_with.name), None)
        if server is None:
            raise ToolError(f"the {listed_with.name} server is no longer offered")
        for attempt in (1, 2):
            session = await self._reached(server, server.timeout)
            if session is None or session.session is None:
                raise ToolError(f"the {server.name} server cannot be reached")
            # In a task of its own: a stop (or the timeout) ends the wait at once, while
            # the SDK tells the server the call is cancelled in the background.
            running = asyncio.ensure_future(session.session.call_tool(tool_name, arguments))
            try:
                result = await asyncio.shield(running)
            except asyncio.CancelledError:
                running.cancel()
                _abandoned.add(running)
                running.add_done_callback(_forget)
                raise
            except TimeoutError:
                raise
            except Exception as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # a stop the SDK turned into an error
                    raise asyncio.CancelledError from exc
                if attempt == 1 and _broken(exc):
                    log.warning(
                        "MCP server %s: the session broke (%s): opening it again", server.name, _describe(exc)
                    )
                    self._drop(session)
                    continue
                raise ToolError(f"the {server.name} server failed: {_describe(exc)}") from None
            return _result_text(result)
        raise ToolError(f"the {server.name} server cannot be reached")

    async def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        await asyncio.gather(*(s.ended.wait() for s in self._sessions.values()), return_exceptions=True)
        self._sessions.clear()


_pending: set[asyncio.Task[None]] = set()
_abandoned: set[asyncio.Future[Any]] = set()  # cancelled calls, kept until the SDK is done with them


def _forget(call: asyncio.Future[Any]) -> None:
    _abandoned.discard(call)
    if not call.cancelled():
        call.exception()  # retrieved: never "exception was never retrieved"


async def _saved(server: Server, tools: list[dict[str, Any]] | None, error: str) -> None:
    try:
        await in_database(_save_status)(server.pk, tools, error)
    except Exception:
        log.exception("MCP server %s: its status could not be saved", server.name)


def _broken(exc: BaseException) -> bool:
    """A failure of the connection itself (not the tool's answer)."""
    import anyio
    from mcp.shared.exceptions import MCPError
    from mcp_types import CONNECTION_CLOSED

    if isinstance(exc, MCPError):
        return exc.error.code == CONNECTION_CLOSED
    return isinstance(
        exc, anyio.ClosedResourceError | anyio.BrokenResourceError | anyio.EndOfStream | OSError
    )


async def _list_all(session: Any) -> list[Any]:
    from mcp_types import PaginatedRequestParams

    found: list[Any] = []
    cursor = None
    for _page in range(20):  # a server that pages forever is cut off
        result = await session.list_tools(params=PaginatedRequestParams(cursor=cursor) if cursor else None)
        found += result.tools
        cursor = result.next_cursor
        if not cursor:
            break
    return found


def _tool(hub: Hub, server: Server, item: Any) -> Tool | None:
    """A server's tool as the model is offered it, or None (not chosen, or a bad name)."""
    if server.tools is not None and item.name not in server.tools:
        return None
    name = f"{server.name}{SEPARATOR}{item.name}"
    schema = item.input_schema if isinstance(item.input_schema, dict) else {}
    if schema.get("type") != "object":
        schema = {"type": "object", "properties": {}}
    if len(json.dumps(schema, default=str)) > MAX_SCHEMA_CHARS:
        log.warning("MCP server %s: tool %r left out: its schema is larger than %d characters",
                    server.name, str(item.name)[:64], MAX_SCHEMA_CHARS)  # fmt: skip
        return None

    async def run(context: ToolContext, arguments: dict[str, Any]) -> str:
        return await hub.call(server, item.name, arguments)

    try:
        return Tool(
            name=name,
            description=(item.description or item.title or item.name)[:1024],
            parameters=schema,
            run=run,
            external=True,
            timeout=server.timeout,
            max_result_chars=settings.CHAT_MCP_RESULT_CHARS,
        )
    except ValueError as exc:
        log.warning("MCP server %s: tool %r left out: %s", server.name, item.name, exc)
        return None


def _result_text(result: Any) -> str:
    """What the model reads of a result: its text; other content named, never dropped silently."""
    parts: list[str] = []
    room = settings.CHAT_MCP_RESULT_CHARS * 2 + 1000  # kept before the cut is made (and said)
    for item in list(result.content or ())[:100]:
        if sum(len(p) for p in parts) > room:
            parts.append("[more content left out]")
            break
        kind = getattr(item, "type", "")
        if kind == "text":
            parts.append(item.text[:room])
        elif kind in ("image", "audio"):
            size = len(getattr(item, "data", "") or "") * 3 // 4
            what = "an image" if kind == "image" else "audio"
            parts.append(f"[{what} ({item.mime_type}, about {size:,} bytes): not shown to the model]")
        elif kind == "resource":
            resource = item.resource
            text = getattr(resource, "text", None)
            parts.append(
                text
                if isinstance(text, str)
                else f"[a resource: {resource.uri} ({getattr(resource, 'mime_type', '') or 'binary'})]"
            )
        elif kind == "resource_link":
            parts.append(f"[a link to a resource: {item.name} {item.uri}]")
        else:
            parts.append(f"[content of type {kind!r}]")
    if not parts and getattr(result, "structured_content", None) is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    text = "\n".join(parts)
    if result.is_error:
        raise ToolError(text or "the tool reported an error")
    return text


# --- One hub per event loop -----------------------------------------------------------------

_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub] = weakref.WeakKeyDictionary()


def hub() -> Hub:
    loop = asyncio.get_running_loop()
    found = _hubs.get(loop)
    if found is None:
        found = _hubs[loop] = Hub()
    return found


async def offered(*, user_id: int, prompt_id: Any | None) -> list[Tool]:
    """The MCP tools offered to the model for this user and prompt; never raises."""
    try:
        return await hub().offered(user_id=user_id, prompt_id=str(prompt_id) if prompt_id else None)
    except Exception:
        log.exception("MCP tools could not be listed: left out")
        return []


async def warm() -> None:
    """Start reaching every enabled server (a worker's start: nothing waits
    for it), so that the first answers find them ready."""
    try:
        found = hub()
        for server in await found.servers():
            found._session(server)
    except Exception:
        log.exception("MCP servers could not be started")


async def named(*, user_id: int, names: Sequence[str]) -> list[Tool]:
    """The MCP tools among `names` this user may use (the HTTP API names them)."""
    wanted = set(names)
    if not wanted:
        return []
    found = await offered(user_id=user_id, prompt_id=None)
    return [tool for tool in found if tool.name in wanted]


def is_mcp_name(name: str) -> bool:
    return SEPARATOR in name


def names(tools: Iterable[Tool]) -> list[str]:
    return [t.name for t in tools]
