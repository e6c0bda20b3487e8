"""The agent's libtorrent session (:class:`LibtorrentSwarm`, a :class:`Swarm`) and its
settings. libtorrent itself is passed in: the caller imports it lazily."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from corral.agent.errors import ReceiveError
from corral.agent.wire.lan_swarm import lan_settings, limit_local_peers

log = logging.getLogger("corral.agent")

#: The port the agent's libtorrent listens on, on the node's own address. A fixed,
#: well-known one so that a site's firewall can let the swarm through.
PEER_PORT = 6881
#: The port of a node's second session, for its lane (:class:`LaneSwarm`): the next one.
LANE_PORT = PEER_PORT + 1
#: Peers a node uploads to at once (libtorrent's own default). Unlimited, as the seed is,
#: each of 100 nodes sent to 80 peers and took from 80: so many TCP flows through each
#: link's queue that all of them lost packets and waited out retransmission timeouts,
#: and a node's own HTTP fetches and progress reports, sharing its download link with
#: them, timed out (17 of 100 nodes failed at N = 100 on the testbed). The seed stays
#: unlimited: the stripes, not choking, bound what it sends.
UPLOAD_SLOTS = 8
#: Of those, the slots that go round every peer that wants pieces, in turn, whatever it
#: sends back (optimistic unchokes). libtorrent gives the other slots to the peers that
#: sent this node the most (tit for tat), and by default only one in five goes round.
#: Among deployment members there is no one to punish, and tit for tat only made some
#: nodes richer than others: at N = 50 on the testbed, their download links ran at
#: 1.2-2.0 Mbit/s of 2, and the last node had the image 54 s after the first (the
#: deployment waits for the last). With half the slots in turn, 30-32 s.
OPTIMISTIC_SLOTS = UPLOAD_SLOTS // 2
#: Seconds an optimistic unchoke lasts (libtorrent's default: 30).
OPTIMISTIC_TURN = 10
#: How long a new torrent may take to check its (empty) save path before pieces are added.
CHECK_WAIT = 5.0
#: A peer's pace (:meth:`LibtorrentSwarm.peers_in_need`) is its pieces since this node
#: first saw it (or over ``known_for``, when nobody joined lately), judged once it has had
#: the time for this many at the rate asked of it.
#: libtorrent's own estimate (``remote_dl_rate``) is updated once a minute and reads 0
#: for a connection's first minute, and for a peer that took less than a piece in it:
#: beside a node at a tenth of B, a sixth of the 99 others stayed their whole 60 s to
#: seed it, and the deployment waited for them.
PACE_PIECES = 2
#: Seconds between two looks at the peers during the download, so that a node that is
#: done already knows since when, and with how many pieces, it has seen each of them.
PACE_EVERY = 2.0


def session_settings(lt: Any, address: str, port: int = PEER_PORT) -> dict[str, Any]:
    """The agent's libtorrent settings: :func:`lan_settings` and what a node adds."""
    return {
        **lan_settings(lt, address, port),
        # the node's own address only: a deploy ramdisk may have several NICs up
        "outgoing_interfaces": address if address != "0.0.0.0" else "",
        "user_agent": "corral-agent",
        # the seed is kept away with the IP filter (see SeedUse); the tracker on the same
        # host must stay reachable
        "apply_ip_filter_to_trackers": False,
        # a node that has its stripe and wants nothing else yet is "finished" for a moment,
        # and libtorrent would drop its connections to seeds and to other finished nodes;
        # its peers would reconnect seconds later. Nodes leave the swarm on their own.
        "close_redundant_connections": False,
        # send_redundant_have stays on (libtorrent's default): off, the testbed's host
        # spent less CPU on one switch, but in 20 racks of 5 every run carried 1.22 x S
        # or more into a rack (docs/benchmarks.md, "BitTorrent without redundant haves").
        "connections_limit": 200,
        "unchoke_slots_limit": UPLOAD_SLOTS,
        # Half the slots go round the peers that want pieces, each for OPTIMISTIC_TURN
        # seconds; see OPTIMISTIC_SLOTS.
        "num_optimistic_unchoke_slots": OPTIMISTIC_SLOTS,
        "optimistic_unchoke_interval": OPTIMISTIC_TURN,
        # the backlog of a listening socket (libtorrent's default: 5) overflows when a
        # wave of nodes connects to every peer at once
        "listen_queue_size": 200,
        # corral serve answers announces from a thread beside a hundred nodes' reports:
        # give it time rather than retry later (a failed announce waits 10 s or more)
        "tracker_completion_timeout": 30,
        "tracker_receive_timeout": 15,
        # a node runs its installer beside libtorrent on a small machine: few threads
        "aio_threads": 2,
        "hashing_threads": 1,
        "alert_mask": int(
            lt.alert.category_t.error_notification
            | lt.alert.category_t.status_notification
            | lt.alert.category_t.storage_notification
            | lt.alert.category_t.tracker_notification
        ),
    }


class LibtorrentSwarm:
    """A libtorrent session with the one torrent, downloading into ``save_path``."""

    def __init__(
        self,
        lt: ModuleType,
        torrent: bytes,
        save_path: Path,
        address: str,
        port: int = PEER_PORT,
        seed: tuple[str, int] | None = None,
        *,
        kept_to: Collection[str] | None = None,
        announce: bool = True,
    ) -> None:
        self.lt = lt
        self.seed = seed
        self.address = address
        try:
            info = lt.torrent_info(lt.bdecode(torrent))
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ReceiveError(
                f"transport bittorrent: the plan's torrent is unreadable: {exc}"
            ) from None
        self.piece_size = int(info.piece_length())
        self.num_files = int(info.num_files())
        self.session = lt.session(session_settings(lt, address, port), 0)  # no plugins
        limit_local_peers(self.session)  # UPLOAD_SLOTS holds on a LAN too
        # The seed is kept away until the node says otherwise (use_seed): the torrent
        # announces as it is added and connects to the peers the tracker names, the seed
        # among them, and on a fast link pieces came from the seed before the node could
        # block it (on loopback the whole image did).
        self._seed_on = False
        self._kept_to = None if kept_to is None else frozenset(kept_to)
        self._filter()
        params = lt.add_torrent_params()
        params.ti = info
        params.save_path = str(save_path)
        flags = lt.torrent_flags
        params.flags = (
            params.flags & ~flags.auto_managed & ~flags.paused
        ) | (flags.disable_dht | flags.disable_lsd | flags.disable_pex)  # fmt: skip
        if not announce:
            # added paused, so that nothing is announced or asked for before the trackers
            # are gone and no piece is wanted
            params.flags |= flags.paused
        self.handle = self.session.add_torrent(params)
        if not announce:
            self.handle.replace_trackers([])
            self.handle.prioritize_pieces([0] * int(info.num_pieces()))
            self.handle.resume()
        self._reads: dict[int, bytes] = {}
        self._subset = False  # wants only some pieces (see want)
        self._warned: set[str] = set()
        self._heard = False
        self._described = 0.0
        #: each peer (address, peer id) when this node first saw it, and its pieces then
        self._first_seen: dict[tuple[str, str], tuple[float, int]] = {}
        self._paced = 0.0
        self._checked(CHECK_WAIT)

    def _checked(self, timeout: float) -> None:
        """Wait, at most ``timeout`` s, for libtorrent to check the (empty) save path:
        until then it drops ``add_piece`` without a word (seen with 2.0.8 and 2.1.1), and
        the node could not share what it took over HTTP."""
        states = self.lt.torrent_status.states
        checking = (states.checking_files, states.checking_resume_data)
        deadline = time.monotonic() + timeout
        while self.handle.status(0).state in checking and time.monotonic() < deadline:
            time.sleep(0.02)

    def listen_port(self) -> int:
        return int(self.session.listen_port())

    def pieces(self) -> Sequence[bool]:
        return list(self.handle.status(self.lt.status_flags_t.query_pieces).pieces)

    def downloaded(self) -> int:
        return int(self.handle.status(0).total_wanted_done)

    def received(self) -> int:
        return int(self.handle.status(0).total_payload_download)

    def sent(self) -> int:
        """Payload bytes given to peers so far."""
        return int(self.handle.status(0).total_payload_upload)

    def read(self, pieces: Sequence[int], timeout: float) -> dict[int, bytes]:
        wanted = set(pieces)
        for piece in wanted - set(self._reads):
            self.handle.read_piece(piece)
        deadline = time.monotonic() + timeout
        while not wanted <= set(self._reads) and time.monotonic() < deadline:
            self.wait(min(0.5, max(0.0, deadline - time.monotonic())))
        out = {p: self._reads.pop(p) for p in wanted if p in self._reads}
        self._reads.clear()  # late answers of an earlier chunk are of no use
        return out

    def add(self, pieces: Mapping[int, bytes]) -> None:
        for piece, data in pieces.items():
            self.handle.add_piece(piece, data, 0)

    def prioritize(self, urgent: Sequence[int]) -> None:
        self.handle.prioritize_pieces([(p, 7) for p in urgent])

    def want(self, pieces: Sequence[int] | None) -> None:
        count = len(self.pieces())
        if pieces is None:
            self.handle.prioritize_pieces([4] * count)
            if self._subset:
                # The tracker last heard "0 bytes left" if the node had the few pieces it
                # wanted (its stripe, a rescue's pieces).
                self.reannounce()
            self._subset = False
        else:
            self._subset = True
            wanted = set(pieces)
            self.handle.prioritize_pieces([4 if p in wanted else 0 for p in range(count)])

    def reannounce(self) -> None:
        """Tell the tracker how many bytes this node has left, now, even within the
        tracker's "min interval" of the last announce. The nodes that are done linger only
        while the tracker counts members with pieces left (``feed.linger``); libtorrent
        itself says "completed" once, the first time the node has what it wants (often its
        stripe alone), and the rest only every announce interval."""
        self.handle.force_reannounce(0, -1, self.lt.reannounce_flags_t.ignore_min_interval)

    def use_seed(self, on: bool) -> None:
        if self.seed is None:
            return
        self._seed_on = on
        self._filter()  # disconnects the seed at once
        if on:
            self.handle.connect_peer(self.seed)

    def keep_to(self, addresses: Collection[str] | None) -> None:
        self._kept_to = None if addresses is None else frozenset(addresses)
        self._filter()

    def _filter(self) -> None:
        """libtorrent's IP filter from :meth:`use_seed` and :meth:`keep_to`; it applies to
        the connections already open too."""
        blocked, allowed = 1, 0
        rules = self.lt.ip_filter()
        seed = self.seed[0] if self.seed else None
        if self._kept_to is not None:
            rules.add_rule("0.0.0.0", "255.255.255.255", blocked)
            for address in self._kept_to:
                rules.add_rule(address, address, allowed)
        if seed is not None:
            rules.add_rule(seed, seed, allowed if self._seed_on else blocked)
        self.session.set_ip_filter(rules)

    def lacking(self, pieces: Collection[int]) -> set[str]:
        wanted = list(pieces)
        out = set()
        for peer in self.handle.get_peer_info():
            held = peer.pieces
            if held and any(p < len(held) and not held[p] for p in wanted):
                out.add(str(peer.ip[0]))
        return out

    def availability(self) -> Sequence[int]:
        return list(self.handle.piece_availability())

    def heard(self) -> bool:
        return self._heard

    def connected(self) -> int:
        return len(self.addresses())

    def addresses(self) -> set[str]:
        flags = self.lt.peer_info
        pending = flags.connecting | flags.handshake
        seed = self.seed[0] if self.seed else ""
        return {
            str(peer.ip[0])
            for peer in self.handle.get_peer_info()
            if not peer.flags & pending and str(peer.ip[0]) != seed
        }

    def meet(self, dial: bool = True) -> None:
        """Nothing: the tracker names the peers (see :class:`LaneSwarm`)."""

    def present(self) -> tuple[int, int]:
        flags = self.lt.peer_info
        peers = self.handle.get_peer_info()
        log.debug(
            "bittorrent: %d peers: %d seeds, %d connecting, %d in handshake",
            len(peers),
            sum(1 for p in peers if p.flags & flags.seed),
            sum(1 for p in peers if p.flags & flags.connecting),
            sum(1 for p in peers if p.flags & flags.handshake),
        )
        others = {
            str(peer.ip[0])
            for peer in peers
            if not peer.flags & (flags.seed | flags.connecting | flags.handshake)
        }
        everyone = sorted(others | {self.address}, key=_address_key)
        return everyone.index(self.address), len(everyone)

    def peers_in_need(self, min_rate: float, known_for: float = 0.0) -> int:
        flags = self.lt.peer_info
        peers = self.handle.get_peer_info()
        now = self._look_at(peers)
        # a peer at min_rate takes PACE_PIECES pieces in this time
        judged_after = PACE_PIECES * self.piece_size / min_rate if min_rate > 0 else float("inf")
        in_need: list[str] = []
        for peer in peers:
            if not peer.flags & flags.remote_interested or peer.flags & flags.seed:
                continue
            if known_for > 0:
                since, had = now - known_for, 0
            else:
                since, had = self._first_seen.get(_peer_key(peer), (now, 0))
            took, gained = now - since, peer.num_pieces - had
            if took < judged_after or gained * self.piece_size >= min_rate * took:
                in_need.append(f"{peer.ip[0]} ({gained} pieces in {took:.0f} s)")
        if now - self._described >= 10:
            self._described = now
            log.debug(
                "bittorrent: seeding to %d peers (%d incoming, %d connecting, %d seeds); "
                "in need: %s",
                len(peers),
                sum(1 for p in peers if not p.flags & flags.local_connection),
                sum(1 for p in peers if p.flags & flags.connecting),
                sum(1 for p in peers if p.flags & flags.seed),
                ", ".join(in_need) or "none",
            )
        return len(in_need)

    def _look_at(self, peers: Sequence[Any]) -> float:
        """Note when each of ``peers`` is first seen, with its pieces then; the time now."""
        now = time.monotonic()
        self._paced = now
        flags = self.lt.peer_info
        for peer in peers:
            if not peer.flags & (flags.connecting | flags.handshake):
                self._first_seen.setdefault(_peer_key(peer), (now, int(peer.num_pieces)))
        return now

    def wait(self, seconds: float) -> None:
        if time.monotonic() - self._paced >= PACE_EVERY:
            self._look_at(self.handle.get_peer_info())
        if self.session.wait_for_alert(int(seconds * 1000)) is None:
            return
        for alert in self.session.pop_alerts():
            self._alert(alert)

    def _alert(self, alert: Any) -> None:
        lt = self.lt
        if isinstance(alert, lt.tracker_reply_alert):
            if not self._heard:
                log.info("bittorrent: the tracker names %d peers", alert.num_peers)
            self._heard = True
        elif isinstance(alert, lt.read_piece_alert):
            if alert.error.value():
                log.warning("libtorrent could not read piece %d: %s", alert.piece, alert.message())
            else:
                self._reads[int(alert.piece)] = bytes(alert.buffer)
        elif isinstance(alert, lt.tracker_error_alert | lt.listen_failed_alert) or (
            alert.category() & lt.alert.category_t.error_notification
        ):
            self._once(type(alert).__name__, alert.message())

    def _once(self, kind: str, message: str) -> None:
        """Log a kind of trouble once (a tracker down is retried every few seconds)."""
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("libtorrent: %s", message)

    def close(self) -> None:
        """Leave the swarm (telling the tracker) and drop the downloaded files."""
        try:
            self.session.remove_torrent(self.handle, self.lt.session.delete_files)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                alert = self.session.wait_for_alert(200)
                done = alert is not None and any(
                    isinstance(
                        a, self.lt.torrent_deleted_alert | self.lt.torrent_delete_failed_alert
                    )
                    for a in self.session.pop_alerts()
                )
                if done:
                    break
        finally:
            del self.handle
            del self.session  # joins libtorrent's threads (the tracker gets 1 s)


class LaneSwarm(LibtorrentSwarm):
    """A node's second session, for its lane alone (see
    :class:`~corral.agent.receivers.bittorrent.seed.SeedUse`): the same torrent, in a
    scratch copy of its own, reachable on :data:`LANE_PORT` by the node's lane partners
    only (and corral's seed, for the lane's rescues; libtorrent's IP filter). It never
    announces: the node connects to its partners itself (:meth:`meet`), and they to it.

    One session cannot take the lane from the partners while the node trades with its
    rack: libtorrent takes any piece from any peer that has it, so rack pieces came across
    the uplink from partners too. Here the lane's session wants the lane only, and the
    rack's session (the node's first, on :data:`PEER_PORT`) is kept to the rack."""

    #: Partners the node uploads to at once, half of them in turn (the node's session
    #: serves 8). Every flow of the lane crosses two racks' uplinks, oversubscribed: in 20
    #: racks of 5 on the testbed, with 8 each, about 32 flows left a rack at once through
    #: its 2.5 Mbit/s uplink, which dropped 4.6 % of their packets, and they held a share
    #: of each node's link the rack's trade lacked. With 4, T was 1.81 x S/B at the median
    #: of six runs against 1.855 with 8 (1.85 and 1.88 at the worst), and the seed sent
    #: 0.2-0.4 x S more, for lane pieces still on their way; with 2, the lanes waited on
    #: each other at their start, and the seed sent their pieces instead (3.1 x S).
    UPLOAD_SLOTS = 4

    #: Seconds between two attempts to connect to the partners not connected yet (they
    #: start at their own time; libtorrent itself waits a minute before it tries a peer
    #: that refused it again).
    MEET_EVERY = 2.0

    def __init__(
        self,
        lt: ModuleType,
        torrent: bytes,
        save_path: Path,
        address: str,
        partners: Collection[str],
        seed: tuple[str, int] | None = None,
        port: int = LANE_PORT,
    ) -> None:
        self.partners = sorted(set(partners))
        self.partner_port = port
        self._met = -1e9
        super().__init__(
            lt, torrent, save_path, address, port, seed, kept_to=self.partners, announce=False
        )
        self.session.apply_settings(
            {
                "unchoke_slots_limit": self.UPLOAD_SLOTS,
                "num_optimistic_unchoke_slots": max(1, self.UPLOAD_SLOTS // 2),
            }
        )
        self.meet()

    def meet(self, dial: bool = True) -> None:
        """Connect to the partners not connected yet (every :attr:`MEET_EVERY` seconds at
        most; not if not ``dial``: the node's lane is in, and the partners that lack its
        pieces come to it), and take the alerts nobody waits for (the rack's session waits,
        not this)."""
        if time.monotonic() - self._met < self.MEET_EVERY:
            return
        self._met = time.monotonic()
        for alert in self.session.pop_alerts():
            self._alert(alert)
        if not dial:
            return
        connected = {str(peer.ip[0]) for peer in self.handle.get_peer_info()}
        for partner in self.partners:
            if partner not in connected:
                self.handle.connect_peer((partner, self.partner_port))


def local_address(host: str, port: int) -> str:
    """The address this machine reaches ``host`` from: the node's own on its boot NIC.

    A UDP "connection" sends nothing; it only asks the kernel for the route.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, port))
            return str(probe.getsockname()[0])
        except OSError:
            return "0.0.0.0"


def _peer_key(peer: Any) -> tuple[str, str]:
    """A peer, across its reconnections: its address and its peer id (several agents may
    share an address)."""
    return str(peer.ip[0]), str(peer.pid)


def _address_key(address: str) -> tuple[int, str]:
    """Sort addresses as numbers where they are IPv4 (every node must sort alike)."""
    try:
        return int.from_bytes(socket.inet_aton(address), "big"), address
    except OSError:
        return -1, address
