"""What the boot server does for nodes, shared by its HTTP and TFTP faces.

Every file is rendered live from the inventory, so no sync is needed: a node's boot
script reflects its profiles and its install state at the moment it asks.
"""

from __future__ import annotations

import gzip
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from corral.agent.phases import NODE_REPORTS, SYSTEM_UP
from corral.config import Settings
from corral.cpio import newc_archive
from corral.errors import CorralError, InvalidValue, NotFound
from corral.images.catalog import image_store
from corral.images.ramdisk.diskless import (
    INITRD_NAME,
    KERNEL_NAME,
    DisklessBootError,
    diskless_boot_files,
)
from corral.inventory import models as m
from corral.inventory.bootfiles import is_url, served_file, tree
from corral.inventory.db import transaction
from corral.inventory.schema import InstallMethod, NodeSpec, normalize_mac
from corral.inventory.state import NodeStates
from corral.inventory.store import Inventory
from corral.render.renderer import Renderer, Snapshot
from corral.serve.steps import BootSteps, mac_in_name, tftp_step

if TYPE_CHECKING:
    from corral.serve.tftp import Transferred

log = logging.getLogger("corral.serve")


class Forbidden(CorralError):
    """A request the node is not allowed to make (wrong token, wrong address)."""

    http_status = 403


class BootService:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.server = settings.server_url.rstrip("/")
        self._renderer: tuple[int, Renderer] | None = None
        self._lock = threading.Lock()
        self._discovery = threading.Lock()
        #: where the boot steps served over TFTP and HTTP (and DHCP) are recorded
        self.steps = BootSteps(self.session)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with transaction(self.engine) as s:
            yield s

    def renderer(self, session: Session) -> Renderer:
        """A renderer for the inventory as it is now (rebuilt when it changes)."""
        generation = Inventory(session).generation
        with self._lock:
            if self._renderer is None or self._renderer[0] != generation:
                self._renderer = (generation, Renderer(self.settings, Snapshot(session)))
            return self._renderer[1]

    # -- finding the asker ----------------------------------------------------------

    def node_by_mac(self, session: Session, mac: str) -> NodeSpec | None:
        try:
            mac = normalize_mac(mac)
        except ValueError:
            return None
        name = session.scalar(select(m.Node.name).join(m.Interface).where(m.Interface.mac == mac))
        return Inventory(session).node(name) if name else None

    def _require_source(self, node: NodeSpec, client_ip: str, what: str) -> None:
        """Install secrets go only to the node's own address (its DHCP reservation)."""
        if client_ip not in {i.ip for i in node.interfaces if i.ip}:
            log.warning(
                "refused %s of node %s to %s: not the node's address", what, node.name, client_ip
            )
            raise Forbidden(f"{what} of node {node.name} is served only to its own address")

    # -- boot files -----------------------------------------------------------------

    def ipxe_entry(self) -> str:
        """What DHCP hands every iPXE client: chain to the script for its MAC."""
        return f"#!ipxe\nchain {self.server}/boot/${{net0/mac:hexhyp}}.ipxe\n"

    def ipxe_for_mac(self, mac: str) -> str:
        try:
            mac = normalize_mac(mac)
        except ValueError as exc:
            # nothing of it goes into a script or a log line
            raise InvalidValue("invalid MAC address in the boot script's name") from exc
        with self.session() as s:
            node = self.node_by_mac(s, mac)
            if node is None:
                return self.discovery_ipxe(mac)
            return self.renderer(s).render_one(node, "ipxe", installer=_boots_network(s, node))

    def discovery_ipxe(self, mac: str) -> str:
        ramdisk = f"{self.server}/corral/ramdisk"
        log.info("unknown MAC %s: handing out the discovery ramdisk", mac)
        return (
            "#!ipxe\n"
            f"echo corral: unknown machine {mac}: discovery\n"
            f"kernel {ramdisk}/vmlinuz initrd=initrd.img corral.server={self.server} "
            "corral.discover=1 ip=dhcp console=ttyS0\n"
            f"initrd {ramdisk}/initrd.img\n"
            "boot\n"
        )

    def menu_for_mac(self, kind: str, mac: str) -> str | None:
        """pxelinux or GRUB menu of the node with this MAC; None for an unknown MAC."""
        with self.session() as s:
            node = self.node_by_mac(s, mac)
            if node is None:
                return None
            return self.renderer(s).render_one(
                node,
                "pxelinux" if kind == "pxelinux" else "grub",
                installer=_boots_network(s, node),
            )

    def shared_file(self, path: str) -> str:
        with self.session() as s:
            files = {f.path: f.content for f in self.renderer(s).render_shared()}
        return files[path]

    def token_cpio(self, name: str, client_ip: str) -> bytes:
        """A fresh install token for the node, as an initrd its ramdisk unpacks."""
        with self.session() as s:
            node = Inventory(s).node(name)
            self._require_source(node, client_ip, "token")
            states = NodeStates(s)
            if node.install_method is InstallMethod.DISKLESS:
                token = states.netboot(name, client_ip)
            elif states.status(name).boots_installer:
                token = states.issue_token(name)
            else:
                raise Forbidden(f"node {name} is not armed for install")
        log.info("issued install token to node %s at %s", name, client_ip)
        archive = newc_archive({"etc/corral/node-token": (token.encode() + b"\n", 0o600)})
        # Compressed: the kernel finds a gzip stream at any offset, while a plain cpio
        # must start 4-byte aligned, which UEFI's initrd concatenation does not ensure.
        return gzip.compress(archive, mtime=0)

    def kickstart(self, name: str, client_ip: str) -> str:
        """The node's kickstart, carrying a fresh install token for its callbacks."""
        with self.session() as s:
            node = Inventory(s).node(name)
            self._require_source(node, client_ip, "kickstart")
            states = NodeStates(s)
            if not states.status(name).boots_installer:
                raise Forbidden(
                    f"node {name} is not armed for install",
                    f"re-arm it with 'corral node reinstall {name}'",
                )
            token = states.issue_token(name)
            text = self.renderer(s).render_one(node, "kickstart", token=token)
        log.info("served kickstart to node %s at %s", name, client_ip)
        return text

    def script(self, name: str, kind: str, token: str | None, client_ip: str) -> str:
        with self.session() as s:
            node = Inventory(s).node(name)
            self.authorize(s, name, token, client_ip)
            return self.renderer(s).render_one(
                node, "pre" if kind == "pre" else "post", token=token
            )

    def authorize(self, session: Session, name: str, token: str | None, client_ip: str) -> None:
        if not NodeStates(session).check_token(name, token):
            log.warning(
                "refused request for node %s from %s: %s token",
                name,
                client_ip,
                "wrong" if token else "missing",
            )
            raise Forbidden(f"bad or missing token for node {name}")

    # -- reports --------------------------------------------------------------------

    def event(
        self, name: str, token: str | None, phase: str, message: str, client_ip: str
    ) -> dict[str, Any]:
        with self.session() as s:
            node = Inventory(s).node(name)
            self.authorize(s, name, token, client_ip)
            if phase not in NODE_REPORTS:
                raise InvalidValue(
                    f"a node does not report phase '{phase}'",
                    f"use one of: {', '.join(NODE_REPORTS)}",
                )
            states = NodeStates(s)
            if phase in SYSTEM_UP:
                # the installed system's word that it is up: from the node itself, once
                self._require_source(node, client_ip, f"{phase} report")
                states.revoke_token(name)
            status = states.record(name, phase, message, client_ip)
        log.info("node %s: %s %s (from %s)", name, phase, message, client_ip)
        return {"node": name, "state": status.state, "phase": status.phase}

    def discover(self, facts: dict[str, Any], client_ip: str) -> str:
        mac = str(facts.get("mac", ""))
        try:
            # one at a time: the limits are counted, then a node is added
            with self._discovery, self.session() as s:
                name = NodeStates(s).discover(
                    mac,
                    facts,
                    client_ip,
                    max_nodes=self.settings.discovery_max_nodes,
                    per_minute=self.settings.discovery_per_minute,
                )
        except CorralError as exc:
            log.warning("refused discovery of %s from %s: %s", mac, client_ip, exc)
            raise
        log.info("discovered machine %s at %s as node %s", mac, client_ip, name)
        return name

    # -- TFTP -----------------------------------------------------------------------

    def tftp_resolve(self, path: str, client_ip: str) -> bytes | None:
        """Files TFTP clients get rendered live; None means 'look in the TFTP root'.

        Raises PermissionError for a file this client may not have (TFTP error 2)."""
        try:
            return self._tftp_resolve(path, client_ip)
        except Forbidden as exc:
            raise PermissionError(exc.message) from None
        except NotFound:
            return None
        except CorralError as exc:
            log.error("TFTP %s for %s: %s", path, client_ip, exc)
            return None

    def tftp_done(self, transfer: Transferred) -> None:
        """A TFTP transfer ended: record the boot step it was, if it was one (a PXE ROM's
        size probe before the real transfer is none)."""
        if transfer.probe:
            return
        step = tftp_step(transfer.path, transfer.client_ip, transfer.bytes, transfer.failure)
        if step is not None:
            self.steps.record(step)

    def _tftp_resolve(self, path: str, client_ip: str) -> bytes | None:
        directory, _, name = path.rpartition("/")
        if directory == "pxelinux.cfg" or (directory == "grub" and name.startswith("grub.cfg")):
            kind = "pxelinux" if directory == "pxelinux.cfg" else "grub"
            mac = mac_in_name(name)
            if mac:
                text = self.menu_for_mac(kind, mac)
                return text.encode() if text is not None else None
            if path in ("pxelinux.cfg/default", "grub/grub.cfg"):
                return self.shared_file(path).encode()
            return None
        if directory == "boot/token" and name.endswith(".cpio.gz"):
            return self.token_cpio(name.removesuffix(".cpio.gz"), client_ip)
        if directory.startswith("distros/"):
            local = self.distro_file(directory.removeprefix("distros/"), name)
            return local.read_bytes() if local else None
        if directory == "corral/ramdisk":
            local = self.ramdisk_file(name)
            return local.read_bytes() if local else None
        if directory.startswith("corral/diskless/"):
            local = self.diskless_file(directory.removeprefix("corral/diskless/"), name)
            return local.read_bytes() if local else None
        return None

    def distro_file(self, distro: str, name: str) -> Path | None:
        """A distro's kernel or initrd, when it is a local file imported into corral's
        tree by ``corral distro add|set`` (never a file elsewhere, whatever the inventory
        says)."""
        with self.session() as s:
            try:
                spec = Inventory(s).distro(distro)
            except NotFound:
                return None
        path = served_file(self.settings.home, spec.name, (spec.kernel, spec.initrd), name)
        if path is None and any(
            Path(source).name == name and not is_url(source)
            for source in (spec.kernel, spec.initrd)
        ):
            log.warning(
                "not serving %s of distro %s: it is not in %s; import it with "
                "'corral distro set %s --kernel PATH --initrd PATH'",
                name,
                spec.name,
                tree(self.settings.home, spec.name),
                spec.name,
            )
        return path

    def ramdisk_file(self, name: str) -> Path | None:
        if name not in ("vmlinuz", "initrd.img"):
            return None
        path = self.settings.ramdisk / name
        return path if path.is_file() else None

    def diskless_file(self, node_name: str, name: str) -> Path | None:
        """A diskless node's kernel (``vmlinuz``, its image's own) or initrd
        (``initrd.img``, the deploy ramdisk with that kernel's modules); None for another
        name. They hold no secret.

        The image is looked up at each request (NAME: its latest version), so a new version
        takes effect at the node's next boot; its boot files are built on first request.
        Raises :class:`DisklessBootError` (HTTP 404) saying why a node gets none.
        """
        if name not in (KERNEL_NAME, INITRD_NAME):
            return None
        with self.session() as s:
            node = Inventory(s).node(node_name)
            if node.install_method is not InstallMethod.DISKLESS:
                raise DisklessBootError(
                    f"node {node_name} is not diskless (install method "
                    f"{node.install_method.value})",
                    f"make it so with 'corral node set {node_name} --install-method diskless'",
                )
            ref = self.renderer(s).merged(node).values["image"]
        if not ref:
            raise DisklessBootError(
                f"diskless node {node_name} has no image",
                "set one in a profile: 'corral profile set P --image NAME'",
            )
        version = image_store(self.settings.home).get_ref(str(ref))
        kernel, initrd = diskless_boot_files(version, self.settings.ramdisk / "initrd.img")
        return kernel if name == KERNEL_NAME else initrd


def _boots_network(session: Session, node: NodeSpec) -> bool:
    """Whether the node's network boot runs corral (its installer, or its diskless image)
    rather than handing it to its local disk."""
    if node.install_method is InstallMethod.DISKLESS:
        return True
    return NodeStates(session).status(node.name).boots_installer
