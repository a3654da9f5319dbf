"""The terminal chat client: the same conversations as the browser, streamed
through the same `generation` and the answer's one follower (generation/follow.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
import uuid
from typing import IO, Any

from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError, CommandParser

from conversations import generation, refusals
from conversations.generation.follow import Reader
from conversations.models import ChatModel, Conversation, SystemPrompt
from conversations.money import money
from conversations.selectors import conversation_for_user

HELP_LINE = (
    "/new starts a new conversation, /clear clears the screen, /quit (or Ctrl+D) leaves; "
    "Ctrl+C stops an answer, and at the prompt it quits."
)
# An answer always ends with `generation.finished`; this only guards against
# a lost event, far beyond any model timeout.
ANSWER_TIMEOUT = 600.0
_QUIT = object()


class Command(BaseCommand):
    help = (
        "Chat in the terminal as a user: the answer streams in as it arrives. Conversations "
        "made here appear in the browser and browser conversations can be continued here. " + HELP_LINE
    )
    stealth_options = ("stdin",)

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--user", required=True, metavar="USERNAME", help="Chat as this user.")
        parser.add_argument(
            "--conversation", metavar="ID", help="Continue this conversation (one of the user's)."
        )
        parser.add_argument("--prompt", metavar="NAME", help="System prompt for new conversations (by name).")
        parser.add_argument(
            "--model", metavar="NAME", help="Model for new conversations (one staff enabled in the admin)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["verbosity"] < 2:
            # The answer's own log lines would land in the middle of the chat.
            logging.getLogger("conversations").setLevel(logging.WARNING)
        user = get_user_model().objects.filter(username=options["user"]).first()
        if user is None:
            raise CommandError(f"No such user: {options['user']}.")
        conversation = None
        if options["conversation"]:
            conversation = _own_conversation(user, options["conversation"])
        prompt = None
        if options["prompt"]:
            prompt = SystemPrompt.objects.filter(name=options["prompt"]).first()
            if prompt is None:
                names = ", ".join(SystemPrompt.objects.values_list("name", flat=True)) or "none"
                raise CommandError(f"No system prompt named {options['prompt']!r} (there are: {names}).")
        model = options["model"] or None
        if model and not ChatModel.is_pickable(model):
            names = ", ".join(m.name for m in ChatModel.choices()) or "none"
            raise CommandError(f"No model named {model!r} may be picked (there are: {names}).")
        stdin = options.get("stdin")
        if stdin is None:
            stdin = sys.stdin
        session = ChatSession(
            self, user=user, conversation=conversation, prompt=prompt, model=model, stdin=stdin
        )
        asyncio.run(session.run())


def refusal_line(refusal: refusals.Refusal) -> str:
    """A refusal as the terminal says it: its words, and its code when the
    person might look it up (limits)."""
    if refusal.code in (refusals.QUOTA_EXCEEDED, refusals.RATE_LIMITED):
        return f"{refusal.message} ({refusal.code})"
    return refusal.message


def _own_conversation(user: User, conversation_id: str) -> Conversation:
    try:
        pk = uuid.UUID(conversation_id)
    except ValueError as exc:
        raise CommandError(f"Not a conversation id: {conversation_id!r}.") from exc
    try:
        return conversation_for_user(user=user, conversation_id=pk)
    except refusals.Refusal:  # someone else's looks the same as none
        raise CommandError(f"No such conversation: {conversation_id}.") from None


class ChatSession:
    def __init__(
        self,
        command: BaseCommand,
        *,
        user: User,
        conversation: Conversation | None,
        prompt: SystemPrompt | None,
        stdin: IO[str],
        model: str | None = None,
    ) -> None:
        self.out = command.stdout
        self.style = command.style
        self.user = user
        self.conversation_id = conversation.id if conversation else None
        self.prompt = prompt
        self.model = model
        self.stdin = stdin
        self.lines: asyncio.Queue[object] = asyncio.Queue()  # a line (str), None at the end, or _QUIT
        self.answering = False
        self.stopping = False
        self.stop_request: asyncio.Future[None] | None = None

    def write(self, text: str, ending: str = "\n") -> None:
        self.out.write(text, ending=ending)
        self.out.flush()

    # --- input ----------------------------------------------------------------------

    def _read_stdin(self, loop: asyncio.AbstractEventLoop) -> None:
        # A daemon thread, not the loop's executor: a blocked readline must
        # not keep the process alive once the user quits with Ctrl+C.
        while True:
            line = self.stdin.readline()
            try:
                loop.call_soon_threadsafe(self.lines.put_nowait, line if line else None)
            except RuntimeError:  # the session is over
                return
            if not line:
                return

    def _on_interrupt(self) -> None:
        if self.answering:
            if self.conversation_id is not None:
                if not self.stopping:
                    self.write("\n^C — stopping the answer…")
                self.stopping = True
                # Again on every Ctrl+C: a stop sent before the answer's task
                # listened would be lost, and a repeated stop is harmless.
                self.stop_request = asyncio.ensure_future(generation.request_stop(self.conversation_id))
            return
        self.lines.put_nowait(_QUIT)

    # --- the session ------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGINT, self._on_interrupt)  # main thread only
        threading.Thread(target=self._read_stdin, args=(loop,), daemon=True, name="chat-stdin").start()
        try:
            await self._greet()
            await self._loop()
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGINT)
            await generation.wait_all()  # an answer still running is saved before we go
            await generation.release_connections()

    async def _greet(self) -> None:
        self.write(f"Chatting as {self.user.get_username()}. {HELP_LINE}")
        if self.conversation_id is not None:
            title = await database_sync_to_async(_title)(self.conversation_id)
            self.write(f"Continuing “{title}” ({self.conversation_id}).")
        if self.prompt is not None:
            self.write(f"New conversations use the system prompt “{self.prompt.name}”.")

    async def _loop(self) -> None:
        while True:
            self.write("you> ", ending="")
            line = await self.lines.get()
            if line is None or line is _QUIT:
                self.write("\nBye.")
                return
            assert isinstance(line, str)
            text = line.strip()
            if not text:
                continue
            if text == "/quit":
                self.write("Bye.")
                return
            if text == "/new":
                self.conversation_id = None
                self.write("New conversation: your next message starts it.")
            elif text == "/clear":
                if getattr(self.out, "isatty", lambda: False)():
                    self.write("\033[2J\033[H", ending="")
                where = (
                    f"conversation {self.conversation_id}" if self.conversation_id else "a new conversation"
                )
                self.write(f"Screen cleared; still in {where}.")
            elif text.startswith("/"):
                self.write(f"Unknown command {text.split()[0]}. {HELP_LINE}")
            else:
                await self._ask(text)

    async def _ask(self, text: str) -> None:
        new = self.conversation_id is None
        try:
            accepted = await database_sync_to_async(generation.accept_message)(
                user=self.user,
                conversation_id=self.conversation_id,
                content=text,
                client_id=uuid.uuid4(),
                prompt_id=self.prompt.id if new and self.prompt else None,
                model=self.model if new else None,
            )
        except refusals.Refusal as refusal:
            self.write(self.style.ERROR(refusal_line(refusal)))
            if refusal.code == refusals.NOT_FOUND:
                self.conversation_id = None
            return
        self.conversation_id = accepted.conversation.id
        if new:
            self.write(f"(new conversation {accepted.conversation.id}, model {accepted.answer.model})")
        # Follow the conversation BEFORE the answer starts: no delta is missed.
        reader = await Reader(str(accepted.conversation.id)).open()
        self.answering, self.stopping = True, False
        try:
            await generation.launch(accepted)
            await asyncio.wait_for(self._stream(reader, str(accepted.answer.id)), ANSWER_TIMEOUT)
        except TimeoutError:
            self.write(self.style.ERROR("\nNo end of the answer arrived; check `manage.py sweep_streaming`."))
        finally:
            self.answering = False
            await reader.close()

    async def _stream(self, reader: Reader, answer_id: str) -> None:
        self.write("assistant> ", ending="")
        async for event in reader.answer_events(answer_id, keep_alive=ANSWER_TIMEOUT):
            kind = event.get("type")
            if kind == "conversation.summary":
                self.write(self.style.NOTICE("[older messages summarised]"), ending=" ")
            elif kind == "generation.delta":
                if not self.stopping:  # after "stopping", nothing more of the answer is printed
                    self.write(event["text"], ending="")
            elif kind == "generation.tool":
                self.write(self.style.NOTICE(f"[used {event['summary']}]"), ending=" ")
            elif kind == "error":
                self.write(
                    "\n" + self.style.ERROR(f"[{event.get('code')}] {event.get('message')}"), ending=""
                )
            elif kind == "generation.finished":
                self.write("")
                if event["status"] != "complete":
                    self.write(self.style.WARNING(f"[{event['status']}]"))
                usage = event.get("usage") or {}
                if usage.get("prompt_tokens") or usage.get("completion_tokens"):
                    line = (
                        f"[{event.get('model') or 'model'} · {usage['prompt_tokens']} in · "
                        f"{usage['completion_tokens']} out · {money(usage.get('cost', 0))}]"
                    )
                    self.write(self.style.HTTP_NOT_MODIFIED(line))
                return


def _title(conversation_id: uuid.UUID) -> str:
    return Conversation.objects.get(pk=conversation_id).display_title
