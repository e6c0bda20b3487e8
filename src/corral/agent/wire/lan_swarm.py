"""The libtorrent settings that the agent and corral's seed share, for a swarm of
deployment members on one LAN. Stdlib only: ``lt`` is the libtorrent module, passed in by
whoever imported it (lazily)."""

from __future__ import annotations

from typing import Any


def lan_settings(lt: Any, address: str, port: int) -> dict[str, Any]:
    """The libtorrent settings that the agent and corral's seed share, for a swarm of
    deployment members on one LAN; each side adds its own
    (:func:`corral.agent.receivers.bittorrent.libtorrent_swarm.session_settings`,
    :func:`corral.deploy.transports.bittorrent.seed_settings`)."""
    return {
        "listen_interfaces": f"{address}:{port}",
        # Peers come from corral's tracker only. DHT and local service discovery would
        # announce the deployment beyond it (and private torrents forbid them anyway);
        # UPnP and NAT-PMP map ports on a home router, which a cluster LAN does not have.
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        # uTP's congestion control (LEDBAT) yields to any other traffic by design and runs
        # in user space: on a LAN dedicated to the deployment plain TCP is faster and
        # cheaper on CPU, which a host running many agents is short of.
        "enable_outgoing_utp": False,
        "enable_incoming_utp": False,
        # Protocol encryption hides BitTorrent from ISPs' shapers; there are none here, and
        # RC4 would cost CPU on every byte.
        "out_enc_policy": int(lt.enc_policy.disabled),
        "in_enc_policy": int(lt.enc_policy.disabled),
        # Every peer is a deployment member admitted by the tracker. Several agents behind
        # one address (a test bench, a NAT'd rack) must still all be served.
        "allow_multiple_connections_per_ip": True,
        # Choking exists to make strangers reciprocate (tit-for-tat). The nodes are not
        # strangers and there are no free riders to punish, so the seed unchokes every
        # peer that asks (fixed slots, unlimited), and no peer waits for an optimistic
        # unchoke every 30 s; a node limits its slots for its links' sake only. What the
        # seed sends is limited by what the nodes ask of it (their stripes, see
        # SeedUse), not by choking. Measured with 20 nodes at 20 Mbit/s
        # and the seed at 200 Mbit/s, 16 MiB, before the stripes: every peer unchoked
        # and asking freely, T = 1.5 x S/B but egress 8.7 x S (the seed, 10x faster
        # than a node, answered everything); 1 or 2 unchoke slots (rotated every 3-5 s),
        # egress 2.3-3.2 x S but T = 2-2.3 x S/B (the seed then injects new pieces
        # no faster than one node can take them); libtorrent's super-seeding, 2.2 x S
        # and 3.4 x S/B. With the stripes: 1.1 x S and 1.6 x S/B. The seed's choking
        # order (round robin) only decides who goes first if a limit is ever set.
        "choking_algorithm": int(lt.choking_algorithm_t.fixed_slots_choker),
        "unchoke_slots_limit": -1,  # a node sets its own (UPLOAD_SLOTS, for its links)
        "seed_choking_algorithm": int(lt.seed_choking_algorithm_t.round_robin),
        # A wave of nodes that boot together connects at once, and a link that is full
        # drops handshakes too; SYNs are resent after 1, 3, 7 s: libtorrent's own
        # patience with a connection attempt (nodes of a 50-node wave were left without
        # a single peer with a 3 s timeout). Each side sets its listen backlog.
        "peer_connect_timeout": 15,
        # LAN round trips are sub-millisecond: a peer that does not answer within a few
        # seconds is dead or overloaded, and its requests are better sent elsewhere.
        "handshake_timeout": 5,
        "request_timeout": 10,
        "piece_timeout": 10,
        "peer_timeout": 30,
        "min_reconnect_time": 2,
        "connection_speed": 100,
        "smooth_connects": False,
        "stop_tracker_timeout": 1,
        # announce as often as corral's tracker asks (10 s; libtorrent's floor is 5 min):
        # the tracker forgets peers silent for three intervals, and a node that stays to
        # seed must stay in its list for the latecomers
        "min_announce_interval": 5,
    }


def limit_local_peers(session: Any) -> None:
    """Make ``unchoke_slots_limit`` hold for peers on private networks too: libtorrent puts
    them in its "local" peer class, which ignores unchoke slots (and rate limits), so on a
    LAN any limit set would mean nothing."""
    local = session.local_peer_class_id
    peer_class = session.get_peer_class(local)
    peer_class["ignore_unchoke_slots"] = False
    session.set_peer_class(local, peer_class)
