"""Where an answer's database work runs.

Channels' `database_sync_to_async` runs every ORM call of the process on ONE
thread. On SQLite that is right (writes take one lock anyway). On PostgreSQL
every statement is a network round trip after which the thread must win the
GIL back from a busy event loop: measured under a burst of 200 answers, a turn
took 24 ms on that thread and waited 2.3 s in its queue. There, turns,
finishes and checkpoints run on a small pool of threads of their own
(`DATABASE_THREADS`, each with its connection from psycopg's pool), so that
their round trips overlap."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import wraps
from typing import Any, ParamSpec, TypeVar, cast

from asgiref.sync import SyncToAsync
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, close_old_connections, connection, connections

T = TypeVar("T")
P = ParamSpec("P")

_executor: ThreadPoolExecutor | None = None


def _threads() -> int:
    configured = int(settings.DATABASE_THREADS)
    if configured:
        return configured
    return 4 if settings.DATABASES["default"]["ENGINE"].endswith("postgresql") else 1


def _fresh_connections(function: Callable[P, T]) -> Callable[P, T]:
    @wraps(function)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        close_old_connections()
        try:
            return function(*args, **kwargs)
        finally:
            close_old_connections()

    return run


def in_database(function: Callable[P, T]) -> Callable[P, Coroutine[Any, Any, T]]:
    """`function` made awaitable, run where the answer's database work runs."""
    global _executor
    threads = _threads()
    if threads <= 1:
        return cast("Callable[P, Coroutine[Any, Any, T]]", database_sync_to_async(function))
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="answer-db")
    return SyncToAsync(_fresh_connections(function), thread_sensitive=False, executor=_executor)


def update_each(model: Any, fields: Sequence[str], rows: Iterable[Sequence[Any]], **where: Any) -> None:
    """For each row `(pk, value, ...)`: UPDATE `fields` of that row (only
    where the `where` columns hold their values), as one statement the driver
    runs once per row (`executemany`: compiled once, pipelined by psycopg).
    A CASE per column for many rows cost the ORM ~50 µs a row of CPU, held
    against the event loop. None is SQL NULL, as in `QuerySet.update`."""
    meta = model._meta
    quote = connection.ops.quote_name
    columns = [meta.get_field(name) for name in fields]
    conditions = [(meta.get_field(name), value) for name, value in where.items()]
    sql = (
        f"UPDATE {quote(meta.db_table)} SET "
        + ", ".join(f"{quote(field.column)} = %s" for field in columns)
        + f" WHERE {quote(meta.pk.column)} = %s"
        + "".join(f" AND {quote(field.column)} = %s" for field, _ in conditions)
    )

    def prep(field: Any, value: Any) -> Any:
        return None if value is None else field.get_db_prep_value(value, connection)

    params = [
        (
            *(prep(field, value) for field, value in zip(columns, values, strict=True)),
            prep(meta.pk, pk),
            *(prep(field, value) for field, value in conditions),
        )
        for pk, *values in rows
    ]
    if params:
        with connection.cursor() as cursor:
            cursor.executemany(sql, params)


def insert_each(model: Any, objs: Sequence[Any]) -> None:
    """INSERT new rows whose primary keys are made in Python (a UUID's
    default), in order, as one statement the driver runs once per row
    (`executemany`, as `update_each`). What `bulk_create` writes, each
    field's value as it saves it (`pre_save`: the creation stamps taken
    row after row, the questions before their answers), without its SQL
    built afresh per batch: that cost about 0.1 ms a row of CPU, held
    against the event loop, in the middle of a burst of sends."""
    if not objs:
        return
    meta = model._meta
    db = connections[DEFAULT_DB_ALIAS]  # this thread's (`connection` looks it up at each use)
    if meta.pk.db_returning:
        raise TypeError(f"{meta.label}: its primary key is made by the database (use bulk_create)")
    quote = db.ops.quote_name
    fields = [field for field in meta.concrete_fields if not getattr(field, "generated", False)]
    sql = (
        f"INSERT INTO {quote(meta.db_table)} ({', '.join(quote(field.column) for field in fields)}) "
        f"VALUES ({', '.join(['%s'] * len(fields))})"
    )
    params = []
    for obj in objs:
        if obj.pk is None:
            raise ValueError(f"{meta.label}: a row without its primary key")
        obj._prepare_related_fields_for_save(operation_name="insert_each")
        values = [field.pre_save(obj, True) for field in fields]
        if any(hasattr(value, "resolve_expression") for value in values):
            raise TypeError(f"{meta.label}: an SQL expression as a value (use bulk_create)")
        params.append(
            [field.get_db_prep_save(value, db) for field, value in zip(fields, values, strict=True)]
        )
    with db.cursor() as cursor:
        cursor.executemany(sql, params)
    for obj in objs:
        obj._state.adding = False
        obj._state.db = db.alias
