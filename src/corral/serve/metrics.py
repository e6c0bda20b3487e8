"""Prometheus metrics of ``corral serve`` (``GET /metrics``, admin token): what the nodes
and deployments are doing, counted as it happens.

Change-driven, whatever the number of nodes: the hub's listener counts each node event as
it is published (boot requests, failures, how long each phase lasted), the chunk routes
and the transports count the image bytes they send, the event stream counts its clients.
A scrape reads those counts, plus one GROUP BY of the nodes' states and one count of the
running deployments. Each app has a registry of its own, so that a process may hold
several (the tests do). ``docs/metrics.md`` lists every metric.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from sqlalchemy.orm import Session

from corral import __version__
from corral.agent import phases
from corral.deploy.service import DeployService
from corral.deploy.store import Deployments
from corral.inventory.state import STATES, NodeStates
from corral.serve.events import Hub
from corral.serve.steps import protocol_of

log = logging.getLogger("corral.serve")

#: Phase durations, from a boot step (a second) to an image over a slow link (hours).
DURATION_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)
#: Phases that end a run of the life cycle: the time until the node's next event (a
#: re-arm, days later) is no phase's duration.
SETTLED = (
    phases.FAILED,
    phases.CANCELLED,
    phases.INSTALL_FINISHED,
    phases.FIRST_BOOT,
    phases.RUNNING,
)
#: After these, boot steps are history (lease renewals, a boot from the node's disk: its
#: state does not move), not a new boot, until another event (armed, netboot) says so.
AT_REST = (*SETTLED, phases.DEPLOYED, phases.REBOOTING)
#: The protocols boot steps are served over: a step's source if it names one, else read
#: from the step (:func:`corral.serve.steps.protocol_of`); "other" if neither says.
BOOT_SOURCES = ("dhcp", "tftp", "http")


def _when(data: dict[str, Any]) -> float:
    try:
        return datetime.fromisoformat(str(data["time"])).timestamp()
    except (KeyError, ValueError):
        return time.time()


class Metrics:
    """The metrics of one app: its registry, the hub listener that feeds it, and the
    collector that reads the rest at scrape time."""

    def __init__(
        self,
        hub: Hub,
        session: Callable[[], AbstractContextManager[Session]],
        deploy: DeployService | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.hub = hub
        self.session = session
        self.deploy = deploy
        # node -> (phase it entered, when): the start of the duration its next event ends
        self._entered: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        r = self.registry
        Info("corral_build", "The corral serving these metrics.", registry=r).info(
            {"version": __version__}
        )
        self.events = Counter(
            "corral_node_events",
            "Node events published (stored), by phase.",
            ["phase"],
            registry=r,
        )
        self.progress = Counter(
            "corral_progress_reports",
            "Deployment progress reports taken from the nodes' agents.",
            registry=r,
        )
        self.boot_requests = Counter(
            "corral_boot_requests",
            "Boot steps corral served (DHCP, TFTP, HTTP), by step and source; known is "
            "false for MACs of no node.",
            ["step", "source", "known"],
            registry=r,
        )
        self.failures = Counter(
            "corral_node_failures",
            "Nodes failed, by reason and the phase they were in.",
            ["reason", "during"],
            registry=r,
        )
        self.durations = Histogram(
            "corral_phase_duration_seconds",
            "How long nodes stayed in each phase: from entering it to entering the next.",
            ["phase"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        r.register(_Snapshot(self))
        hub.listeners.append(self.listen)

    def listen(self, kind: str, data: dict[str, Any]) -> None:
        """The hub's listener: one published message in (from any thread)."""
        if kind == "progress":
            self.progress.inc()
            return
        if kind != "event":
            return
        phase = str(data.get("phase") or "")
        node = data.get("node")
        self.events.labels(phase=phase).inc()
        if phase in phases.BOOT_STEPS:
            source = str(data.get("source") or "")
            if source not in BOOT_SOURCES:  # a step stored by the client's address
                source = protocol_of(phase, str(data.get("message") or "")) or "other"
            self.boot_requests.labels(
                step=phase,
                source=source,
                known="true" if node else "false",
            ).inc()
        if phase == phases.FAILED:
            self.failures.labels(
                reason=data.get("reason") or "unknown", during=data.get("during") or "none"
            ).inc()
        if node:
            self._entering(str(node), phase, _when(data))

    def _entering(self, node: str, phase: str, when: float) -> None:
        """The node entered ``phase`` at ``when``: observe how long its last phase lasted."""
        with self._lock:
            last = self._entered.get(node)
            if last is not None:
                was, since = last
                history = phase in phases.BOOT_STEPS or phase == phases.POWER_OPERATION
                if phase == was or (history and was in AT_REST):
                    return  # still in it; or history, not a step of its life cycle
                if was in phases.LIFE_CYCLE and was not in SETTLED and when >= since:
                    self.durations.labels(phase=was).observe(when - since)
            self._entered[node] = (phase, when)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The metrics in the format the scraper asked for (OpenMetrics or text), and its
        content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class _Snapshot:
    """What a scrape reads as it is: the nodes by state and the running deployments (a
    query each), the stream's clients and the image bytes sent (counts in memory)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        # the names, without querying the database when the registry checks them
        yield GaugeMetricFamily("corral_nodes", "")
        yield GaugeMetricFamily("corral_deployments_running", "")
        yield GaugeMetricFamily("corral_event_stream_clients", "")
        yield CounterMetricFamily("corral_image_bytes_sent", "")

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        with metrics.session() as s:
            counts = NodeStates(s).counts()
            running = Deployments(s).running_count()
        nodes = GaugeMetricFamily("corral_nodes", "Nodes in each state.", labels=["state"])
        for state in dict.fromkeys([*STATES, *counts]):
            nodes.add_metric([state], counts.get(state, 0))
        yield nodes
        yield GaugeMetricFamily("corral_deployments_running", "Deployments running.", value=running)
        yield GaugeMetricFamily(
            "corral_event_stream_clients",
            "Clients of the event stream (dashboards, corral watch) connected now.",
            value=metrics.hub.clients,
        )
        sent = CounterMetricFamily(
            "corral_image_bytes_sent",
            "Image bytes sent since the server started, by transport (http: the chunk "
            "routes, whatever the node's transport) and export.",
            labels=["transport", "image"],
        )
        deploy = metrics.deploy
        if deploy is not None:
            by_transport = deploy.transports.sent()
            by_transport["http"] = {**by_transport.get("http", {}), **deploy.served.read()}
            for transport, exports in sorted(by_transport.items()):
                for ref, count in sorted(exports.items()):
                    sent.add_metric([transport, ref], count)
        yield sent
