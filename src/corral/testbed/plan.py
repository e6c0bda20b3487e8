"""What a testbed is, before anything is made: the names and addresses of its namespaces
and nodes, the options that shape it (link rates, loss, disk size, slower nodes, racks),
each checked, and the :class:`TestbedState` that ``up`` records in
``$CORRAL_HOME/testbed/state.json``."""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from corral.errors import InvalidValue, NotFound
from corral.inventory.noderange import expand, is_noderange

PREFIX = "ctb-"
HUB = "ctb-hub"
SERVER_NS = "ctb-srv"
NETWORK = ipaddress.IPv4Network("10.77.0.0/24")
SERVER_IP = "10.77.0.1"
MAX_NODES = 250
STATE_VERSION = 1

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$", re.IGNORECASE)
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_SIZE = re.compile(r"^(\d+)([kmgt]?)(i?b)?$", re.IGNORECASE)
_LOSS = re.compile(r"^(\d+(?:\.\d+)?)%?$")


def parse_rate(text: str | int) -> int:
    """``20mbit`` -> 20_000_000 bits/s (tc's units, decimal); an int is bits/s already."""
    if isinstance(text, int):
        bps = text
    else:
        m = _RATE.match(text.strip())
        if m is None:
            hint = "use a number and bit, kbit, mbit or gbit, e.g. 20mbit"
            if text.strip().lower().endswith("bps"):
                hint += " (tc reads 'mbps' as megabytes per second)"
            raise InvalidValue(f"bad rate '{text}'", hint)
        bps = round(float(m.group(1)) * _RATE_UNITS[m.group(2).lower()])
    if not 8_000 <= bps <= 100 * 10**9:
        raise InvalidValue(f"rate {text} is out of range", "give 8kbit to 100gbit")
    return bps


def format_rate(bps: int) -> str:
    """The shortest exact tc spelling: 20_000_000 -> ``20mbit``."""
    for unit, size in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bps % size == 0:
            return f"{bps // size}{unit}"
    return f"{bps}bit"


def parse_loss(text: str | float | None) -> float:
    """``1%`` (or ``1``: netem's unit is percent) -> 0.01."""
    if text is None:
        return 0.0
    if isinstance(text, float | int):
        percent = float(text) * 100
    else:
        m = _LOSS.match(text.strip())
        if m is None:
            raise InvalidValue(f"bad loss '{text}'", "give a percentage, e.g. 1% or 0.5%")
        percent = float(m.group(1))
    if not 0 <= percent < 100:
        raise InvalidValue(f"loss {text} is out of range", "give 0% to less than 100%")
    return percent / 100


def parse_size(text: str | int) -> int:
    """``1G`` -> bytes (K, M, G, T are powers of 1024, as truncate reads them)."""
    if isinstance(text, int):
        size = text
    else:
        m = _SIZE.match(text.strip())
        if m is None:
            raise InvalidValue(f"bad size '{text}'", "give e.g. 512M, 1G or 20G")
        size = int(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " ")
    if not 1024**2 <= size <= 1024**5:
        raise InvalidValue(f"disk size {text} is out of range", "give 1M to 1P")
    return size


def node_name(index: int) -> str:
    return f"tb{index:03d}"


def node_ip(index: int) -> str:
    """Node ``index`` (1-based) at ``10.77.0.<index + 1>``; the server is ``.1``."""
    if not 1 <= index <= MAX_NODES:
        raise InvalidValue(f"node number {index} is out of range 1-{MAX_NODES}")
    return str(NETWORK.network_address + 1 + index)


def node_mac(index: int) -> str:
    """Locally administered, unicast, and readable: node 258 is ``02:cb:00:00:01:02``."""
    return f"02:cb:00:00:{index >> 8:02x}:{index & 0xFF:02x}"


#: The server's MAC, as node 0 of the address plan (its address is ``.1``, node 0's).
SERVER_MAC = node_mac(0)


def rack_sizes(nodes: int, racks: int) -> list[int]:
    """How many consecutive nodes each of ``racks`` racks holds: as even as can be, the
    first ``nodes % racks`` racks one node more (100 in 4: 25 each; 10 in 4: 3, 3, 2, 2).

    Racks that differ by more than one node would make uplinks of the same rate unequally
    oversubscribed, and a benchmark's per-uplink figures incomparable.
    """
    if racks < 1:
        raise InvalidValue(
            f"--racks {racks} is out of range", f"give 1 to {nodes} racks, at most one per node"
        )
    if racks > nodes:
        raise InvalidValue(
            f"--racks {racks} is more than the {nodes} nodes",
            f"give at most {nodes} racks, or more --nodes",
        )
    base, extra = divmod(nodes, racks)
    return [base + 1 if i < extra else base for i in range(racks)]


def rack_name(index: int) -> str:
    return f"r{index}"


def parse_slow(
    items: Iterable[str] | Mapping[str, str | int], names: Sequence[str]
) -> dict[str, int]:
    """``NODE=RATE`` overrides; NODE is a name, a noderange (``tb[001-004]``) or a number."""
    pairs: list[tuple[str, str | int]] = []
    if isinstance(items, Mapping):
        pairs = list(items.items())
    else:
        for item in items:
            node, sep, rate = item.partition("=")
            if not sep or not node.strip() or not rate.strip():
                raise InvalidValue(f"bad --slow '{item}'", "give NODE=RATE, e.g. tb007=2mbit")
            pairs.append((node.strip(), rate.strip()))
    known = set(names)
    rates: dict[str, int] = {}
    for target, value in pairs:
        bps = parse_rate(value)
        if target.isdigit():
            target = node_name(int(target))
        for name in expand(target) if is_noderange(target) else [target]:
            if name not in known:
                raise InvalidValue(
                    f"--slow names unknown node '{name}'",
                    f"the nodes are {names[0]}..{names[-1]}" if names else None,
                )
            rates[name] = bps
    return rates


@dataclass(frozen=True)
class NodeInfo:
    name: str
    index: int
    ip: str
    mac: str
    rate: int  # bits/s, both directions of the node's link
    loop: str = ""  # /dev/loopN
    disk: str = ""  # the loop's backing file
    rack: str = ""  # the rack's name; "" in a testbed without racks

    @property
    def namespace(self) -> str:
        return PREFIX + self.name

    @property
    def port(self) -> str:
        """The node's veth end in the hub (at most 15 characters, as every interface name)."""
        return f"t{self.index:03d}"


@dataclass(frozen=True)
class RackInfo:
    """A rack: a bridge of its own in the hub, joined to the core bridge (the server's) by
    one veth pair, the uplink, shaped to ``uplink`` bits/s each way (None: unshaped)."""

    name: str
    index: int
    uplink: int | None = None

    @property
    def bridge(self) -> str:
        return f"br-{self.name}"

    @property
    def core_port(self) -> str:
        """The uplink's end on the core bridge: what it sends goes into the rack."""
        return f"{self.name}-core"

    @property
    def rack_port(self) -> str:
        """The uplink's end on the rack's bridge: what it sends leaves the rack."""
        return f"{self.name}-up"


@dataclass
class TestbedState:
    """What ``up`` built, in ``$CORRAL_HOME/testbed/state.json``."""

    nodes: list[NodeInfo]
    link: int
    racks: list[RackInfo] = field(default_factory=list)
    server_link: int | None = None
    loss: float = 0.0
    disk_size: int = 1024**3
    http_port: int = 8080
    server_ip: str = SERVER_IP
    network: str = str(NETWORK)
    server_url: str = ""
    server_pid: int | None = None
    created: float = field(default_factory=time.time)
    version: int = STATE_VERSION

    def node(self, name: str) -> NodeInfo:
        for info in self.nodes:
            if info.name == name:
                return info
        raise NotFound("testbed node", name, "see 'corral testbed status'")

    def rack_nodes(self, rack: str) -> list[NodeInfo]:
        return [n for n in self.nodes if n.rack == rack]

    @property
    def netmask(self) -> str:
        return str(ipaddress.IPv4Network(self.network).netmask)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TestbedState:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ValueError("not a testbed state of this version")
        data["nodes"] = [NodeInfo(**n) for n in data["nodes"]]
        data["racks"] = [RackInfo(**r) for r in data.get("racks", [])]
        return cls(**data)


def plan(
    nodes: int,
    link: str | int = "20mbit",
    *,
    server_link: str | int | None = None,
    loss: str | float | None = None,
    slow: Iterable[str] | Mapping[str, str | int] = (),
    disk_size: str | int = "1G",
    http_port: int = 8080,
    racks: int | None = None,
    rack_uplink: str | int | None = None,
) -> TestbedState:
    """The testbed these options ask for, every input checked; nothing is created.

    ``racks`` splits the nodes into that many racks of consecutive nodes (see
    :func:`rack_sizes`) behind uplinks of ``rack_uplink`` each way; without it, every node
    hangs on the server's bridge.
    """
    if not 1 <= nodes <= MAX_NODES:
        raise InvalidValue(f"--nodes {nodes} is out of range", f"give 1 to {MAX_NODES}")
    if not 1 <= http_port <= 65535:
        raise InvalidValue(f"--http-port {http_port} is out of range", "give 1 to 65535")
    rate = parse_rate(link)
    names = [node_name(i) for i in range(1, nodes + 1)]
    overrides = parse_slow(slow, names)
    rack_list, rack_of = plan_racks(nodes, racks, rack_uplink)
    return TestbedState(
        nodes=[
            NodeInfo(name, i, node_ip(i), node_mac(i), overrides.get(name, rate), rack=rack_of[i])
            for i, name in enumerate(names, start=1)
        ],
        link=rate,
        racks=rack_list,
        server_link=parse_rate(server_link) if server_link is not None else None,
        loss=parse_loss(loss),
        disk_size=parse_size(disk_size),
        http_port=http_port,
    )


def plan_racks(
    nodes: int, racks: int | None, uplink: str | int | None
) -> tuple[list[RackInfo], dict[int, str]]:
    """(the racks, node index -> its rack's name, "" without racks)."""
    if racks is None:
        if uplink is not None:
            raise InvalidValue("--rack-uplink needs --racks", "add --racks R or drop it")
        return [], dict.fromkeys(range(1, nodes + 1), "")
    sizes = rack_sizes(nodes, racks)
    bps = None
    if uplink is not None:
        try:
            bps = parse_rate(uplink)
        except InvalidValue as exc:
            raise InvalidValue(f"--rack-uplink: {exc.message}", exc.hint) from None
    rack_list = [RackInfo(rack_name(i), i, bps) for i in range(1, racks + 1)]
    rack_of: dict[int, str] = {}
    index = 1
    for rack, size in zip(rack_list, sizes, strict=True):
        for _ in range(size):
            rack_of[index] = rack.name
            index += 1
    return rack_list, rack_of


def summarize_racks(state: TestbedState) -> str:
    """``4 racks of 25 nodes, 50mbit uplinks`` for one line of output ("" without racks)."""
    if not state.racks:
        return ""
    sizes = [len(state.rack_nodes(r.name)) for r in state.racks]
    size = str(sizes[0]) if min(sizes) == max(sizes) else f"{min(sizes)}-{max(sizes)}"
    uplink = state.racks[0].uplink  # plan() gives every rack the same
    rate = f"{format_rate(uplink)} uplinks" if uplink else "unshaped uplinks"
    return f"{len(state.racks)} rack{'s' if len(sizes) > 1 else ''} of {size} nodes, {rate}"


def summarize_rates(state: TestbedState) -> str:
    """``20mbit links (tb007: 2mbit)`` for one line of output."""
    odd = [f"{n.name}: {format_rate(n.rate)}" for n in state.nodes if n.rate != state.link]
    text = f"{format_rate(state.link)} links"
    return text + (f" ({', '.join(odd)})" if odd else "")


def loss_text(loss: float) -> str:
    return f"{loss * 100:g}%" if loss else "none"
