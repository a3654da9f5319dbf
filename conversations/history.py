"""What is sent upstream for one answer: the system prompt (and a project's
instructions and files), the summary of older turns (a long chat), then the
most recent turns of THIS conversation that fit the context budget.

The conversation is read newest-first, a page at a time, and reading stops
as soon as the budget is spent: a turn costs the same whether the chat has
ten messages or ten thousand."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from . import attachments, projects
from .llm import ChatMessage, content_tokens
from .models import ChatModel, Conversation, Message, Project, ToolRound

# Every message costs a few tokens of framing on top of its text.
PER_MESSAGE_OVERHEAD = 4
FIRST_PAGE = 32  # most turns fit in the first page; later pages grow


def message_tokens(content: str | list[dict[str, Any]] | None) -> int:
    return content_tokens(content) + PER_MESSAGE_OVERHEAD


def _tokens(message: ChatMessage) -> int:
    calls = message.get("tool_calls") or ()
    extra = sum(content_tokens(c["function"]["name"] + c["function"]["arguments"]) for c in calls)
    return message_tokens(message.get("content")) + extra


def messages_tokens(messages: Iterable[ChatMessage]) -> int:
    return sum(_tokens(m) for m in messages)


def _fit_newest_first(
    system_prompt: str, newest_first: Iterable[list[ChatMessage]], budget: int
) -> list[ChatMessage]:
    """`newest_first`: units, each kept or dropped whole (an answer with its
    tool rounds: a `tool_calls` message without its results is refused)."""
    head: list[ChatMessage] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    used = messages_tokens(head)
    kept: list[list[ChatMessage]] = []
    for unit in newest_first:
        cost = messages_tokens(unit)
        if kept and used + cost > budget:  # the newest turn is always kept
            break
        used += cost
        kept.append(unit)
    kept.reverse()
    # An answer without the question that prompted it only confuses the model.
    while len(kept) > 1 and kept[0][0]["role"] == "assistant":
        kept.pop(0)
    return head + [message for unit in kept for message in unit]


def fit_history(system_prompt: str, turns: Sequence[ChatMessage], budget: int) -> list[ChatMessage]:
    """Keep the system prompt and the newest turn always; add older turns,
    newest first, while they fit in `budget` tokens."""
    return _fit_newest_first(system_prompt, ([turn] for turn in reversed(turns)), budget)


def with_tool_rounds(content: str, tool_rounds: Sequence[ToolRound] | None) -> list[ChatMessage]:
    """An answer as the Chat Completions API wants it back: for each tool
    round, the `assistant` message with its `tool_calls` and one `tool`
    message per call (with its `tool_call_id`); then the answer's text."""
    messages: list[ChatMessage] = []
    for round_ in tool_rounds or ():
        messages.append(
            {
                "role": "assistant",
                "content": round_.get("text") or None,
                "tool_calls": [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["name"], "arguments": c["arguments"]},
                    }
                    for c in round_["calls"]
                ],
            }
        )
        messages.extend(
            {"role": "tool", "tool_call_id": r["call_id"], "content": r["content"]} for r in round_["results"]
        )
    if content:
        messages.append({"role": "assistant", "content": content})
    return messages


Key = tuple[Any, Any]  # (created_at, pk): the order of a conversation's messages
SUMMARY_HEADING = "Summary of the earlier part of this conversation (older messages are not shown):"
TRANSCRIPT_CHARS = 8000  # of one message in a summary call
PENDING_ROWS = 500  # messages folded into the summary by one call, at most


def summary_message(summary: str) -> ChatMessage:
    return {"role": "system", "content": f"{SUMMARY_HEADING}\n{summary}"}


def summary_reserve(budget: int) -> int:
    """Tokens kept free for the summary when older turns overflow (0: no summaries)."""
    tokens = min(settings.CHAT_SUMMARY_TOKENS, budget // 4)
    return tokens + message_tokens(SUMMARY_HEADING) if tokens > 0 else 0


def _rows(conversation: Conversation) -> Any:
    """The active, non-empty, settled messages of a conversation."""
    return (
        Message.objects.filter(conversation=conversation, is_active=True)
        .exclude(status=Message.Status.STREAMING)
        .exclude(content="", tool_rounds__isnull=True, attachments__isnull=True)
        .values_list("role", "content", "tool_rounds", "created_at", "pk", "attachments")
    )


Row = tuple[str, str, Any, Any, Any, Any]  # `_rows`' values


class _Units:
    """A conversation's rows as what the model reads: an answer with its
    tool rounds, a question with its files (one unit: kept or dropped
    whole). Whether the model can see is asked once, and only of a chat
    that sent images."""

    def __init__(self, conversation: Conversation) -> None:
        self.conversation = conversation
        self._sees: bool | None = None

    def sees(self) -> bool:
        if self._sees is None:
            self._sees = ChatModel.can_see(self.conversation.chosen_model)
        return self._sees

    def of(self, rows: list[Row], *, images: bool = True) -> list[list[ChatMessage]]:
        """`images`: False for a summary's turns (an image is named, not shown).
        An image's bytes are read only for the turns kept (`attachments.fill_images`)."""
        loaded = attachments.load(row[5] for row in rows)
        images = images and any(found.kind == "image" for found in loaded.values())
        return [self._unit(row, loaded, images) for row in rows]

    def _unit(self, row: Row, loaded: dict[str, attachments.Loaded], images: bool) -> list[ChatMessage]:
        role, content, tool_rounds, _created, _pk, held = row
        if tool_rounds:
            return with_tool_rounds(content, tool_rounds)
        if held:
            parts = attachments.user_content(content, held, loaded, sees=images and self.sees())
            return [{"role": role, "content": parts}]
        return [{"role": role, "content": content}]


def _newest_first(conversation: Conversation, upto: Message) -> Iterable[tuple[Key, list[ChatMessage]]]:
    """The messages up to `upto`, newest first, each with its key, a page at
    a time (keyset on created_at, pk): stops reading when the caller stops
    iterating."""
    rows = _rows(conversation).order_by("-created_at", "-pk")
    page = rows.filter(created_at__lte=upto.created_at)
    size = FIRST_PAGE
    units = _Units(conversation)
    while True:
        batch = list(page[:size])
        for row, unit in zip(batch, units.of(batch), strict=True):
            yield (row[3], row[4]), unit
        if len(batch) < size:
            return
        _, _, _, created, pk, _ = batch[-1]
        page = rows.filter(created_at__lte=created).exclude(created_at=created, pk__gte=pk)
        size *= 4


def _between(
    conversation: Conversation, after: Key | None, before: Key, budget: int
) -> Iterable[tuple[Key, list[ChatMessage]]]:
    """The messages after `after` (all when None) and before `before`, oldest
    first, while they fit `budget` tokens (the first always)."""
    rows = _rows(conversation).order_by("created_at", "pk")
    rows = rows.filter(created_at__lte=before[0]).exclude(created_at=before[0], pk__gte=before[1])
    if after is not None:
        rows = rows.filter(created_at__gte=after[0]).exclude(created_at=after[0], pk__lte=after[1])
    used = 0
    batch = list(rows[:PENDING_ROWS])
    for row, unit in zip(batch, _Units(conversation).of(batch, images=False), strict=True):
        used += messages_tokens(unit)
        if used > budget and used != messages_tokens(unit):
            return
        yield (row[3], row[4]), unit


@dataclass
class History:
    """What the answer sends upstream, and the summary work it needs first.

    `before` + [the summary] + `after` is what is sent: `after` are the
    newest turns that fit. `pending`: the older turns that no longer fit and
    that the stored summary does not cover yet (oldest first); when there
    are any, a summary call folds them into the summary (`through`: the
    newest of them) before the answer starts."""

    before: list[ChatMessage]
    after: list[ChatMessage]
    summary: str = ""
    pending: list[ChatMessage] = field(default_factory=list)
    through: Any = None

    @property
    def messages(self) -> list[ChatMessage]:
        return [*self.before, *([summary_message(self.summary)] if self.summary else []), *self.after]

    def with_summary(self, summary: str) -> list[ChatMessage]:
        return [*self.before, summary_message(summary), *self.after]


def head_of(conversation: Conversation) -> list[ChatMessage]:
    """What comes before the turns: the staff's system prompt (always
    first), then, for a chat in a project, the project's instructions and
    files (projects.context), read now: a change shows at the next answer."""
    return [*_staff_head(conversation), *_project_head(conversation)]


def _staff_head(conversation: Conversation) -> list[ChatMessage]:
    return [{"role": "system", "content": conversation.prompt_text}] if conversation.prompt_text else []


def _project_head(conversation: Conversation) -> list[ChatMessage]:
    """A project's part: its own room (CHAT_PROJECT_CONTEXT_TOKENS, with the
    instructions' length limit), on top of CHAT_CONTEXT_TOKENS, so that a
    project's files never crowd out the chat's own turns."""
    if conversation.project_id is None:
        return []

    project = Project.objects.filter(pk=conversation.project_id).first()
    return projects.context(project) if project is not None else []


def plan_history(conversation: Conversation, *, upto: Message, budget: int | None = None) -> History:
    """The history for the answer that follows `upto` (the question, or the
    truncated answer being continued): it and every earlier message of this
    conversation on the active path that has text; replaced versions and the
    answer being written are left out. Read newest first until the budget
    is spent; when older turns overflow (and CHAT_SUMMARY_TOKENS > 0), room
    is kept for the conversation's summary, and the overflowing turns it
    does not cover yet are read (oldest first) for the summary call."""
    budget = settings.CHAT_CONTEXT_TOKENS if budget is None else budget
    staff = _staff_head(conversation)
    head = [*staff, *_project_head(conversation)]
    room = budget - messages_tokens(staff)  # a project's part has a room of its own
    reserve = summary_reserve(budget)
    kept: list[tuple[Key, list[ChatMessage], int]] = []
    used = 0
    overflow = False
    for key, unit in _newest_first(conversation, upto):
        cost = messages_tokens(unit)
        if kept and used + cost > room:  # the newest turn is always kept
            overflow = True
            break
        used += cost
        kept.append((key, unit, cost))
    if overflow and reserve:
        while len(kept) > 1 and used > room - reserve:
            used -= kept.pop()[2]
    kept.reverse()
    # An answer without the question that prompted it only confuses the model.
    while len(kept) > 1 and kept[0][1][0]["role"] == "assistant":
        kept.pop(0)
        overflow = True
    history = History(before=head, after=[m for _key, unit, _cost in kept for m in unit])
    if not (overflow and reserve):
        return history
    history.summary = conversation.summary
    covered = _through_key(conversation)
    room_for_pending = budget - reserve - message_tokens(conversation.summary)
    pending = list(_between(conversation, covered, kept[0][0], room_for_pending))
    if pending:
        history.pending = [m for _key, unit in pending for m in unit]
        history.through = pending[-1][0][1]
    return history


def _through_key(conversation: Conversation) -> Key | None:
    if conversation.summary_through_id is None or not conversation.summary:
        return None
    found = Message.objects.filter(pk=conversation.summary_through_id).values_list("created_at", "pk").first()
    return (found[0], found[1]) if found else None


def transcript(messages: Sequence[ChatMessage]) -> str:
    """Turns as plain text for a summary call."""
    lines = []
    for message in messages:
        role = message["role"]
        own, files = attachments.named_files(message.get("content"))
        text = own[:TRANSCRIPT_CHARS] + (f"\n(Files sent with it: {', '.join(files)})" if files else "")
        if role == "tool":
            lines.append(f"Tool result: {text}")
        elif message.get("tool_calls"):
            calls = ", ".join(
                f"{c['function']['name']}({c['function']['arguments']})" for c in message["tool_calls"]
            )
            lines.append(f"Assistant called tools: {calls}")
        elif text:
            lines.append(f"{'User' if role == 'user' else 'Assistant'}: {text}")
    return "\n\n".join(lines)
