"""The ``bittorrent`` receiver itself (:class:`BitTorrentReceiver`); see
:mod:`corral.agent.receivers.bittorrent`."""

from __future__ import annotations

import base64
import importlib
import logging
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

from corral.agent.errors import ReceiveError
from corral.agent.plan import Plan
from corral.agent.receivers.base import Job, Received, StreamReceiver
from corral.agent.receivers.bittorrent.feed import Feeder, FeedStats, Latecomers, linger
from corral.agent.receivers.bittorrent.libtorrent_swarm import (
    LANE_PORT,
    PEER_PORT,
    LaneSwarm,
    LibtorrentSwarm,
    local_address,
)
from corral.agent.receivers.bittorrent.swarm import PieceMap, pieces, stripe
from corral.agent.receivers.http import HttpReceiver
from corral.agent.receivers.stream import VerifiedStream

log = logging.getLogger("corral.agent")

#: The scratch directory, under the target's mount point.
SCRATCH = ".corral-bittorrent"
#: Room left over on the target beyond the tree and the stream (filesystem metadata, the
#: identity files, the bootloader).
SPACE_MARGIN = 64 << 20
#: A node brings its lane into its rack in a session of its own (:class:`LaneSwarm`),
#: trading with its rack meanwhile, when the lane is at least this share of the pieces: in
#: racks of up to about ten nodes, where the import is a large part of the work (behind a
#: 4:1 uplink, a rack of 5 takes as long to bring in the image as a node to take it from
#: its rack). On the testbed at N = 100, in 20 racks of 5 (lanes of 22-23 pieces of 120)
#: T fell from 2.43 to 1.87 x S/B. In racks of 25 (lanes of 3-4 pieces) the import takes
#: 15-25 s alone, and beside the rack's trade the partners' links, busy with their own
#: racks, brought the lanes in at half the pace: a tenth of them were given up, their
#: pieces came from the seed, and the busiest uplink carried 1.27-1.51 x S into its rack
#: (1.18-1.21 with the import first).
LANE_SESSION_SHARE = 0.1


def _endpoint(text: str) -> tuple[str, int] | None:
    """``host:port`` as (IPv4 address, port); None if empty or unresolvable."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        return socket.gethostbyname(host), int(port)
    except OSError:
        log.warning("cannot resolve the seed's address %s: using it like any peer", host)
        return None


def _place(value: Any) -> tuple[int, int] | None:
    """This node's place in the session's stripes, ``(index, count)``, from the plan's
    ``[index, count]``; None if it has none (a lone node takes everything from the seed)."""
    try:
        index, count = (int(v) for v in value)
    except (TypeError, ValueError):
        return None
    if count < 2 or not 0 <= index < count:
        return None
    return index, count


def _rack(params: dict[str, Any], address: str) -> list[str] | None:
    """The addresses of this node's rack, from the plan; None if it is in none, or if
    the plan does not know its own address (a node on DHCP): the node would keep itself
    to a rack it cannot name, and trade with nobody."""
    peers = params.get("rack_peers")
    if not params.get("rack") or not isinstance(peers, list):
        return None
    rack = [str(a) for a in peers]
    return rack if address in rack else None


def _turn(value: Any) -> int:
    """The racks' turn in the session's stripes (``stripe_turn``: see
    :func:`~corral.agent.receivers.bittorrent.swarm.spare_stripes`); 0 without racks, or
    from a server that does not say."""
    return value if isinstance(value, int) and value > 0 else 0


def _lane(
    params: dict[str, Any], num_pieces: int, place: tuple[int, int] | None, turn: int = 0
) -> list[int]:
    """The pieces this node brings into its rack (the stripes of its lane, from the plan;
    see :class:`~corral.agent.receivers.bittorrent.seed.SeedUse`)."""
    lane = params.get("lane")
    if place is None or not isinstance(lane, list):
        return []
    count = place[1]
    stripes = {int(g) for g in lane if isinstance(g, int) and 0 <= g < count}
    return sorted(p for g in stripes for p in stripe(num_pieces, g, count, turn))


def _lane_room(params: dict[str, Any], stream_size: int) -> int:
    """Bytes the lane's own scratch copy may take (see :class:`LaneSwarm`): the stripes of
    the lane and the node's own, a share of the stream, in sparse files."""
    place, lane = _place(params.get("stripe")), params.get("lane")
    if place is None or not isinstance(lane, list) or not lane:
        return 0
    return stream_size * (len(lane) + 1) // place[1]


def _lane_apart(lane: Sequence[int], num_pieces: int, partners: Sequence[str]) -> bool:
    """Whether the node brings its lane in a session of its own (see
    :data:`LANE_SESSION_SHARE`)."""
    return bool(partners) and len(lane) >= LANE_SESSION_SHARE * num_pieces


def _import_libtorrent() -> ModuleType | None:
    try:
        return importlib.import_module("libtorrent")
    except ImportError as exc:
        log.warning("libtorrent is not available (%s)", exc)
        return None


class BitTorrentReceiver(StreamReceiver):
    """The stream's chunks from the swarm, checked and unpacked in order."""

    name = "bittorrent"

    #: the port to listen on (0: any, for tests that run several agents on one address)
    port: ClassVar[int] = PEER_PORT
    #: the port of the lane's session, the node's and its partners' (see :class:`LaneSwarm`)
    lane_port: ClassVar[int] = LANE_PORT
    #: the address to use ("": the one the node reaches corral's server from)
    address: ClassVar[str] = ""
    #: the engine, replaced by the tests
    engine: Callable[[], ModuleType | None] = staticmethod(_import_libtorrent)

    def receive(self, job: Job) -> Received:
        why = self._no_swarm(job.plan, job.target)
        lt = None if why else self.engine()
        if why or lt is None:
            log.warning("transport bittorrent: %s; receiving over HTTP", why or "no libtorrent")
            http = HttpReceiver(self.context)
            return http.receive(job)
        refetched = len(self.refetched)
        client = self.context.client
        address = self.address or (local_address(client.host, client.port) if client else "")
        params = job.plan.transport.params
        seed = _endpoint(str(params.get("seed", "")))
        scratch = job.target / SCRATCH
        shutil.rmtree(scratch, ignore_errors=True)  # a previous attempt's
        scratch.mkdir(mode=0o700)
        torrent = base64.b64decode(str(params["torrent"]))
        started = time.monotonic()
        swarm: LibtorrentSwarm | None = None
        lane_swarm: LaneSwarm | None = None
        latecomers: Latecomers | None = None
        try:
            swarm = live = self.make_swarm(lt, torrent, scratch, address or "0.0.0.0", seed)
            layout = self._layout(job.plan, swarm)
            place = _place(params.get("stripe")) if seed else None
            turn = _turn(params.get("stripe_turn"))
            mine = None if place is None else stripe(layout.num_pieces, *place, turn)
            rack = _rack(params, address)
            lane = _lane(params, layout.num_pieces, place, turn) if rack is not None else []
            partners = [str(a) for a in params.get("lane_peers") or []]
            if _lane_apart(lane, layout.num_pieces, partners):
                lane_swarm = LaneSwarm(
                    lt, torrent, scratch / "lane", address, partners, seed, self.lane_port
                )
            log.info(
                "bittorrent: %d pieces of %d KiB on %s:%d, tracker %s, seed %s, my stripe %s%s",
                layout.num_pieces,
                layout.piece_size >> 10,
                address,
                swarm.listen_port(),
                params.get("tracker", "?"),
                params.get("seed", "?"),
                "none" if mine is None else pieces(len(mine)),
                f", rack {params['rack']}" if params.get("rack") else "",
            )
            if lane_swarm is not None:
                log.info(
                    "bittorrent: my lane's session on %s:%d, %d partners elsewhere",
                    address,
                    lane_swarm.listen_port(),
                    len(partners),
                )

            latecomers = Latecomers(
                str(params.get("tracker", "")),
                str(params.get("info_hash", "")),
                stripes=None if place is None else (layout.num_pieces, place[1]),
                turn=turn,
            ).start()

            def fetch(index: int, partial: Callable[[int], None]) -> bytes:
                if client is None:
                    raise ReceiveError("transport bittorrent: no server to fetch chunks from")
                return self.fetch_chunk(client, job.plan, index, partial, job.cancel)

            feeds: list[FeedStats] = []

            def fill(stream: VerifiedStream) -> None:
                feeder = Feeder(
                    stream,
                    live,
                    layout,
                    fetch,
                    job.progress,
                    job.cancel,
                    mine=mine,
                    rack=rack,
                    lane=lane,
                    partners=partners,
                    late=latecomers.pieces,
                    lane_swarm=lane_swarm,
                )
                latecomers.striping = feeder.seed.striping
                feeds.append(feeder.run())

            self.unpack(job, fill)
            stats = feeds[0]
            elapsed = time.monotonic() - started
            swarm.reannounce()  # done: no bytes left
            stayed = linger(
                swarm,
                job.cancel,
                own_rate=job.plan.image.stream_size / max(elapsed, 0.1),
                age=elapsed,
                pending=latecomers.pending,
                unfinished=latecomers.unfinished,
                joined_lately=latecomers.joined_lately,
            )
            if lane_swarm is not None:
                log.info(
                    "bittorrent: my lane's session took %.1f MiB from my partners and the "
                    "seed and gave them %.1f MiB; my rack's took %.1f MiB and gave %.1f MiB",
                    lane_swarm.received() / 2**20,
                    lane_swarm.sent() / 2**20,
                    swarm.received() / 2**20,
                    swarm.sent() / 2**20,
                )
        finally:
            if latecomers is not None:
                latecomers.close()
            try:
                for session in (lane_swarm, swarm):
                    if session is not None:
                        session.close()
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        log.info(
            "received %s by bittorrent: %d chunks from the swarm, %d over HTTP "
            "(%d mismatched), %d rescues by the seed, in %.1f s, then seeded %.1f s more",
            job.plan.image.ref,
            stats.from_swarm,
            stats.from_http,
            stats.mismatched,
            stats.rescues,
            elapsed,
            stayed,
        )
        return Received(
            stats.bytes,
            {
                "chunks": len(job.plan.image.chunks),
                "swarm": stats.from_swarm,
                "http": stats.from_http,
                "mismatched": stats.mismatched,
                "rescues": stats.rescues,
                "refetched": len(self.refetched) - refetched,
            },
        )

    def make_swarm(
        self,
        lt: ModuleType,
        torrent: bytes,
        scratch: Path,
        address: str,
        seed: tuple[str, int] | None,
    ) -> LibtorrentSwarm:
        """The node's swarm for ``torrent``, downloading into ``scratch`` (the tests
        replace it, as :meth:`make_unpacker`)."""
        return LibtorrentSwarm(lt, torrent, scratch, address, self.port, seed)

    @staticmethod
    def _no_swarm(plan: Plan, target_dir: Path) -> str:
        """Why this node cannot join the swarm ("" if it can)."""
        if not plan.transport.params.get("torrent"):
            return "the plan has no torrent (the session had not started on the server)"
        stream = plan.image.stream_size
        lane = _lane_room(plan.transport.params, stream)
        need = plan.image.tree_bytes + stream + lane + SPACE_MARGIN
        free = shutil.disk_usage(target_dir).free
        if free < need:
            return (
                f"the target has {free >> 20} MiB free, the tree and a scratch copy of the "
                f"stream{' (and of its lane)' if lane else ''} need {need >> 20} MiB"
            )
        return ""

    @staticmethod
    def _layout(plan: Plan, swarm: LibtorrentSwarm) -> PieceMap:
        layout = PieceMap(swarm.piece_size, tuple(c.size for c in plan.image.chunks))
        if swarm.num_files != len(plan.image.chunks) or layout.total != plan.image.stream_size:
            raise ReceiveError(
                f"transport bittorrent: the torrent has {swarm.num_files} files, the plan's "
                f"image {plan.image.ref} {len(plan.image.chunks)} chunks"
            )
        return layout
