"""The metadata store on PostgreSQL, for a registry that several processes on several machines share (every
`loramux hub`, `loramux serve` and `loramux train-worker` pointed at one `--database-url`).

psycopg 3, through the pool of `postgres_connections.py`. The tables are created and changed by the Alembic migrations
in `migrations/` (`loramux db upgrade`); a process refuses to start on a database whose schema is not the one it
knows.

Commits to one repo are serialized by a lock on the repo's row: the head a commit checks is the head it moves, and
its revision, files and ref are written in one transaction, so a push that fails half-way (the database restarting,
say) leaves nothing behind. A database that cannot be reached raises `StorageUnavailableError` (HTTP 503).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from loramux.registry.postgres_connections import Connections, check_schema, unavailable
from loramux.registry.sql_store import Row, SQLStore

BLOB_LOCK = 0x6C6D78626C6F62  # the advisory lock key of `blob_lock` ("lmxblob")


class PostgresStore(SQLStore):
    """`MetadataStore` on PostgreSQL. `url` is a libpq URL (`postgresql://user:password@host:port/dbname`)."""

    FOR_UPDATE = " FOR UPDATE"
    SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"
    DUPLICATE = pg_errors.UniqueViolation

    def __init__(self, url: str, max_connections: int = 8, timeout: float = 5.0) -> None:
        check_schema(url, timeout)
        self._pool = Connections(url, max_connections, timeout)

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def _write(self) -> Iterator[_Transaction]:
        with unavailable(), self._pool.connection() as conn, conn.transaction():
            yield _Transaction(conn)

    def _rows(self, sql: str, *args: Any) -> list[Row]:
        with unavailable(), self._pool.connection() as conn:
            return conn.execute(_dialect(sql), args).fetchall()

    @contextmanager
    def blob_lock(self, exclusive: bool) -> Iterator[None]:
        # A session-level advisory lock, held on a connection of its own for as long as the caller needs it. A
        # session that ends (its process died, the database restarted) releases it.
        mode = "" if exclusive else "_shared"
        with unavailable(), self._pool.connection() as conn:
            conn.execute(f"SELECT pg_advisory_lock{mode}(%s)", (BLOB_LOCK,))
            try:
                yield
            finally:
                try:
                    conn.execute(f"SELECT pg_advisory_unlock{mode}(%s)", (BLOB_LOCK,))
                except psycopg.Error:
                    conn.close()  # never hand back a connection that may still hold the lock


class _Transaction:
    """A connection inside its transaction, taking the store's statements (`?` placeholders)."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> psycopg.Cursor:
        return self.conn.execute(_dialect(sql), args)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.conn.cursor().executemany(_dialect(sql), rows)


def _dialect(sql: str) -> str:
    """psycopg's placeholders for the store's (no statement has a `?` or a `%` of its own)."""
    return sql.replace("?", "%s")
