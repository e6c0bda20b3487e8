"""Group commit: the writes of many requests in one transaction.

At 1,000 nodes, a wave of phase changes (every node of a multicast session ends
receiving within a second) is hundreds of small write transactions at once. SQLite takes
one writer at a time, so each request thread held the write lock through its share of
Python work while the others waited on it, and the server spent its core switching
between them. One writer thread that takes every request queued meanwhile and runs them in
one transaction turns that wave into a few commits, without lock waits.

A request's work runs in the batch's session; its answer comes back when the batch has
committed, so a caller never tells anyone of a write that could still be rolled back.
When one request's work fails, the batch is rolled back, that request gets its error,
and the others run again in a new transaction: work must therefore only read and write
the database (anything else happens once its result is back).

Another writer of the same process (the deployment manager's pass) takes its
transactions in :attr:`GroupCommit.turns` with the batches, in the order they asked.
Left to SQLite, it lost: its busy handler sleeps up to 100 ms between tries, while the
writer thread begins its next batch the moment it commits, so with 100 nodes reporting
the manager waited for SQLite's whole busy timeout and failed ("database is locked",
docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from sqlalchemy.orm import Session

log = logging.getLogger("corral.inventory")
T = TypeVar("T")
#: The most requests one transaction takes.
BATCH = 256

Work = Callable[[Session], Any]


class Turns:
    """A lock its takers get in the order they asked for it (a ticket lock), so that no
    thread that takes it again at once can keep another out. Not reentrant."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._issued = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._changed:
            ticket = self._issued
            self._issued += 1
            self._changed.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *_: object) -> None:
        with self._changed:
            self._serving += 1
            self._changed.notify_all()


class GroupCommit:
    """One writer thread, started on first use, running queued work in shared
    transactions."""

    def __init__(self, session: Callable[[], AbstractContextManager[Session]]) -> None:
        self.session = session
        self._queue: queue.Queue[tuple[Work, Future[Any]]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        #: every transaction of the batches is taken in its turn here, and so must the
        #: process's other writers take theirs
        self.turns = Turns()

    def submit(self, work: Callable[[Session], T]) -> Future[T]:
        """The future of ``work(session)``'s result, set once it is committed (its
        exception if it raised): an event loop awaits it without holding a thread."""
        future: Future[T] = Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="corral-group-commit", daemon=True
                )
                self._thread.start()
        self._queue.put((work, future))
        return future

    def run(self, work: Callable[[Session], T]) -> T:
        """``work(session)``'s result once it is committed; its exception if it raised."""
        return self.submit(work).result()

    def _loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._commit(batch)

    def _commit(self, batch: list[tuple[Work, Future[Any]]]) -> None:
        while batch:
            results: list[Any] = []
            failed: int | None = None
            error: BaseException | None = None
            try:
                with self.turns, self.session() as s:
                    for i, (work, _) in enumerate(batch):
                        try:
                            results.append(work(s))
                        except Exception as exc:
                            failed, error = i, exc
                            raise
            except Exception as exc:
                if failed is None:  # the commit itself failed: nobody's write is in
                    for _, future in batch:
                        future.set_exception(exc)
                    return
                assert error is not None
                batch[failed][1].set_exception(error)
                batch = batch[:failed] + batch[failed + 1 :]  # the others, again
                continue
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)
            return
