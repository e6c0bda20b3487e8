"""The inventory's domain functions: every read and write that the CLI, the cluster
file and the HTTP API perform goes through :class:`Inventory`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from corral.errors import AlreadyExists, InvalidValue, NotFound, UsageError
from corral.inventory import models as m
from corral.inventory.schema import (
    RACK,
    WITH_SECRETS,
    DistroSpec,
    GroupSpec,
    NodeSpec,
    ProfileSpec,
    Spec,
    parse,
)

if TYPE_CHECKING:
    from corral.vault import Vault

Kind = Literal["distro", "profile", "group", "node"]
Outcome = Literal["created", "changed", "unchanged"]


@dataclass(frozen=True)
class KindInfo:
    table: Any  # one of the entity tables: Distro, Profile, Group, Node
    spec: type[Spec]


KINDS: dict[str, KindInfo] = {
    "distro": KindInfo(m.Distro, DistroSpec),
    "profile": KindInfo(m.Profile, ProfileSpec),
    "group": KindInfo(m.Group, GroupSpec),
    "node": KindInfo(m.Node, NodeSpec),
}


def _stored(spec: BaseModel) -> dict[str, Any]:
    data = spec.model_dump(mode="json", context=WITH_SECRETS)
    data.pop("name")
    data.pop("interfaces", None)
    return data


class Inventory:
    """Reads and writes the inventory inside one database transaction."""

    def __init__(self, session: Session, vault: Vault | None = None) -> None:
        self.session = session
        self._gen: int | None = None
        self._vault = vault

    def vault(self) -> Vault:
        """What seals BMC passwords: the one given, else the process's home's."""
        if self._vault is None:
            from corral.vault import process_vault

            self._vault = process_vault()
        return self._vault

    # -- generation: one number per committed change, for incremental sync ---------

    @property
    def generation(self) -> int:
        row = self.session.get(m.Meta, "generation")
        return row.value if row else 0

    def _write_gen(self) -> int:
        if self._gen is None:
            row = self.session.get(m.Meta, "generation")
            if row is None:
                row = m.Meta(key="generation", value=0)
                self.session.add(row)
            row.value += 1
            self._gen = row.value
        return self._gen

    # -- reading -------------------------------------------------------------------

    def _row(self, kind: Kind, name: str) -> Any:
        info = KINDS[kind]
        row = self.session.scalar(select(info.table).where(info.table.name == name))
        if row is None:
            raise NotFound(kind, name)
        return row

    def _spec(self, kind: Kind, row: Any) -> Any:
        data = dict(row.spec, name=row.name)
        if kind == "node":
            data["interfaces"] = [i.spec for i in row.interfaces]
        return KINDS[kind].spec.model_validate(data)

    def get(self, kind: Kind, name: str) -> Any:
        return self._spec(kind, self._row(kind, name))

    def names(self, kind: Kind) -> list[str]:
        table = KINDS[kind].table
        return list(self.session.scalars(select(table.name).order_by(table.name)))

    def exists(self, kind: Kind, name: str) -> bool:
        table = KINDS[kind].table
        return self.session.scalar(select(table.id).where(table.name == name)) is not None

    def specs(self, kind: Kind, names: Iterable[str] | None = None) -> list[Any]:
        table = KINDS[kind].table
        query = select(table).order_by(table.name)
        if names is not None:
            wanted = list(names)
            query = query.where(table.name.in_(wanted))
            rows = {r.name: r for r in self.session.scalars(query)}
            missing = [n for n in wanted if n not in rows]
            if missing:
                raise NotFound(kind, missing[0])
            return [self._spec(kind, rows[n]) for n in wanted]
        return [self._spec(kind, r) for r in self.session.scalars(query)]

    def distro(self, name: str) -> DistroSpec:
        spec: DistroSpec = self.get("distro", name)
        return spec

    def node(self, name: str) -> NodeSpec:
        spec: NodeSpec = self.get("node", name)
        return spec

    # -- writing -------------------------------------------------------------------

    def add(self, kind: Kind, specs: Sequence[Spec]) -> None:
        """Create new entities; any name that exists already is an error."""
        table = KINDS[kind].table
        names = [s.name for s in specs]  # type: ignore[attr-defined]
        taken = set(self.session.scalars(select(table.name).where(table.name.in_(names))))
        if taken:
            name = sorted(taken)[0]
            raise AlreadyExists(
                f"{kind} '{name}' exists already", f"change it with 'corral {kind} set {name}'"
            )
        self.put(kind, specs)

    def put(self, kind: Kind, specs: Sequence[Spec]) -> list[Outcome]:
        """Create or replace entities by name; returns what happened to each."""
        names = [s.name for s in specs]  # type: ignore[attr-defined]
        dupes = {n for n in names if names.count(n) > 1} if len(set(names)) < len(names) else set()
        if dupes:
            raise InvalidValue(f"{kind} '{sorted(dupes)[0]}' is given twice")
        self._check_references(kind, specs)
        if kind == "node":
            self._check_addresses(specs)  # type: ignore[arg-type]
            self._check_power(specs)  # type: ignore[arg-type]
        table = KINDS[kind].table
        existing = {
            r.name: r for r in self.session.scalars(select(table).where(table.name.in_(names)))
        }
        outcomes: list[Outcome] = []
        for spec in specs:
            row = existing.get(spec.name)  # type: ignore[attr-defined]
            old = self._spec(kind, row) if row is not None else None
            if kind != "distro":
                spec = self._sealed(kind, spec, old)
            if old is not None and old == spec:
                outcomes.append("unchanged")
                continue
            gen = self._write_gen()
            if row is None:
                row = table(name=spec.name, spec=_stored(spec), gen=gen)  # type: ignore[attr-defined]
                self.session.add(row)
                outcomes.append("created")
            else:
                row.spec = _stored(spec)
                row.gen = gen
                outcomes.append("changed")
            if kind == "node":
                self._set_interfaces(row, spec)  # type: ignore[arg-type]
        self.session.flush()
        return outcomes

    def _sealed(self, kind: Kind, spec: Any, old: Any) -> Any:
        """``spec`` with its BMC password sealed, or the stored one kept (see
        :func:`corral.inventory.power.seal_password`)."""
        if spec.power is None:
            return spec
        from corral.inventory.power import seal_password

        power = seal_password(
            f"{kind} {spec.name}", spec.power, old.power if old is not None else None, self.vault
        )
        return spec if power is spec.power else spec.model_copy(update={"power": power})

    def edit(self, kind: Kind, names: Sequence[str], changes: dict[str, Any]) -> int:
        """Change entries as `corral ... set` and the REST API's PATCH do (see
        :meth:`edited`); returns how many changed."""
        specs = [self.edited(kind, current, changes) for current in self.specs(kind, names)]
        return sum(1 for o in self.put(kind, specs) if o == "changed")

    def update(self, kind: Kind, names: Sequence[str], changes: dict[str, Any]) -> int:
        """Apply field changes to existing entities, each field given replacing the
        entry's (``variables`` too: :meth:`edit` merges them); returns how many changed."""
        specs = [self._changed(kind, current, changes) for current in self.specs(kind, names)]
        return sum(1 for o in self.put(kind, specs) if o == "changed")

    def edited(self, kind: Kind, current: Any, changes: dict[str, Any]) -> Any:
        """``current`` with ``changes`` made, checked but not stored: ``variables`` merge
        by key into the entry's own (none or empty: no change), ``power`` field by field
        (null removes one), every other field given replaces."""
        variables = changes.get("variables")
        if not variables:
            changes = {k: v for k, v in changes.items() if k != "variables"}
        elif isinstance(variables, dict):
            changes = {**changes, "variables": {**current.variables, **variables}}
        # anything else is no mapping of variables: parsing refuses it
        power = changes.get("power")
        if isinstance(power, dict) and getattr(current, "power", None) is not None:
            fields = {**current.power.model_dump(mode="json", exclude_none=True), **power}
            fields = {k: v for k, v in fields.items() if v is not None}
            changes = {**changes, "power": fields or None}
        return self._changed(kind, current, changes)

    def _changed(self, kind: Kind, current: Any, changes: dict[str, Any]) -> Any:
        renamed = changes.get("name", current.name)
        if renamed != current.name:
            # Names are what other entries, sync trees and deployments refer to.
            raise InvalidValue(
                f"{kind} '{current.name}' cannot be renamed to '{renamed}'",
                f"add {kind} '{renamed}' and remove '{current.name}', "
                "or leave 'name' out of the changes",
            )
        data = current.model_dump(mode="json")
        data.update(changes)
        return parse(KINDS[kind].spec, data, f"{kind} {current.name}")

    def remove(self, kind: Kind, names: Sequence[str]) -> int:
        rows = [self._row(kind, n) for n in names]
        self._check_unused(kind, set(names))
        gen = self._write_gen()
        for row in rows:
            self.session.add(m.Tombstone(kind=kind, name=row.name, gen=gen))
            self.session.delete(row)
        self.session.flush()
        return len(rows)

    def _set_interfaces(self, row: m.Node, spec: NodeSpec) -> None:
        row.interfaces.clear()
        self.session.flush()
        for pos, iface in enumerate(spec.interfaces):
            row.interfaces.append(
                m.Interface(
                    position=pos, mac=iface.mac, ip=iface.ip, spec=iface.model_dump(mode="json")
                )
            )

    # -- integrity -----------------------------------------------------------------

    def _require(self, kind: Kind, names: set[str], user: str) -> None:
        if not names:
            return
        table = KINDS[kind].table
        known = set(self.session.scalars(select(table.name).where(table.name.in_(names))))
        missing = sorted(names - known)
        if missing:
            raise NotFound(kind, missing[0], f"{user} refers to it; add it first or fix the name")

    def _check_references(self, kind: Kind, specs: Sequence[Any]) -> None:
        self._check_racks(kind, specs)
        for spec in specs:
            what = f"{kind} '{spec.name}'"
            if kind == "profile" and spec.distro:
                self._require("distro", {spec.distro}, what)
            if kind in ("group", "node"):
                self._require("profile", {p.removeprefix("~") for p in spec.profiles}, what)
            if kind == "node":
                self._require("group", set(spec.groups), what)
                ifnames = [i.name for i in spec.interfaces]
                if len(set(ifnames)) < len(ifnames):
                    raise InvalidValue(f"{what}: interface names must be unique")

    def _check_racks(self, kind: Kind, specs: Sequence[Any]) -> None:
        """Refuse a ``rack`` variable that names no rack. A rack is a group (its nodes), so
        that ``corral deploy r2`` reaches it and rack-aware transports can trust the name."""
        racks = {
            str(spec.variables[RACK]): spec.name
            for spec in specs
            if kind != "distro" and spec.variables.get(RACK) not in (None, "")
        }
        if not racks:
            return
        known = set(self.session.scalars(select(m.Group.name).where(m.Group.name.in_(racks))))
        if kind == "group":
            known |= {spec.name for spec in specs}
        for rack in sorted(set(racks) - known):
            raise InvalidValue(
                f"{kind} '{racks[rack]}': rack '{rack}' names no rack",
                f"a rack is a group of its nodes: add it with 'corral group add {rack}', "
                "or correct the variable",
            )

    def _check_power(self, specs: Sequence[NodeSpec]) -> None:
        """Refuse a node whose power settings, merged from its profiles and groups, miss
        what their driver needs (exit 2, nothing stored)."""
        groups = {g.name: g for g in self.specs("group")}
        profiles = {p.name: p for p in self.specs("profile")}
        if not any(s.power for s in specs) and not any(
            e.power for e in (*groups.values(), *profiles.values())
        ):
            return
        from corral.inventory.power import refuse_incomplete

        refuse_incomplete(specs, groups, profiles)

    def _check_addresses(self, specs: Sequence[NodeSpec]) -> None:
        for field in ("mac", "ip"):
            owner: dict[str, str] = {}
            for spec in specs:
                for iface in spec.interfaces:
                    value = getattr(iface, field)
                    if value is None:
                        continue
                    if value in owner:
                        raise AlreadyExists(
                            f"{field.upper()} {value} is given to both {owner[value]} "
                            f"and {spec.name}",
                            "each interface needs its own address",
                        )
                    owner[value] = spec.name
            column = getattr(m.Interface, field)
            values = list(owner)
            for start in range(0, len(values), 500):
                chunk = values[start : start + 500]
                rows = self.session.execute(
                    select(column, m.Node.name)
                    .join(m.Node, m.Interface.node_id == m.Node.id)
                    .where(column.in_(chunk))
                )
                for value, node in rows:
                    if node != owner[value]:
                        raise AlreadyExists(
                            f"{field.upper()} {value} of node {owner[value]} "
                            f"belongs to node {node} already",
                            f"free it first with 'corral node set {node}' or pick another",
                        )

    def _check_unused(self, kind: Kind, names: set[str]) -> None:
        users: list[tuple[Kind, str]] = []
        if kind == "distro":
            users = [("profile", p.name) for p in self.specs("profile") if p.distro in names]
        elif kind == "profile":
            for k in ("group", "node"):
                for spec in self.specs(k):
                    if {p.removeprefix("~") for p in spec.profiles} & names:
                        users.append((k, spec.name))
        elif kind == "group":
            users = [("node", n.name) for n in self.specs("node") if set(n.groups) & names]
        if users:
            k, name = users[0]
            more = f" and {len(users) - 1} more" if len(users) > 1 else ""
            raise UsageError(
                f"cannot remove {kind} in use: {k} '{name}'{more} refers to it",
                f"remove the reference first, e.g. 'corral {k} set {name}'",
            )

    def count(self, kind: Kind) -> int:
        table = KINDS[kind].table
        return self.session.scalar(select(func.count()).select_from(table)) or 0
