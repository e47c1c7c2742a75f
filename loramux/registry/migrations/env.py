"""Alembic's entry point for the registry's migrations: runs them on the database `loramux db upgrade` names."""

from alembic import context
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

MIGRATION_LOCK = 0x6C6D786D696772  # advisory lock key ("lmxmigr"): one upgrade at a time per database

engine = create_engine(context.config.attributes["database_url"], poolclass=NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        # Two processes upgrading at once: the second waits here, then finds the schema current.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()
engine.dispose()
