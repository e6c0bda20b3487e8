"""A :class:`Bell` that threads ring and coroutines wait on: how work done in a thread
(a database transaction, the deployment manager's pass) wakes the requests that wait for
it on the server's event loop, without polling."""

from __future__ import annotations

import asyncio
import threading
from contextlib import suppress


class Bell:
    """Rung from any thread; waited on from the event loop it is bound to.

    :attr:`rings` counts the rings: a waiter reads it, looks at whatever it waits for, and
    then waits for a ring past what it read, so a ring between the look and the wait is not
    lost. Rings that come faster than the loop runs wake the waiters once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rings = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rung: asyncio.Event | None = None
        self._wake_pending = False

    @property
    def rings(self) -> int:
        return self._rings

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake the waiters on ``loop`` (the server's), from now on."""
        with self._lock:
            self._loop = loop
            self._rung = asyncio.Event()
            self._wake_pending = False

    def ring(self) -> None:
        with self._lock:
            self._rings += 1
            loop = self._loop
            wake = loop is not None and not self._wake_pending
            if wake:
                self._wake_pending = True
        if loop is not None and wake:
            with suppress(RuntimeError):  # the loop closed: the server is stopping
                loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
            rung, self._rung = self._rung, asyncio.Event()
        if rung is not None:
            rung.set()

    async def wait(self, since: int, timeout: float) -> bool:
        """Until a ring past ``since`` (a value of :attr:`rings`), or ``timeout`` seconds;
        whether it rang."""
        if self._rung is None or self._loop is not asyncio.get_running_loop():
            self.bind(asyncio.get_running_loop())  # an app whose lifespan did not run
        rung = self._rung
        if self._rings > since or rung is None:
            return True
        with suppress(TimeoutError):
            await asyncio.wait_for(rung.wait(), timeout)
        return self._rings > since
