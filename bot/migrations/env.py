"""Alembic environment: migrations run on a connection handed in by ``bot.db.upgrade``."""

from alembic import context
from sqlmodel import SQLModel

import bot.models  # noqa: F401  - registers the tables on SQLModel.metadata

config = context.config
target_metadata = SQLModel.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:  # plain `alembic` command line: build our own engine
        from bot.db import make_engine

        engine = make_engine(config.get_main_option("sqlalchemy.url"), writer=True)
        with engine.begin() as connection:
            _run(connection)
        engine.dispose()
    else:
        _run(connection)


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run `imagebot db upgrade`")
run_migrations_online()
