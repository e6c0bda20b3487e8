from __future__ import annotations

import threading
import time
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text

from corral.inventory.db import HEAD, open_engine, transaction
from corral.inventory.models import Base


def test_migrations_build_exactly_the_models(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    assert diff == []
    assert version == HEAD


def test_a_current_database_is_left_alone(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    open_engine(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE marker (x INTEGER)")
    open_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM marker").scalar() == 0


def test_a_transaction_that_read_then_writes_waits_for_another_writer(tmp_path: Path) -> None:
    """Two deferred transactions, one reading while the other writes, fail the reader's
    later write at once with "database is locked": what 100 nodes' plan requests met.
    Begun IMMEDIATE, the second waits for the first and both commit."""
    engine = open_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE counter (n INTEGER)")
        conn.exec_driver_sql("INSERT INTO counter VALUES (0)")
    first_has_read = threading.Event()
    errors: list[Exception] = []

    def read_then_write() -> None:
        try:
            with transaction(engine) as s:
                n = s.execute(text("SELECT n FROM counter")).scalar_one()
                first_has_read.set()
                time.sleep(0.3)  # the other's write comes now, if it can
                s.execute(text("UPDATE counter SET n = :n"), {"n": n + 1})
        except Exception as exc:  # the assertion below reports it
            errors.append(exc)
            first_has_read.set()

    def write() -> None:
        first_has_read.wait()
        try:
            with transaction(engine) as s:
                s.execute(text("UPDATE counter SET n = n + 1"))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read_then_write), threading.Thread(target=write)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT n FROM counter").scalar() == 2
