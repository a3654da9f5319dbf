"""Accepting a turn: every rule an answer must pass, for every interface
(socket, terminal client, API) alike: ownership, idempotency on the
client's id, the per-user rate limit, one streaming answer per
conversation, and the budget.

Each `accept_*` is one call on the database thread and one transaction: it
stores the question and an empty `streaming` answer, reserves the budget and
reads the history to send (newest first, up to the context budget), so that
an answer costs one round trip from the event loop before it streams."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import IntegrityError, connection, transaction
from django.db.models.functions import Now
from django.utils import timezone

from accounts import sessions
from accounts.limits import take_send, take_sends

from .. import attachments, inputs, llm, projects, prompts, quotas, refusals
from ..attachments import files_for_send
from ..database import insert_each
from ..history import History, head_of, messages_tokens, plan_history
from ..models import ChatModel, Conversation, Message, SystemPrompt
from ..selectors import conversation_for_user
from .identity import WORKER_ID
from .ledger import accounting_of
from .titles import title_from

log = logging.getLogger(__name__)

CONTINUE_INSTRUCTION = "Continue exactly where your last answer stopped, without repeating anything."


@dataclass
class Accepted:
    """A turn ready to be answered: the question, the empty answer and the
    messages to send upstream."""

    conversation: Conversation
    question: Message
    answer: Message
    conversation_created: bool = False
    first_turn: bool = False  # the conversation's first question (it gets a title after its answer)
    question_created: bool = True  # False when an answer is regenerated or continued
    replaces_question: Message | None = None  # an edit: the question it replaced
    replaces_answer: Message | None = None  # a regenerate or edit: the answer it replaced
    continues: Message | None = None  # a continue: the truncated answer
    reservation: quotas.Reservation | None = None  # budget held until the answer settles
    messages: list[llm.ChatMessage] = field(default_factory=list)  # what is sent upstream
    history: History | None = None  # its plan: a long chat's summary work to do first


def find_sent(*, user: User, client_id: uuid.UUID) -> Message | None:
    """The user message already stored for this `client_id`, if any."""
    if not _client_id_seen(client_id):
        return None
    sent = Message.objects.filter(client_id=client_id).select_related("conversation").first()
    return sent if sent is not None and sent.conversation.owner_id == user.pk else None


def _refuse_unstorable(content: str) -> None:
    """Every interface refuses such text as it parses; this rule makes sure
    none reaches a batch (a lone surrogate or a NUL failed every send of it)."""
    problem = inputs.text_problem(content)
    if problem:
        raise refusals.invalid(f"The message {problem}.")


def _refuse_resent(user: User, client_id: uuid.UUID) -> None:
    sent = find_sent(user=user, client_id=client_id)
    if sent is not None:
        raise refusals.resent(sent)


def _client_id_seen(client_id: uuid.UUID) -> bool:
    """Asked before every turn, almost always answered no: one indexed
    lookup in plain SQL (the ORM spent 0.5 ms building this query, 20 times
    what running it costs)."""
    field = Message._meta.get_field("client_id")
    quote = connection.ops.quote_name
    sql = f"SELECT 1 FROM {quote(Message._meta.db_table)} WHERE {quote(str(field.column))} = %s LIMIT 1"
    with connection.cursor() as cursor:
        cursor.execute(sql, [field.get_db_prep_value(client_id, connection)])
        return cursor.fetchone() is not None


def _prompt_for_new_conversation(prompt_id: uuid.UUID | None) -> SystemPrompt | None:
    if prompt_id is not None:
        prompt = SystemPrompt.objects.filter(pk=prompt_id).first()
        if prompt is None:
            raise refusals.not_found("system prompt")
        return prompt
    return SystemPrompt.objects.filter(is_default=True).first()


def new_conversation(
    user: User,
    prompt: SystemPrompt | None,
    *,
    model: str | None = None,
    title: str = "",
    project: Any = None,
) -> Conversation:
    """A conversation of `user` with `prompt` (the version it starts with is
    recorded) and `model` (already checked with `ChatModel.is_pickable`), in
    `project` (the user's own) if given."""
    version = prompts.version_for_new_conversation(prompt) if prompt else None
    conversation = _conversation_row(user, prompt, version, model=model, title=title)
    conversation.project = project
    conversation.save(force_insert=True)
    return conversation


def _conversation_row(
    user: User, prompt: SystemPrompt | None, version: Any, *, model: str | None = None, title: str = ""
) -> Conversation:
    """A new conversation, unsaved."""
    return Conversation(
        owner=user,
        title=title,
        prompt=prompt,
        prompt_version=version,
        prompt_text=version.text if version else "",
        model=model or "",
    )


def _question_row(conversation: Conversation, content: str, client_id: uuid.UUID, **fields: Any) -> Message:
    """A new question, unsaved."""
    return Message(
        conversation=conversation, role=Message.Role.USER, content=content, client_id=client_id, **fields
    )


def _store_question(question: Message, files: list[Any]) -> None:
    """Insert the question with what it holds of its files."""
    if not question.content.strip() and not files:
        raise refusals.invalid("The message is empty.")
    question.attachments = attachments.records(files) or None
    question.save(force_insert=True)
    attachments.attach(question, files)


def _title_text(content: str, files: list[Any]) -> str:
    """What a new chat's provisional title is made of: its question, else its first file's name."""
    return content if content.strip() or not files else files[0].filename


def _own_conversation(user: User, conversation_id: Any) -> Conversation:
    return conversation_for_user(user=user, conversation_id=conversation_id, with_prompt=True)


def _last_active(conversation: Conversation, role: str) -> Message | None:
    return (
        Message.objects.filter(conversation=conversation, role=role, is_active=True)
        .order_by("-created_at")
        .first()
    )


def _new_answer(conversation: Conversation, **fields: Any) -> Message:
    """The answer, not yet stored: `_atomic_turn` inserts it once its
    history and budget are known, with what a dead worker's answer needs
    to be settled."""
    return Message(
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        status=Message.Status.STREAMING,
        model=conversation.chosen_model,
        worker=WORKER_ID,
        **fields,
    )


def _first_heartbeat(answer_ids: list[Any]) -> None:
    """A new answer's heartbeat (`updated_at`) in the database's clock, like
    every later one: stamped with this host's, a host whose clock is behind
    would have its new answers look dead to the other workers' caretakers."""
    Message.objects.filter(pk__in=answer_ids).update(updated_at=Now())


def _history(accepted: Accepted) -> History:
    if accepted.conversation_created:  # nothing to read: the prompt and the question
        question = accepted.question
        held = question.attachments
        # An image reached here only for a model that can see (files_for_send).
        content = attachments.user_content(question.content, held, attachments.load([held]), sees=True)
        after: list[llm.ChatMessage] = [{"role": "user", "content": content}]
        attachments.fill_images(after)
        return History(before=head_of(accepted.conversation), after=after)
    if accepted.continues is None:
        history = plan_history(accepted.conversation, upto=accepted.question)
    else:
        # The truncated answer is the last turn; ask the model to go on.
        history = plan_history(accepted.conversation, upto=accepted.continues)
        history.after.append({"role": "user", "content": CONTINUE_INSTRUCTION})
    attachments.fill_images(history.after)  # the pictures of the turns it keeps
    return history


def _most_tokens(accepted: Accepted) -> int:
    """What the answer may cost at most, reserved before it starts: the
    history it sends and its longest reply. Settling gives back what it did
    not use."""
    prompt = accepted.conversation.prompt
    longest = (prompt.max_tokens if prompt and prompt.max_tokens else None) or settings.OPENAI_MAX_TOKENS
    return messages_tokens(accepted.messages) + longest


def _atomic_turn(user: User, build: Callable[[], Accepted]) -> Accepted:
    """`build` in one transaction with the history, the budget and, last,
    the rate limit: everything it stores and reserves, or nothing."""
    try:
        with transaction.atomic():
            accepted = build()
            accepted.history = _history(accepted)
            accepted.messages = accepted.history.messages
            accepted.reservation = quotas.reserve_answer(
                user, estimated_tokens=_most_tokens(accepted), model=accepted.answer.model
            )
            accepted.answer.accounting = accounting_of(
                messages_tokens(accepted.messages), accepted.reservation
            )
            # Inserted last: the partial unique index refuses a second
            # streaming answer here (Busy), and everything rolls back with it.
            accepted.answer.save(force_insert=True)
            _first_heartbeat([accepted.answer.pk])
            if not accepted.conversation_created:  # a new one has just been stamped
                Conversation.objects.filter(pk=accepted.conversation.pk).update(updated_at=timezone.now())
            retry_after = take_send(user)
            if retry_after is not None:
                raise refusals.rate_limited(retry_after)
    except IntegrityError:
        # The partial unique index on streaming answers, or the same client_id
        # racing in on a second socket: either way, nothing was stored.
        raise refusals.busy() from None
    except quotas.QuotaExceeded as exc:
        raise refusals.over_quota(exc.message, exc.retry_after) from None
    return accepted


@dataclass
class Send:
    """One `message.send`. `sign_in`: a socket's (session key, user id), to
    be verified again in the same call (accounts/sessions.py), or None."""

    user: User
    conversation_id: uuid.UUID | None
    content: str
    client_id: uuid.UUID
    prompt_id: uuid.UUID | None = None
    model: str | None = None
    sign_in: tuple[str | None, Any] | None = None
    attachments: list[uuid.UUID] = field(default_factory=list)  # the user's file ids
    project_id: uuid.UUID | None = None  # a new conversation's project (one of the user's)


def accept_message(
    *,
    user: User,
    conversation_id: uuid.UUID | None,
    content: str,
    client_id: uuid.UUID,
    prompt_id: uuid.UUID | None = None,
    model: str | None = None,
    attachments: list[uuid.UUID] | None = None,
    project_id: uuid.UUID | None = None,
) -> Accepted:
    """Store the question and an empty `streaming` answer, in one transaction:
    a batch of one (`accept_messages`). A new conversation gets `prompt_id`'s
    system prompt (else the default one) and `model` (one of the enabled
    ChatModels; else the prompt's). `attachments`: the user's files that go
    with the question (`attachments.files_for_send` refuses the rest).

    Refuses (`refusals.Refusal`): `resent` for a `client_id` already stored,
    `not_found` for a conversation that is not the user's, `busy` when an
    answer already streams there (the question is then not stored either),
    `rate_limited`, `quota_exceeded`; `invalid_request` for a model users may
    not pick or text that cannot be stored.
    """
    send = Send(
        user,
        conversation_id,
        content,
        client_id,
        prompt_id,
        model,
        attachments=attachments or [],
        project_id=project_id,
    )
    (outcome,) = accept_messages([send])
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _accept_one(send: Send) -> Accepted:
    """A send that goes on its own (an existing conversation, a limited user,
    a model to check), in a transaction of its own."""
    _refuse_unstorable(send.content)
    _refuse_resent(send.user, send.client_id)  # also the same frame twice in one batch
    model, conversation_id, content = send.model, send.conversation_id, send.content
    if model and conversation_id is None and not ChatModel.is_pickable(model):
        raise refusals.invalid(f"The model “{model[:100]}” is not available.")

    def build() -> Accepted:
        # Files are refused before anything is stored.
        if conversation_id is None:
            # In a project: its prompt and model unless the send names its own.
            project = projects.own(send.user, send.project_id) if send.project_id else None
            if project is not None and send.prompt_id is None and project.prompt_id is not None:
                prompt = project.prompt
            else:
                prompt = _prompt_for_new_conversation(send.prompt_id)
            chosen = model or ""
            if not chosen and project is not None and project.model and ChatModel.is_pickable(project.model):
                chosen = project.model
            answers = llm.resolve_model(chosen, prompt.model if prompt else "")
            files = files_for_send(send.user, send.attachments, answers)
            conversation = new_conversation(
                send.user,
                prompt,
                model=chosen,
                title=title_from(_title_text(content, files)),
                project=project,
            )
        else:
            conversation = _own_conversation(send.user, conversation_id)
            files = files_for_send(send.user, send.attachments, conversation.chosen_model)
        # A conversation made empty (the HTTP API) gets its title from its first
        # question. (Every other one has a title: no query on a normal turn.)
        first_turn = conversation_id is None or (
            not conversation.title and not Message.objects.filter(conversation=conversation).exists()
        )
        if first_turn and not conversation.title:
            conversation.title = title_from(_title_text(content, files))
            Conversation.objects.filter(pk=conversation.pk).update(title=conversation.title)
        question = _question_row(conversation, content, send.client_id)
        _store_question(question, files)
        return Accepted(
            conversation,
            question,
            _new_answer(conversation),
            conversation_created=conversation_id is None,
            first_turn=first_turn,
        )

    return _atomic_turn(send.user, build)


def accept_messages(sends: list[Send]) -> list[Accepted | Exception]:
    """Many sends at once (a burst: a team opening new chats in the same
    second), each with exactly the rules and the outcome `accept_message`
    gives it alone: an `Accepted`, or the exception it would raise.

    New conversations of users without a quota are stored together: one
    query for the resent ones, one for the users' limits, two for each
    system prompt (and its version), one INSERT of the conversations and one
    of their questions and answers, the rate limit in one cache round trip,
    however many there are (alone, each costs eight round trips and their
    Python). Every other send (an existing conversation, a limited user, a
    model to check) is accepted on its own, in the same call."""
    results: list[Accepted | Exception | None] = [None] * len(sends)
    checked = [index for index, send in enumerate(sends) if send.sign_in is not None]
    if checked:  # a socket's sign-in may have ended (a logout, a deactivation)
        good = sessions.still_signed_in([sends[index].sign_in for index in checked])  # type: ignore[misc]
        for index, signed_in in zip(checked, good, strict=True):
            if not signed_in:
                results[index] = refusals.signed_out()
    sent = _sent_by_client_id([send.client_id for send in sends])
    limits = quotas.limits_for_many([send.user for send in sends])
    candidates: list[int] = []
    seen: set[uuid.UUID] = set()
    for index, send in enumerate(sends):
        earlier = sent.get(send.client_id)
        if results[index] is not None or inputs.text_problem(send.content):
            continue  # refused, or goes alone to be refused there, before anything is stored
        if earlier is not None and earlier.conversation.owner_id == send.user.pk:
            results[index] = refusals.resent(earlier)
        elif (
            earlier is None
            and send.client_id not in seen
            and send.conversation_id is None
            and not send.model
            and not send.attachments
            and send.project_id is None
            and limits[send.user.pk].unlimited
        ):
            candidates.append(index)
        seen.add(send.client_id)
    # A user's sends count against their rate limit in the order they came:
    # one with a send that goes alone has all of them go alone.
    candidate = set(candidates)
    alone = {
        send.user.pk for index, send in enumerate(sends) if results[index] is None and index not in candidate
    }
    together = [index for index in candidates if sends[index].user.pk not in alone]
    if together:
        try:
            for index, outcome in zip(
                together, _accept_new_together([sends[i] for i in together]), strict=True
            ):
                results[index] = outcome
        except Exception as exc:
            # Not expected (the interfaces refuse text that cannot be
            # stored): nothing of the batch was stored; each send goes alone
            # and hears its own outcome, so that one person's send never
            # fails another's.
            log.warning("a batch of %d sends failed together (%r); each goes alone", len(together), exc)
    for index, send in enumerate(sends):
        if results[index] is None:
            try:
                results[index] = _accept_one(send)
            except Exception as exc:  # a refusal, or this send's own fault: its caller hears it
                results[index] = exc
    return results  # type: ignore[return-value]


def _sent_by_client_id(client_ids: list[uuid.UUID]) -> dict[uuid.UUID, Message]:
    if len(client_ids) == 1 and not _client_id_seen(client_ids[0]):
        return {}
    found = Message.objects.filter(client_id__in=client_ids).select_related("conversation")
    return {message.client_id: message for message in found if message.client_id is not None}


def _accept_new_together(sends: list[Send]) -> list[Accepted | Exception]:
    """New conversations of unlimited users, in one transaction: the
    rate limit is taken last, as alone, and a send it refuses is taken out
    again before anything commits."""
    outcomes: list[Accepted | Exception] = []
    prompts_by_id: dict[uuid.UUID | None, Any] = {}
    accepted: list[tuple[int, Accepted]] = []  # (its place in outcomes, the turn)
    with transaction.atomic():
        for send in sends:
            if send.prompt_id not in prompts_by_id:
                try:
                    prompt = _prompt_for_new_conversation(send.prompt_id)
                except refusals.Refusal as exc:
                    prompts_by_id[send.prompt_id] = exc
                else:
                    version = prompts.version_for_new_conversation(prompt) if prompt else None
                    prompts_by_id[send.prompt_id] = (prompt, version)
            found = prompts_by_id[send.prompt_id]
            if isinstance(found, refusals.Refusal):
                outcomes.append(found)
                continue
            prompt, version = found
            conversation = _conversation_row(send.user, prompt, version, title=title_from(send.content))
            question = _question_row(conversation, send.content, send.client_id)
            turn = Accepted(
                conversation, question, _new_answer(conversation), conversation_created=True, first_turn=True
            )
            turn.history = _history(turn)
            turn.messages = turn.history.messages
            turn.answer.accounting = accounting_of(messages_tokens(turn.messages), turn.reservation)
            accepted.append((len(outcomes), turn))
            outcomes.append(turn)
        if not accepted:
            return outcomes
        turns = [turn for _place, turn in accepted]
        insert_each(Conversation, [turn.conversation for turn in turns])
        # The questions first: each is older than its answer.
        insert_each(Message, [turn.question for turn in turns] + [turn.answer for turn in turns])
        _first_heartbeat([turn.answer.pk for turn in turns])
        refused = []
        waits = take_sends([turn.conversation.owner for turn in turns])
        for (place, turn), retry_after in zip(accepted, waits, strict=True):
            if retry_after is not None:
                refused.append(turn.conversation.pk)
                outcomes[place] = refusals.rate_limited(retry_after)
        if refused:
            Conversation.objects.filter(pk__in=refused).delete()
    return outcomes


def accept_regenerate(*, user: User, conversation_id: uuid.UUID) -> Accepted:
    """A new version of the last answer (also "retry" of a failed one); the
    old one stays as a replaced version."""

    def build() -> Accepted:
        conversation = _own_conversation(user, conversation_id)
        old = _last_active(conversation, Message.Role.ASSISTANT)
        question = _last_active(conversation, Message.Role.USER)
        if old is None or question is None or old.created_at < question.created_at:
            raise refusals.invalid("There is no answer to regenerate.")
        if old.status == Message.Status.STREAMING:
            raise refusals.busy()
        Message.objects.filter(pk=old.pk).update(is_active=False)
        answer = _new_answer(conversation, version_group=old.version_group)
        return Accepted(conversation, question, answer, question_created=False, replaces_answer=old)

    return _atomic_turn(user, build)


def accept_edit(
    *,
    user: User,
    conversation_id: uuid.UUID,
    message_id: uuid.UUID,
    content: str,
    client_id: uuid.UUID,
    attachments: list[uuid.UUID] | None = None,
) -> Accepted:
    """Replace the last question with new text and answer it anew; the old
    question and its answers stay as replaced versions. `attachments`: the
    new question's files; None keeps the old one's."""
    file_ids = attachments
    _refuse_unstorable(content)
    _refuse_resent(user, client_id)

    def build() -> Accepted:
        conversation = _own_conversation(user, conversation_id)
        old_question = _last_active(conversation, Message.Role.USER)
        if old_question is None or old_question.pk != message_id:
            raise refusals.invalid("Only the last question can be edited.")
        old_answer = _last_active(conversation, Message.Role.ASSISTANT)
        if old_answer is not None and old_answer.created_at < old_question.created_at:
            old_answer = None
        if old_answer is not None and old_answer.status == Message.Status.STREAMING:
            raise refusals.busy()
        kept = [uuid.UUID(r["id"]) for r in old_question.attachments or ()] if file_ids is None else file_ids
        files = files_for_send(user, kept, conversation.chosen_model, missing_ok=file_ids is None)
        Message.objects.filter(
            conversation=conversation, is_active=True, created_at__gte=old_question.created_at
        ).update(is_active=False)
        question = _question_row(conversation, content, client_id, version_group=old_question.version_group)
        _store_question(question, files)
        answer = _new_answer(
            conversation, **({"version_group": old_answer.version_group} if old_answer else {})
        )
        return Accepted(
            conversation, question, answer, replaces_question=old_question, replaces_answer=old_answer
        )

    return _atomic_turn(user, build)


def accept_continue(*, user: User, conversation_id: uuid.UUID) -> Accepted:
    """Go on with a truncated last answer, as a new answer after it."""

    def build() -> Accepted:
        conversation = _own_conversation(user, conversation_id)
        truncated = _last_active(conversation, Message.Role.ASSISTANT)
        question = _last_active(conversation, Message.Role.USER)
        if truncated is None or truncated.status != Message.Status.TRUNCATED or question is None:
            raise refusals.invalid("The last answer was not cut short: there is nothing to continue.")
        answer = _new_answer(conversation)
        return Accepted(conversation, question, answer, question_created=False, continues=truncated)

    return _atomic_turn(user, build)


def check_owner(*, user: User, conversation_id: Any) -> None:
    """A `not_found` refusal unless the conversation is the user's (stop, join)."""
    conversation_for_user(user=user, conversation_id=conversation_id)
