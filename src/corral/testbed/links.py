"""The testbed's network as ``ip -batch`` and ``tc -batch`` lines: a bridge in the hub
namespace with a veth pair to each other namespace, each link shaped by tbf where its
packets leave, and loss by a BPF filter.

With racks, the hub holds a bridge per rack besides the core one (``br0``, where the
server is), and each rack bridge is joined to the core by a veth pair, its uplink, in the
hub too. Traffic between two nodes of a rack stays on the rack's bridge; traffic from the
server or from another rack crosses the uplink. The uplink is shaped at both of its ends,
each where packets leave: the core end (``rN-core``) limits what goes into the rack, the
rack end (``rN-up``) what comes out of it, so the core end's counters are the uplink's
traffic both ways.
"""

from __future__ import annotations

from corral.testbed.plan import SERVER_NS, NodeInfo, TestbedState

BRIDGE = "br0"
SERVER_PORT = "s0"
TBF_LATENCY = "50ms"


def tbf(device: str, bps: int) -> str:
    """A tc line that limits ``device``'s egress to ``bps``.

    The bucket holds 4 ms of traffic but at least 32 KiB, enough for the timer's slack at
    high rates without letting slow links burst for long; veth's 64 KiB GSO packets are
    split by tbf itself.
    """
    burst = max(32 * 1024, bps // 8 // 250)
    return f"qdisc add dev {device} root tbf rate {bps}bit burst {burst} latency {TBF_LATENCY}"


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
        mac = f" address {node.mac}" if node else ""
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
