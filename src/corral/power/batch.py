"""Many nodes at once: :func:`power` runs one action on a list of BMCs with a bounded
number in flight and a deadline per node, and answers with one Outcome per node.

Each node runs in a thread of its own, started when a slot is free; its deadline counts
from then. Drivers bound their own work by the deadline (a subprocess's timeout, an HTTP
request's), so a node normally ends by itself. Should a driver overrun it by more than
:data:`GRACE`, the node is answered "timeout" all the same and its slot goes to the next
node; the late thread is left to end on its own (a daemon), and what it returns is dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence

from corral.errors import InvalidValue
from corral.power.check import check
from corral.power.drivers import REGISTRY
from corral.power.model import (
    ACTIONS,
    BMC_ERROR,
    CONFIG,
    DRIVERS,
    TIMEOUT,
    Bmc,
    Deadline,
    Outcome,
    PowerContext,
    PowerFailure,
)

log = logging.getLogger("corral.power")

#: Seconds a driver may overrun its node's deadline before the node is answered for it.
GRACE = 1.0


def power(
    bmcs: Sequence[Bmc],
    action: str,
    *,
    netboot: bool = False,
    pool: int = 32,
    timeout: float = 20.0,
    context: PowerContext | None = None,
    on_done: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Run ``action`` on every node in parallel, ``pool`` at most at once, each within
    ``timeout`` seconds; one Outcome per Bmc, in input order.

    A node's failure (a driver's exception included) is its Outcome, never an exception.
    ``netboot``: before on and cycle, set the boot device to the network for the next boot
    only, where the BMC can. ``on_done`` is called with each Outcome as its node finishes,
    from a worker thread (or this one, for a node past its deadline); an exception it raises
    is logged and does not stop the others. Raises InvalidValue for a bad action, pool or
    timeout.
    """
    if action not in ACTIONS:
        raise InvalidValue(f"unknown power action '{action}'", f"use {', '.join(ACTIONS)}")
    if pool < 1:
        raise InvalidValue(f"power pool {pool} is too small", "run at least 1 node at a time")
    if not timeout > 0:
        raise InvalidValue(f"power timeout {timeout} is not positive", "give seconds, e.g. 20")
    return _Batch(bmcs, action, netboot, pool, timeout, context or PowerContext(), on_done).run()


class _Batch:
    def __init__(
        self,
        bmcs: Sequence[Bmc],
        action: str,
        netboot: bool,
        pool: int,
        timeout: float,
        context: PowerContext,
        on_done: Callable[[Outcome], None] | None,
    ) -> None:
        self.bmcs = list(bmcs)
        self.action = action
        self.netboot = netboot
        self.pool = pool
        self.timeout = timeout
        self.context = context
        self.on_done = on_done
        self.outcomes: list[Outcome | None] = [None] * len(self.bmcs)
        self.cond = threading.Condition()
        #: node index -> when the supervisor answers for it (monotonic)
        self.running: dict[int, float] = {}
        self.started: dict[int, float] = {}
        #: nodes whose worker has its outcome and is reporting it: theirs, not the timer's
        self.reporting: set[int] = set()

    def run(self) -> list[Outcome]:
        waiting = deque(range(len(self.bmcs)))
        while True:
            expired: list[Outcome] = []
            with self.cond:
                while waiting and len(self.running) < self.pool:
                    self._start(waiting.popleft())
                if not waiting and not self.running:
                    break
                timed = [t for i, t in self.running.items() if i not in self.reporting]
                wait = max(0.0, min(timed) - time.monotonic()) if timed else None
                self.cond.wait(wait)
                now = time.monotonic()
                for i, until in list(self.running.items()):
                    if until <= now and i not in self.reporting:
                        del self.running[i]
                        late = self._overrun(i, now)
                        self.outcomes[i] = late
                        expired.append(late)
            for outcome in expired:
                self._report(outcome)
        return [o for o in self.outcomes if o is not None]

    def _start(self, i: int) -> None:
        now = time.monotonic()
        self.started[i] = now
        self.running[i] = now + self.timeout + GRACE
        bmc = self.bmcs[i]
        thread = threading.Thread(
            target=self._work, args=(i, now), name=f"power {bmc.node}", daemon=True
        )
        thread.start()

    def _work(self, i: int, started: float) -> None:
        outcome = attempt(
            self.bmcs[i],
            self.action,
            netboot=self.netboot,
            deadline=Deadline(started, self.timeout),
            context=self.context,
        )
        with self.cond:
            if i not in self.running:  # answered for already: past its deadline
                log.debug("node %s: dropping a late answer (%s)", outcome.node, outcome.reason)
                return
            self.reporting.add(i)
        self._report(outcome)
        with self.cond:
            self.outcomes[i] = outcome
            del self.running[i]
            self.cond.notify_all()

    def _overrun(self, i: int, now: float) -> Outcome:
        bmc = self.bmcs[i]
        where = f"BMC {bmc.address}" if bmc.address else f"the {bmc.driver} driver"
        return Outcome(
            node=bmc.node,
            action=self.action,
            ok=False,
            state=None,
            reason=f"{where} did not answer within {self.timeout:g} s",
            why=TIMEOUT,
            seconds=now - self.started[i],
            driver=bmc.driver,
        )

    def _report(self, outcome: Outcome) -> None:
        if self.on_done is None:
            return
        try:
            self.on_done(outcome)
        except Exception:
            log.exception("node %s: reporting its power outcome failed", outcome.node)


def attempt(
    bmc: Bmc, action: str, *, netboot: bool, deadline: Deadline, context: PowerContext
) -> Outcome:
    """One node's operation, whatever happens, as an Outcome."""

    def outcome(ok: bool, state: str | None, reason: str | None, why: str | None) -> Outcome:
        return Outcome(
            node=bmc.node,
            action=action,
            ok=ok,
            state=state,
            reason=_without(bmc.password, reason),
            why=why,
            seconds=deadline.elapsed(),
            driver=bmc.driver,
        )

    driver = REGISTRY.get(bmc.driver)
    if driver is None:
        return outcome(
            False, None, f"unknown power driver '{bmc.driver}': use one of {', '.join(DRIVERS)}",
            CONFIG,
        )  # fmt: skip
    if bmc.driver in DRIVERS:
        fields = {k: v for k, v in dataclasses.asdict(bmc).items() if k != "node"}
        problems = check(fields)
        if problems:
            return outcome(False, None, "; ".join(problems), CONFIG)
    try:
        answer = driver.run(bmc, action, netboot=netboot, deadline=deadline, context=context)
    except PowerFailure as exc:
        return outcome(False, None, exc.reason, exc.why)
    except Exception as exc:
        text = _without(bmc.password, f"{type(exc).__name__}: {exc}")
        log.error("node %s: the %s driver failed: %s", bmc.node, bmc.driver, text)
        # the frames without the exception's text, which may quote the password
        frames = "".join(traceback.format_tb(exc.__traceback__))
        log.debug("node %s: where the %s driver failed:\n%s", bmc.node, bmc.driver, frames)
        return outcome(False, None, f"the {bmc.driver} driver failed: {text}", BMC_ERROR)
    return outcome(True, answer.state, answer.note, answer.why)


def _without(secret: str | None, text: str | None) -> str | None:
    """``text`` with ``secret`` masked: a reason may quote what a BMC or a library said."""
    if text is None or not secret:
        return text
    return text.replace(secret, "***")
