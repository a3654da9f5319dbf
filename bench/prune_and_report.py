"""Pruning and spend reports at a million rows.

Fills a database with 1,000,000 messages (in 50,000 conversations, 90% of
them older than 90 days, some pinned) and 1,000,000 ledger rows (200 users,
5 models, one year), then measures:

- `manage.py prune_history --older-than 90d`, run as its own process:
  messages deleted per second and the process's peak memory (max RSS, next
  to the RSS of the same process doing nothing);
- the spend report at 1,000,000 ledger rows: the selectors (per user, model,
  day, month over 30 days and over the year) and the whole admin report page
  and ledger change list (with its totals), rendered by the test client.

    .venv/bin/python bench/prune_and_report.py            # SQLite in a temp dir
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench .venv/bin/python bench/prune_and_report.py

Measured on this 2-core machine (other test suites running beside it):

- PostgreSQL 15: spend report over 365 days (1,000,000 rows) 340-440 ms per
  grouping, over 30 days 40-50 ms; the admin report page 380-480 ms, the
  ledger change list with its totals 130-340 ms. prune_history deleted
  890,000 messages (44,500 conversations) in 108 s, 8,250 messages/s, peak
  RSS 115 MiB against 102 MiB for a trivial command. Whole run: 4 min 50 s.
- SQLite: report over 365 days 1.8-3.3 s, over 30 days 40-270 ms; pruning
  5,300 messages/s, peak RSS 108 MiB against 94 MiB. Whole run: 8.5 min
  (loading 2,000,000 rows into SQLite takes 4 of them).

It refuses a database that already holds conversations or usage rows.
Rows are bulk-loaded (COPY on PostgreSQL, executemany on SQLite).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
os.environ.setdefault("DATABASE_URL", f"sqlite:///{tempfile.mkdtemp()}/bench.sqlite3")
os.environ.setdefault("ALLOWED_HOSTS", "testserver,localhost,127.0.0.1")

import django  # noqa: E402

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from django.db.models import Model  # noqa: E402
from django.test import Client  # noqa: E402
from django.utils import timezone  # noqa: E402

from conversations import reports  # noqa: E402
from conversations.models import Conversation, Message, TokenUsage  # noqa: E402

if TYPE_CHECKING:
    from django.contrib.auth.models import User
    from django.db.backends.utils import CursorWrapper

MESSAGES = int(os.environ.get("BENCH_MESSAGES", 1_000_000))
LEDGER_ROWS = int(os.environ.get("BENCH_LEDGER_ROWS", 1_000_000))
PER_CONVERSATION = 20
USERS = 200
MODELS = ["gpt-4o-mini", "gpt-4o", "llama3.2", "qwen2.5-7b", "mistral-small"]
CHUNK = 50_000
random.seed(7)


def _converter(field: Any) -> Callable[[Any], str | None] | None:
    """How one column's Python value goes to the driver: what Django's
    get_db_prep_save does, once per column instead of once per cell."""
    if connection.vendor == "postgresql":
        return None  # psycopg's COPY adapts UUID, datetime, Decimal and bool itself
    internal = (field.target_field if field.is_relation else field).get_internal_type()
    if internal == "UUIDField":
        return lambda value: value.hex if value is not None else None
    if internal == "DateTimeField":
        return lambda value: value.astimezone(UTC).replace(tzinfo=None).isoformat(" ")
    if internal == "DecimalField":
        return lambda value: str(value)
    return None


def bulk_load(model: type[Model], rows: Iterator[dict[str, Any]]) -> int:
    """Insert rows (dicts of attname -> value; other fields take their
    defaults) without the ORM's per-object cost."""
    fields = [
        field
        for field in model._meta.concrete_fields
        if field.get_internal_type() not in ("AutoField", "BigAutoField")  # the database numbers them
    ]
    names = [cast(str, field.column) for field in fields]  # a concrete field has its column
    table = model._meta.db_table
    defaults = [field.get_default() for field in fields]
    attnames = [field.attname for field in fields]
    converters = [_converter(field) for field in fields]
    count = 0

    def prepared(chunk: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        out = []
        for row in chunk:
            values = []
            for attname, default, convert in zip(attnames, defaults, converters, strict=True):
                value = row.get(attname, default)
                values.append(convert(value) if convert is not None and value is not None else value)
            out.append(tuple(values))
        return out

    chunk: list[dict[str, Any]] = []
    with connection.cursor() as cursor:
        for row in rows:
            chunk.append(row)
            if len(chunk) == CHUNK:
                count += _write(cursor, table, names, prepared(chunk))
                chunk = []
        if chunk:
            count += _write(cursor, table, names, prepared(chunk))
    return count


def _write(cursor: CursorWrapper, table: str, names: list[str], values: list[tuple[Any, ...]]) -> int:
    if connection.vendor == "postgresql":
        with cursor.cursor.copy(f"COPY {table} ({', '.join(names)}) FROM STDIN") as copy:
            for value in values:
                copy.write_row(value)
    else:
        placeholders = ", ".join(["%s"] * len(names))
        with transaction.atomic():
            cursor.executemany(f"INSERT INTO {table} ({', '.join(names)}) VALUES ({placeholders})", values)
    return len(values)


def seed() -> tuple[list[User], list[uuid.UUID]]:
    User = get_user_model()
    users = User.objects.bulk_create([User(username=f"bench-{i:03d}", password="!") for i in range(USERS)])
    now = timezone.now()
    conversations = MESSAGES // PER_CONVERSATION
    convs: list[dict[str, Any]] = []
    for i in range(conversations):
        old = i % 10 != 0  # 90% idle for more than 90 days
        age = timedelta(days=random.randint(91, 400)) if old else timedelta(days=random.randint(0, 30))
        convs.append(
            {
                "id": uuid.uuid4(),
                "owner_id": users[i % USERS].pk,
                "title": f"Bench conversation {i}",
                "pinned": old and i % 100 == 1,  # 1% of the old ones are pinned
                "created_at": now - age - timedelta(hours=1),
                "updated_at": now - age,
            }
        )
    bulk_load(Conversation, iter(convs))
    text = "lorem ipsum dolor sit amet " * 8

    def messages() -> Iterator[dict[str, Any]]:
        for conv in convs:
            for j in range(PER_CONVERSATION):
                pk = uuid.uuid4()
                at = conv["created_at"] + timedelta(seconds=j * 30)
                yield {
                    "id": pk,
                    "conversation_id": conv["id"],
                    "role": "user" if j % 2 == 0 else "assistant",
                    "content": text,
                    "status": "complete",
                    "version_group": pk,
                    "created_at": at,
                    "updated_at": at,
                }

    bulk_load(Message, messages())
    return users, [conv["id"] for conv in convs]


def seed_ledger(users: list[User], conversation_ids: list[uuid.UUID]) -> None:
    now = timezone.now()

    def rows() -> Iterator[dict[str, Any]]:
        for i in range(LEDGER_ROWS):
            prompt, completion = random.randint(50, 3000), random.randint(10, 800)
            yield {
                "user_id": users[i % USERS].pk,
                "conversation_id": conversation_ids[i % len(conversation_ids)] if i % 3 == 0 else None,
                "kind": "answer" if i % 5 else "title",
                "model": MODELS[i % len(MODELS)],
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "cached_tokens": prompt // 4 if i % 7 == 0 else 0,
                "cost": (Decimal(prompt * 150 + completion * 600) / Decimal(1_000_000)).quantize(
                    Decimal("0.000001")
                ),
                "estimated": i % 50 == 0,
                "created_at": now - timedelta(seconds=random.randint(0, 365 * 86400)),
            }

    bulk_load(TokenUsage, rows())


# `...`: the callers' lambdas take loop variables as default arguments; timed calls them with none.
def timed(label: str, action: Callable[..., object], repeat: int = 3) -> object:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = action()
        best = min(best, time.perf_counter() - start)
    print(f"  {label:<52} {best * 1000:8.0f} ms")
    return result


# Runs one management command and reports the high-water mark of its own
# resident memory (VmHWM is per address space: it starts afresh at exec, unlike
# ru_maxrss, which would include this parent process's memory).
_CHILD = """
import os, sys, time, django
sys.path.insert(0, os.getcwd())
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
django.setup()
from django.core.management import call_command
start = time.perf_counter()
call_command(*sys.argv[1:])
print(f"ELAPSED {time.perf_counter() - start}", file=sys.stderr)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
print(f"VmHWM {int(hwm) // 1024}", file=sys.stderr)
"""


def run_command(*args: str) -> tuple[float, int, str]:
    """Run a manage.py command as its own process: (seconds, peak RSS in MiB, output)."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    peak = int(done.stderr.rsplit("VmHWM", 1)[1].split()[0])
    elapsed = float(done.stderr.rsplit("ELAPSED", 1)[1].split()[0])  # the command, not Python's start-up
    return elapsed, peak, done.stdout.strip()


def main() -> None:
    call_command("migrate", verbosity=0)
    if Conversation.objects.exists() or TokenUsage.objects.exists():
        raise SystemExit("This database already holds chats or usage: give the benchmark an empty one.")
    db = connection.vendor
    print(f"Database: {db}; {MESSAGES:,} messages, {LEDGER_ROWS:,} ledger rows.")

    start = time.perf_counter()
    users, conversation_ids = seed()
    seed_ledger(users, conversation_ids)
    if db == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE")
    else:
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
    print(f"Loaded in {time.perf_counter() - start:.0f} s.\n")

    print(f"Spend report at {TokenUsage.objects.count():,} ledger rows (best of 3):")
    today = timezone.localdate()
    month, year = today - timedelta(days=29), today - timedelta(days=364)
    for label, since in (("30 days", month), ("365 days", year)):
        rows = reports.ledger(since=since, until=today)
        for by in reports.GROUPINGS:
            timed(f"spend_by {by:<5} over {label}", lambda rows=rows, by=by: reports.spend_by(rows, by))
        timed(f"totals over {label}", lambda rows=rows: reports.spend_totals(rows))
    admin = get_user_model().objects.create_superuser("bench-admin", password="x")
    client = Client()
    client.force_login(admin)

    def page(url: str, query: dict[str, str]) -> None:
        response = client.get(url, query)
        assert response.status_code == 200, response.status_code

    report = "/admin/conversations/tokenusage/report/"
    for by in ("user", "day", "month"):
        query = {"by": by, "since": str(year), "until": str(today), "metric": "cost"}
        timed(f"admin report page, by {by}, 365 days", lambda q=query: page(report, q))
    timed(
        "admin report CSV, by day, 365 days",
        lambda: page(
            report, {"by": "day", "since": str(year), "until": str(today), "metric": "cost", "format": "csv"}
        ),
    )
    ledger_url = "/admin/conversations/tokenusage/"
    timed("admin ledger change list + totals, unfiltered", lambda: page(ledger_url, {}))
    timed("admin ledger change list + totals, one user", lambda: page(ledger_url, {"username": "bench-007"}))
    timed(
        "admin ledger, one model, estimated only",
        lambda: page(ledger_url, {"model_name": "gpt-4o", "estimated__exact": "1"}),
    )

    print("\nprune_history --older-than 90d (its own process):")
    _, idle_rss, _ = run_command("spend_report", "--days", "1", "--user", "nobody-at-all")
    before = Message.objects.count()
    elapsed, rss, output = run_command("prune_history", "--older-than", "90d")
    deleted = before - Message.objects.count()
    print(f"  {output}")
    print(f"  deleted {deleted:,} messages in {elapsed:.1f} s: {deleted / elapsed:,.0f} messages/s")
    print(f"  peak memory (VmHWM) {rss} MiB; a one-row spend_report process: {idle_rss} MiB")
    print(f"  ledger rows after pruning: {TokenUsage.objects.count():,}")
    elapsed, rss, output = run_command(
        "prune_history", "--older-than", "10d", "--what", "messages", "--dry-run"
    )
    print(f"  dry run of the rest ({elapsed:.1f} s, {rss} MiB): {output}")


if __name__ == "__main__":
    main()
