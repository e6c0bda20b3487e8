"""Rendering a node's files from the inventory: iPXE, pxelinux, GRUB, kickstart,
pre- and post-install scripts."""

from __future__ import annotations

import posixpath
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import jinja2
from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.config import Settings
from corral.errors import RenderError, UsageError
from corral.inventory import models as m
from corral.inventory.merge import Merged, merge_node
from corral.inventory.schema import (
    DistroSpec,
    GroupSpec,
    InstallMethod,
    NodeSpec,
    ProfileSpec,
)
from corral.render.environment import load_template, make_environment

FileKind = Literal["ipxe", "pxelinux", "grub", "kickstart", "pre", "post"]
FILE_KINDS: tuple[FileKind, ...] = ("ipxe", "pxelinux", "grub", "kickstart", "pre", "post")


@dataclass(frozen=True)
class RenderedFile:
    path: str  # relative to the sync root
    kind: FileKind
    content: str


def mac_file_id(mac: str) -> str:
    """``aa:bb:..`` -> ``01-aa-bb-..``, the name pxelinux and GRUB look for (01 = Ethernet)."""
    return "01-" + mac.replace(":", "-")


def file_paths(node: NodeSpec, kind: FileKind) -> list[str]:
    macs = [i.mac for i in node.interfaces if i.mac]
    if kind == "ipxe":
        return [f"ipxe/{node.name}.ipxe"]
    if kind == "pxelinux":
        return [f"pxelinux.cfg/{mac_file_id(mac)}" for mac in macs]
    if kind == "grub":
        return [f"grub/grub.cfg-{mac_file_id(mac)}" for mac in macs]
    if kind == "kickstart":
        return [f"kickstart/{node.name}.ks"]
    return [f"scripts/{node.name}.{kind}.sh"]


def grub_location(url: str, path: str | None) -> str | None:
    """Where GRUB loads a file from: its path on corral's TFTP root, or an http URL as
    GRUB's ``(http,HOST)/PATH``; None where GRUB cannot fetch it (https, another port
    than 80: GRUB's http device names a host only)."""
    if path is not None:
        return f"/{path}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.port not in (None, 80) or parts.query or not parts.hostname:
        return None
    return f"(http,{parts.hostname})/{parts.path.lstrip('/')}"


def _loaders_that_cannot(
    distro: DistroSpec, urls: dict[str, str], paths: dict[str, str | None]
) -> dict[str, dict[str, str] | None]:
    """The network boot loaders that cannot load a distro's kernel or initrd given as a
    URL: why, and the fix. pxelinux (without a loader of HTTP) reads files over TFTP
    only; corral serves nothing under distros/NAME/ for a URL."""
    cannot: dict[str, dict[str, str] | None] = {"pxelinux": None, "grub": None}
    remote = [urls[w] for w in ("kernel", "initrd") if paths[w] is None]
    fix = (
        "boot the node with iPXE (boot_loader: ipxe), or give distro "
        f"{distro.name} a kernel and initrd path on this server"
    )
    if remote:
        cannot["pxelinux"] = {
            "reason": f"pxelinux loads files over TFTP only, not {remote[0]}",
            "fix": fix,
        }
    unreachable = [
        urls[w] for w in ("kernel", "initrd") if grub_location(urls[w], paths[w]) is None
    ]
    if unreachable:
        cannot["grub"] = {
            "reason": f"GRUB cannot fetch {unreachable[0]} (plain HTTP on port 80 only)",
            "fix": fix.replace("a kernel and initrd path", "http:// URLs without a port, or paths"),
        }
    return cannot


SHARED_FILES = {"pxelinux.cfg/default": "pxelinux-default.j2", "grub/grub.cfg": "grub-default.j2"}


class Snapshot:
    """The inventory as rendering needs it, loaded once per render or sync."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.distros = {
            r.name: DistroSpec.model_validate(dict(r.spec, name=r.name))
            for r in session.scalars(select(m.Distro))
        }
        self.profiles = {
            r.name: ProfileSpec.model_validate(dict(r.spec, name=r.name))
            for r in session.scalars(select(m.Profile))
        }
        self.groups = {
            r.name: GroupSpec.model_validate(dict(r.spec, name=r.name))
            for r in session.scalars(select(m.Group))
        }

    def nodes(self, names: Iterable[str] | None = None) -> Iterator[NodeSpec]:
        """Nodes in name order (all, or the named ones that exist), two queries per batch."""
        wanted = sorted(set(names)) if names is not None else None
        batches = (
            [wanted[i : i + 500] for i in range(0, len(wanted), 500)]
            if wanted is not None
            else [None]
        )
        for batch in batches:
            query = select(m.Node.id, m.Node.name, m.Node.spec).order_by(m.Node.name)
            iquery = select(m.Interface.node_id, m.Interface.spec).order_by(
                m.Interface.node_id, m.Interface.position
            )
            if batch is not None:
                query = query.where(m.Node.name.in_(batch))
                iquery = iquery.join(m.Node).where(m.Node.name.in_(batch))
            interfaces: dict[int, list[dict[str, Any]]] = {}
            for node_id, spec in self.session.execute(iquery):
                interfaces.setdefault(node_id, []).append(spec)
            for node_id, name, spec in self.session.execute(query):
                yield NodeSpec.model_validate(
                    dict(spec, name=name, interfaces=interfaces.get(node_id, []))
                )


class Renderer:
    def __init__(self, settings: Settings, snapshot: Snapshot) -> None:
        self.settings = settings
        self.snapshot = snapshot
        self.env = make_environment(settings.templates)
        self.server = settings.server_url.rstrip("/")
        self._snippets: dict[str, jinja2.Template] = {}
        self._merges: dict[tuple[str, ...], Merged] = {}

    # -- context ------------------------------------------------------------------

    def merged(self, node: NodeSpec) -> Merged:
        return merge_node(node, self.snapshot.groups, self.snapshot.profiles, self._merges)

    def distro_of(self, node: NodeSpec, merged: Merged) -> DistroSpec | None:
        name = merged.values["distro"]
        return self.snapshot.distros[name] if name else None

    def _asset(self, distro: DistroSpec, which: str) -> tuple[str, str | None]:
        """(HTTP URL, path on corral's TFTP/HTTP root) of a distro's kernel or initrd; no
        path for one given as a URL, which corral does not serve."""
        source = getattr(distro, which)
        if source.startswith(("http://", "https://")):
            return source, None
        base = posixpath.basename(source.rstrip("/")) or which
        path = f"distros/{distro.name}/{base}"
        return f"{self.server}/{path}", path

    def _boot(
        self, node: NodeSpec, distro: DistroSpec | None, merged: Merged, installer: bool
    ) -> dict[str, Any]:
        method = node.install_method
        urls = self._urls(node)
        boot: dict[str, Any] = {
            "method": method.value,
            "local": not (node.netboot and installer),
            "extra_initrds": [],
            # loader -> {reason, fix} for a loader that cannot boot this, else None
            "cannot": {"pxelinux": None, "grub": None},
        }
        if boot["local"]:
            return boot  # boots its disk: needs no installer (a discovered node has none)
        if method is InstallMethod.KICKSTART:
            if distro is None:
                raise RenderError(
                    f"node {node.name}: install method kickstart needs a distro",
                    "give one of its profiles a distro",
                )
            kernel_url, kernel_path = self._asset(distro, "kernel")
            initrd_url, initrd_path = self._asset(distro, "initrd")
            grub = {
                "kernel": grub_location(kernel_url, kernel_path),
                "initrd": grub_location(initrd_url, initrd_path),
            }
            boot["cannot"] = _loaders_that_cannot(
                distro,
                {"kernel": kernel_url, "initrd": initrd_url},
                {"kernel": kernel_path, "initrd": initrd_path},
            )
            args = [f"inst.ks={urls['kickstart']}"]
            if distro.install_tree:
                args.append(f"inst.repo={distro.install_tree}")
            args.append("ip=dhcp")
        else:
            sub = "ramdisk" if method is InstallMethod.IMAGE else f"diskless/{node.name}"
            kernel_path, initrd_path = f"corral/{sub}/vmlinuz", f"corral/{sub}/initrd.img"
            kernel_url, initrd_url = f"{self.server}/{kernel_path}", f"{self.server}/{initrd_path}"
            grub = {"kernel": f"/{kernel_path}", "initrd": f"/{initrd_path}"}
            args = [f"corral.server={self.server}", f"corral.node={node.name}", "ip=dhcp"]
            if method is InstallMethod.DISKLESS:
                args.append("corral.mode=diskless")
            else:
                # The agent installs what its deployment's plan says, then reboots into the
                # installed system (no power control needed); a profile's kernel_args come
                # after these and win (e.g. corral.agent_exit=poweroff).
                args += ["corral.mode=deploy", "corral.agent_exit=reboot"]
            # The node's token reaches its ramdisk as a second initrd fetched at boot,
            # never on the kernel command line.
            token_path = f"boot/token/{node.name}.cpio.gz"
            boot["extra_initrds"] = [
                {"url": f"{self.server}/{token_path}", "path": token_path, "name": "token.cpio.gz"}
            ]
        boot.update(
            kernel_url=kernel_url,
            initrd_url=initrd_url,
            kernel_path=kernel_path,
            initrd_path=initrd_path,
            grub_kernel=grub["kernel"],
            grub_initrd=grub["initrd"],
            initrd_name=posixpath.basename(initrd_url),
            args=" ".join(args + list(merged.values["kernel_args"])),
        )
        return boot

    def _urls(self, node: NodeSpec) -> dict[str, str]:
        return {
            "kickstart": f"{self.server}/ks/{node.name}",
            "pre": f"{self.server}/scripts/{node.name}/pre",
            "post": f"{self.server}/scripts/{node.name}/post",
            "events": f"{self.server}/api/v1/nodes/{node.name}/events",
        }

    def context(
        self, node: NodeSpec, token: str | None = None, installer: bool = True
    ) -> dict[str, Any]:
        """The template context; ``token`` is the node's install token when serving live,
        ``installer`` False when the node must boot from its local disk (installed)."""
        merged = self.merged(node)
        distro = self.distro_of(node, merged)
        profile = dict(merged.values, chain=merged.chain)
        return {
            "node": node,
            "distro": distro,
            "profile": profile,
            "vars": merged.values["variables"],
            "urls": self._urls(node),
            "token": token or "",
            "boot": self._boot(node, distro, merged, installer),
            "bond_member_names": {n for i in node.interfaces for n in i.bond_members},
            "snippets": {
                kind: [
                    {"origin": origin, "text": text}
                    for text, origin in zip(merged.values[kind], merged.origins[kind], strict=True)
                ]
                for kind in ("pre", "post")
            },
        }

    # -- rendering ----------------------------------------------------------------

    def _render(self, template_name: str, context: dict[str, Any], node: str) -> str:
        template = load_template(self.env, template_name)
        try:
            return template.render(context)
        except jinja2.TemplateError as exc:
            raise RenderError(
                f"node {node}: template {template_name}: {exc}",
                "define the missing value in a profile, group or node, or fix the template",
            ) from None

    def _render_snippets(self, context: dict[str, Any], node: str) -> None:
        for kind in ("pre", "post"):
            for snippet in context["snippets"][kind]:
                template = self._snippets.get(snippet["text"])
                if template is None:
                    try:
                        template = self.env.from_string(snippet["text"])
                    except jinja2.TemplateSyntaxError as exc:
                        raise RenderError(
                            f"{kind} snippet of {snippet['origin']}: "
                            f"line {exc.lineno}: {exc.message}",
                            "fix the snippet's template syntax",
                        ) from None
                    self._snippets[snippet["text"]] = template
                try:
                    snippet["text"] = template.render(context).rstrip("\n")
                except jinja2.TemplateError as exc:
                    raise RenderError(
                        f"node {node}: {kind} snippet of {snippet['origin']}: {exc}"
                    ) from None

    def render_node(
        self,
        node: NodeSpec,
        kinds: Iterable[FileKind] = FILE_KINDS,
        token: str | None = None,
        installer: bool = True,
    ) -> list[RenderedFile]:
        """All of a node's files (of the given kinds); kinds that do not apply are skipped."""
        context = self.context(node, token, installer)
        self._render_snippets(context, node.name)
        wanted = set(kinds)
        scripts = {k: self._render(f"{k}.sh.j2", context, node.name) for k in ("pre", "post")}
        out: list[RenderedFile] = []

        def emit(kind: FileKind, text: str) -> None:
            if kind in wanted:
                out.extend(RenderedFile(p, kind, text) for p in file_paths(node, kind))

        emit("ipxe", self._render("ipxe.j2", context, node.name))
        if node.interfaces and any(i.mac for i in node.interfaces):
            cannot = context["boot"]["cannot"].get(node.boot_loader.value)
            if cannot:  # the loader DHCP hands this node could not boot it
                raise RenderError(
                    f"node {node.name} boots with {node.boot_loader.value}: {cannot['reason']}",
                    cannot["fix"],
                )
            emit("pxelinux", self._render("pxelinux.j2", context, node.name))
            emit("grub", self._render("grub.j2", context, node.name))
        if "kickstart" in wanted and self.uses_kickstart(node, context["distro"]):
            template = context["profile"]["kickstart_template"] or "kickstart.ks.j2"
            emit("kickstart", self._render(template, dict(context, scripts=scripts), node.name))
        emit("pre", scripts["pre"])
        emit("post", scripts["post"])
        return out

    def uses_kickstart(self, node: NodeSpec, distro: DistroSpec | None) -> bool:
        if node.install_method is not InstallMethod.KICKSTART:
            return False
        if distro is None or not distro.family.uses_kickstart:
            family = distro.family.value if distro else "none"
            raise RenderError(
                f"node {node.name}: install method kickstart needs a rhel or fedora distro "
                f"(its distro is {distro.name if distro else 'not set'}, family {family})",
                "set install_method to image, or give the node a rhel/fedora distro",
            )
        return True

    def render_one(
        self, node: NodeSpec, kind: FileKind, token: str | None = None, installer: bool = True
    ) -> str:
        files = self.render_node(node, [kind], token, installer)
        if not files:
            why = {
                "kickstart": f"it installs by {node.install_method.value}",
                "pxelinux": "it has no interface with a MAC",
                "grub": "it has no interface with a MAC",
            }.get(kind, "")
            raise UsageError(f"node {node.name} has no {kind} file: {why}")
        return files[0].content

    def render_shared(self) -> list[RenderedFile]:
        context: dict[str, Any] = {"server": self.server}
        return [
            RenderedFile(
                path,
                "grub" if path.startswith("grub/") else "pxelinux",
                self._render(name, context, "(default)"),
            )
            for path, name in SHARED_FILES.items()
        ]
