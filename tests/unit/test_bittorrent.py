"""The bittorrent transport's parts: piece sizes and hashes, the torrent libtorrent reads,
the tracker's answers, the LAN settings, and the agent's in-order feed with a fake swarm."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import select
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import libtorrent as lt
import pytest

from corral.agent.errors import Cancelled, ReceiveError
from corral.agent.plan import Plan
from corral.agent.receivers import RECEIVERS
from corral.agent.receivers.bittorrent import seed as bittorrent_seed
from corral.agent.receivers.bittorrent.feed import LINGER_SHARE, Feeder, Latecomers, linger
from corral.agent.receivers.bittorrent.libtorrent_swarm import (
    PACE_PIECES,
    UPLOAD_SLOTS,
    LaneSwarm,
    LibtorrentSwarm,
    session_settings,
)
from corral.agent.receivers.bittorrent.receiver import (
    SPACE_MARGIN,
    BitTorrentReceiver,
    _lane,
    _lane_apart,
    _lane_room,
    _place,
    _rack,
    _turn,
)
from corral.agent.receivers.bittorrent.seed import (
    ALONE_WAIT,
    LANE_HANDOVER,
    LANE_SLACK,
    LANE_TIMEOUT,
    LATE_WAIT,
    STRIPE_TIMEOUT,
    PieceClock,
)
from corral.agent.receivers.bittorrent.swarm import PieceMap, stripe
from corral.agent.receivers.stream import VerifiedStream
from corral.agent.wire.bencode import bencode
from corral.config import Settings
from corral.deploy import transports
from corral.deploy.transports.base import NotReady
from corral.deploy.transports.bittorrent import (
    BitTorrentTransport,
    Layout,
    Seeder,
    by_stripe,
    make_torrent,
    piece_hashes,
    piece_size_for,
    seed_settings,
)
from corral.deploy.transports.bittorrent_tracker import (
    ARRIVAL_QUIET,
    JOIN_WINDOW,
    MAX_PEERS,
    STRIPE_GRACE,
    STRIPE_LEASE,
    Swarms,
    Tracker,
    _TrackerHandler,
    _TrackerServer,
    lanes,
    parse_query,
    partners,
)
from corral.images.exports import Chunked
from tests.fakes import stream_plan, stream_version

KiB, MiB = 1 << 10, 1 << 20
ENGINE: Any = lt  # the module as corral uses it (untyped, imported by name)


# --- torrent ---------------------------------------------------------------------------


def test_registered_on_both_sides() -> None:
    assert transports.REGISTRY["bittorrent"] is BitTorrentTransport
    assert RECEIVERS["bittorrent"] is BitTorrentReceiver
    assert BitTorrentTransport.export == "stream"


def test_a_node_that_asks_before_its_session_started_waits_for_it(tmp_path: Path) -> None:
    # a plan without a torrent sent the node to HTTP for the whole image
    transport = BitTorrentTransport(Settings(home=tmp_path, server_url="http://10.0.0.1:8080"))
    version = stream_version(tmp_path / "images" / "img" / "v1", [b"a" * 10])
    with pytest.raises(NotReady, match="no BitTorrent session for img:1 with node n1 yet"):
        transport.params(Chunked(version), "n1")


@pytest.mark.parametrize(
    ("stream", "chunk", "piece"),
    [
        (1 * KiB, 4 * MiB, 256 * KiB),  # tiny images: the floor
        (64 * MiB, 4 * MiB, 256 * KiB),  # 256 pieces
        (256 * MiB, 4 * MiB, 256 * KiB),  # 1024 pieces
        (300 * MiB, 4 * MiB, 512 * KiB),
        (1 << 30, 4 * MiB, 1 * MiB),
        (4 << 30, 4 * MiB, 4 * MiB),
        (64 << 30, 4 * MiB, 4 * MiB),  # the ceiling: a chunk
        (64 * MiB, 1 * MiB, 256 * KiB),
        (1 << 30, 1 * MiB, 1 * MiB),  # never more than a chunk
        (64 * MiB, 3 * 64 * KiB, 64 * KiB),  # must divide the chunk
    ],
)
def test_piece_size(stream: int, chunk: int, piece: int) -> None:
    assert piece_size_for(stream, chunk) == piece
    assert chunk % piece == 0


def test_piece_hashes_run_across_files(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000  # 256000 bytes, cut into files that are not pieces
    paths = []
    for i, (a, b) in enumerate([(0, 100000), (100000, 100001), (100001, 256000)]):
        paths.append(tmp_path / f"{i}.bin")
        paths[-1].write_bytes(data[a:b])
    piece = 64 * KiB
    expected = b"".join(
        hashlib.sha1(data[i : i + piece]).digest() for i in range(0, len(data), piece)
    )
    assert piece_hashes(paths, piece) == expected
    assert len(expected) == 20 * 4  # the last piece is short


def test_bencode() -> None:
    assert bencode({"b": [1, -2, b"x"], "a": "\u00e9"}) == b"d1:a2:\xc3\xa91:bli1ei-2e1:xee"
    assert bencode({b"\x00": 0}) == b"d1:\x00i0ee"
    with pytest.raises(TypeError):
        bencode(1.5)
    with pytest.raises(TypeError):
        bencode(True)


def _layout(tmp_path: Path, sizes: Sequence[int], piece: int) -> tuple[Layout, bytes]:
    data = hashlib.sha256(b"seed").digest() * (sum(sizes) // 32 + 1)
    data = data[: sum(sizes)]
    chunks = tmp_path / "exports" / "chunks"
    chunks.mkdir(parents=True)
    at, files = 0, []
    for i, size in enumerate(sizes):
        (chunks / f"{i:08d}.bin").write_bytes(data[at : at + size])
        files.append((f"{i:08d}.bin", size))
        at += size
    paths = [chunks / name for name, _ in files]
    return Layout(tuple(files), piece, piece_hashes(paths, piece)), data


def test_the_torrent_is_private_deterministic_and_read_by_libtorrent(tmp_path: Path) -> None:
    layout, _ = _layout(tmp_path, [128 * KiB, 128 * KiB, 50 * KiB], 32 * KiB)
    url = "http://10.0.0.1:6969/announce"
    torrent = make_torrent(layout, url, "corral deployment 7 image small:1")
    assert make_torrent(layout, url, "corral deployment 7 image small:1") == torrent
    other = make_torrent(layout, url, "corral deployment 8 image small:1")
    assert other.info_hash != torrent.info_hash  # private to its deployment
    info = lt.torrent_info(torrent.data)
    assert info.priv()
    assert info.piece_length() == 32 * KiB
    assert info.num_pieces() == 10  # 306 KiB / 32 KiB
    assert info.total_size() == 306 * KiB
    files = info.layout()
    assert [files.file_path(i) for i in range(files.num_files())] == [
        "chunks/00000000.bin",
        "chunks/00000001.bin",
        "chunks/00000002.bin",
    ]
    assert b"8:announce%d:%s" % (len(url), url.encode()) in torrent.data
    assert bytes.fromhex(str(info.info_hash())) == torrent.info_hash


# --- the tracker -----------------------------------------------------------------------

H1, H2 = b"\x01" * 20, b"\x02" * 20


def announce(
    swarms: Swarms, ip: str, peer: bytes, port: int = 6881, **extra: Any
) -> dict[str, Any]:
    query = {"info_hash": H1, "peer_id": peer, "port": str(port).encode()}
    query.update({k: str(v).encode() for k, v in extra.items()})
    return swarms.announce(query, ip)


def peers(answer: dict[str, Any]) -> set[tuple[str, int]]:
    raw = answer["peers"]
    return {
        (".".join(str(b) for b in raw[i : i + 4]), int.from_bytes(raw[i + 4 : i + 6], "big"))
        for i in range(0, len(raw), 6)
    }


def test_the_tracker_answers_members_of_known_torrents_only() -> None:
    swarms = Swarms()
    assert "unknown torrent" in announce(swarms, "10.0.0.11", b"a" * 20)["failure reason"]
    members = ["10.0.0.11", "10.0.0.12", "10.0.0.13"]
    swarms.open(H1, {*members, "10.0.0.1"}, members, {"10.0.0.1"})
    assert "not a member" in announce(swarms, "10.0.0.99", b"z" * 20)["failure reason"]
    assert "bad announce" in swarms.announce({"info_hash": H1}, "10.0.0.11")["failure reason"]
    seed = announce(swarms, "10.0.0.1", b"s" * 20, left=0)
    assert seed["interval"] > 0 and seed["peers"] == b""
    first = announce(swarms, "10.0.0.11", b"a" * 20, left=100)
    assert peers(first) == {("10.0.0.1", 6881)}
    second = announce(swarms, "10.0.0.12", b"b" * 20, left=100, event="started")
    assert peers(second) == {("10.0.0.1", 6881), ("10.0.0.11", 6881)}
    assert (second["complete"], second["incomplete"]) == (1, 2)
    # corral's seed is given no peers: the nodes connect to it when they want it
    assert peers(announce(swarms, "10.0.0.1", b"s" * 20, left=0)) == set()
    # a node is, even one that reports nothing left (it only wants its stripe yet)
    assert peers(announce(swarms, "10.0.0.11", b"a" * 20, left=0)) == {
        ("10.0.0.1", 6881),
        ("10.0.0.12", 6881),
    }
    assert swarms.pending(H1) == 1  # 10.0.0.13 has not joined yet
    assert swarms.coming(H1) == [0, 1, 2]  # two have just come, one is not there yet
    # a peer that leaves is forgotten; a finished one is still given to the others
    announce(swarms, "10.0.0.12", b"b" * 20, left=100, event="stopped")
    announce(swarms, "10.0.0.11", b"a" * 20, left=0, event="completed")
    third = announce(swarms, "10.0.0.13", b"c" * 20, left=100)
    assert peers(third) == {("10.0.0.1", 6881), ("10.0.0.11", 6881)}
    assert (third["complete"], third["incomplete"]) == (2, 1)
    swarms.close(H1)
    assert "unknown torrent" in announce(swarms, "10.0.0.11", b"a" * 20)["failure reason"]


def test_the_tracker_forgets_silent_peers_and_caps_its_answers() -> None:
    now = [0.0]
    swarms = Swarms(interval=10, clock=lambda: now[0])
    swarms.open(H1, None)  # any address
    for i in range(MAX_PEERS + 20):
        announce(swarms, f"10.0.{i // 200}.{i % 200 + 1}", b"%020d" % i, left=1)
    answer = announce(swarms, "10.9.9.9", b"x" * 20, left=1, numwant=500)
    assert len(peers(answer)) == MAX_PEERS
    assert len(peers(announce(swarms, "10.9.9.9", b"x" * 20, left=1, numwant=3))) == 3
    now[0] = 25.0
    announce(swarms, "10.9.9.9", b"x" * 20, left=1)
    now[0] = 31.0  # three intervals without a word from the others
    assert peers(announce(swarms, "10.9.9.8", b"y" * 20, left=1)) == {("10.9.9.9", 6881)}


def test_members_that_do_not_come_are_not_waited_for_forever() -> None:
    now = [100.0]
    swarms = Swarms(clock=lambda: now[0])
    swarms.open(H1, None, ["10.0.0.11", "", "10.0.0.12"])  # the second's address unknown
    announce(swarms, "10.0.0.11", b"a" * 20, left=1)
    # the first has just come: its stripe is still on its way to it
    assert (swarms.pending(H1), swarms.coming(H1)) == (1, [0, 2])
    now[0] += STRIPE_GRACE
    announce(swarms, "10.0.0.11", b"a" * 20, left=1)  # announces again: came before
    assert (swarms.pending(H1), swarms.coming(H1)) == (1, [2])
    now[0] = 100.0 + JOIN_WINDOW + 1
    assert (swarms.pending(H1), swarms.coming(H1)) == (0, [])
    assert (swarms.pending(H2), swarms.coming(H2)) == (0, [])  # not a session


def test_members_missing_are_waited_for_while_others_still_come() -> None:
    # a boot wave longer than a minute: the members still missing are named for as long
    # as others keep joining, and no longer once none has for ARRIVAL_QUIET seconds
    now = [0.0]
    swarms = Swarms(clock=lambda: now[0])
    members = [f"10.0.0.{i}" for i in range(11, 16)]
    swarms.open(H1, None, members, servers=["10.0.0.1"])
    assert swarms.coming(H1) == [0, 1, 2, 3, 4]  # nobody yet: all are on their way
    for i, ip in enumerate(members[:4]):  # one every 25 s, for 75 s
        now[0] = 25.0 * i
        announce(swarms, ip, b"%020d" % i, left=1)
    now[0] = 75.0 + STRIPE_GRACE
    assert swarms.coming(H1) == [4]  # those that came have had their stripes' time
    now[0] = 75.0 + ARRIVAL_QUIET - 1
    announce(swarms, "10.0.0.1", b"s" * 20, left=0)  # the seed coming is no member
    assert swarms.coming(H1) == [4]
    now[0] = 75.0 + ARRIVAL_QUIET
    assert (swarms.pending(H1), swarms.coming(H1)) == (1, [])  # the wave is over
    now[0] = 110.0  # it comes after all: its stripe is its own again
    announce(swarms, members[4], b"e" * 20, left=1)
    assert swarms.coming(H1) == [4]


def test_a_stripe_is_on_its_way_while_its_member_says_so() -> None:
    # on a slow server link the stripes take longer than STRIPE_GRACE: a member still
    # taking its own is named until it stops saying so, and no longer than the lease
    now = [0.0]
    swarms = Swarms(clock=lambda: now[0])
    swarms.open(H1, None, ["10.0.0.11", "10.0.0.12"], servers=["10.0.0.1"])
    announce(swarms, "10.0.0.11", b"a" * 20, left=1)
    announce(swarms, "10.0.0.12", b"b" * 20, left=1)
    every = 5.0  # the questions' interval at two members
    for t in (5.0, 10.0, 15.0, 20.0):  # 10.0.0.11 asks every 5 s while its stripe comes
        now[0] = t
        swarms.striping(H1, "10.0.0.11")
    swarms.striping(H1, "10.0.0.1")  # the seed is no member: not heard
    swarms.striping(H1, "10.0.0.99")  # nor is a stranger
    now[0] = STRIPE_GRACE
    assert swarms.coming(H1) == [0]  # 10.0.0.12 said nothing: its grace is over
    now[0] = 20.0 + STRIPE_LEASE * every - 0.1
    assert swarms.coming(H1) == [0]
    now[0] = 20.0 + STRIPE_LEASE * every  # it stopped saying so (here, given up, or dead)
    assert swarms.coming(H1) == []
    swarms.open(H1, None, ["10.0.0.11", "10.0.0.12"])  # opened again: what was said stands
    swarms.striping(H1, "10.0.0.12")
    assert swarms.coming(H1) == [1]
    swarms.striping(H2, "10.0.0.12")  # not a session: nothing to note
    assert swarms.coming(H2) == []


def test_the_tracker_over_http() -> None:
    now = [0.0]
    tracker = Tracker("127.0.0.1", 0, Swarms(clock=lambda: now[0]))
    try:
        tracker.swarms.open(H2, None)
        peer = b"-LT2110-" + bytes(range(200, 212))
        url = (
            f"http://127.0.0.1:{tracker.port}/announce?info_hash=%02%02%02%02%02%02%02%02%02"
            "%02%02%02%02%02%02%02%02%02%02%02&peer_id=-LT2110-%c8%c9%ca%cb%cc%cd%ce%cf%d0%d1"
            "%d2%d3&port=6881&uploaded=0&downloaded=0&left=10&compact=1&event=started"
        )
        assert parse_query(url.split("?")[1])["peer_id"] == peer
        with urllib.request.urlopen(url, timeout=5) as answer:
            body = answer.read()
        assert body.startswith(b"d8:completei0e10:incompletei1e8:intervali")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{tracker.port}/scrape", timeout=5)
        tracker.swarms.open(H1, None, ["10.0.0.11", "10.0.0.12"])
        pending = f"http://127.0.0.1:{tracker.port}/pending/{H1.hex()}"
        with urllib.request.urlopen(pending, timeout=5) as answer:
            assert json.load(answer) == {
                "pending": 2,
                "coming": [0, 1],
                "unfinished": 0,
                "every": 5.0,
            }
        announce(tracker.swarms, "10.0.0.12", b"b" * 20, left=1)
        now[0] += STRIPE_GRACE  # 10.0.0.12 has had the time to take its stripe
        # 7 pieces in 2 stripes: 10.0.0.11's are 0, 2, 4, 6
        late = Latecomers(f"http://127.0.0.1:{tracker.port}/announce", H1.hex(), stripes=(7, 2))
        assert (late.pending(), set(late.pieces())) == (0, set())  # not asked yet
        assert late.unfinished() is None  # nothing known: linger by the peers alone
        assert late.joined_lately()  # nor whether a peer seen now has just come
        assert late.ask()
        assert (late.pending(), set(late.pieces())) == (1, {0, 2, 4, 6})
        assert late.unfinished() == 2  # 10.0.0.12 has pieces left, 10.0.0.11 is to come
        assert late.joined_lately()
        announce(tracker.swarms, "10.0.0.11", b"a" * 20, left=1)
        now[0] += STRIPE_GRACE
        assert late.ask()
        assert (late.pending(), set(late.pieces()), late.unfinished()) == (0, set(), 2)
        assert not late.joined_lately()  # everyone came more than STRIPE_GRACE ago
        announce(tracker.swarms, "10.0.0.11", b"a" * 20, left=0)  # done
        announce(tracker.swarms, "10.0.0.12", b"b" * 20, left=0, event="stopped")  # gone
        now[0] += 1
        assert late.ask() and late.unfinished() == 0
        tracker.swarms.open(H1, None, ["10.0.0.11", "127.0.0.1"])  # this host a member
        announce(tracker.swarms, "127.0.0.1", b"c" * 20, left=1)
        now[0] += STRIPE_GRACE
        assert late.ask() and set(late.pieces()) == set()  # had the time to take its stripe
        late.striping = lambda: True  # asks with ?stripe=coming: its stripe still comes
        assert late.ask()
        now[0] += 1  # the answer is made again after a second
        assert late.ask() and set(late.pieces()) == {1, 3, 5}
        late.striping = lambda: False
        now[0] += 1
        tracker.swarms.open(H1, None, ["10.0.0.11", "10.0.0.13"])  # a new member
        late.start()  # its thread asks at once
        deadline = time.monotonic() + 5
        while late.pending() != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        late.close()
        assert (late.pending(), set(late.pieces())) == (1, {1, 3, 5})
        tracker.stop()
        assert not late.ask()  # the tracker does not answer: the last answer stands
        assert (late.pending(), set(late.pieces())) == (1, {1, 3, 5})
        gone = Latecomers("http://127.0.0.1:1/announce", H1.hex(), stripes=(7, 2))
        assert not gone.ask()
        assert (gone.pending(), set(gone.pieces())) == (0, set())  # no tracker: nothing known
    finally:
        tracker.stop()


def test_the_tracker_holds_a_hundred_connections_at_once() -> None:
    # its thread not accepting: the kernel must still take every node's SYN
    server = _TrackerServer(("127.0.0.1", 0), _TrackerHandler)
    clients = [socket.socket() for _ in range(100)]
    try:
        for client in clients:
            client.setblocking(False)
            client.connect_ex(server.server_address)
        waiting, deadline = set(clients), time.monotonic() + 3.0
        while waiting and time.monotonic() < deadline:
            _, connected, _ = select.select([], list(waiting), [], 0.1)
            waiting -= set(connected)
        assert not waiting, f"{len(waiting)} of {len(clients)} SYNs not taken"
    finally:
        for client in clients:
            client.close()
        server.server_close()


# --- settings --------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["seed", "agent"])
def test_lan_settings_are_accepted_by_libtorrent(which: str) -> None:
    if which == "seed":
        wanted = seed_settings(lt, "127.0.0.1", 0)
    else:
        wanted = session_settings(lt, "127.0.0.1", 0)
    session = ENGINE.session(wanted, 0)  # a dict of settings, no plugins, as corral does
    have = session.get_settings()
    for key, value in wanted.items():
        assert have[key] == value, key
    for key in ("enable_dht", "enable_lsd", "enable_upnp", "enable_natpmp", "enable_incoming_utp"):
        assert have[key] is False
    assert have["in_enc_policy"] == int(lt.enc_policy.disabled)
    assert have["allow_multiple_connections_per_ip"] is True


def test_a_lanes_session_uploads_to_fewer_peers_at_once_than_the_nodes(tmp_path: Path) -> None:
    layout, _ = _layout(tmp_path, [128 * KiB], 32 * KiB)
    torrent = make_torrent(layout, "http://127.0.0.1:9/announce", "corral deployment 7 image a:1")
    lane = LaneSwarm(lt, torrent.data, tmp_path / "lane", "127.0.0.1", ["127.0.0.2"], port=0)
    node = LibtorrentSwarm(lt, torrent.data, tmp_path / "node", "127.0.0.1", 0)
    try:
        lanes, nodes = lane.session.get_settings(), node.session.get_settings()
        assert lanes["unchoke_slots_limit"] == LaneSwarm.UPLOAD_SLOTS < UPLOAD_SLOTS
        assert lanes["num_optimistic_unchoke_slots"] == LaneSwarm.UPLOAD_SLOTS // 2
        assert nodes["unchoke_slots_limit"] == UPLOAD_SLOTS
    finally:
        lane.close()
        node.close()


def test_the_seed_does_not_dial_a_node_that_keeps_it_away(tmp_path: Path) -> None:
    # A node takes its stripe from the seed, then keeps it away (the IP filter). The seed
    # used to dial it again every 2 s for as long as the deployment ran.
    layout, _ = _layout(tmp_path, [1 * MiB], 256 * KiB)
    torrent = make_torrent(layout, "http://127.0.0.1:9/announce", "corral deployment 7 image a:1")
    seeder = Seeder(ENGINE, "127.0.0.1", 0)
    node = None
    try:
        seeder.add(torrent, tmp_path / "exports")
        seed = ("127.0.0.1", seeder.port)
        node = LibtorrentSwarm(
            lt, torrent.data, tmp_path / "node", "127.0.0.2", 0, seed, announce=False
        )
        node.want([0])
        node.use_seed(True)
        deadline = time.monotonic() + 10
        while not node.pieces()[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert node.pieces()[0]  # it came from the seed: they were connected
        node.want(None)  # the node wants the rest, from its peers
        node.use_seed(False)
        time.sleep(5)  # libtorrent redials a peer after min_reconnect_time (2 s)
        counters = _session_counters(seeder.session)
        assert counters["peer.incoming_connections"] == 1
        assert counters["peer.connection_attempts"] == 0
        assert sum(node.pieces()) == 1
    finally:
        if node is not None:
            node.close()
        seeder.close()


def test_a_peer_far_below_the_rate_asked_is_not_in_need(tmp_path: Path) -> None:
    # A node that has the image seeds to a peer at half the rate asked, and to one at four
    # times it. libtorrent's own estimate of a peer's rate reads 0 for a minute, and the
    # slow peer kept whole swarms lingering for it.
    piece, rate = 16 * KiB, 16 * KiB
    layout, data = _layout(tmp_path, [4 * MiB], piece)
    torrent = make_torrent(layout, "http://127.0.0.1:9/announce", "corral deployment 7 image a:1")
    done = LibtorrentSwarm(lt, torrent.data, tmp_path / "done", "127.0.0.1", 0, announce=False)
    peers: list[LibtorrentSwarm] = []

    def peer(address: str, limit: int) -> LibtorrentSwarm:
        """A peer taking everything from ``done``, at ``limit`` bytes/s at most."""
        swarm = LibtorrentSwarm(
            lt, torrent.data, tmp_path / address, address, 0, ("127.0.0.1", done.listen_port())
        )
        peers.append(swarm)
        local = swarm.session.local_peer_class_id
        peer_class = swarm.session.get_peer_class(local)
        peer_class["download_limit"] = limit
        swarm.session.set_peer_class(local, peer_class)
        swarm.want(None)
        swarm.use_seed(True)
        return swarm

    def connected(count: int) -> None:
        deadline = time.monotonic() + 10
        while len(done.handle.get_peer_info()) < count and time.monotonic() < deadline:
            time.sleep(0.05)

    try:
        done.add({i: data[i * piece : (i + 1) * piece] for i in range(len(data) // piece)})
        started = time.monotonic()
        slow, fast = peer("127.0.0.2", rate // 2), peer("127.0.0.3", 4 * rate)
        connected(2)
        deadline = time.monotonic() + 10
        while done.peers_in_need(rate) < 2 and time.monotonic() < deadline:
            done.wait(0.1)
        assert done.peers_in_need(rate) == 2  # both just came: not judged yet
        # judged after two pieces' time at the rate asked (2 s); a margin for the slow
        # start of TCP and of libtorrent's rate limiter
        end = time.monotonic() + 3 * PACE_PIECES * piece / rate
        while time.monotonic() < end:
            done.wait(0.1)
        assert sum(slow.pieces()) < sum(fast.pieces()) < len(fast.pieces())
        assert done.peers_in_need(rate) == 1
        # by their pieces over the swarm's age (no member joined lately): a slow peer it
        # first sees now is judged at once (a node at B/10 met some nodes only once they
        # were done), and the others as before
        peer("127.0.0.4", rate // 2)
        connected(3)
        assert done.peers_in_need(rate, known_for=time.monotonic() - started) == 1
    finally:
        for swarm in peers:
            swarm.close()
        done.close()


def _session_counters(session: Any) -> dict[str, int]:
    """libtorrent's session counters by name (``peer.connection_attempts``, ...)."""
    session.post_session_stats()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for alert in session.pop_alerts():
            if isinstance(alert, lt.session_stats_alert):
                return dict(alert.values)
        time.sleep(0.05)
    raise AssertionError("libtorrent posted no session stats")


#: Both sides' settings as they were before the shared LAN base was factored out.
SHARED_LAN = {
    "allow_multiple_connections_per_ip": True,
    "choking_algorithm": 0,
    "connection_speed": 100,
    "enable_dht": False,
    "enable_incoming_utp": False,
    "enable_lsd": False,
    "enable_natpmp": False,
    "enable_outgoing_utp": False,
    "enable_upnp": False,
    "handshake_timeout": 5,
    "in_enc_policy": 2,
    "min_announce_interval": 5,
    "min_reconnect_time": 2,
    "out_enc_policy": 2,
    "peer_connect_timeout": 15,
    "peer_timeout": 30,
    "piece_timeout": 10,
    "request_timeout": 10,
    "seed_choking_algorithm": 0,
    "smooth_connects": False,
    "stop_tracker_timeout": 1,
    "unchoke_slots_limit": -1,
}


def test_seed_settings_are_pinned() -> None:
    assert seed_settings(lt, "10.0.0.1", 6881) == {
        **SHARED_LAN,
        "listen_interfaces": "10.0.0.1:6881",
        "user_agent": "corral",
        "connections_limit": 1000,
        "listen_queue_size": 1000,
        "connection_speed": 0,
        "aio_threads": 4,
        "alert_mask": 1,
    }


def test_agent_settings_are_pinned() -> None:
    assert session_settings(lt, "10.0.0.2", 6882) == {
        **SHARED_LAN,
        "listen_interfaces": "10.0.0.2:6882",
        "outgoing_interfaces": "10.0.0.2",
        "user_agent": "corral-agent",
        "apply_ip_filter_to_trackers": False,
        "close_redundant_connections": False,
        "connections_limit": 200,
        "unchoke_slots_limit": 8,
        "num_optimistic_unchoke_slots": 4,
        "optimistic_unchoke_interval": 10,
        "listen_queue_size": 200,
        "tracker_completion_timeout": 30,
        "tracker_receive_timeout": 15,
        "aio_threads": 2,
        "hashing_threads": 1,
        "alert_mask": 89,
    }
    assert session_settings(lt, "0.0.0.0", 6882)["outgoing_interfaces"] == ""


# --- the agent's in-order feed ---------------------------------------------------------

PIECE = 4


def make_plan(data: bytes, chunk: int) -> Plan:
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    params = {"torrent": "", "base": "http://x"}
    return stream_plan(chunks, "bittorrent", params, node="n01", deployment=1, ref="small:1")


class FakeSwarm:
    """Pieces arrive from a script: ``arrivals[i]`` is what the i-th wait brings."""

    def __init__(self, data: bytes, arrivals: Sequence[Sequence[int]], *, bad: int = -1) -> None:
        self.data = data
        self.have = [False] * (-(-len(data) // PIECE))
        self.arrivals = list(arrivals)
        self.bad = bad  # a piece libtorrent reads back wrong
        self.urgent: list[list[int]] = []
        self.added: dict[int, bytes] = {}
        self.reads: list[list[int]] = []
        self.waits = 0
        self.in_need = 0
        self.avail = [1] * len(self.have)  # connected peers having each piece
        self.seed_up = True  # corral's seed answers when the node lets it in
        self.seed_connected = False
        self.calls: list[tuple[str, Any]] = []  # want and use_seed, in order
        self.position = (0, 1)  # alone among the peers still downloading
        self.min_rates: list[float] = []
        self.known_for: list[float] = []
        self.tracker_answered = True
        self.peers_connected = 3
        self.outside: set[str] = set()  # connected peers from other racks
        self.without_mine: set[str] = set()  # connected peers that lack the node's stripe
        self.want_at: list[int] = []  # looks at the swarm before each want()
        self.partial = 0  # bytes of pieces still incomplete
        self.trickle = 0  # the next this many waits bring a byte of some piece each

    def pieces(self) -> Sequence[bool]:
        return list(self.have)

    def downloaded(self) -> int:
        return sum(PIECE for h in self.have if h)

    def received(self) -> int:
        return self.downloaded() + self.partial

    def read(self, pieces: Sequence[int], timeout: float) -> dict[int, bytes]:
        self.reads.append(list(pieces))
        out = {p: self.data[p * PIECE : (p + 1) * PIECE] for p in pieces}
        if self.bad in out:
            out[self.bad] = b"!" * len(out[self.bad])
        return out

    def add(self, pieces: Mapping[int, bytes]) -> None:
        self.added.update(pieces)

    def prioritize(self, urgent: Sequence[int]) -> None:
        self.urgent.append(list(urgent))
        self.calls.append(("prioritize", list(urgent)))

    def want(self, pieces: Sequence[int] | None) -> None:
        self.calls.append(("want", None if pieces is None else list(pieces)))
        self.want_at.append(self.waits)

    def use_seed(self, on: bool) -> None:
        self.calls.append(("seed", on))
        self.seed_connected = on and self.seed_up

    def keep_to(self, addresses: Collection[str] | None) -> None:
        self.calls.append(("keep_to", None if addresses is None else sorted(addresses)))
        if addresses is not None:
            self.outside = {a for a in self.outside if a in addresses}

    def lacking(self, pieces: Collection[int]) -> set[str]:
        return set(self.without_mine)

    def availability(self) -> Sequence[int]:
        """The connected peers' counts, and the seed (which has every piece) once the
        node lets it in."""
        return [a + (1 if self.seed_connected else 0) for a in self.avail]

    def present(self) -> tuple[int, int]:
        return self.position

    def heard(self) -> bool:
        return self.tracker_answered

    def connected(self) -> int:
        return len(self.addresses())

    def addresses(self) -> set[str]:
        return {f"10.0.1.{i}" for i in range(self.peers_connected)} | self.outside

    def peers_in_need(self, min_rate: float, known_for: float = 0.0) -> int:
        self.min_rates.append(min_rate)
        self.known_for.append(known_for)
        return self.in_need

    def meet(self, dial: bool = True) -> None:
        self.calls.append(("meet", dial))

    def wait(self, seconds: float) -> None:
        self.waits += 1
        for p in self.arrivals.pop(0) if self.arrivals else []:
            self.have[p] = True
        if self.trickle > 0:
            self.trickle -= 1
            self.partial += 1


DATA = bytes(range(40))  # 5 chunks of 8 bytes, 10 pieces of 4
RACK = [f"10.0.1.{i}" for i in range(20)]


def run_feeder(
    swarm: FakeSwarm,
    *,
    stall: float = 5.0,
    cancel: threading.Event | None = None,
    fetch_ok: bool = True,
    mine: Sequence[int] | None = None,
    rack: Sequence[str] | None = None,
    lane: Sequence[int] = (),
    late: Any = frozenset,
    lane_swarm: FakeSwarm | None = None,
) -> tuple[Feeder, list[bytes], list[int], list[tuple[int, int]]]:
    plan = make_plan(DATA, 8)
    fed: list[bytes] = []
    fetched: list[int] = []
    progress: list[tuple[int, int]] = []
    now = [0.0]
    real_wait = swarm.wait

    def wait(seconds: float) -> None:  # each look at the swarm takes a second
        now[0] += 1
        real_wait(seconds)
        if lane_swarm is not None:  # the lane's session moves in the same second
            lane_swarm.wait(seconds)

    swarm.wait = wait  # type: ignore[method-assign]

    def fetch(index: int, partial: Any) -> bytes:
        if not fetch_ok:
            raise ReceiveError("no server")
        fetched.append(index)
        partial(3)
        now[0] += 1  # a download takes a second too, while the swarm goes on
        for p in swarm.arrivals.pop(0) if swarm.arrivals else []:
            swarm.have[p] = True
        return DATA[index * 8 : index * 8 + 8]

    feeder = Feeder(
        VerifiedStream(plan, fed.append, lambda done, total: None),
        swarm,
        PieceMap(PIECE, tuple(c.size for c in plan.image.chunks)),
        fetch,
        lambda done, total: progress.append((done, total)),
        cancel or threading.Event(),
        stall=stall,
        clock=lambda: now[0],
        mine=mine,
        rack=rack,
        lane=lane,
        late=late,
        lane_swarm=lane_swarm,
    )
    feeder.run()
    return feeder, fed, fetched, progress


def test_chunks_are_fed_in_order_as_their_pieces_complete() -> None:
    # pieces arrive rarest-first, in no order: chunk 0 (pieces 0, 1) is complete at the
    # third look, then chunks 1-4 all at once
    swarm = FakeSwarm(DATA, [[9, 3], [0], [1, 5], [2, 4, 6, 7, 8]])
    feeder, fed, fetched, progress = run_feeder(swarm)
    assert b"".join(fed) == DATA
    assert fed == [DATA[i : i + 8] for i in range(0, 40, 8)]
    assert fetched == []
    assert feeder.stats.from_swarm == 5 and feeder.stats.from_http == 0
    assert feeder.stream.whole.hexdigest() == hashlib.sha256(DATA).hexdigest()
    assert swarm.reads == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    # the next chunk's pieces first, each time
    assert swarm.urgent == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    # progress counts what libtorrent holds before it is unpacked, and never goes back
    dones = [d for d, _ in progress]
    assert dones == sorted(dones) and dones[-1] == 40 and {t for _, t in progress} == {40}
    assert max(d for d, _ in progress[:3]) >= 8  # pieces 9 and 3 count before chunk 0 is fed


def test_a_chunk_that_does_not_match_the_plan_comes_over_http() -> None:
    swarm = FakeSwarm(DATA, [list(range(10))], bad=3)
    feeder, fed, fetched, _ = run_feeder(swarm)
    assert b"".join(fed) == DATA
    assert fetched == [1]
    assert feeder.stats.mismatched == 1 and feeder.stats.from_http == 1
    assert swarm.added == {}  # libtorrent has both pieces already


def test_a_stalled_swarm_falls_back_to_http_until_it_moves_again() -> None:
    # chunk 0 arrives, then nothing for 5 looks (the stall is 5 s, a look is 1 s): chunk 1
    # comes over HTTP (a second, nothing arrives), and chunk 2 too since the swarm still
    # has not moved; while it comes, piece 7 arrives: the swarm moves again, chunk 3 is
    # waited for, and pieces 6, 8, 9 complete chunks 3 and 4
    swarm = FakeSwarm(DATA, [[0, 1], [], [], [], [], [], [], [7], [6, 8, 9]])
    feeder, fed, fetched, _ = run_feeder(swarm)
    assert b"".join(fed) == DATA
    assert fetched == [1, 2]
    # fetched chunks go into libtorrent too, to be served to the peers
    assert sorted(swarm.added) == [2, 3, 4, 5]
    assert swarm.added[4] == DATA[16:20]
    assert feeder.stats.from_swarm == 3 and feeder.stats.from_http == 2


def test_bytes_arriving_are_movement_even_while_no_piece_completes() -> None:
    # as in the test above, no piece completes for 6 looks; but bytes of pieces keep
    # coming (a full link, shared by many peers' pieces): no chunk goes to HTTP
    swarm = FakeSwarm(DATA, [[0, 1], [], [], [], [], [], [], [2, 3, 4, 5, 6, 7, 8, 9]])
    swarm.trickle = 7
    feeder, fed, fetched, _ = run_feeder(swarm)
    assert b"".join(fed) == DATA
    assert fetched == []
    assert feeder.stats.from_swarm == 5


def test_chunks_the_swarm_never_brings_all_come_over_http() -> None:
    swarm = FakeSwarm(DATA, [])
    _, fed, fetched, progress = run_feeder(swarm, stall=2)
    assert fetched == [0, 1, 2, 3, 4] and b"".join(fed) == DATA
    assert swarm.waits == 2  # one stall, then one chunk after the other
    assert (11, 40) in progress  # partial HTTP progress: chunk 1 at its byte 3


def test_a_cancel_stops_the_feed() -> None:
    cancel = threading.Event()
    swarm = FakeSwarm(DATA, [[0, 1]])
    real = swarm.wait

    def wait(seconds: float) -> None:
        real(seconds)
        cancel.set()

    swarm.wait = wait  # type: ignore[method-assign]
    with pytest.raises(Cancelled):
        run_feeder(swarm, cancel=cancel)


def test_a_failing_fallback_fails_the_receive() -> None:
    with pytest.raises(ReceiveError, match="no server"):
        run_feeder(FakeSwarm(DATA, []), stall=1, fetch_ok=False)


def test_piece_map_with_chunks_that_are_not_whole_pieces() -> None:
    layout = PieceMap(4, (6, 6, 3))  # 15 bytes: pieces 0-3, the last of 3 bytes
    assert layout.num_pieces == 4
    assert [layout.pieces(i) for i in range(3)] == [range(0, 2), range(1, 3), range(3, 4)]
    assert [layout.whole_pieces(i) for i in range(3)] == [range(0, 1), range(2, 3), range(3, 4)]
    data = bytes(range(15))
    pieces = {p: data[p * 4 : p * 4 + 4] for p in range(4)}
    assert [layout.chunk_bytes(i, pieces) for i in range(3)] == [data[:6], data[6:12], data[12:]]
    assert layout.split(1, data[6:12]) == {2: data[8:12]}
    assert layout.split(2, data[12:]) == {3: data[12:]}
    assert layout.piece_length(3) == 3
    with pytest.raises(ValueError):
        PieceMap(0, (1,))


def test_linger_stays_while_peers_need_this_node() -> None:
    swarm = FakeSwarm(DATA, [])
    now = [0.0]

    def wait(seconds: float) -> None:
        now[0] += seconds
        if now[0] >= 2:
            swarm.in_need = 0

    swarm.wait = wait  # type: ignore[method-assign]
    swarm.in_need = 3
    cancel = threading.Event()
    stayed = linger(swarm, cancel, own_rate=1e6, budget=10, clock=lambda: now[0])
    assert 2 <= stayed <= 3  # until two looks find nobody in need
    assert swarm.min_rates[0] == pytest.approx(LINGER_SHARE * 1e6)  # slow peers do not count
    swarm.in_need = 3
    now[0] = 0.0
    swarm.wait = lambda seconds: now.__setitem__(0, now[0] + seconds)  # type: ignore[method-assign]
    assert linger(swarm, cancel, own_rate=1, budget=4, clock=lambda: now[0]) == pytest.approx(4)
    swarm.in_need = 0
    now[0] = 0.0
    assert linger(swarm, cancel, own_rate=1, budget=4, clock=lambda: now[0]) == pytest.approx(0.5)


def test_linger_leaves_when_the_tracker_counts_no_member_with_pieces_left() -> None:
    # libtorrent shows peers in need that have finished and gone; the tracker knows
    swarm = FakeSwarm(DATA, [])
    now = [0.0]
    swarm.wait = lambda seconds: now.__setitem__(0, now[0] + seconds)  # type: ignore[method-assign]
    swarm.in_need = 3
    left = [2]

    def unfinished() -> int | None:
        if now[0] >= 3:
            left[0] = 0
        return left[0]

    cancel = threading.Event()
    stayed = linger(
        swarm, cancel, own_rate=1, unfinished=unfinished, budget=60, clock=lambda: now[0]
    )
    assert stayed == pytest.approx(3.5)  # two looks after the last member finished
    now[0] = 0.0
    stayed = linger(
        swarm, cancel, own_rate=1, unfinished=lambda: None, budget=4, clock=lambda: now[0]
    )
    assert stayed == pytest.approx(4)  # the tracker has not said: the peers in need count
    now[0] = 0.0
    stayed = linger(
        swarm,
        cancel,
        own_rate=1,
        pending=lambda: 1,
        unfinished=lambda: 0,
        budget=4,
        clock=lambda: now[0],
    )
    assert stayed == pytest.approx(4)  # members still to come are waited for all the same


def test_linger_waits_for_members_that_have_not_joined_yet() -> None:
    swarm = FakeSwarm(DATA, [])
    now = [0.0]
    swarm.wait = lambda seconds: now.__setitem__(0, now[0] + seconds)  # type: ignore[method-assign]
    answers = iter([2, 1, 0, 0, 0])
    asked: list[float] = []

    def pending() -> int:
        asked.append(now[0])
        return next(answers)

    stayed = linger(
        swarm, threading.Event(), own_rate=1, pending=pending, budget=60, clock=lambda: now[0]
    )
    assert asked == [0.0, 5.0, 10.0]  # every 5 s
    assert stayed == pytest.approx(10.5)  # then two looks without a reason


def test_linger_judges_a_peer_it_first_sees_by_its_pieces_unless_a_member_joined_lately() -> None:
    swarm = FakeSwarm(DATA, [])
    now = [0.0]
    swarm.wait = lambda seconds: now.__setitem__(0, now[0] + seconds)  # type: ignore[method-assign]
    lately = [True]
    linger(
        swarm, threading.Event(), own_rate=1, age=200.0, joined_lately=lambda: lately[0],
        budget=1, clock=lambda: now[0],
    )  # fmt: skip
    assert set(swarm.known_for) == {0.0}  # a peer first seen now may have just come
    lately[0], now[0] = False, 0.0
    swarm.known_for.clear()
    linger(
        swarm, threading.Event(), own_rate=1, age=200.0, joined_lately=lambda: lately[0],
        budget=1, clock=lambda: now[0],
    )  # fmt: skip
    assert set(swarm.known_for) == {200.0}  # everyone has been in the swarm as long


# --- when a node uses the seed ---------------------------------------------------------


def test_stripes_cover_the_pieces_once() -> None:
    stripes = [stripe(10, i, 3) for i in range(3)]
    assert stripes == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert stripe(2, 4, 5) == []  # more nodes than pieces: nothing from the seed
    assert stripe(4, 0, 0) == [0, 1, 2, 3]


def test_a_node_takes_its_stripe_from_the_seed_then_the_rest_from_its_peers() -> None:
    # stripe 1 of 2: pieces 1, 3, 5, 7, 9, which no peer has when the node has looked
    swarm = FakeSwarm(DATA, [[], [1, 3], [5, 7, 9], [0, 2, 4, 6, 8]])
    swarm.avail = [0] * 10
    _, fed, fetched, _ = run_feeder(swarm, mine=stripe(10, 1, 2))
    assert b"".join(fed) == DATA and fetched == []
    assert swarm.calls[:7] == [
        ("seed", False),  # first a look at the peers
        ("prioritize", [0, 1]),
        ("want", [1, 3, 5, 7, 9]),  # nothing else can be asked of the seed
        ("seed", True),
        ("seed", False),  # the stripe is here: the seed is kept away
        ("want", None),
        ("prioritize", [0, 1]),  # and the next chunk comes first again
    ]


def test_a_node_without_a_stripe_never_asks_the_seed() -> None:
    swarm = FakeSwarm(DATA, [list(range(10))])
    run_feeder(swarm, mine=[])
    assert swarm.calls[0] == ("seed", False)
    assert ("want", None) not in swarm.calls  # it wanted everything all along


def test_pieces_no_peer_has_are_asked_of_the_seed_until_they_come() -> None:
    # the stripe arrives; then the peers bring pieces 0-5 but nobody has 6-9 (their
    # member died): after RESCUE_IDLE seconds without a piece the node asks the seed, and
    # keeps it away again as soon as they are here
    swarm = FakeSwarm(DATA, [[0, 2], [1, 3, 4, 5], [], [], [], [6, 7, 8, 9]])
    swarm.avail = [1] * 6 + [0] * 4
    feeder, fed, fetched, _ = run_feeder(swarm, mine=[0, 2])
    assert b"".join(fed) == DATA and fetched == []
    seed = [on for call, on in swarm.calls if call == "seed"]
    assert seed == [False, True, False]
    assert ("want", [6, 7, 8, 9]) in swarm.calls  # those only, while the seed is in use
    back = len(swarm.calls) - 1 - swarm.calls[::-1].index(("seed", False))
    assert swarm.calls[back + 1] == ("want", None)  # then everything from the peers again
    assert feeder.stats.rescues == 1


def test_pieces_only_a_slow_peer_has_are_asked_of_the_seed_too() -> None:
    swarm = FakeSwarm(DATA, [[0, 2, 1, 3, 4, 5, 6], [], [], [], [7, 8, 9]])
    swarm.avail = [3] * 7 + [2, 1, 1]
    feeder, fed, _, _ = run_feeder(swarm, mine=[0, 2])
    assert b"".join(fed) == DATA
    assert ("want", [8, 9]) in swarm.calls and feeder.stats.rescues == 1
    # every missing piece at two peers or more: a pause, not a reason to load the seed
    # (a host short of CPU slows every node at once; a dead swarm is the HTTP stall's)
    swarm = FakeSwarm(DATA, [[0, 2, 1, 3, 4, 5, 6], [], [], [], [7, 8, 9]])
    swarm.avail = [3] * 10
    run_feeder(swarm, mine=[0, 2])
    assert ("seed", True) not in swarm.calls


def test_a_late_stripe_is_given_up_for_the_peers() -> None:
    swarm = FakeSwarm(DATA, [[0]] + [[]] * 10 + [list(range(1, 10))])
    swarm.avail = [0] * 10
    _, fed, _, _ = run_feeder(swarm, mine=[0, 5], stall=30)
    assert b"".join(fed) == DATA
    # no new piece for 2 x RESCUE_IDLE: the seed is not answering, use the peers
    calls = [c for c in swarm.calls if c[0] != "prioritize"]
    assert calls[:5] == [
        ("seed", False),
        ("want", [5]),
        ("seed", True),
        ("seed", False),
        ("want", None),
    ]


def test_the_stripe_from_the_plan() -> None:
    assert _place([1, 3]) == (1, 3)
    assert _place(["1", "3"]) == (1, 3)
    assert _place([0, 1]) is None  # a lone node: plain BitTorrent
    assert _place(None) is None
    assert _place(["x", 2]) is None
    assert _place([5, 3]) is None


def test_the_rack_and_the_lane_from_the_plan() -> None:
    plan = {"rack": "r2", "rack_peers": ["10.0.2.1", "10.0.2.2"], "lane": [0, 3, 9]}
    assert _rack(plan, "10.0.2.2") == ["10.0.2.1", "10.0.2.2"]
    # a node on DHCP, whose address the plan does not know: no rack to keep to
    assert _rack(plan, "10.0.9.9") is None
    assert _rack({"rack_peers": ["10.0.2.2"]}, "10.0.2.2") is None
    # stripes 0 and 3 of 4 over 10 pieces (9 is no stripe of 4)
    assert _lane(plan, 10, (1, 4)) == [0, 3, 4, 7, 8]
    assert _lane(plan, 10, None) == [] and _lane({}, 10, (1, 4)) == []


def test_a_rescue_goes_on_while_nobody_else_has_the_pieces() -> None:
    # pieces 6-9 are at no peer; the seed sends piece 6 within RESCUE_MAX, and the rest
    # are still at no other peer then (the seed counts for one): the rescue goes on for them
    arrivals: list[list[int]] = [[0, 2], [1, 3, 4, 5], [], [], [6], [], [], [], [], [7, 8, 9]]
    swarm = FakeSwarm(DATA, arrivals)
    swarm.avail = [1] * 6 + [0] * 4
    feeder, fed, _, _ = run_feeder(swarm, mine=[0, 2])
    assert b"".join(fed) == DATA
    wants = [w for call, w in swarm.calls if call == "want"]
    assert wants == [[6, 7, 8, 9], [7, 8, 9], None]  # the stripe was here when it looked
    assert feeder.stats.rescues == 1


def test_peers_lacking_the_same_pieces_share_the_rescue() -> None:
    # second of three peers in need: pieces 7 (7 % 3 == 1) first; piece 6 and 8 are
    # the others' to fetch, and they pass them on; 9 never comes: after three times
    # RESCUE_IDLE this node asks the seed for everything it lacks
    arrivals = [[0, 2], [1, 3, 4, 5], [], [], [], [7], [6, 8]] + [[]] * 7 + [[9]]
    swarm = FakeSwarm(DATA, arrivals)
    swarm.avail = [1] * 6 + [0] * 4
    swarm.position = (1, 3)
    _, fed, _, _ = run_feeder(swarm, mine=[0, 2], stall=60)
    assert b"".join(fed) == DATA
    wants = [w for call, w in swarm.calls if call == "want"]
    assert wants[0] == [7]
    assert [9] in wants[2:]


def test_a_latecomer_takes_its_stripe_from_the_peers_that_have_it() -> None:
    swarm = FakeSwarm(DATA, [[], list(range(10))])
    swarm.avail = [1] * 10  # a node that is done (the seed is kept away while it looks)
    run_feeder(swarm, mine=[1, 3, 5])
    assert swarm.calls[0] == ("seed", False)
    assert [c for c in swarm.calls if c[0] != "prioritize"] == [("seed", False)]


def test_pieces_at_no_peer_for_long_are_asked_of_the_seed_even_while_others_come(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the first nodes of a deployment booting in waves: pieces keep coming from the
    # peers, but 8 and 9 are nobody's yet; after ORPHAN_WAIT the node asks the seed (the
    # floor: the pace of this fake, a piece a second, would stretch it; see below)
    monkeypatch.setattr(bittorrent_seed, "ORPHAN_PIECES", 0)
    swarm = FakeSwarm(DATA, [[0, 2], [1], [3], [4], [5], [6], [7], [], [8, 9]])
    swarm.avail = [1] * 8 + [0, 0]
    feeder, fed, _, _ = run_feeder(swarm, mine=[0, 2], stall=60)
    assert b"".join(fed) == DATA
    assert ("want", [8, 9]) in swarm.calls and feeder.stats.rescues == 1


def test_only_the_pieces_at_no_peer_are_asked_of_the_seed_for_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 8 and 9 are at no peer for long, 6 and 7 at one and still to come: the seed is
    # asked for 8 and 9 alone (a stall would be a reason to ask for 6 and 7 too)
    monkeypatch.setattr(bittorrent_seed, "ORPHAN_PIECES", 0)
    arrivals = [[0, 2], [1], [3], [4], [5], [], [], [], [6], [7], [], [8, 9]]
    swarm = FakeSwarm(DATA, arrivals)
    swarm.avail = [1] * 8 + [0, 0]
    feeder, fed, _, _ = run_feeder(swarm, mine=[0, 2], stall=60)
    assert b"".join(fed) == DATA
    rescues = [w for c, w in swarm.calls if c == "want" and w and set(w) & {6, 7, 8, 9}]
    assert rescues[0] == [8, 9] and feeder.stats.rescues == 1


class MovingOrphans(FakeSwarm):
    """Each piece from 3 on is at no connected peer for two looks, then at one, and comes
    a look later: while the stripes spread from their members, some piece is always at no
    peer, but none for long."""

    def availability(self) -> Sequence[int]:
        orphan = 3 + self.waits // 2
        return [0 if p == orphan else 1 for p in range(len(self.have))]


def test_pieces_at_no_peer_for_a_moment_each_are_not_asked_of_the_seed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bittorrent_seed, "ORPHAN_PIECES", 0)  # ORPHAN_WAIT: 5 s
    arrivals: list[list[int]] = [[0, 2], [1]] + [[] for _ in range(30)]
    for k, piece in enumerate(range(3, 10)):
        arrivals[2 * k + 3].append(piece)
    swarm = MovingOrphans(DATA, arrivals)
    feeder, fed, _, _ = run_feeder(swarm, mine=[0, 2], stall=60)
    assert b"".join(fed) == DATA
    assert ("seed", True) not in swarm.calls[2:] and feeder.stats.rescues == 0


def test_the_stripes_of_members_still_booting_are_left_to_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the same, but 8 and 9 are the stripe of a member that has not joined yet: the node
    # neither rescues them nor fetches their chunk over HTTP while it waits (stall 5 s),
    # and takes them from the peers once that member has come and taken them
    monkeypatch.setattr(bittorrent_seed, "ORPHAN_PIECES", 0)
    arrivals = [[0, 2], [1], [3], [4], [5], [6], [7]] + [[]] * 20 + [[8, 9]]
    swarm = FakeSwarm(DATA, arrivals)
    swarm.avail = [1] * 8 + [0, 0]
    feeder, fed, fetched, _ = run_feeder(swarm, mine=[0, 2], stall=5, late=lambda: {8, 9})
    assert b"".join(fed) == DATA and fetched == []
    assert ("seed", True) not in swarm.calls[2:] and feeder.stats.rescues == 0


def test_a_member_that_never_comes_is_waited_for_only_so_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bittorrent_seed, "ORPHAN_PIECES", 0)
    arrivals = [[0, 2], [1], [3], [4], [5], [6], [7]] + [[]] * int(LATE_WAIT + 20) + [[8, 9]]
    swarm = FakeSwarm(DATA, arrivals)
    swarm.avail = [1] * 8 + [0, 0]
    feeder, fed, _, _ = run_feeder(swarm, mine=[0, 2], stall=600, late=lambda: {8, 9})
    assert b"".join(fed) == DATA
    assert ("want", [8, 9]) in swarm.calls and feeder.stats.rescues == 1
    rescued = swarm.want_at[[w for c, w in swarm.calls if c == "want"].index([8, 9])]
    assert LATE_WAIT <= rescued < LATE_WAIT + 10  # one look a second


def test_in_a_rack_pieces_at_no_peer_wait_for_their_lane(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the same, in a rack: 8 and 9 are at no peer of the rack because the node whose lane
    # they are has not brought them in yet; asking the seed would carry them over the
    # uplink again
    monkeypatch.setattr(bittorrent_seed, "ORPHAN_PIECES", 0)
    arrivals = [[0, 2], [1], [3], [4], [5], [6], [7], [], [8, 9]]
    swarm = FakeSwarm(DATA, arrivals)
    swarm.avail = [1] * 8 + [0, 0]
    swarm.outside = {"10.0.2.10"}  # a lane partner, still connected
    feeder, fed, _, _ = run_feeder(swarm, mine=[0, 2], stall=60, rack=RACK)
    assert b"".join(fed) == DATA
    assert ("want", [8, 9]) not in swarm.calls and feeder.stats.rescues == 0
    assert ("keep_to", sorted(RACK)) in swarm.calls and not swarm.outside
    # a node in no rack asks the seed for them
    swarm = FakeSwarm(DATA, arrivals)
    swarm.avail = [1] * 8 + [0, 0]
    feeder, fed, _, _ = run_feeder(swarm, mine=[0, 2], stall=60)
    assert ("want", [8, 9]) in swarm.calls and feeder.stats.rescues == 1


def test_in_a_rack_nothing_new_for_long_is_still_trouble() -> None:
    # the rack's nodes are slow or died: nothing new for RESCUE_IDLE, and the seed is asked
    swarm = FakeSwarm(DATA, [[0, 2], [1], [3], [4], [5], [6], [7]] + [[]] * 4 + [[8, 9]])
    swarm.avail = [1] * 8 + [0, 0]
    feeder, fed, fetched, _ = run_feeder(swarm, mine=[0, 2], stall=60, rack=RACK)
    assert b"".join(fed) == DATA and feeder.stats.rescues == 1 and fetched == []


def test_a_node_brings_its_lane_into_its_rack_then_trades_inside_it() -> None:
    # stripe 0, 2 from the seed; then its lane, 5 and 7, from its partner elsewhere with
    # the seed kept away; then the rest from its rack only
    swarm = FakeSwarm(DATA, [[], [0, 2], [], [5], [7], [1, 3, 4, 6, 8, 9]])
    swarm.outside = {"10.0.2.10"}
    swarm.avail = [0, 1, 0] + [1] * 7  # its stripe is at no peer
    _, fed, fetched, _ = run_feeder(swarm, mine=[0, 2], stall=60, rack=RACK, lane=[5, 7])
    assert b"".join(fed) == DATA and fetched == []
    calls = [c for c in swarm.calls if c[0] != "prioritize"]
    assert calls == [
        ("seed", False), ("want", []),  # looking: nothing from the partner
        ("want", [0, 2]), ("seed", True),
        ("seed", False), ("want", [5, 7]),
        ("keep_to", sorted(RACK)), ("want", None),
    ]  # fmt: skip
    # nothing of the next chunks was asked first before the node traded with its rack
    first = [i for i, c in enumerate(swarm.calls) if c[0] == "prioritize"]
    assert first and first[0] > swarm.calls.index(("keep_to", sorted(RACK)))


def test_a_lane_piece_at_no_peer_is_asked_of_the_seed_and_a_partner_is_waited_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # piece 7 of its lane is at no peer (its partner died): after RESCUE_IDLE, from the
    # seed. Then a partner still lacks the node's stripe: it waits LANE_HANDOVER for it
    arrivals: list[list[int]] = [[], [0, 2], [5]] + [[]] * 8 + [[7]] + [[]] * 30 + [list(range(10))]
    swarm = FakeSwarm(DATA, arrivals)
    swarm.outside = {"10.0.2.10"}
    swarm.avail = [0, 1, 0] + [1] * 4 + [0] + [1] * 2
    swarm.without_mine = {"10.0.2.10"}
    with caplog.at_level("INFO", logger="corral.agent"):
        _, fed, fetched, _ = run_feeder(swarm, mine=[0, 2], stall=60, rack=RACK, lane=[5, 7])
    assert b"".join(fed) == DATA and fetched == []
    calls = [c for c in swarm.calls if c[0] != "prioritize"]
    assert calls[4:9] == [
        ("seed", False), ("want", [5, 7]), ("want", [7]), ("seed", True), ("seed", False)
    ]  # fmt: skip
    assert "1 piece of my lane at no peer; asking the seed" in caplog.text
    assert "10.0.2.10 still lack my stripe" in caplog.text
    wants = [w for c, w in swarm.calls if c == "want"]
    assert swarm.want_at[wants.index(None)] >= 12 + LANE_HANDOVER  # 7 came at the 12th look


@pytest.mark.parametrize("stops", [False, True])
def test_a_lane_that_comes_slowly_is_waited_for_and_one_that_stops_is_not(
    stops: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # its lane of six pieces through a slow uplink, one every 10 s: 60 s, past
    # LANE_TIMEOUT, and the node takes them all; or two, and then none: at that pace the
    # lane takes 60 s, and after LANE_SLACK times that the node trades with its rack
    lane = [4, 5, 6, 7, 8, 9]
    slow: list[list[int]] = [y for p in lane for y in ([[]] * 9 + [[p]])]
    arrivals = [[], [0, 2], *(slow[:20] + [[]] * 120 if stops else slow), [1, 3, *lane]]
    swarm = FakeSwarm(DATA, arrivals)
    swarm.outside = {"10.0.2.10"}
    with caplog.at_level("INFO", logger="corral.agent"):
        _, fed, fetched, _ = run_feeder(swarm, mine=[0, 2], stall=600, rack=RACK, lane=lane)
    assert b"".join(fed) == DATA and fetched == []
    wants = [w for c, w in swarm.calls if c == "want"]
    started, handed = swarm.want_at[wants.index(lane)], swarm.want_at[wants.index(None)]
    if stops:
        assert "4 pieces of my lane late" in caplog.text
        assert LANE_SLACK * 60 <= handed - started <= LANE_SLACK * 60 + 8
    else:
        assert "my lane is here" in caplog.text and "late" not in caplog.text
        assert handed - started >= 60


def test_before_the_tracker_answers_nothing_is_asked_of_the_seed_but_the_stripe() -> None:
    # a busy corral serve: no tracker answer for TRACKER_WAIT; no peer seems to have
    # anything, but that means nothing yet
    swarm = FakeSwarm(DATA, [[]] * 15 + [[0, 2]] + [[]] * 20 + [list(range(10))])
    swarm.avail = [0] * 10
    swarm.tracker_answered = False
    run_feeder(swarm, mine=[0, 2], stall=60)
    calls = [c for c in swarm.calls if c[0] != "prioritize"]
    # the stripe after TRACKER_WAIT, then the seed only after another look at the peers
    assert calls[:3] == [("seed", False), ("want", [0, 2]), ("seed", True)]
    assert calls[3:5] == [("seed", False), ("want", None)]


def test_a_node_without_peers_waits_for_them_before_asking_the_seed() -> None:
    # the first node of a deployment: nobody to swap with for a while
    swarm = FakeSwarm(DATA, [[0, 2]] + [[]] * 30 + [list(range(10))])
    swarm.avail = [0] * 10
    swarm.peers_connected = 0
    feeder, *_ = run_feeder(swarm, mine=[0, 2], stall=60)
    assert feeder.stats.rescues == 1
    seed_again = [i for i, c in enumerate(swarm.calls) if c == ("seed", True)]
    assert len(seed_again) == 1
    # asked ALONE_WAIT seconds after it found itself alone, not RESCUE_IDLE
    assert swarm.waits >= ALONE_WAIT


@pytest.mark.parametrize(("connected", "looks"), [(3, 1), (0, 4)])
def test_a_node_looks_until_it_has_met_a_peer(connected: int, looks: int) -> None:
    swarm = FakeSwarm(DATA, [[]] * 8 + [[0, 5]] + [list(range(10))])
    swarm.avail = [0] * 10
    swarm.peers_connected = connected
    run_feeder(swarm, mine=[0, 5], stall=60)
    assert swarm.calls[swarm.calls.index(("want", [0, 5])) + 1] == ("seed", True)
    assert swarm.want_at[0] == looks  # LOOK_TIME, or four times that for the first node


def test_a_rack_trades_with_its_lane_partners_and_itself() -> None:
    now = [0.0]
    racks = {f"10.0.{r}.{i}": f"r{r}" for r in (1, 2, 3) for i in range(10, 30)}
    swarms = Swarms(interval=10, clock=lambda: now[0], rng=random.Random(7))
    swarms.open(H1, None, list(by_stripe(racks, racks)), {"10.0.0.1"}, racks=racks)
    announce(swarms, "10.0.0.1", b"s" * 20, left=0)
    for n, ip in enumerate(racks):
        announce(swarms, ip, b"%020d" % n, left=1)
    announce(swarms, "10.0.9.9", b"z" * 20, left=1)  # a node in no rack

    def got(ip: str, n: int) -> set[str]:
        return {a for a, _ in peers(announce(swarms, ip, b"%020d" % n, left=1))}

    # a node of rack r2: the seed, the nodes at its place in the other racks (it brings
    # their stripes into r2, they bring its own into theirs), and its own rack
    member = got("10.0.2.11", 21)
    rack = {f"10.0.2.{i}" for i in range(10, 30) if i != 11}
    assert member == {"10.0.0.1", "10.0.1.11", "10.0.3.11"} | rack
    assert got("10.0.1.29", 19) - {f"10.0.1.{i}" for i in range(10, 30)} == {
        "10.0.0.1", "10.0.2.29", "10.0.3.29",
    }  # fmt: skip
    # a node in no rack gets peers from the whole swarm, as before racks
    anywhere = peers(announce(swarms, "10.0.9.9", b"z" * 20, left=1))
    assert len(anywhere) == MAX_PEERS
    assert len({racks.get(ip) for ip, _ in anywhere} - {None}) == 3


def test_in_many_racks_a_node_gets_its_lane_partners_and_its_own_racks_peers() -> None:
    # 100 racks of 40: a node's 14 lane partners (1, 2, 4, ... 64 racks away on either
    # side) and 36 of its own rack's 39 fill an answer; paired with every other rack, it
    # had 99, one a rack, who took every place before
    racks = {f"10.{r}.0.{i}": f"r{r:02}" for r in range(100) for i in range(1, 41)}
    members = list(by_stripe(racks, racks))
    swarms = Swarms(rng=random.Random(3))
    swarms.open(H1, None, members, racks=racks)
    for n, ip in enumerate(racks):
        announce(swarms, ip, b"%020d" % n, left=1)
    got = {ip for ip, _ in peers(announce(swarms, "10.7.0.5", b"%020d" % 285, left=1))}
    lane = got - {ip for ip in got if racks[ip] == "r07"}
    assert len(got) == MAX_PEERS and "10.7.0.5" not in got
    away = [d * 2**k for d in (1, -1) for k in range(7)]
    assert {racks[ip] for ip in lane} == {f"r{(7 + d) % 100:02}" for d in away}
    # in small racks every partner and rack peer is there
    small = {f"10.{r}.1.{i}": f"s{r:02}" for r in range(40) for i in range(1, 6)}
    swarms.open(H2, None, list(by_stripe(small, small)), racks=small)
    for n, ip in enumerate(small):
        swarms.announce({"info_hash": H2, "peer_id": b"%020d" % n, "port": b"6881"}, ip)
    answer = swarms.announce(
        {"info_hash": H2, "peer_id": b"%020d" % 0, "port": b"6881"}, "10.0.1.1"
    )
    got = {ip for ip, _ in peers(answer)}
    assert {ip for ip in got if small[ip] == "s00"} == {f"10.0.1.{i}" for i in range(2, 6)}
    assert len(got) == 10 + 4  # its lane partners, one a rack, and the 4 others of its own


def test_a_large_swarm_is_told_to_announce_and_ask_less_often() -> None:
    members = [f"10.{i // 256}.{i % 256}.1" for i in range(10_000)]
    swarms = Swarms()
    swarms.open(H1, None, members)
    first = announce(swarms, members[0], b"a" * 20, left=1)
    assert (first["interval"], first["min interval"]) == (50, 25)  # 200 announces a second
    tracker = Tracker("127.0.0.1", 0, swarms)
    try:
        late = Latecomers(f"http://127.0.0.1:{tracker.port}/announce", H1.hex())
        assert late.every == Latecomers.ASK_EVERY and late.ask()
        assert (late.pending(), late.every) == (9_999, 25.0)  # 400 questions a second
    finally:
        tracker.stop()
    # a hundred nodes: the usual rates
    swarms.open(H2, None, members[:100])
    query = {"info_hash": H2, "peer_id": b"b" * 20, "port": b"6881"}
    assert swarms.announce(query, members[1])["interval"] == 10
    assert json.loads(swarms.latecomers(H2))["every"] == Latecomers.ASK_EVERY


def test_the_racks_take_turns_in_the_stripes() -> None:
    # the first stripes hold a piece more when N does not divide the pieces: in name
    # order the first rack would hold them all
    racks = {f"n{i:02}": f"r{1 + i // 3}" for i in range(9)}  # and x in none
    nodes = ["x", *racks]
    assert by_stripe(nodes, racks) == (
        "x", "n00", "n03", "n06", "n01", "n04", "n07", "n02", "n05", "n08",
    )  # fmt: skip
    assert by_stripe(["b", "c", "a"], {}) == ("a", "b", "c")  # no racks: by name


def test_lanes_bring_each_stripe_into_each_rack_once() -> None:
    # racks of 3, 2 and 4 nodes, and two members in no rack, "" of unknown address
    racks = {"a1": "A", "a2": "A", "a3": "A", "b1": "B", "b2": "B"}
    racks |= {f"c{i}": "C" for i in range(1, 5)}
    members = ["a1", "a2", "a3", "b1", "b2", "c1", "c2", "c3", "c4", "x", ""]
    got = lanes(members, racks)
    assert set(got) == set(racks)
    for rack in ("A", "B", "C"):
        inside = [m for m in members if racks.get(m) == rack]
        brought = sorted(g for m in inside for g in got[m])
        elsewhere = [g for g, m in enumerate(members) if racks.get(m) != rack]
        assert brought == elsewhere, rack  # every stripe from elsewhere, each once
        loads = [len(got[m]) for m in inside]
        assert max(loads) - min(loads) <= 1, (rack, loads)
    # a rack's nodes take the stripes from elsewhere in runs, in stripe order
    assert got["b1"] == [0, 1, 2, 5, 6] and got["b2"] == [7, 8, 9, 10]
    assert got["a1"] == [3, 4, 5] and got["c4"] == [10]
    pairs = partners(members, got, racks)
    # in three racks every holder of a stripe pairs with its holders in the two others:
    # a1 holds stripe 0 (its own; b1 and c1 bring it in) and 3, 4 and 5 (b1's, b2's and
    # c1's; c2 and c3 bring in the first two); equal racks line up better (below)
    assert pairs["a1"] == {"b1", "b2", "c1", "c2", "c3"}
    assert pairs["x"] == {"a3", "b2", "c3"} and "" not in pairs
    # equal racks, in the order of by_stripe, pair the nodes at the same place
    even = {f"{r}{i}": r for r in "pqs" for i in range(3)}
    order = list(by_stripe(even, even))
    assert partners(order, lanes(order, even), even) == {
        f"{r}{i}": {f"{o}{i}" for o in "pqs" if o != r} for r in "pqs" for i in range(3)
    }


@pytest.mark.parametrize(
    ("nodes", "count", "num_pieces"),
    [(100, 20, 120), (100, 4, 120), (1000, 25, 2800), (10000, 250, 28000)],
)
def test_the_spare_pieces_spread_over_the_lanes_and_the_racks(
    nodes: int, count: int, num_pieces: int
) -> None:
    """The pieces left over when the torrent's are not a multiple of the nodes go to
    stripes spread over the racks' turns: every lane brings in about as many pieces, and
    every rack holds its share. Taken from the first stripes, one node of each rack brought
    them all in (at N = 100 in 20 racks of 5: 38 pieces beside 19; at 1,000 in 25 racks of
    40 with 2,800 pieces: 72 beside 48)."""
    size = nodes // count
    racks = {f"n{i:05}": f"r{i // size:03}" for i in range(nodes)}
    members = list(by_stripe(racks, racks))
    got = lanes(members, racks)

    def spread(turn: int) -> tuple[list[int], list[int]]:
        held = sorted(p for g in range(nodes) for p in stripe(num_pieces, g, nodes, turn))
        assert held == list(range(num_pieces))  # each piece in one stripe
        lane = [sum(len(stripe(num_pieces, g, nodes, turn)) for g in got[m]) for m in members]
        own = [
            sum(
                len(stripe(num_pieces, g, nodes, turn))
                for g, m in enumerate(members)
                if racks[m] == rack
            )
            for rack in set(racks.values())
        ]
        return lane, own

    lane, own = spread(count)
    assert max(lane) - min(lane) <= 1 and max(own) == min(own), (lane, own)
    lane, own = spread(0)  # without racks, the first stripes (as before)
    assert max(lane) >= 1.5 * min(lane)
    assert stripe(num_pieces, 0, nodes) == list(range(0, num_pieces, nodes))


def test_the_racks_turn_from_the_plan() -> None:
    # 14 pieces, 6 nodes in 2 racks (3 turns): the 2 spare pieces go to the first stripe
    # of turn 0 and the second of turn 1, not to stripes 0 and 1 (both turn 0)
    assert stripe(14, 1, 6) == [1, 7, 13] and stripe(14, 1, 6, 2) == [1, 7]
    assert stripe(14, 3, 6, 2) == [3, 9, 13]
    assert _turn(2) == 2
    assert _turn(None) == _turn("2") == _turn(-1) == 0  # an older server, or nonsense
    plan = {"rack": "r2", "rack_peers": ["10.0.2.1"], "lane": [1, 2]}
    assert _lane(plan, 14, (0, 6), 2) == [1, 2, 7, 8]
    assert _lane(plan, 14, (0, 6)) == [1, 2, 7, 8, 13]


@pytest.mark.parametrize("sizes", [[10] * 64, [9, 10] * 30 + [10] * 3])
def test_in_many_racks_a_node_has_a_few_lane_partners_that_carry_every_stripe_everywhere(
    sizes: list[int],
) -> None:
    # 640 nodes in 64 racks of 10 (or of 9 and 10): a node paired with all the others'
    # importers would have 63 partners; paired along the ring of racks, 1, 2, 4, ... 32
    # racks away on either side, it has 11; where racks differ in size a node's stripes
    # are held by two or three nodes of another rack
    racks = {f"n{r:02}{i}": f"r{r:02}" for r, size in enumerate(sizes) for i in range(size)}
    members = list(by_stripe(racks, racks))
    got = lanes(members, racks)
    pairs = partners(members, got, racks)
    counts = sorted(len(pairs[m]) for m in members)
    assert counts[-1] <= (11 if len(set(sizes)) == 1 else 3 * 12), counts
    for g, owner in enumerate(members):
        holders = {owner} | {m for m in members if g in got[m]}
        assert len({racks[m] for m in holders}) == len(holders) == len(sizes)
        reached, hops, edge = {owner}, 0, {owner}
        while edge:  # a stripe goes from partner to partner, each a holder of it
            edge = {p for m in edge for p in pairs[m] if p in holders} - reached
            reached |= edge
            hops += bool(edge)
        assert reached == holders and hops <= 4, (g, hops)


def test_the_piece_clock_keeps_the_fastest_recent_pace() -> None:
    now = [0.0]
    pace = PieceClock(lambda: now[0])
    assert pace.piece_time() is None and pace.scaled(2.0, 4) == 2.0  # not measured: floor
    for second, count in [(0, 0), (2, 4), (4, 8), (6, 8), (8, 8), (10, 9), (12, 10)]:
        now[0] = second
        pace.observe(count)
    # 0.5 s a piece while they flowed; the 4 s pause and the slow pieces after it are not
    # the link's pace
    assert pace.piece_time() == 0.5
    assert pace.scaled(2.0, 4) == 2.0 and pace.scaled(2.0, 10) == 5.0


def test_on_a_slow_link_a_normal_gap_between_pieces_is_no_rescue() -> None:
    # a piece every 6 s (a 256 KiB piece at 0.35 Mbit/s): gaps of 6 s are its pace, not
    # trouble, though longer than RESCUE_IDLE and the stall (5 s); the seed is never asked
    # for more than the stripe, and nothing goes to HTTP, though one peer only has each
    arrivals: list[list[int]] = [[0, 2]]
    for piece in (1, 3, 4, 5, 6, 7, 8, 9):
        arrivals += [[]] * 5 + [[piece]]
    swarm = FakeSwarm(DATA, arrivals)
    swarm.avail = [1] * 10
    feeder, fed, fetched, _ = run_feeder(swarm, mine=[0, 2], stall=5)
    assert b"".join(fed) == DATA and fetched == []
    # one rescue, in the first gap: the pace is not measured yet, the floors hold (with
    # fixed timings, every gap would have been one, and a stall to HTTP)
    assert feeder.stats.rescues == 1


def test_the_look_at_the_peers_does_not_make_the_stripe_late(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # nobody connected: the node looks for 4 s with nothing coming (the seed is kept
    # away), then asks the seed for its stripe, which takes 3 s; it waits for it rather
    # than finding it late at once because nothing came while it looked
    swarm = FakeSwarm(DATA, [[]] * 7 + [[0, 2]] + [list(range(10))])
    swarm.avail = [0] * 10
    with caplog.at_level("INFO", logger="corral.agent"):
        run_feeder(swarm, mine=[0, 2], stall=60)
    assert "my stripe is here" in caplog.text and "late" not in caplog.text


def test_a_stripe_that_keeps_coming_is_not_late(caplog: pytest.LogCaptureFixture) -> None:
    # The seed sends every stripe at once, each at its share of the server's link: on a
    # 10 Mbit/s server link at N = 100 they take 25 s. Bytes of the stripe keep coming for
    # longer than STRIPE_TIMEOUT; the node waits for them rather than dropping a stripe the
    # seed is sending (its pieces would then come from the seed again, as rescues).
    coming = int(STRIPE_TIMEOUT) + 10
    swarm = FakeSwarm(DATA, [[]] * coming + [[0, 2]] + [list(range(10))])
    swarm.avail = [0] * 10
    swarm.trickle = coming
    with caplog.at_level("INFO", logger="corral.agent"):
        feeder, fed, _, _ = run_feeder(swarm, mine=[0, 2], stall=60)
    assert b"".join(fed) == DATA
    assert "my stripe is here" in caplog.text and "late" not in caplog.text, caplog.text
    assert [c[1] for c in swarm.calls if c[0] == "seed"][:3] == [False, True, False]
    assert feeder.stats.rescues == 0


def test_a_stripe_that_stops_coming_is_late(caplog: pytest.LogCaptureFixture) -> None:
    # a seed that is connected but sends nothing of the stripe: late after STRIPE_TIMEOUT
    # without a byte
    swarm = FakeSwarm(DATA, [[]] * 60 + [list(range(10))])
    swarm.avail = [0] * 10
    swarm.trickle = 5
    with caplog.at_level("INFO", logger="corral.agent"):
        run_feeder(swarm, mine=[0, 2], stall=120)
    late = re.search(r"my stripe is late after ([\d.]+) s", caplog.text)
    assert late is not None, caplog.text
    assert STRIPE_TIMEOUT <= float(late.group(1)) <= STRIPE_TIMEOUT + 8, caplog.text


def test_a_seed_that_is_not_there_makes_the_stripe_late_soon(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # corral serve restarting: the stripe is nowhere, not even at the seed; the node turns
    # to its peers after twice RESCUE_IDLE, not after STRIPE_TIMEOUT
    swarm = FakeSwarm(DATA, [[]] * 12 + [list(range(10))])
    swarm.avail = [0] * 10
    swarm.seed_up = False
    with caplog.at_level("INFO", logger="corral.agent"):
        run_feeder(swarm, mine=[0, 2], stall=60)
    seed_calls = [c[1] for c in swarm.calls if c[0] == "seed"]
    assert seed_calls[:3] == [False, True, False]
    late = re.search(r"my stripe is late after ([\d.]+) s", caplog.text)
    assert late is not None and float(late.group(1)) < STRIPE_TIMEOUT / 2, caplog.text


def test_a_node_that_wants_every_piece_again_tells_the_tracker_at_once() -> None:
    # after its stripe or a rescue, the tracker last heard "0 bytes left" from it
    swarm = LibtorrentSwarm.__new__(LibtorrentSwarm)
    swarm.lt, swarm.handle, swarm._subset = lt, MagicMock(), False
    swarm.handle.status.return_value.pieces = [False] * 4
    swarm.want(None)
    swarm.handle.force_reannounce.assert_not_called()  # it wanted every piece already
    swarm.want([1, 3])
    swarm.handle.prioritize_pieces.assert_called_with([0, 4, 0, 4])
    swarm.want(None)
    swarm.handle.force_reannounce.assert_called_once_with(
        0, -1, lt.reannounce_flags_t.ignore_min_interval
    )


class StoringSwarm(FakeSwarm):
    """A session that keeps the pieces added to it (libtorrent's ``add_piece``)."""

    def add(self, pieces: Mapping[int, bytes]) -> None:
        super().add(pieces)
        for piece in pieces:
            self.have[piece] = True


def test_with_a_session_for_its_lane_a_node_trades_with_its_rack_meanwhile() -> None:
    # stripe 0, 2 from the seed; then its lane, 5 and 7, comes in the lane's session from
    # a partner, slowly, while the rack's session takes the rest from the rack; each lane
    # piece is handed to the rack's session as it comes, the stripe to the lane's
    rack_swarm = StoringSwarm(DATA, [[], [0, 2], [1], [3], [4, 6], [8], [9]])
    rack_swarm.avail = [0, 1, 0] + [1] * 7  # its stripe is at no peer
    lane_swarm = StoringSwarm(DATA, [[]] * 5 + [[5]] + [[]] * 3 + [[7]])
    lane_swarm.avail = [0] * 5 + [1, 0, 1, 0, 0]  # the partner holds the lane
    _, fed, fetched, _ = run_feeder(
        rack_swarm, mine=[0, 2], stall=60, rack=RACK, lane=[5, 7], lane_swarm=lane_swarm
    )
    assert b"".join(fed) == DATA and fetched == []
    assert sorted(rack_swarm.added) == [5, 7] and sorted(lane_swarm.added) == [0, 2]
    calls = [c for c in rack_swarm.calls if c[0] not in ("prioritize", "meet")]
    assert calls == [
        ("seed", False), ("keep_to", sorted(RACK)), ("want", []),  # the partners: elsewhere
        ("want", [0, 2]), ("seed", True),
        ("seed", False), ("want", None),  # its rack's pieces meanwhile
        ("keep_to", sorted(RACK)), ("want", None),
    ]  # fmt: skip
    assert [c for c in lane_swarm.calls if c[0] != "meet"] == [("want", [5, 7]), ("want", [])]
    # the rack's pieces were wanted from the lane's start, not after its last piece
    assert rack_swarm.want_at[-2:] == [2, 10]  # the stripe came with the 2nd look, 7 the 10th
    # it dials its partners until its lane is in; those still in need come to it then
    dials = [dial for call, dial in lane_swarm.calls if call == "meet"]
    assert dials[0] and not dials[-1] and dials == sorted(dials, reverse=True)


def test_a_lane_piece_at_no_partner_is_asked_of_the_seed_in_the_lanes_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # piece 7 of the lane is at no partner (one died): once the lane's session has
    # received nothing for RESCUE_IDLE, though the rack's pieces keep coming, that session
    # asks the seed for it; the rack's session never lets the seed in for it
    rack_swarm = StoringSwarm(DATA, [[], [0, 2], [1], [3], [4], [6], [8], [9]])
    rack_swarm.avail = [0, 1, 0] + [1] * 7
    lane_swarm = StoringSwarm(DATA, [[]] * 3 + [[5]] + [[]] * 6 + [[7]])
    lane_swarm.avail = [0] * 5 + [1, 0, 0, 0, 0]
    with caplog.at_level("INFO", logger="corral.agent"):
        _, fed, fetched, _ = run_feeder(
            rack_swarm, mine=[0, 2], stall=60, rack=RACK, lane=[5, 7], lane_swarm=lane_swarm
        )
    assert b"".join(fed) == DATA and fetched == []
    assert "1 piece of my lane at no peer; asking the seed" in caplog.text
    assert [c for c in lane_swarm.calls if c[0] != "meet"][:4] == [
        ("want", [5, 7]), ("want", [7]), ("seed", True), ("seed", False)
    ]  # fmt: skip
    assert [c for c in rack_swarm.calls if c[0] == "seed"] == [
        ("seed", False), ("seed", True), ("seed", False)  # the stripe only
    ]  # fmt: skip


def test_a_lane_piece_its_rack_brought_is_not_brought_in_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # piece 7 of the lane comes to the rack's session from a rack-mate (who asked the seed
    # for it): it goes into the lane's session, and the lane is in without it from there
    rack_swarm = StoringSwarm(DATA, [[], [0, 2], [1, 3], [4, 6, 7], [8, 9]])
    rack_swarm.avail = [0, 1, 0] + [1] * 7
    lane_swarm = StoringSwarm(DATA, [[]] * 3 + [[5]])
    lane_swarm.avail = [0] * 5 + [1] + [0] * 4  # no partner has 7
    with caplog.at_level("INFO", logger="corral.agent"):
        _, fed, fetched, _ = run_feeder(
            rack_swarm, mine=[0, 2], stall=60, rack=RACK, lane=[5, 7], lane_swarm=lane_swarm
        )
    assert b"".join(fed) == DATA and fetched == []
    assert sorted(lane_swarm.added) == [0, 2, 7] and sorted(rack_swarm.added) == [5]
    assert "my lane is here" in caplog.text and "of my lane at no peer" not in caplog.text


def test_a_lane_has_a_session_of_its_own_in_small_racks_only() -> None:
    # 120 pieces: in 20 racks of 5 a lane of 22 pieces; in 4 racks of 25, 4
    assert _lane_apart(list(range(22)), 120, ["10.0.2.1"])
    assert not _lane_apart(list(range(4)), 120, ["10.0.2.1"])
    assert not _lane_apart(list(range(22)), 120, [])  # nobody to take it from


@pytest.mark.parametrize("flowing", [True, False], ids=["bytes flowing", "nothing"])
def test_a_lane_in_its_own_session_is_late_only_when_nothing_comes(
    flowing: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # the lane's two pieces complete after 50 s: past LANE_TIMEOUT, but bytes of them came
    # all along (8 partners sending at once complete nothing for a while), or none did
    rack_swarm = StoringSwarm(DATA, [[], [0, 2], [1], [3], [4], [6], [8], [9]])
    rack_swarm.avail = [0, 1, 0] + [1] * 7
    lane_swarm = StoringSwarm(DATA, [[]] * 50 + [[5, 7]])
    lane_swarm.avail = [0] * 5 + [1, 0, 1, 0, 0]
    lane_swarm.trickle = 60 if flowing else 0
    with caplog.at_level("INFO", logger="corral.agent"):
        _, fed, fetched, _ = run_feeder(
            rack_swarm, mine=[0, 2], stall=600, rack=RACK, lane=[5, 7], lane_swarm=lane_swarm
        )
    assert b"".join(fed) == DATA and fetched == []
    if flowing:
        assert "late" not in caplog.text and "my lane is here" in caplog.text
    else:
        assert "2 pieces of my lane late" in caplog.text
        wants = [w for c, w in lane_swarm.calls if c == "want"]
        assert lane_swarm.want_at[wants.index([])] <= 2 + LANE_TIMEOUT + 2


def test_a_target_without_room_for_the_scratch_copies_takes_http(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1,000 MiB of stream, a lane of 2 stripes of 10 beside the node's own: 300 MiB more
    mib = 1 << 20
    plan = make_plan(DATA, 8)
    params = {"torrent": "x", "stripe": [3, 10], "lane": [5, 6], "rack": "r1"}
    plan = dataclasses.replace(
        plan,
        image=dataclasses.replace(plan.image, stream_size=1000 * mib, tree_bytes=2000 * mib),
        transport=dataclasses.replace(plan.transport, params=params),
    )
    assert _lane_room(params, 1000 * mib) == 300 * mib
    need = (2000 + 1000 + 300) * mib + SPACE_MARGIN

    def free(left: int) -> None:
        usage = shutil.disk_usage(tmp_path)._replace(free=left)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)

    free(need)
    assert BitTorrentReceiver._no_swarm(plan, tmp_path) == ""
    free(need - 1)
    why = BitTorrentReceiver._no_swarm(plan, tmp_path)
    assert "scratch copy of the stream (and of its lane) need 3364 MiB" in why
