"""The PostgreSQL schema of the registry as Alembic migrations (`versions/`), applied by `loramux db upgrade`.

The embedded SQLite store creates its tables itself; these migrations are for the shared PostgreSQL database only.
"""

from __future__ import annotations

from pathlib import Path


def sqlalchemy_url(database_url: str) -> str:
    """The libpq URL as SQLAlchemy names it with the psycopg 3 driver."""
    scheme, sep, rest = database_url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        raise ValueError("the database URL must start with postgresql://")
    return f"postgresql+psycopg://{rest}"


def alembic_config(database_url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    # Not through set_main_option: the config file syntax would read a '%' in a password as interpolation.
    config.attributes["database_url"] = sqlalchemy_url(database_url)
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate the database to `revision` (each migration in one transaction; concurrent upgrades wait in turn)."""
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)


def current(database_url: str) -> str | None:
    """The database's schema revision (None: no loramux tables yet)."""
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    engine = create_engine(sqlalchemy_url(database_url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("postgresql://")).get_current_head()
