"""The testbed's network as ``ip -batch`` and ``tc -batch`` lines: a bridge in the hub
namespace with a veth pair to each other namespace, each link shaped by tbf where its
packets leave (a host's own end with a scheduler in it, :func:`host_shaping`), and loss by
a BPF filter.

With racks, the hub holds a bridge per rack besides the core one (``br0``, where the
server is), and each rack bridge is joined to the core by a veth pair, its uplink, in the
hub too. Traffic between two nodes of a rack stays on the rack's bridge; traffic from the
server or from another rack crosses the uplink. The uplink is shaped at both of its ends,
each where packets leave: the core end (``rN-core``) limits what goes into the rack, the
rack end (``rN-up``) what comes out of it, so the core end's counters are the uplink's
traffic both ways.
"""

from __future__ import annotations

from corral.testbed.plan import SERVER_MAC, SERVER_NS, NodeInfo, TestbedState

BRIDGE = "br0"
SERVER_PORT = "s0"
#: How long tbf lets a packet wait before it drops it (the queue, in time).
TBF_LATENCY_MS = 50


def tbf(device: str, bps: int, handle: str = "") -> str:
    """A tc line that limits ``device``'s egress to ``bps``.

    The bucket holds 4 ms of traffic but at least 32 KiB, enough for the timer's slack at
    high rates without letting slow links burst for long; veth's 64 KiB GSO packets are
    split by tbf itself.
    """
    burst = _burst(bps)
    root = f"root handle {handle}" if handle else "root"
    return (
        f"qdisc add dev {device} {root} tbf rate {bps}bit burst {burst} latency {TBF_LATENCY_MS}ms"
    )


def _burst(bps: int) -> int:
    return max(32 * 1024, bps // 8 // 250)


#: Packets up to this many bytes leave a host ahead of its bulk traffic
#: (:func:`host_shaping`): handshakes, ACKs and requests, not full segments.
SPARSE_BYTES = 200


def host_shaping(device: str, bps: int) -> list[str]:
    """tc lines that limit a host's own ``device`` (a node's or the server's ``eth0``) to
    ``bps`` the way a real host sends at its NIC's line rate.

    A real host's queue is its default qdisc, fq_codel on Debian and RHEL (systemd sets
    it), which serves a flow with little queued (a TCP handshake, a bare ACK, a request)
    before the flows that fill the link. A tbf alone drops them behind the bulk instead:
    with 100 BitTorrent nodes uploading at 2 Mbit/s, the peers' SYNs and SYN-ACKs died in
    full 50 ms queues and most peers never connected. The kernels this runs on may lack
    fq_codel (this project's machines do), so the tbf that sets the rate holds an htb
    with two unlimited classes instead of its own FIFO: packets of up to
    :data:`SPARSE_BYTES` first, the rest after. The bulk class keeps exactly the FIFO tbf
    would have had (50 ms of the rate plus the bucket, in bytes), so bulk traffic sees the
    same queue as before. A switch port (the hub's side) has no such scheduler, and keeps
    the plain :func:`tbf`.
    """
    burst = _burst(bps)
    limit = bps // 8 * TBF_LATENCY_MS // 1000 + burst
    # Classic BPF: load the packet's length; longer than SPARSE_BYTES is no match (0),
    # otherwise the filter's class (-1).
    program = f"4,128 0 0 0,37 1 0 {SPARSE_BYTES},6 0 0 {2**32 - 1},6 0 0 0"
    return [
        tbf(device, bps, handle="1:"),
        f"qdisc add dev {device} parent 1:1 handle 10: htb default 20",
        f"class add dev {device} parent 10: classid 10:10 htb rate 10gbit prio 0",
        f"class add dev {device} parent 10: classid 10:20 htb rate 10gbit prio 1",
        f"qdisc add dev {device} parent 10:10 pfifo limit 1000",
        f"qdisc add dev {device} parent 10:20 bfifo limit {limit}",
        f'filter add dev {device} parent 10: bpf bytecode "{program}" classid 10:10',
    ]


def loss_filter(device: str, loss: float) -> list[str]:
    """tc lines that drop each packet leaving ``device`` with probability ``loss``.

    netem would be the usual tool, but kernels built without it exist (this project's test
    machines among them). A classic BPF filter on the clsact egress hook does the same:
    ``ld rand`` (a fresh random u32 per packet), then pass (TC_ACT_OK) or drop
    (TC_ACT_SHOT). It runs before the root qdisc, so dropped packets cost no tbf tokens,
    as netem's loss in front of a tbf child would. Like netem's, the loss is per packet as
    the kernel sees it: a TCP segment that veth carries as one GSO packet is lost whole.
    """
    threshold = min(round(loss * 2**32), 2**32 - 1)
    program = f"4,32 0 0 {2**32 - 0x1000 + 56},53 0 1 {threshold},6 0 0 0,6 0 0 2"
    return [
        f"qdisc add dev {device} clsact",
        f'filter add dev {device} egress bpf da bytecode "{program}"',
    ]


def bridge_commands(bridge: str) -> list[str]:
    """A bridge that floods multicast (no snooping: udpcast's receivers join groups the
    bridge would otherwise have to learn) and forwards at once (no STP, no delay)."""
    return [
        f"link add {bridge} type bridge mcast_snooping 0 stp_state 0 forward_delay 0",
        f"link set {bridge} addrgenmode none",
        f"link set {bridge} up",
    ]


def node_bridge(state: TestbedState, node: NodeInfo) -> str:
    for rack in state.racks:
        if rack.name == node.rack:
            return rack.bridge
    return BRIDGE


def hub_commands(state: TestbedState) -> tuple[list[str], list[str]]:
    """(``ip -batch`` lines, ``tc -batch`` lines) that build the hub."""
    ip = ["link set lo up", *bridge_commands(BRIDGE)]
    tc: list[str] = []
    for rack in state.racks:
        ip += bridge_commands(rack.bridge)
        ip.append(f"link add {rack.core_port} type veth peer name {rack.rack_port}")
        for port, bridge in ((rack.core_port, BRIDGE), (rack.rack_port, rack.bridge)):
            ip += [
                f"link set {port} master {bridge}",
                f"link set {port} addrgenmode none",
                f"link set {port} up",
            ]
            if rack.uplink is not None:
                tc.append(tbf(port, rack.uplink))
    ports = [(SERVER_PORT, SERVER_NS, None)] + [(n.port, n.namespace, n) for n in state.nodes]
    for port, namespace, node in ports:
        mac = f" address {node.mac if node else SERVER_MAC}"
        bridge = node_bridge(state, node) if node else BRIDGE
        ip += [
            f"link add {port} type veth peer name eth0{mac} netns {namespace}",
            f"link set {port} master {bridge}",
            f"link set {port} addrgenmode none",
            f"link set {port} up",
        ]
        if node is not None:
            tc.append(tbf(port, node.rate))
            if state.loss > 0:
                tc += loss_filter(port, state.loss)
    return ip, tc


def neighbour_commands(state: TestbedState) -> str:
    """``ip -batch`` lines that give a namespace the MAC of every host of the testbed, the
    server and each node, as permanent neighbour entries: no host of a testbed sends ARP.

    On a real LAN, ARP costs nothing next to the data; on the testbed it is not scaled
    down with the links. When 100 BitTorrent nodes each reach 60 peers at once, 6,000
    broadcast requests are flooded to every port, 360 KB for each 2 Mbit/s link, and the
    ports' 50 ms queues drop most of them: with ARP, 778 of those 6,000 connections were
    made within 15 s on an idle testbed; with these tables, 5,969. The testbed knows every
    address and MAC it gave (the server's is :data:`SERVER_MAC`), so it writes them in.
    """
    hosts = [(state.server_ip, SERVER_MAC)] + [(n.ip, n.mac) for n in state.nodes]
    return "".join(f"neigh replace {ip} lladdr {mac} dev eth0 nud permanent\n" for ip, mac in hosts)


def endpoint_commands(address: str, prefix: int) -> str:
    """``ip -batch`` lines for a namespace's own end: lo, eth0 with its address.

    No IPv6 link-local address (addrgenmode none): its router solicitations and DAD would
    add traffic to the counters that benchmarks read.
    """
    return (
        "link set lo up\n"
        "link set eth0 addrgenmode none\n"
        f"addr add {address}/{prefix} dev eth0\n"
        "link set eth0 up\n"
    )
