"""What a chat is made of: conversations, their messages, the system prompts
staff write, and the ledger of what each model call cost."""

from __future__ import annotations

import time
import uuid
from decimal import Decimal
from typing import NotRequired, TypedDict

from django.conf import settings
from django.db import models
from django.db.models import Q


class SystemPrompt(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=100, unique=True)
    text = models.TextField()
    is_default = models.BooleanField(default=False)
    model = models.CharField(
        max_length=100, blank=True, help_text="Model for this prompt; blank = OPENAI_MODEL."
    )
    temperature = models.FloatField(null=True, blank=True, help_text="Blank = OPENAI_TEMPERATURE.")
    max_tokens = models.PositiveIntegerField(
        null=True, blank=True, help_text="Longest answer in tokens; blank = OPENAI_MAX_TOKENS."
    )
    tools = models.CharField(
        max_length=300,
        blank=True,
        help_text="Tools offered to the model with this prompt: comma-separated names "
        "(current_time, calculator, search_conversations), or “none”; blank = CHAT_TOOLS.",
    )
    fallback_models = models.CharField(
        max_length=300,
        blank=True,
        help_text="Models tried in order when this prompt's model fails before its first token; "
        "blank = OPENAI_FALLBACK_MODELS.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["is_default"], condition=Q(is_default=True), name="one_default_prompt"
            )
        ]

    def __str__(self) -> str:
        return self.name


class SystemPromptVersion(models.Model):
    """The text and settings of a prompt as saved once: never edited, so that
    an answer can always be traced to the prompt that produced it."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    prompt = models.ForeignKey(SystemPrompt, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    text = models.TextField()
    model = models.CharField(max_length=100, blank=True)
    temperature = models.FloatField(null=True, blank=True)
    max_tokens = models.PositiveIntegerField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["prompt", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["prompt", "number"], name="unique_prompt_version_number")
        ]

    def __str__(self) -> str:
        return f"{self.prompt} v{self.number}"


class Project(models.Model):
    """A user's folder of chats that share instructions and files: every
    chat in it is told them after the staff's system prompt (which always
    comes first: a project adds to it, never replaces it)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="projects")
    name = models.CharField(max_length=100)
    instructions = models.TextField(blank=True)
    files = models.ManyToManyField("files.File", through="ProjectFile", related_name="+", blank=True)
    # A new chat's defaults here (blank / null: the site's).
    model = models.CharField(max_length=100, blank=True)
    prompt = models.ForeignKey(
        SystemPrompt, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name", "created_at"]
        indexes = [models.Index(fields=["owner", "name"], name="project_owner_idx")]

    def __str__(self) -> str:
        return self.name


class ProjectFile(models.Model):
    """A file of a project, in its order: the file is held (a prune keeps it)."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="project_files")
    file = models.ForeignKey("files.File", on_delete=models.CASCADE, related_name="project_files")
    position = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["position", "pk"]
        constraints = [models.UniqueConstraint(fields=["project", "file"], name="project_file_once")]

    def __str__(self) -> str:
        return f"{self.project_id}: {self.file_id}"


class Conversation(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations"
    )
    title = models.CharField(max_length=200, blank=True)
    prompt = models.ForeignKey(
        SystemPrompt, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # The prompt text as it was when the conversation started: editing the
    # prompt later must not change what this conversation was told.
    prompt_text = models.TextField(blank=True)
    prompt_version = models.ForeignKey(
        SystemPromptVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # The model chosen for this conversation (one of the enabled ChatModels);
    # blank = the prompt's model, else OPENAI_MODEL.
    model = models.CharField(max_length=100, blank=True)
    # Memory of a long chat: a summary of its older turns, up to and
    # including `summary_through`, sent upstream in their place once they no
    # longer fit CHAT_CONTEXT_TOKENS; extended as more turns overflow.
    summary = models.TextField(blank=True)
    summary_through = models.ForeignKey(
        "Message", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Pinned conversations are kept by `prune_history`.
    pinned = models.BooleanField(default=False)
    # The project it is in (its instructions and files go upstream), if any.
    project = models.ForeignKey(
        Project, null=True, blank=True, on_delete=models.SET_NULL, related_name="conversations"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    # Not a column: set on the rows of a sidebar search by `selectors.sidebar_page`.
    snippet: str

    class Meta:
        ordering = ["-updated_at"]
        indexes = [models.Index(fields=["owner", "-updated_at"], name="conv_sidebar_idx")]
        permissions = [("review_conversation", "Can read users' conversations in the admin")]

    def __str__(self) -> str:
        return self.title or f"Conversation {self.id}"

    @property
    def display_title(self) -> str:
        return self.title or "New chat"

    @property
    def chosen_model(self) -> str:
        """The model that answers here: the one picked for the chat, else its
        prompt's, else OPENAI_MODEL; the demo model in demo mode."""
        from . import llm

        prompt = self.prompt
        return llm.resolve_model(self.model, prompt.model if prompt else "")


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"

    class Status(models.TextChoices):
        STREAMING = "streaming"
        COMPLETE = "complete"
        TRUNCATED = "truncated"
        STOPPED = "stopped"
        FAILED = "failed"
        INTERRUPTED = "interrupted"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.COMPLETE)
    finish_reason = models.CharField(max_length=32, blank=True)
    # For failed answers: why, in words for the person (shown again after a reload).
    error = models.TextField(blank=True)
    model = models.CharField(max_length=100, blank=True)
    # For user messages: the browser's id, so that a resent frame is a no-op.
    client_id = models.UUIDField(null=True, blank=True)
    # For streaming answers: which process runs it, so that a restarted
    # process can tell its own dead answers from another worker's live ones.
    worker = models.CharField(max_length=100, blank=True)
    # For streaming answers: what settling needs if the worker dies (the
    # prompt's estimated tokens and the quota holds), so that any worker can
    # account a dead answer and release its reservation. Cleared on the end.
    accounting = models.JSONField(null=True, blank=True, editable=False)
    # For answers: the model's tool rounds before its final text, each
    # {"calls": [{"id", "name", "arguments"}], "results": [{"call_id", "name",
    # "summary", "ok", "content"}]}: sent upstream again on later turns as the
    # `assistant` tool-call message and its `tool` messages, shown as chips.
    tool_rounds = models.JSONField(null=True, blank=True, editable=False)
    # For questions: the files sent with it, as they were then (the contract's
    # `attachments`: [{"id", "filename", "bytes", "content_type", "tokens",
    # "read_tokens"}], `read_tokens` what the model reads of it); the files
    # themselves through `Attachment`. None: no files.
    attachments = models.JSONField(null=True, blank=True, editable=False)
    # Versions: a regenerated answer or an edited question is a new message in
    # the same `version_group`; the replaced one stays, inactive (shown as 1/2).
    version_group = models.UUIDField(default=uuid.uuid4, editable=False)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    # Not columns: set on the rows of a page by `selectors.messages_for_page`.
    html: str
    files: list[dict[str, object]]  # a question's attachments, each with its `note` (what was cut)
    usage: AnswerUsage | None
    version_index: int
    version_count: int

    class Meta:
        ordering = ["created_at"]
        indexes = [
            models.Index(fields=["created_at"], name="msg_created_idx"),
            models.Index(fields=["conversation", "created_at"], name="msg_conv_created_idx"),
            models.Index(
                fields=["updated_at"],
                condition=Q(status="streaming"),
                name="msg_streaming_idx",
            ),
            # A resent frame is looked up by its client_id before every turn.
            models.Index(
                fields=["client_id"], condition=Q(client_id__isnull=False), name="msg_client_id_idx"
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["conversation", "client_id"], name="unique_client_id_per_conversation"
            ),
            # At most one answer streams per conversation, enforced by the database.
            models.UniqueConstraint(
                fields=["conversation"],
                condition=Q(status="streaming"),
                name="one_streaming_answer_per_conversation",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:50]}"


class Attachment(models.Model):
    """A file sent with a question. The file stays while a message holds it;
    one no message holds is pruned (`prune_history`), and deleting its
    conversation deletes it (`attachments.delete_unattached`)."""

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="attached")
    file = models.ForeignKey("files.File", on_delete=models.CASCADE, related_name="attachments")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["message", "file"], name="unique_file_per_message")]

    def __str__(self) -> str:
        return f"{self.file_id} on {self.message_id}"


class Share(models.Model):
    """A conversation's shared link: a snapshot of its active messages when
    the owner shared it (or last updated it), opened at /s/<token>/ by whoever
    CHAT_SHARING lets in. Deleting the row revokes the link."""

    conversation = models.OneToOneField(Conversation, on_delete=models.CASCADE, related_name="share")
    token = models.CharField(max_length=64, unique=True, editable=False)
    title = models.CharField(max_length=200)
    # [{"id", "role", "content", "model", "status", "created_at", "attachments"}], in order.
    messages = models.JSONField(editable=False)
    show_owner = models.BooleanField(default=False, help_text="The page names the owner.")
    # What a reader's copy ("continue in your own chat") starts with, as shared.
    prompt_text = models.TextField(blank=True, editable=False)
    model = models.CharField(max_length=100, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]

    def __str__(self) -> str:
        return f"Link to {self.title}"


class ChatModel(models.Model):
    """A model users may pick for a new chat (staff keep the list in the
    admin). With no enabled model listed, every chat uses its prompt's model
    or OPENAI_MODEL and the page offers no choice."""

    name = models.CharField(max_length=100, unique=True, help_text="The model's name at the upstream API.")
    label = models.CharField(max_length=100, blank=True, help_text="What users see; blank = the name.")
    enabled = models.BooleanField(default=True)
    vision = models.BooleanField(
        default=False, help_text="The model can see images (people may send pictures to it)."
    )
    position = models.PositiveIntegerField(default=0, help_text="Order in the page's list (smallest first).")

    class Meta:
        ordering = ["position", "name"]

    def __str__(self) -> str:
        return self.display

    @property
    def display(self) -> str:
        return self.label or self.name

    @classmethod
    def choices(cls) -> list[ChatModel]:
        """The models users may pick, in the page's order."""
        return list(cls.objects.filter(enabled=True))

    @classmethod
    def is_pickable(cls, name: str) -> bool:
        """May a user pick this model for a new chat (page, terminal, API)?"""
        return cls.objects.filter(name=name, enabled=True).exists()

    @classmethod
    def can_see(cls, name: str) -> bool:
        """May images be sent to this model? Its row's `vision` flag, else
        OPENAI_VISION_MODELS; the offline demo model describes what it got."""
        from . import llm

        if name == llm.DEMO_MODEL:
            return True
        found = cls.objects.filter(name=name).values_list("vision", flat=True).first()
        return bool(found) if found is not None else name in settings.OPENAI_VISION_MODELS

    @classmethod
    def label_of(cls, name: str) -> str:
        found = cls.objects.filter(name=name).values_list("label", flat=True).first()
        return found or name


PRICE_TTL = 10.0  # seconds
_price_cache: dict[str, tuple[float, ModelPrice | None]] = {}


def forget_prices(**_kwargs: object) -> None:
    _price_cache.clear()


class ModelPrice(models.Model):
    model = models.CharField(max_length=100, unique=True)
    input_per_million = models.DecimalField(
        max_digits=12, decimal_places=6, help_text="Price of 1M prompt tokens."
    )
    output_per_million = models.DecimalField(
        max_digits=12, decimal_places=6, help_text="Price of 1M completion tokens."
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model"]

    def __str__(self) -> str:
        return self.model

    @classmethod
    def current(cls, model: str) -> ModelPrice | None:
        """The model's price, read at most every PRICE_TTL seconds per process
        (twice per answer otherwise); a save or delete here forgets it at once,
        other workers see it within PRICE_TTL."""
        now = time.monotonic()
        cached = _price_cache.get(model)
        if cached is not None and cached[0] > now:
            return cached[1]
        price = cls.objects.filter(model=model).first()
        _price_cache[model] = (now + PRICE_TTL, price)
        return price

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        total = (
            self.input_per_million * prompt_tokens + self.output_per_million * completion_tokens
        ) / Decimal(1_000_000)
        return total.quantize(Decimal("0.000001"))


class TokenUsage(models.Model):
    """One row per model call. A ledger: rows outlive the messages they paid for."""

    class Kind(models.TextChoices):
        ANSWER = "answer"
        TITLE = "title"
        SUMMARY = "summary"
        API = "api"  # a call of the stateless HTTP endpoint (/api/v1/chat/completions)

    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    conversation = models.ForeignKey(
        Conversation, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    message = models.ForeignKey(Message, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.ANSWER)
    model = models.CharField(max_length=100)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=14, decimal_places=6, default=Decimal("0"))
    # True when the upstream sent no usage (a stopped or cut stream) and the
    # counts are our estimate.
    estimated = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["user", "created_at"], name="usage_user_created_idx"),
            models.Index(fields=["model", "created_at"], name="usage_model_created_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.model}: {self.prompt_tokens}+{self.completion_tokens}"


class AnswerUsage(TypedDict):
    """An answer's ledger rows (several with tool rounds), summed (`selectors.answers_usage`)."""

    message_id: uuid.UUID
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal
    estimated_calls: int


class ToolCallRecord(TypedDict):
    """One tool call of a round, as the model made it (arguments untrusted JSON text)."""

    id: str
    name: str
    arguments: str


class ToolResultRecord(TypedDict):
    call_id: str
    name: str
    summary: str  # for the chip: "current_time (Asia/Tokyo)"
    ok: bool
    arguments: NotRequired[str]
    content: str  # what went back to the model


class ToolRound(TypedDict):
    """One tool round of an answer (`Message.tool_rounds` holds a list of them)."""

    text: str  # what the model said before its calls
    calls: list[ToolCallRecord]
    results: list[ToolResultRecord]


class UsagePayload(TypedDict):
    """An answer's usage as the contract's `generation.finished` carries it."""

    prompt_tokens: int
    completion_tokens: int
    cost: str


class McpServer(models.Model):
    """A Model Context Protocol server whose tools the model may use
    (conversations/tools/mcp.py), registered by staff here or in
    CHAT_MCP_SERVERS (written here at first use, `from_settings`)."""

    class Transport(models.TextChoices):
        HTTP = "http", "Streamable HTTP (url)"
        STDIO = "stdio", "stdio (a command this server runs)"

    name = models.CharField(
        max_length=30,
        unique=True,
        help_text="Lowercase letters, digits and _: its tools are offered as <name>__<tool>.",
    )
    transport = models.CharField(max_length=8, choices=Transport.choices, default=Transport.HTTP)
    url = models.URLField(max_length=500, blank=True, help_text="Streamable HTTP: the server's endpoint.")
    headers = models.JSONField(
        default=dict, blank=True, help_text='HTTP headers, e.g. {"Authorization": "Bearer …"}.'
    )
    command = models.CharField(max_length=500, blank=True, help_text="stdio: the program to run.")
    args = models.JSONField(default=list, blank=True, help_text="stdio: its arguments, a JSON list.")
    env = models.JSONField(default=dict, blank=True, help_text="stdio: more environment variables.")
    enabled = models.BooleanField(default=True)
    prompts = models.ManyToManyField(
        SystemPrompt, blank=True, related_name="+", help_text="Offered only with these prompts (none = any)."
    )
    groups = models.ManyToManyField(
        "auth.Group", blank=True, related_name="+", help_text="Offered only to members (none = everyone)."
    )
    tools = models.CharField(
        max_length=1000, blank=True, help_text="Its tools to offer, comma-separated; blank = all of them."
    )
    timeout = models.FloatField(default=10.0, help_text="Seconds a call (or connecting) may take.")
    from_settings = models.BooleanField(
        default=False, editable=False, help_text="Kept from CHAT_MCP_SERVERS."
    )
    # What it answered last (any worker): its tools as listed, or the error.
    listed_tools = models.JSONField(default=list, blank=True, editable=False)
    listed_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_error = models.TextField(blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "MCP server"

    def __str__(self) -> str:
        return self.name
