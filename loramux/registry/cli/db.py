"""`loramux db upgrade|current`: the schema of a PostgreSQL registry database (Alembic migrations).

Migrations run only when asked: a database shared by several processes is migrated once, by whoever deploys the new
version, never by whichever process happens to start first. A process on a database whose schema it does not know
refuses to start and says to run `loramux db upgrade`. The embedded SQLite store needs none of this.
"""

from __future__ import annotations

import argparse

from loramux.registry.cli.common import add_database_url_argument, database_url


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    upgrade = actions.add_parser("upgrade", help="create the registry's tables, or migrate them to this version's")
    current = actions.add_parser("current", help="print the database's schema revision and this version's")
    for sub in (upgrade, current):
        add_database_url_argument(sub)


def run(args: argparse.Namespace) -> int:
    url = database_url(args)
    if url is None:
        raise ValueError("name the database with --database-url or LORAMUX_DATABASE_URL (SQLite needs no migrations)")
    try:
        from sqlalchemy.exc import SQLAlchemyError

        from loramux.registry import migrations
        from loramux.registry.postgres_connections import describe
    except ImportError as exc:
        raise ValueError(f"migrations need the cluster extra: pip install 'loramux[cluster]' ({exc})") from exc

    try:
        if args.action == "upgrade":
            migrations.upgrade(url)
            print(f"the registry database is at schema revision {migrations.head()}")
        else:
            print(f"database: {migrations.current(url) or 'no loramux tables'}; this loramux: {migrations.head()}")
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc  # the driver's own error, where there is one
        raise ValueError(f"cannot migrate the registry database: {describe(cause)}") from exc
    return 0
