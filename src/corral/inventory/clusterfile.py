"""The declarative cluster file: ``corral apply`` and ``corral export``.

A file lists distros, profiles, groups and nodes. A node entry whose name is a noderange
(``n[001-100]``) stands for one node per name, with each interface's ``ip`` and ``mac``
taken as the first of consecutive addresses. Applying is idempotent: entities equal to
their stored form are left alone. ``export`` writes such a range entry for each run of
nodes that differ only by consecutive names and addresses, and one entry per other node;
``apply`` takes it back unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml

from corral.errors import InvalidClusterFile
from corral.inventory.noderange import expand, is_noderange, numbered
from corral.inventory.nodes import offset_ip, offset_mac
from corral.inventory.schema import ClusterSpec, parse
from corral.inventory.store import Inventory, Kind, Outcome

ORDER: tuple[Kind, ...] = ("distro", "profile", "group", "node")

#: How many YAML nodes aliases may add to a cluster file, all aliases together. An alias
#: repeats what its anchor holds; nested ones multiply (a few hundred bytes can stand for
#: billions of values: the "billion laughs"). Ordinary reuse (``<<: *defaults`` in every
#: entry) stays far below this.
MAX_ALIAS_EXPANSION = 100_000


class AliasBomb(yaml.YAMLError):
    """YAML whose aliases would expand beyond :data:`MAX_ALIAS_EXPANSION`, or loop."""


def _expanded_size(root: yaml.Node) -> tuple[int, int]:
    """(nodes the document stands for with every alias expanded, distinct nodes), counted
    without expanding anything."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise AliasBomb("an alias refers to the node that contains it")
        active.add(key)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        total = 1 + sum(size(child) for child in children)
        active.discard(key)
        sizes[key] = total
        return total

    return size(root), len(sizes)


class _LimitedLoader(yaml.SafeLoader):
    """The safe loader, refusing documents whose aliases expand beyond a bound."""

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is None:
            return None
        expanded, distinct = _expanded_size(node)
        if expanded - distinct > MAX_ALIAS_EXPANSION:
            raise AliasBomb(
                f"its aliases expand to {expanded - distinct} more values, "
                f"more than the {MAX_ALIAS_EXPANSION} allowed"
            )
        return node


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses an alias bomb (:class:`AliasBomb`, a YAMLError):
    for every YAML that users hand corral."""
    return yaml.load(text, Loader=_LimitedLoader)  # a SafeLoader: plain data only


def expand_node_entries(entries: list[Any]) -> list[Any]:
    out: list[Any] = []
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not is_noderange(name):
            out.append(entry)
            continue
        for offset, node in enumerate(expand(name)):
            interfaces = []
            for iface in entry.get("interfaces") or []:
                if not isinstance(iface, dict):
                    raise InvalidClusterFile(f"node entry {name}: each interface must be a mapping")
                iface = dict(iface)
                try:
                    if iface.get("ip"):
                        iface["ip"] = offset_ip(str(iface["ip"]), offset)
                    if iface.get("mac"):
                        iface["mac"] = offset_mac(str(iface["mac"]), offset)
                except ValueError as exc:
                    raise InvalidClusterFile(f"node entry {name}: {exc}") from None
                interfaces.append(iface)
            out.append(dict(entry, name=node, interfaces=interfaces))
    return out


def load_cluster(text: str, source: str) -> ClusterSpec:
    try:
        data = load_yaml(text)
    except AliasBomb as exc:
        raise InvalidClusterFile(
            f"{source}: {exc}", "write the values out, or use noderanges for similar nodes"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InvalidClusterFile(f"{source}:{where}: malformed YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidClusterFile(
            f"{source}: expected a mapping with distros, profiles, groups, nodes"
        )
    for key in ("distros", "profiles", "groups", "nodes"):
        if key in data and not isinstance(data[key], list):
            raise InvalidClusterFile(f"{source}: '{key}' must be a list")
    if "nodes" in data:
        data = dict(data, nodes=expand_node_entries(data["nodes"]))
    try:
        return parse(ClusterSpec, data, source)
    except InvalidClusterFile:
        raise
    except Exception as exc:
        raise InvalidClusterFile(str(exc)) from None


#: What applying a file did to each entry; "removed" only with ``prune``.
ApplyOutcome = Literal["created", "changed", "unchanged", "removed"]
APPLY_OUTCOMES: tuple[ApplyOutcome, ...] = ("created", "changed", "unchanged", "removed")


def apply_cluster_entries(
    inv: Inventory, cluster: ClusterSpec, prune: bool = False
) -> dict[Kind, dict[ApplyOutcome, list[str]]]:
    """Create or update everything in ``cluster`` and, with ``prune``, remove what it does
    not list (nodes first, then groups, profiles, distros, so that nothing removed is still
    referred to); returns the names per kind and outcome."""
    entries: dict[Kind, dict[ApplyOutcome, list[str]]] = {
        kind: {outcome: [] for outcome in APPLY_OUTCOMES} for kind in ORDER
    }
    for kind in ORDER:
        specs = getattr(cluster, f"{kind}s")
        for spec, outcome in zip(specs, inv.put(kind, specs), strict=True):
            entries[kind][outcome].append(spec.name)
    if prune:
        for kind in reversed(ORDER):
            listed = {spec.name for spec in getattr(cluster, f"{kind}s")}
            extra = [name for name in inv.names(kind) if name not in listed]
            if extra:
                inv.remove(kind, extra)
                entries[kind]["removed"] = extra
    return entries


def apply_cluster(inv: Inventory, cluster: ClusterSpec) -> dict[str, dict[Outcome, int]]:
    """Create or update everything in ``cluster``; returns counts per kind and outcome."""
    entries = apply_cluster_entries(inv, cluster)
    return {
        kind: {o: len(entries[kind][o]) for o in ("created", "changed", "unchanged")}
        for kind in ORDER
    }


def _follows(entry: dict[str, Any], first: dict[str, Any], offset: int) -> bool:
    """Whether ``entry`` is what the range entry ``first`` gives its node ``offset``."""
    if entry.keys() != first.keys() or any(
        entry[k] != first[k] for k in entry if k not in ("name", "interfaces")
    ):
        return False
    ours, theirs = entry.get("interfaces", []), first.get("interfaces", [])
    if len(ours) != len(theirs):
        return False
    for iface, base in zip(ours, theirs, strict=True):
        expected = dict(base)
        if base.get("ip"):
            expected["ip"] = offset_ip(base["ip"], offset)
        if base.get("mac"):
            try:
                expected["mac"] = offset_mac(base["mac"], offset)
            except ValueError:
                return False
        if iface != expected:
            return False
    return True


def fold_node_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Node entries with each run of nodes that differ only by consecutive numbers in
    their names and consecutive addresses written as one noderange entry (what
    :func:`expand_node_entries` reads back); in the order of each run's first node."""
    runs: list[tuple[int, list[dict[str, Any]]]] = []  # (position of first, its nodes)
    by_prefix: dict[str, list[tuple[int, int, int, dict[str, Any]]]] = {}
    for position, entry in enumerate(entries):
        split = numbered(entry["name"])
        if split is None:
            runs.append((position, [entry]))
        else:
            prefix, number, width = split
            by_prefix.setdefault(prefix, []).append((number, width, position, entry))
    for prefix, members in by_prefix.items():
        current: list[dict[str, Any]] = []
        start = low = width = 0
        for number, digits, position, entry in sorted(members, key=lambda m: m[:2]):
            offset = number - low
            if (
                current
                and offset == len(current)
                # the name expand() gives the range's node at this offset
                and entry["name"] == f"{prefix}{number:0{width}d}"
                and _follows(entry, current[0], offset)
            ):
                current.append(entry)
                continue
            if current:
                runs.append((start, current))
            current, start, low, width = [entry], position, number, digits
        runs.append((start, current))
    out: list[dict[str, Any]] = []
    for _position, nodes in sorted(runs, key=lambda run: run[0]):
        if len(nodes) == 1:
            out.append(nodes[0])
            continue
        prefix, low, width = numbered(nodes[0]["name"])  # type: ignore[misc]
        high = low + len(nodes) - 1
        out.append(dict(nodes[0], name=f"{prefix}[{low:0{width}d}-{high:0{width}d}]"))
    return out


def export_cluster(inv: Inventory) -> str:
    cluster = ClusterSpec(
        distros=inv.specs("distro"),
        profiles=inv.specs("profile"),
        groups=inv.specs("group"),
        nodes=inv.specs("node"),
    )
    data = cluster.model_dump(mode="json", exclude_defaults=True)
    data["nodes"] = fold_node_entries(data.get("nodes", []))
    if not data["nodes"]:
        del data["nodes"]
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
