"""The real services behind a shared registry, started for the tests on loopback ports: a throwaway PostgreSQL
cluster from Debian's `postgresql` package (under a temporary directory; as an unprivileged user when the tests run
as root, since PostgreSQL refuses to run as root) and an S3-compatible server (moto's server mode, in this process,
so that it can be stopped and started again with its objects kept)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PG_MISSING = "PostgreSQL is not installed (Debian: apt-get install postgresql; `make test` does it when run as root)"


def postgres_bindir() -> Path | None:
    """The newest PostgreSQL server binaries: Debian keeps them in /usr/lib/postgresql/VERSION/bin, off PATH."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    if debian:
        return debian[-1].parent
    found = shutil.which("postgres")
    return Path(found).parent if found and shutil.which("initdb") else None


class PostgresCluster:
    """A PostgreSQL cluster of its own (trust authentication, no fsync: nothing here must outlive the tests)."""

    def __init__(self, bindir: Path, port: int) -> None:
        self.bindir, self.port = bindir, port
        self.root = Path(tempfile.mkdtemp(prefix="loramux-pg-"))  # not under pytest's tmp dirs: those are 0700
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.process: subprocess.Popen | None = None
        self._as_user: dict = {}
        if os.geteuid() == 0:
            account = _unprivileged_account()
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C",
                  "--no-sync", "--no-instructions")  # fmt: skip

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([str(self.bindir / tool), *args], check=True, capture_output=True, timeout=120, **self._as_user)

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.root),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=200"],
                stdout=log, stderr=subprocess.STDOUT, **self._as_user,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            ready = subprocess.run([str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                                   capture_output=True)  # fmt: skip
            if ready.returncode == 0:
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        """A fast shutdown: open sessions are ended, their transactions rolled back."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=60)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def execute(self, sql: str, database: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            conn.execute(sql)

    def empty(self, database: str) -> None:
        """Remove every row of the registry's tables, ending the sessions a test left behind first."""
        self.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'")
        tables = "tenants, namespaces, api_keys, repos, revisions, refs, files, uploads, ft_jobs, ft_events"
        self.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE", database)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _unprivileged_account() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("no unprivileged account (postgres or nobody) to run PostgreSQL as")


class S3Server:
    """moto's S3 in server mode on `port`. `stop()` closes the port (clients get "connection refused"); `start()`
    opens it again with every bucket and object as it was."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import logging

        from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", self.port, app, threaded=True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None


@dataclass
class LocalStorage:
    """The embedded registry: SQLite and blob files in the data directory."""

    kind = "local"
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)

    def open(self, data_dir: Path):
        from loramux.registry.registry import Registry

        return Registry.open(data_dir)

    def close(self) -> None:
        pass


@dataclass
class SharedStorage:
    """One shared registry's places: a PostgreSQL database and an S3 prefix, and the variables a process needs to
    reach them (the AWS_* ones for the bucket)."""

    database_url: str
    blob_url: str
    aws_env: dict[str, str]
    registries: list = field(default_factory=list)
    kind = "postgres-s3"

    @property
    def env(self) -> dict[str, str]:
        """Variables for a `loramux` process on this storage."""
        return {**self.aws_env, "LORAMUX_DATABASE_URL": self.database_url, "LORAMUX_BLOB_URL": self.blob_url}

    @property
    def args(self) -> list[str]:
        return ["--database-url", self.database_url, "--blob-url", self.blob_url]

    def open(self, data_dir: Path):
        """A registry of this process on the shared storage (`data_dir`: this process's local blob cache)."""
        from loramux.registry.registry import Registry

        registry = Registry.open(data_dir, self.database_url, self.blob_url)
        self.registries.append(registry)
        return registry

    def close(self) -> None:
        for registry in self.registries:
            registry.close()
