"""Connections to the registry's PostgreSQL database: a small pool of its own, the check of the schema a process
starts on, and the driver's "cannot reach the database" errors turned into `StorageUnavailableError` (HTTP 503).

`Connections` checks an idle connection before it hands it out, so that one broken by a database restart is replaced
rather than failing a request, and opens a new one at once when none is idle, so that requests fail fast (503) while
the database is down and succeed again as soon as it is back. (psycopg_pool reconnects in the background with a
growing delay between attempts: requests would keep failing for seconds after the database is back.)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

from loramux.registry.store import StorageUnavailableError

# The Alembic revisions of `migrations/versions`, oldest first; the last is the schema this code reads and writes.
SCHEMA_REVISIONS = ("0001",)


class Connections:
    """At most `size` connections to the database at `url` (autocommit, rows as dicts), idle ones kept for reuse.

    An idle connection is checked with an empty query before it is handed out; when none is idle (or none works) a
    new one is opened on the spot. A connection comes back only if it is healthy and outside any transaction.
    """

    def __init__(self, url: str, size: int, timeout: float) -> None:
        self.url, self.timeout = url, timeout
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[psycopg.Connection] = []
        self._lock = threading.Lock()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        if not self._slots.acquire(timeout=self.timeout):
            raise psycopg.OperationalError(f"all connections stayed busy for {self.timeout:.0f} s")
        conn = None
        try:
            conn = self._take()
            yield conn
        finally:
            self._give_back(conn)
            self._slots.release()

    def _take(self) -> psycopg.Connection:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return psycopg.connect(
                    self.url, autocommit=True, row_factory=dict_row, connect_timeout=max(1, int(self.timeout))
                )
            try:
                conn.execute("")  # one round trip: is the session still there (the database may have restarted)?
                return conn
            except psycopg.Error:
                conn.close()

    def _give_back(self, conn: psycopg.Connection | None) -> None:
        if conn is None or conn.closed:
            return
        if conn.broken or conn.info.transaction_status != TransactionStatus.IDLE:
            conn.close()
            return
        with self._lock:
            self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


@contextmanager
def unavailable() -> Iterator[None]:
    """Turn the driver's "cannot reach the database" errors into `StorageUnavailableError`."""
    try:
        yield
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        raise StorageUnavailableError(f"the registry database is unavailable: {describe(exc)}", "database") from exc


def describe(exc: BaseException) -> str:
    """A driver error on one line (libpq's messages span several)."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def check_schema(url: str, timeout: float) -> None:
    """Refuse a database that cannot be reached or whose schema is not the one this code knows, with what to do."""
    try:
        with psycopg.connect(url, connect_timeout=max(1, int(timeout)), autocommit=True) as conn:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except pg_errors.UndefinedTable:
        row = None
    except psycopg.ProgrammingError as exc:  # a malformed URL
        raise ValueError(f"invalid database URL: {describe(exc)}") from exc
    except psycopg.OperationalError as exc:
        raise StorageUnavailableError(f"cannot connect to the registry database: {describe(exc)}", "database") from exc
    version, head = (row[0] if row else None), SCHEMA_REVISIONS[-1]
    if version == head:
        return
    if version is None or version in SCHEMA_REVISIONS:
        state = "has no loramux tables yet" if version is None else f"has the schema of revision {version}"
        raise ValueError(
            f"the registry database {state}; this loramux needs revision {head}: run `loramux db upgrade` "
            "with the same database URL first"
        )
    raise ValueError(f"the registry database has schema revision {version}, newer than this loramux knows: upgrade it")
