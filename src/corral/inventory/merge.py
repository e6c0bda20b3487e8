"""How a node's profiles combine.

A node's profile chain is its groups' profiles (in group order) followed by its own.
``~name`` drops a profile inherited so far. Along the chain, later profiles win for
scalars, lists concatenate, and variables merge key by key; group variables then
override profile variables, and the node's own variables override everything. The power
settings merge field by field the same way: profiles, then groups, then the node.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from corral.inventory.schema import WITH_SECRETS, GroupSpec, NodeSpec, PowerSpec, ProfileSpec

_MERGED_FIELDS = [f for f in ProfileSpec.model_fields if f != "name"]


@dataclass
class Merged:
    """A node's merged profile settings and where each value came from."""

    chain: list[str]
    values: dict[str, Any] = field(default_factory=dict)
    # field -> origin (scalars), list of origins (lists), {key: origin} (variables)
    origins: dict[str, Any] = field(default_factory=dict)


def profile_chain(node: NodeSpec, groups: Mapping[str, GroupSpec]) -> list[str]:
    chain: list[str] = []
    refs = [p for g in node.groups for p in groups[g].profiles] + list(node.profiles)
    for ref in refs:
        if ref.startswith("~"):
            name = ref[1:]
            chain = [p for p in chain if p != name]
        elif ref not in chain:
            chain.append(ref)
    return chain


def merge_profiles(chain: list[str], profiles: Mapping[str, ProfileSpec]) -> Merged:
    merged = Merged(chain=list(chain))
    values, origins = merged.values, merged.origins
    for name in _MERGED_FIELDS:
        default = ProfileSpec.model_fields[name].get_default(call_default_factory=True)
        values[name] = default
        origins[name] = [] if isinstance(default, list) else {} if name == "variables" else None
    for pname in chain:
        profile = profiles[pname]
        origin = f"profile {pname}"
        for name in _MERGED_FIELDS:
            value = getattr(profile, name)
            if name == "power":
                _merge_power(merged, value, origin)
            elif name == "variables":
                for key, item in value.items():
                    values[name] = {**values[name], key: item}
                    origins[name] = {**origins[name], key: origin}
            elif isinstance(value, list):
                values[name] = values[name] + value
                origins[name] = origins[name] + [origin] * len(value)
            elif value is not None:
                values[name] = value
                origins[name] = origin
    return merged


def merge_node(
    node: NodeSpec,
    groups: Mapping[str, GroupSpec],
    profiles: Mapping[str, ProfileSpec],
    cache: dict[tuple[str, ...], Merged] | None = None,
) -> Merged:
    """The node's merged settings; ``cache`` shares profile merges between nodes."""
    chain = profile_chain(node, groups)
    key = tuple(chain)
    base = cache.get(key) if cache is not None else None
    if base is None:
        base = merge_profiles(chain, profiles)
        if cache is not None:
            cache[key] = base
    merged = Merged(chain=list(base.chain), values=dict(base.values), origins=dict(base.origins))
    variables = dict(merged.values["variables"])
    var_origins = dict(merged.origins["variables"])
    for gname in node.groups:
        for var, value in groups[gname].variables.items():
            variables[var] = value
            var_origins[var] = f"group {gname}"
    for var, value in node.variables.items():
        variables[var] = value
        var_origins[var] = f"node {node.name}"
    merged.values["variables"] = variables
    merged.origins["variables"] = var_origins
    for gname in node.groups:
        _merge_power(merged, groups[gname].power, f"group {gname}")
    _merge_power(merged, node.power, f"node {node.name}")
    return merged


def _merge_power(merged: Merged, power: PowerSpec | None, origin: str) -> None:
    """Merge the fields ``power`` sets into ``merged``'s (a dict, or None if none is set:
    the profile default), with their origins; the password stays sealed."""
    if power is None:
        return
    given = power.model_dump(mode="json", exclude_none=True, context=WITH_SECRETS)
    if not given:
        return
    origins = dict.fromkeys(given, origin)
    merged.values["power"] = {**(merged.values.get("power") or {}), **given}
    merged.origins["power"] = {**(merged.origins.get("power") or {}), **origins}
