"""corral.inventory.batch: group commit, and the turns its transactions take with the
process's other writers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from corral.inventory.batch import GroupCommit, Turns

#: Generous: only a broken lock makes a test wait this long.
WAIT = 10.0


class Book:
    """A stand-in for the database: what each transaction did, in order."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.committed: list[list[str]] = []
        self._open: list[str] | None = None

    @contextmanager
    def session(self) -> Iterator[Book]:
        self._open = []
        try:
            yield self
        except Exception:
            self._open = None
            raise
        self.committed.append(self._open)
        self._open = None

    def write(self, what: str) -> str:
        assert self._open is not None, "a write outside a transaction"
        self._open.append(what)
        self.log.append(what)
        return what


def writes(what: str) -> Callable[[Any], str]:
    """A work that writes ``what``."""
    return lambda s: s.write(what)


def wait_for_tickets(turns: Turns, count: int) -> None:
    """Until ``count`` threads have asked for their turn."""
    for _ in range(int(WAIT / 0.01)):
        if turns._issued >= count:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"{count} tickets never issued")


def test_turns_go_in_the_order_they_were_asked_for() -> None:
    turns, order = Turns(), []

    def take(name: str) -> None:
        with turns:
            order.append(name)

    with turns:  # held, while two others ask in a known order
        threads = []
        for i, name in enumerate(["first", "second"]):
            thread = threading.Thread(target=take, args=(name,))
            thread.start()
            threads.append(thread)
            wait_for_tickets(turns, i + 2)
    for thread in threads:
        thread.join(WAIT)
    assert order == ["first", "second"]


def test_a_failed_work_gets_its_error_and_the_others_are_committed() -> None:
    book = Book()
    writer = GroupCommit(book.session)  # type: ignore[arg-type]

    def bad(_: Any) -> None:
        raise ValueError("no such node")

    held = threading.Event()
    release = threading.Event()

    def hold(s: Any) -> str:  # keeps the writer busy while the next three queue up
        held.set()
        release.wait(WAIT)
        return str(s.write("hold"))

    first = writer.submit(hold)
    assert held.wait(WAIT)
    a, failing, b = writer.submit(writes("a")), writer.submit(bad), writer.submit(writes("b"))
    release.set()
    assert first.result(WAIT) == "hold"
    assert a.result(WAIT) == "a" and b.result(WAIT) == "b"
    with pytest.raises(ValueError, match="no such node"):
        failing.result(WAIT)
    # the batch of three was rolled back and its two good works ran again, together
    assert book.committed == [["hold"], ["a", "b"]]


def test_a_writer_that_waits_for_its_turn_is_not_kept_out_by_the_next_batch() -> None:
    """The deployment manager's pass against a stream of reports: it gets in after the
    batch under way, before the batch queued meanwhile."""
    book = Book()
    writer = GroupCommit(book.session)  # type: ignore[arg-type]
    held = threading.Event()
    release = threading.Event()

    def hold(s: Any) -> str:
        held.set()
        release.wait(WAIT)
        return str(s.write("batch 1"))

    first = writer.submit(hold)
    assert held.wait(WAIT)
    queued = writer.submit(writes("batch 2"))

    def manager() -> None:
        with writer.turns, book.session() as s:
            s.write("manager")

    thread = threading.Thread(target=manager)
    thread.start()
    wait_for_tickets(writer.turns, 2)  # batch 1 holds the first, the manager the second
    release.set()
    assert first.result(WAIT) == "batch 1" and queued.result(WAIT) == "batch 2"
    thread.join(WAIT)
    assert book.log == ["batch 1", "manager", "batch 2"]
