"""Indexes for reading the token ledger at a million rows and more.

- `usage_report_idx`: every column the spend reports aggregate, keyed by
  `created_at`, so that a report over a date range is an index-only scan
  (PostgreSQL: INCLUDE columns; SQLite: a wide composite index, which SQLite
  also reads as covering).
- `usage_estimated_idx`: the few estimated rows, for the admin's filter.
- PostgreSQL 14+: statistics on the day and month of `created_at` in the
  site's time zone, the very expressions `TruncDate`/`TruncMonth` group by.
  Without them the planner guesses a million groups, sorts a million rows on
  disk and takes 2-3x longer; with them it hashes ~365 groups in parallel.
  They name TIME_ZONE: after changing it, recreate them (only the estimate,
  never a result, depends on it).

Written as SQL per database because Django's `Index(include=...)` exists only
on PostgreSQL and the model's Meta is shared with other code; the schema state
is unchanged, so `makemigrations` sees no difference.
"""

from django.conf import settings
from django.db import migrations

COLUMNS = "user_id, model, prompt_tokens, completion_tokens, cached_tokens, cost, estimated"


def create(apps, schema_editor):
    table = "conversations_tokenusage"
    if schema_editor.connection.vendor == "postgresql":
        report = f"CREATE INDEX IF NOT EXISTS usage_report_idx ON {table} (created_at) INCLUDE ({COLUMNS})"
    else:
        report = f"CREATE INDEX IF NOT EXISTS usage_report_idx ON {table} (created_at, {COLUMNS})"
    schema_editor.execute(report)
    schema_editor.execute(
        f"CREATE INDEX IF NOT EXISTS usage_estimated_idx ON {table} (created_at) WHERE estimated"
    )

    if schema_editor.connection.vendor == "postgresql" and schema_editor.connection.pg_version >= 140000:
        zone = settings.TIME_ZONE.replace("'", "''")
        created = f"created_at AT TIME ZONE '{zone}'"
        schema_editor.execute(
            f"CREATE STATISTICS IF NOT EXISTS usage_day_stats ON (({created})::date) FROM {table}"
        )
        month = f"DATE_TRUNC('month', {created})"
        schema_editor.execute(f"CREATE STATISTICS IF NOT EXISTS usage_month_stats ON ({month}) FROM {table}")


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("DROP STATISTICS IF EXISTS usage_day_stats")
        schema_editor.execute("DROP STATISTICS IF EXISTS usage_month_stats")
    schema_editor.execute("DROP INDEX IF EXISTS usage_report_idx")
    schema_editor.execute("DROP INDEX IF EXISTS usage_estimated_idx")


class Migration(migrations.Migration):
    dependencies = [("conversations", "0002_versions_pins_usage_kind")]

    operations = [migrations.RunPython(create, drop)]
