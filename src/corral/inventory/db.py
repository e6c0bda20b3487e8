"""Settings -> engine -> session: opening the inventory database, keeping its schema
current (Alembic), and transactions on it.

:func:`open_engine` and :func:`transaction` work for any database URL and engine. The
process's own database, the one its settings name ($CORRAL_HOME, corral.toml), is
:func:`settings`, :func:`engine`, :func:`session` and :func:`inventory`: each is made
once, on first use. The CLI, ``corral serve``, the tests and the benchmarks all open it
here; :func:`close` forgets it, for those that switch homes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from corral.config import Settings, load_settings, make_private_dir, restrict_file
from corral.errors import ConfigError
from corral.inventory.store import Inventory

MIGRATIONS = Path(__file__).parent / "migrations"
# The newest migration; checked first so that a current database costs one query.
HEAD = "0006"


# How long a write waits for SQLite's write lock before "database is locked". Python's
# default, 5 s, ran out at N = 100 on a busy host: a node's plan request, whose write
# waited behind the group commits of a hundred nodes' reports, failed twice with 500.
SQLITE_BUSY_SECONDS = 30.0


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _private_sqlite(path: Path) -> None:
    """The database holds root password hashes: mode 0600, and its write-ahead log and
    shared memory files too (SQLite gives them the database's mode when it makes them)."""
    make_private_dir(path.parent)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        restrict_file(file)


def open_engine(url: str) -> Engine:
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        _private_sqlite(Path(url.removeprefix("sqlite:///")))
    connect_args = {"timeout": SQLITE_BUSY_SECONDS} if url.startswith("sqlite") else {}
    try:
        engine = create_engine(url, connect_args=connect_args)
    except (SQLAlchemyError, ImportError) as exc:
        raise ConfigError(f"cannot use database '{url}': {exc}") from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    migrate(engine)
    return engine


def _current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except OperationalError:
        return None
    except SQLAlchemyError:
        return None


def migrate(engine: Engine) -> None:
    """Bring the schema to HEAD; a no-op (one query) when it is there already."""
    if _current_revision(engine) == HEAD:
        return
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


@contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """One unit of work: everything commits together or nothing does."""
    factory = sessionmaker(engine, expire_on_commit=False)
    with factory() as session, session.begin():
        yield session


@cache
def settings() -> Settings:
    """The process's settings, read once from $CORRAL_HOME and corral.toml."""
    loaded = load_settings()
    make_private_dir(loaded.home)  # on first use: it will hold the database and secrets
    return loaded


@cache
def engine() -> Engine:
    """The engine of the process's database, opened (and migrated) once."""
    return open_engine(settings().database)


@contextmanager
def session() -> Iterator[Session]:
    """One transaction on the process's database."""
    with transaction(engine()) as s:
        yield s


@contextmanager
def inventory() -> Iterator[Inventory]:
    """The inventory in one transaction: committed if the block succeeds, else rolled back."""
    with session() as s:
        yield Inventory(s)


def close() -> None:
    """Close the process's database and forget its settings: the next use reads
    $CORRAL_HOME and corral.toml again (tests and benchmarks that switch homes)."""
    if engine.cache_info().currsize:
        engine().dispose()
    engine.cache_clear()
    settings.cache_clear()
