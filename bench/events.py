"""Benchmark: the live event stream while 1,000 nodes report their progress.

A real ``corral serve`` (its own home, DHCP and TFTP off, a free port) runs one
deployment of a tiny image to N inventory nodes, each with an address of its own. The
inventory refuses loopback addresses (127.x), so the bench runs in a network namespace
of its own (``unshare --net``, with ``--map-root-user`` when not root) whose loopback
holds 10.77.0.0/16: every address in it is then local, the server listens on 10.77.0.1,
node i sends from 10.77.(1 + i / 256).(i % 256), and nothing changes on the host. Each
simulated node fetches its
install token as a real one does (``/boot/token/NODE.cpio.gz``, served only to its own
address), reports ``booted``, then reports its progress from its own address on one
kept-alive connection, as the agent's reporter does: at once at every phase change
(partitioning, receiving, configuring, bootloader, post-install, done), else every
``report_interval(N)`` seconds (5 s at 1,000 nodes: about 200 reports a second), with
the bytes growing while it receives. Starts are jittered over one interval.

Meanwhile ``--clients`` viewers hold ``GET /api/v1/events/stream`` and a scraper GETs
``/metrics`` every second (``--scrape``; a server that answers 404 has none yet, which
is said, and the run goes on).

Measured:

- reports sent, accepted (2xx) and failed (other answers, or none), and request latency;
- events lost: every accepted progress report must reach every viewer, matched per
  node in order by (phase, bytes) (a node sends one report at a time, and the hub
  publishes it before the node gets its answer); every event the server stored during
  the run (``GET /api/v1/events``) must reach every viewer too, by its id;
- latency from a report's send to its delivery on each stream: p50, p99 (target
  p99 <= 250 ms);
- ``corral serve``'s CPU (user + system from ``/proc/PID/stat``, as % of one core) and
  RSS (at the end, and its peak);
- the load generator's own CPU, and how late it sent reports against its schedule. A
  node waits for each answer before its next report, as the agent does, so lateness with
  a generator far from a core's worth of CPU is the server's backlog; with a busy
  generator it would be the generator's own;
- the scrape latency; the host's load average before and after.

Everything simulated runs in this one process on one asyncio loop (raw HTTP/1.1 on
sockets bound to each node's address: a full client library cost more CPU than the
server's share of a report). The viewers only timestamp what they read during the run;
frames are parsed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.agent.phases import (
    BOOTED,
    BOOTLOADER,
    CONFIGURING,
    DONE,
    PARTITIONING,
    POST_INSTALL,
    RECEIVING,
)
from corral.deploy.service import report_interval
from corral.deploy.store import new_deployment
from corral.images.catalog import image_store
from corral.inventory import db
from corral.inventory import models as m
from corral.inventory.schema import InstallMethod, InterfaceSpec, NodeSpec
from corral.run import run, unwind_on_sigterm
from corral.run import stop as stop_process
from corral.serve.assets import api_token

HOME = Path.home() / ".cache" / "corral-bench" / "events-home"
REPO = Path(__file__).resolve().parents[1]
#: The namespace's loopback network: the server's address, then the nodes'.
NETWORK = "10.77.0.0/16"
SERVER = "10.77.0.1"
#: Set in the environment once the bench runs in its own network namespace.
NETNS_MARK = "CORRAL_BENCH_NETNS"
#: When each phase starts, as a share of a node's install (its last interval excepted).
SCHEDULE = (
    (PARTITIONING, 0.0),
    (RECEIVING, 0.05),
    (CONFIGURING, 0.85),
    (BOOTLOADER, 0.9),
    (POST_INSTALL, 0.95),
    (DONE, 1.0),
)
#: The stream a node "receives" (bytes only: nothing is sent).
TOTAL = 2 << 30
#: Seconds the agent waits for an answer.
TIMEOUT = 15.0
#: Seconds the viewers keep reading once the last report was answered.
DRAIN = 3.0
TARGET_P99 = 0.250


def use_home(home: Path) -> None:
    """A fresh corral home for one run, the one in use from now on."""
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    os.environ["CORRAL_HOME"] = str(home)
    db.close()


def node_name(i: int) -> str:
    return f"n{i:04d}"


def node_ip(i: int) -> str:
    return f"10.77.{1 + (i >> 8)}.{i & 255}"


def own_network() -> None:
    """Go on in a network namespace of this process's own (by running again under
    ``unshare``), whose loopback holds :data:`NETWORK`."""
    if os.environ.get(NETNS_MARK) != "1":
        user = [] if os.geteuid() == 0 else ["--map-root-user"]
        argv = ["unshare", "--net", *user, sys.executable, *sys.argv]
        os.execvpe("unshare", argv, dict(os.environ, **{NETNS_MARK: "1"}))
    run(["ip", "link", "set", "lo", "up"])
    run(["ip", "address", "add", f"{SERVER}/{NETWORK.split('/')[1]}", "dev", "lo"])


def prepare(home: Path, n: int) -> tuple[int, str]:
    """N nodes with loopback addresses, a tiny image, and a running deployment of it to
    them, through corral's own code; returns the deployment and the admin token."""
    specs = [
        NodeSpec(
            name=node_name(i),
            install_method=InstallMethod.IMAGE,
            interfaces=[
                InterfaceSpec(
                    mac=f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}",
                    ip=node_ip(i),
                    netmask="255.255.0.0",
                )
            ],
        )
        for i in range(1, n + 1)
    ]
    with db.inventory() as inv:
        inv.add("node", specs)
    tree = home / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text("ID=corralbench\n")
    version = image_store(home).import_tree("tiny", tree)
    with db.session() as s:
        ident = new_deployment(
            s, image_store(home), f"n[0001-{n:04d}]", version.ref, "http", kind="install"
        )
    return ident, api_token(home)


# -- corral serve ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((SERVER, 0))
        return int(sock.getsockname()[1])


def start_server(home: Path, port: int) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "corral", "serve", "--address", SERVER]
    argv += ["--http-port", str(port), "--tftp-port", "0", "--dhcp", "off"]
    log = open(home / "serve.log", "wb")  # noqa: SIM115 (the child holds it)
    with log:
        return subprocess.Popen(
            argv,
            env=dict(os.environ, CORRAL_HOME=str(home)),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def profile(path: Path, pid: int, seconds: float) -> subprocess.Popen[bytes]:
    """py-spy sampling corral serve for ``seconds``, its raw stacks into ``path``
    (``pip install py-spy``; it needs ptrace rights over the server: root, or a
    ptrace_scope of 0)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    argv = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds))]
    argv += ["--rate", "100", "--format", "raw", "--output", str(path), "--nonblocking"]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def proc_cpu(pid: int) -> float:
    """User + system seconds of the process so far."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_memory(pid: int) -> dict[str, float]:
    """RSS now and at its peak, MiB."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {
        "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
        "peak_rss_mib": int(status["VmHWM"].split()[0]) / 1024,
    }


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- HTTP/1.1, just enough ---------------------------------------------------------------


class HttpError(Exception):
    pass


class Connection:
    """One kept-alive connection, from ``source`` (a node's address) when given."""

    def __init__(self, port: int, source: str | None = None) -> None:
        self.port = port
        self.source = source
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        local = (self.source, 0) if self.source else None
        return await asyncio.open_connection(SERVER, self.port, local_addr=local)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(
        self, method: str, path: str, token: str, body: bytes | None = None
    ) -> tuple[int, bytes]:
        """Status and body; one more try on a new connection if a kept one was closed
        (as the agent does)."""
        kept = self.writer is not None
        try:
            return await asyncio.wait_for(self._request(method, path, token, body), TIMEOUT)
        except (OSError, HttpError, asyncio.IncompleteReadError):
            self.close()
            if not kept:
                raise
            return await asyncio.wait_for(self._request(method, path, token, body), TIMEOUT)
        except TimeoutError:
            self.close()
            raise

    async def _request(
        self, method: str, path: str, token: str, body: bytes | None
    ) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await self._open()
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {SERVER}\r\nAuthorization: Bearer {token}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        status, headers = await read_head(self.reader)
        if "content-length" in headers:
            data = await self.reader.readexactly(int(headers["content-length"]))
        else:
            data = b"".join([chunk async for chunk in read_chunks(self.reader)])
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, data


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    line = await reader.readline()
    if not line:
        raise HttpError("connection closed")
    status = int(line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def read_chunks(reader: asyncio.StreamReader) -> Any:
    """The chunks of a chunked body, as they come."""
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            await reader.readline()
            return
        data = await reader.readexactly(size + 2)
        yield data[:-2]


# -- the simulated nodes -----------------------------------------------------------------


@dataclass
class Sent:
    """One progress report as a node sent it."""

    phase: str
    bytes: int
    at: float  # monotonic, just before it was written
    late: float  # seconds after its schedule
    status: int = 0  # 0: no answer
    answered: float = 0.0


@dataclass
class Node:
    index: int
    token: str = ""
    sent: list[Sent] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return node_name(self.index)

    @property
    def ip(self) -> str:
        return node_ip(self.index)


def token_from(archive: bytes) -> str:
    """The node token in the initrd corral serves a booting node (gzipped newc cpio)."""
    data, offset = gzip.decompress(archive), 0
    while offset + 110 <= len(data):
        head = data[offset : offset + 110]
        size, name_size = int(head[54:62], 16), int(head[94:102], 16)
        start = (offset + 110 + name_size + 3) & ~3
        name = data[offset + 110 : offset + 110 + name_size - 1].decode()
        if name == "etc/corral/node-token":
            return data[start : start + size].decode().strip()
        offset = (start + size + 3) & ~3
    raise ValueError("no node token in the archive")


async def fetch_tokens(nodes: list[Node], port: int) -> None:
    limit = asyncio.Semaphore(32)

    async def one(node: Node) -> None:
        async with limit:
            conn = Connection(port, node.ip)
            try:
                status, data = await conn.request("GET", f"/boot/token/{node.name}.cpio.gz", "")
            finally:
                conn.close()
            if status != 200:
                raise RuntimeError(f"token of {node.name}: HTTP {status} {data[:200]!r}")
            node.token = token_from(data)

    await asyncio.gather(*(one(node) for node in nodes))


def phase_times(start: float, length: float) -> list[tuple[float, str]]:
    return [(start + share * length, phase) for phase, share in SCHEDULE]


async def run_node(
    node: Node,
    port: int,
    ident: int,
    t0: float,
    start: float,
    length: float,
    interval: float,
    until: float,
) -> None:
    """One node's agent: ``booted``, then progress as its reporter sends it, until its
    install is done or the run ends (``until`` seconds after ``t0``). A node whose
    install started before the run (``start`` < 0) is met mid-install: its first report
    is of the phase it is in."""
    conn = Connection(port, node.ip)
    changes = phase_times(start, length)
    receive_from, receive_to = changes[1][0], changes[2][0]
    path = f"/api/v1/deployments/{ident}/nodes/{node.name}/progress"
    await asyncio.sleep(max(0.0, t0 + start - time.monotonic()))
    try:
        if start >= 0:
            body = json.dumps({"phase": BOOTED, "message": "bench"}).encode()
            events = f"/api/v1/nodes/{node.name}/events"
            status, _ = await conn.request("POST", events, node.token, body)
            if status != 200:
                node.errors.append(f"booted: HTTP {status}")
            phase_i, due = -1, t0 + start
        else:
            phase_i = max(i for i, (at, _) in enumerate(changes) if at <= 0)
            due = t0 + (-start) % interval  # its reporter's timer runs since long: spread
        while True:
            if due > t0 + until:
                return
            upcoming = t0 + changes[phase_i + 1][0] if phase_i + 1 < len(changes) else None
            change = upcoming is not None and upcoming <= due
            if change:
                assert upcoming is not None
                phase_i, due = phase_i + 1, upcoming
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            phase = changes[phase_i][1]
            now = time.monotonic()
            done = min(1.0, max(0.0, (now - t0 - receive_from) / (receive_to - receive_from)))
            got = int(TOTAL * done) if phase == RECEIVING else (TOTAL if done >= 1 else 0)
            report = Sent(phase, got, now, now - due)
            node.sent.append(report)
            body = json.dumps({"phase": phase, "bytes": got, "total": TOTAL}).encode()
            try:
                report.status, _ = await conn.request("POST", path, node.token, body)
            except (OSError, HttpError, TimeoutError, asyncio.IncompleteReadError) as exc:
                node.errors.append(f"{phase}: {type(exc).__name__}: {exc}")
            report.answered = time.monotonic()
            if phase == DONE:
                return
            due = report.answered + interval  # the agent's timer starts after a report
    finally:
        conn.close()


# -- the viewers and the scraper ---------------------------------------------------------


@dataclass
class Viewer:
    """What one stream delivered: (arrival, bytes) as read; parsed afterwards."""

    reads: list[tuple[float, bytes]] = field(default_factory=list)
    error: str = ""

    def messages(self) -> Iterator[tuple[float, str, dict[str, Any]]]:
        """(arrival, event name, data) of every message."""
        pending = b""
        for at, data in self.reads:
            pending += data
            *frames, pending = pending.split(b"\n\n")
            for text in frames:
                name, payload = "message", None
                for line in text.decode().split("\n"):
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        payload = json.loads(line[6:])
                if payload is not None:
                    yield at, name, payload


async def view(viewer: Viewer, port: int, token: str, ready: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection(SERVER, port)
    try:
        writer.write(
            f"GET /api/v1/events/stream HTTP/1.1\r\nHost: {SERVER}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        status, _ = await read_head(reader)
        if status != 200:
            viewer.error = f"HTTP {status}"
            return
        ready.set()
        async for chunk in read_chunks(reader):
            viewer.reads.append((time.monotonic(), chunk))
    except (OSError, HttpError, asyncio.IncompleteReadError) as exc:
        viewer.error = f"{type(exc).__name__}: {exc}"
    finally:
        writer.close()


@dataclass
class Scrapes:
    latencies: list[float] = field(default_factory=list)
    served: bool | None = None  # None: not asked yet
    errors: int = 0


async def scrape(scrapes: Scrapes, port: int, token: str, stop: asyncio.Event) -> None:
    """GET /metrics every second, as Prometheus would."""
    conn = Connection(port)
    try:
        while not stop.is_set():
            asked = time.monotonic()
            try:
                status, _ = await conn.request("GET", "/metrics", token)
            except (OSError, HttpError, TimeoutError, asyncio.IncompleteReadError):
                scrapes.errors += 1
            else:
                if status == 404:
                    scrapes.served = False
                    return
                scrapes.served = True
                if status == 200:
                    scrapes.latencies.append(time.monotonic() - asked)
                else:
                    scrapes.errors += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, asked + 1.0 - time.monotonic()))
    finally:
        conn.close()


# -- one run -----------------------------------------------------------------------------


async def drive(args: argparse.Namespace, port: int, ident: int, token: str, pid: int) -> Any:
    nodes = [Node(i) for i in range(1, args.nodes + 1)]
    await fetch_tokens(nodes, port)
    admin = Connection(port)
    viewers = [Viewer() for _ in range(args.clients)]
    ready = [asyncio.Event() for _ in viewers]
    pairs = zip(viewers, ready, strict=True)
    tasks = [asyncio.create_task(view(v, port, token, r)) for v, r in pairs]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 10)
    first_event = await last_event_id(admin, token)
    stop = asyncio.Event()
    scrapes = Scrapes()
    scraper = asyncio.create_task(scrape(scrapes, port, token, stop)) if args.scrape else None
    interval = report_interval(args.nodes)
    rng = random.Random(args.seed)
    window = max(1.0, args.seconds - interval)
    # the storm (default): every node's whole install within the run; with --install, a
    # node's install lasts that long and the run meets each at a random point of it
    length = max(window, args.install or window)
    profiler = profile(args.profile, pid, args.seconds) if args.profile else None
    load0, cpu0, own0 = os.getloadavg(), proc_cpu(pid), self_cpu()
    t0 = time.monotonic()
    await asyncio.gather(
        *(
            run_node(
                node,
                port,
                ident,
                t0,
                rng.uniform(-(length - window), interval),
                length,
                interval,
                args.seconds,
            )
            for node in nodes
        )
    )
    elapsed = time.monotonic() - t0
    await asyncio.sleep(DRAIN)
    cpu1, own1, load1 = proc_cpu(pid), self_cpu(), os.getloadavg()
    if profiler is not None:
        profiler.wait()
    stop.set()
    if scraper is not None:
        await scraper
    stored = await stored_ids(admin, token, first_event)
    admin.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "nodes": nodes,
        "viewers": viewers,
        "scrapes": scrapes,
        "stored": stored,
        "elapsed": elapsed,
        "interval": interval,
        "server_cpu_s": cpu1 - cpu0,
        "generator_cpu_s": own1 - own0,
        "load": (load0[0], load1[0]),
        "memory": proc_memory(pid),
    }


async def last_event_id(admin: Connection, token: str) -> int:
    return max(await stored_ids(admin, token, 0), default=0)


async def stored_ids(admin: Connection, token: str, after: int) -> set[int]:
    """The ids of the events the server stored past ``after``."""
    ids: set[int] = set()
    while True:
        page = f"/api/v1/events?after={after}&limit=10000"
        status, data = await admin.request("GET", page, token)
        if status != 200:
            raise RuntimeError(f"GET /api/v1/events: HTTP {status}")
        rows = json.loads(data)
        if not rows:
            return ids
        ids.update(int(r["id"]) for r in rows)
        after = max(int(r["id"]) for r in rows)


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def summarize(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    nodes: list[Node] = result["nodes"]
    viewers: list[Viewer] = result["viewers"]
    sent = [r for node in nodes for r in node.sent]
    accepted = {node.name: [r for r in node.sent if 200 <= r.status < 300] for node in nodes}
    n_accepted = sum(map(len, accepted.values()))
    latencies: list[float] = []
    lost = unmatched = 0
    events_lost = 0
    for viewer in viewers:
        seen: dict[str, list[tuple[float, str, int]]] = {}
        ids: set[int] = set()
        for at, name, data in viewer.messages():
            if name == "progress" and data.get("node") in accepted:
                seen.setdefault(data["node"], []).append((at, data["phase"], data["bytes"]))
            elif name == "event" and data.get("id") is not None:
                ids.add(int(data["id"]))
        events_lost += len(result["stored"] - ids)
        for node, reports in accepted.items():
            # in order: a node sends one report at a time, published before its answer
            got, j = seen.get(node, []), 0
            for report in reports:
                while j < len(got) and (got[j][1], got[j][2]) != (report.phase, report.bytes):
                    j += 1
                    unmatched += 1
                if j == len(got):
                    lost += 1
                    continue
                latencies.append(got[j][0] - report.at)
                j += 1
    requests = [r.answered - r.at for r in sent if r.status]
    errors = [e for node in nodes for e in node.errors]
    errors += [f"HTTP {r.status}" for r in sent if r.status and not 200 <= r.status < 300]
    scrapes: Scrapes = result["scrapes"]
    elapsed = result["elapsed"]
    late = [r.late for r in sent]

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 1)

    return {
        "nodes": args.nodes,
        "seconds": args.seconds,
        "install": args.install or None,
        "clients": args.clients,
        "interval_s": result["interval"],
        "elapsed_s": round(elapsed, 1),
        "reports_sent": len(sent),
        "reports_accepted": n_accepted,
        "reports_per_s": round(len(sent) / elapsed, 1),
        "request_errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "deliveries_expected": n_accepted * len(viewers),
        "progress_lost": lost,
        "events_stored": len(result["stored"]),
        "events_lost": events_lost,
        "lost": lost + events_lost,
        "unexpected": unmatched,
        "viewer_errors": [v.error for v in viewers if v.error],
        "latency_p50_ms": ms(percentile(latencies, 0.5)),
        "latency_p99_ms": ms(percentile(latencies, 0.99)),
        "latency_max_ms": ms(max(latencies, default=None)),
        "request_p50_ms": ms(percentile(requests, 0.5)),
        "request_p99_ms": ms(percentile(requests, 0.99)),
        "server_cpu_pct": round(100 * result["server_cpu_s"] / elapsed, 1),
        "server_rss_mib": round(result["memory"]["rss_mib"], 1),
        "server_peak_rss_mib": round(result["memory"]["peak_rss_mib"], 1),
        "generator_cpu_pct": round(100 * result["generator_cpu_s"] / elapsed, 1),
        "generator_late_p99_ms": ms(percentile(late, 0.99)),
        "metrics": (
            "not asked"
            if not args.scrape
            else {None: "no answer", False: "not served", True: "served"}[scrapes.served]
        ),
        "scrapes": len(scrapes.latencies),
        "scrape_errors": scrapes.errors,
        "scrape_p50_ms": ms(percentile(scrapes.latencies, 0.5)),
        "scrape_p99_ms": ms(percentile(scrapes.latencies, 0.99)),
        "load_before": round(result["load"][0], 2),
        "load_after": round(result["load"][1], 2),
        "cores": os.cpu_count(),
        "commit": commit(),
    }


def commit() -> str:
    def git(*argv: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(REPO), *argv], capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    dirty = git("status", "--porcelain", "--", "src", "bench")
    return (git("rev-parse", "--short", "HEAD") or "unknown") + ("+dirty" if dirty else "")


def table(summary: dict[str, Any]) -> str:
    s = summary
    p99 = s["latency_p99_ms"]
    verdict = "ok" if p99 is not None and p99 <= TARGET_P99 * 1000 else "MISSED"
    rows = [
        ("nodes x seconds, viewers", f"{s['nodes']} x {s['seconds']} s, {s['clients']}"),
        ("install length", f"{s['install']:.0f} s" if s["install"] else "the run (a storm)"),
        ("report interval", f"{s['interval_s']:.1f} s"),
        ("reports sent / accepted", f"{s['reports_sent']} / {s['reports_accepted']}"),
        ("reports per second", f"{s['reports_per_s']}"),
        ("request errors", f"{s['request_errors']}"),
        ("request p50 / p99", f"{s['request_p50_ms']} / {s['request_p99_ms']} ms"),
        ("events lost (progress + stored)", f"{s['progress_lost']} + {s['events_lost']}"),
        ("stored events during the run", f"{s['events_stored']}"),
        ("report -> stream p50", f"{s['latency_p50_ms']} ms"),
        ("report -> stream p99 (<= 250 ms)", f"{p99} ms ({verdict})"),
        ("report -> stream max", f"{s['latency_max_ms']} ms"),
        ("corral serve CPU (one core)", f"{s['server_cpu_pct']} %"),
        ("corral serve RSS / peak", f"{s['server_rss_mib']} / {s['server_peak_rss_mib']} MiB"),
        ("generator CPU (one core)", f"{s['generator_cpu_pct']} %"),
        ("reports late p99 (backlog)", f"{s['generator_late_p99_ms']} ms"),
        ("metrics", f"{s['metrics']}"),
        ("scrape p50 / p99", f"{s['scrape_p50_ms']} / {s['scrape_p99_ms']} ms"),
        ("load average before / after", f"{s['load_before']} / {s['load_after']}"),
        ("commit", s["commit"]),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def wait_until_started(port: int, proc: subprocess.Popen[bytes], ident: int) -> None:
    """Until corral serve answers and its manager has taken every node in (a report
    before that would race the manager's first pass)."""
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"corral serve exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError("corral serve did not start the deployment within 120 s")
        try:
            with socket.create_connection((SERVER, port), timeout=1):
                pass
        except OSError:
            time.sleep(0.2)
            continue
        with db.session() as s:
            rows = s.query(m.DeploymentNode).filter_by(deployment_id=ident, powered=None)
            if rows.count() == 0:
                return
        time.sleep(0.2)


def run_once(args: argparse.Namespace) -> dict[str, Any]:
    home = args.home
    use_home(home)
    ident, token = prepare(home, args.nodes)
    port = free_port()
    proc = start_server(home, port)
    try:
        wait_until_started(port, proc, ident)
        result = asyncio.run(drive(args, port, ident, token, proc.pid))
    finally:
        stop_process(proc, 20)
        db.close()
    return summarize(result, args)


def main() -> int:
    unwind_on_sigterm()  # kill stops the server it started too
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument(
        "--install",
        type=float,
        default=0.0,
        help="seconds a node's whole install lasts (phases in SCHEDULE's shares); the run "
        "meets each node at a random point of it [default: the run's length: every node "
        "goes through every phase within the run, a storm of phase changes]",
    )
    parser.add_argument("--clients", type=int, default=10, help="SSE viewers")
    parser.add_argument(
        "--scrape",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="GET /metrics every second",
    )
    parser.add_argument("--seed", type=int, default=1, help="of the nodes' start jitter")
    parser.add_argument("--home", type=Path, default=HOME, help="wiped first")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument(
        "--profile", type=Path, help="sample corral serve with py-spy over the run, into here"
    )
    args = parser.parse_args()
    if args.nodes > 60000:
        parser.error("at most 60,000 nodes (their addresses are in 10.77.0.0/16)")
    own_network()
    summary = run_once(args)
    print(table(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if summary["lost"] == 0 and not summary["viewer_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
