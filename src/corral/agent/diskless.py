"""A diskless boot: the image's squashfs into RAM, an overlay over it, the node's identity,
then the image's own init (``/init`` of the ramdisk switch_root's into :data:`NEWROOT`).

:class:`DisklessBoot` is an :class:`~corral.agent.deploy.Installer` whose work is
different and whose mounts stay when it succeeds. Its phases, reported like an install's:

- ``receiving``: a tmpfs for the squashfs (:data:`IMAGE_DIR`), filled by the plan's
  transport (any receiver of the chunked stream: every chunk checked, a bad one fetched
  again, a dropped connection resumed) written as one file instead of unpacked;
- ``configuring``: the squashfs mounted read-only (:data:`LOWER`), a tmpfs of the
  profile's ``overlay_size`` for the overlay's upper layer (:data:`OVERLAY`), the overlay
  at the new root; the persistent paths bound from the local partition labelled
  ``corral-state`` (made on an empty disk at the first boot, never on a disk holding
  something else unless the profile says ``wipe_disk``); the node's identity and the unit
  by which its systemd reports ``running``;
- ``post-install``: the profile's script, in the new root.

Everything it mounts lies under ``run_dir`` (``/run/corral``), which ``/init`` moves into
the new root with ``/run``: the running system shows the squashfs and the overlay at
``/run/corral/diskless``, each mount with a unit that leaves it to systemd's last pass at
shutdown (:data:`KEEP_MOUNTED`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

from corral.agent import disk, firstboot, identity
from corral.agent.deploy import Installer
from corral.agent.errors import InstallError
from corral.agent.plan import Diskless, Plan, Progress
from corral.agent.receivers.base import Job
from corral.agent.run import check

log = logging.getLogger("corral.agent")

#: Where ``/init`` finds the root to switch to.
NEWROOT = Path("/newroot")
IMAGE_DIR = "diskless/image"
LOWER = "diskless/lower"
OVERLAY = "diskless/overlay"
STATE = "diskless/state"
SQUASHFS = "image.squashfs"
#: Room in the squashfs's tmpfs beyond the file (a receiver's scratch, rounding).
IMAGE_MARGIN = 16 << 20
#: Where the running system has the state partition (and so its persistent paths).
STATE_MOUNT = "var/lib/corral-state"
#: The unit the running system's systemd gets for each mount made here. Without default
#: dependencies a mount unit does not conflict with umount.target: systemd unmounts it in
#: its last pass at shutdown, after every process has ended. Otherwise it stops it among the
#: other units, and fails for the squashfs's tmpfs (which the loop device holds while the
#: overlay is the root) and for a persistent /var/log (journald writes there): "FAILED" in
#: red on the console of every reboot. A unit file, not a drop-in: the unit of /var/log
#: (which systemd-journal-flush.service requires) kept its default dependencies with a
#: drop-in, in a VM of Debian 12 (systemd 252; my reading, not checked in its source: that
#: unit is loaded before the mount table is read, and a unit found mounted later does not
#: read its drop-ins). Not fstab's x-initrd.mount either: systemd takes a mounted file
#: system's options from /proc/self/mountinfo, where busybox's mount does not record it.
KEEP_MOUNTED = """\
# Mounted by corral's ramdisk before systemd started; unmounted in systemd's last pass
# at shutdown, after every process has ended, not stopped among the units.
[Unit]
DefaultDependencies=no

[Mount]
What={what}
Where={where}
Type={type}
Options={options}
"""


def mount_unit(path: str) -> str:
    """systemd's name of the mount unit of ``path`` (as ``systemd-escape --path
    --suffix=mount`` gives it)."""
    name = "/".join(p for p in path.split("/") if p)
    escaped = "".join(
        "-" if c == "/"
        else c if c.isascii() and (c.isalnum() or c in ":_.") and not (i == 0 and c == ".")
        else "".join(f"\\x{b:02x}" for b in c.encode())
        for i, c in enumerate(name)
    )  # fmt: skip
    return (escaped or "-") + ".mount"


def machine_id(node: str, host_key: str) -> str:
    """A node's machine-id: the same at every boot while its SSH host key stays."""
    return hashlib.sha256(f"corral machine-id\0{node}\0{host_key}".encode()).hexdigest()[:32]


class DisklessBoot(Installer):
    """Runs one diskless plan; :meth:`run` returns the final :class:`Progress`, and on
    ``done`` leaves the new root mounted at ``settings.work_dir``."""

    def __init__(self, plan: Plan, *args: object, run_dir: Path, **kwargs: object) -> None:
        super().__init__(plan, *args, **kwargs)  # type: ignore[arg-type]
        self.run_dir = run_dir
        self.diskless = plan.diskless or Diskless()
        #: (source, mount point, type, options) of each mount the new root keeps
        self.made: list[tuple[str, Path, str, str]] = []

    @property
    def device(self) -> str:
        return self.settings.disk or self.diskless.device

    def path(self, relative: str) -> Path:
        return self.run_dir / relative

    def release(self) -> list[str]:
        if self.succeeded:
            return []  # the new root, for /init to switch to
        left = self.mounts.unmount_all()
        return left + disk.mounts_under(self.target) + disk.mounts_under(self.path("diskless"))

    def done(self, seconds: float) -> Progress:
        log.info(
            "%s is in RAM and mounted at %s in %.0f s", self.plan.image.ref, self.target, seconds
        )
        return Progress(
            "done",
            self.bytes,
            self.total,
            f"{self.plan.image.ref} in RAM in {seconds:.0f} s; starting its systemd",
            first_boot=self.first_boot,
        )

    def _install(self) -> None:
        plan = self.plan
        if plan.transport.name not in self.receivers:
            known = ", ".join(sorted(self.receivers))
            raise InstallError(f"unknown transport {plan.transport.name!r}: this agent has {known}")
        context = self.context()
        receiver = self.receivers[plan.transport.name](context)
        for relative in ("diskless", ""):
            self.mounts.clear(self.path(relative) if relative else self.target)

        image_dir = self.path(IMAGE_DIR)
        self.total = receiver.expected_bytes(plan)
        self._enter("receiving", f"{plan.image.ref} by {plan.transport.name} into RAM")
        room = 2 * plan.image.stream_size if plan.transport.name == "bittorrent" else 0
        size = plan.image.stream_size + room + IMAGE_MARGIN
        self.mount("corral-image", image_dir, "tmpfs", f"size={size},mode=0700")
        squashfs = image_dir / SQUASHFS
        self.received = receiver.receive(
            Job(plan, image_dir, self._progress, self.cancel, into_file=squashfs)
        )
        self.bytes = self.received.bytes

        self._enter("configuring", plan.identity.hostname)
        self.mount_root(squashfs)
        if self.diskless.persistent:
            self.persistent_paths()
        identity.configure(self.target, plan.identity, None)
        self.keep_mounts()
        self.install_first_boot()

        if plan.post_script.strip():
            self._enter("post-install")
            self._chroot_mounts()
            try:
                self.run_post_script()
            finally:
                for name in ("sys", "proc", "dev"):
                    self.mounts.unmount(self.target / name)

    def mount(self, source: str, where: Path, fstype: str, options: str | None = None) -> None:
        """Mount for good: the new root keeps it (see :meth:`keep_mounts`)."""
        self.mounts.mount(source, where, fstype=fstype, options=options)
        self.made.append((source, where, fstype, options or "defaults"))

    def bind(self, source: str, where: Path) -> None:
        self.mounts.bind(source, where)
        self.made.append((source, where, "none", "bind"))

    def keep_mounts(self) -> None:
        """A unit file (:data:`KEEP_MOUNTED`) in the new root for each mount made here, as
        the running system sees it: ``run_dir`` is where it was, since ``/init`` moves
        ``/run`` into the new root."""

        def seen(path: str) -> str:
            if Path(path).is_relative_to(self.target):
                return f"/{Path(path).relative_to(self.target)}"
            return path

        for source, where, fstype, options in self.made:
            # a unit file expands % specifiers in What= and Options= (size=25%): %% is a %
            what, point = seen(source).replace("%", "%%"), seen(str(where))
            options = options.replace("%", "%%")
            text = KEEP_MOUNTED.format(what=what, where=point, type=fstype, options=options)
            identity.write_atomic(self.target / "etc/systemd/system" / mount_unit(point), text)
        log.info("%d mounts left to systemd's last pass at shutdown", len(self.made))

    def mount_root(self, squashfs: Path) -> None:
        lower, overlay = self.path(LOWER), self.path(OVERLAY)
        self.mount(str(squashfs), lower, "squashfs", "loop,ro")
        size = self.diskless.overlay_size
        options = f"size={size}" + ("" if size.endswith("%") else "m") + ",mode=0755"
        self.mount("corral-overlay", overlay, "tmpfs", options)
        for name in ("upper", "work"):
            (overlay / name).mkdir(exist_ok=True)
        self.mounts.mount(
            "overlay",
            self.target,
            fstype="overlay",
            options=f"lowerdir={lower},upperdir={overlay / 'upper'},workdir={overlay / 'work'}",
        )
        log.info("root: %s read-only under a %s tmpfs overlay at %s", squashfs, size, self.target)
        release = os.uname().release
        if not any(
            (self.target / d / release).is_dir() for d in ("usr/lib/modules", "lib/modules")
        ):
            # a newer version of the image appeared between the kernel's fetch and the plan's
            log.warning(
                "the image has no modules for the running kernel %s: drivers will not load "
                "(reboot the node to boot the image's own kernel)",
                release,
            )

    def install_first_boot(self) -> None:
        client = self.client
        if client is None or not client.token:
            return
        if not firstboot.has_systemd(self.target):
            log.warning("the image has no systemd: corral will not hear that it runs")
            return
        what = f"image {self.plan.image.ref} (diskless)"
        firstboot.install(
            self.target, client.server, self.plan.node, client.token, phase="running", what=what
        )
        self.first_boot = True

    # --- the state partition ---------------------------------------------------------

    def persistent_paths(self) -> None:
        """Bind each persistent path of the profile from the state partition."""
        state = self.path(STATE)
        device = self.state_device()
        self.mount(device, state, "ext4")
        shown = self.target / STATE_MOUNT
        self.bind(str(state), shown)
        for path in self.diskless.persistent:
            relative = path.strip("/")
            kept, where = state / relative, self.target / relative
            if not kept.exists():
                # the first boot with this path: start from the image's content
                kept.mkdir(parents=True)
                if where.is_dir():
                    check(
                        self.run_command(["cp", "-a", f"{where}/.", str(kept)], timeout=600),
                        f"copying {path} to the state partition",
                    )
            self.bind(str(kept), where)
        log.info(
            "persistent on %s (%s): %s",
            device,
            self.diskless.label,
            " ".join(self.diskless.persistent),
        )

    def state_device(self) -> str:
        """The partition labelled ``corral-state``; made when the disk is empty (or the
        profile lets corral erase it)."""
        label = self.diskless.label
        found = self.run_command(["blkid", "-L", label], timeout=30)
        if found.ok and found.stdout.strip():
            return found.stdout.strip()
        device = self.device
        if not device:
            raise InstallError(
                f"persistent paths {' '.join(self.diskless.persistent)} need a disk, and this "
                "node has none: give it one, or drop persistent_paths from its profile"
            )
        used = self.run_command(["blkid", "-p", "-o", "value", "-s", "TYPE", device], timeout=30)
        table = disk.foreign_table(self.run_command, self.mounts, device, self.path("scratch"))
        kind = used.stdout.strip()
        what = table or (f"a file system of type {kind}" if kind else "")
        if what and not self.diskless.wipe:
            raise InstallError(
                f"{device} holds {what}, and no partition labelled {label}: not erased; "
                "set wipe_disk: true in the node's profile to let corral make one there"
            )
        if what:
            log.warning("erasing %s for the state partition: it holds %s (wipe_disk)", device, what)
        log.info("making the state partition %s on %s", label, device)
        check(
            self.run_command(
                ["sfdisk", "--wipe", "always", "--quiet", device], input="label: gpt\n,,L\n"
            ),
            f"partitioning {device}",
        )
        part = disk.partition_device(device, 1)
        deadline = time.monotonic() + self.settings.partition_timeout
        while not os.path.exists(part):
            if time.monotonic() > deadline:
                raise InstallError(f"{part} did not appear after partitioning {device}")
            self.run_command(["partx", "-u", device], timeout=30)
            self.sleep(0.2)
        check(
            self.run_command(["mkfs.ext4", "-q", "-F", "-L", label, part], timeout=1800),
            f"mkfs.ext4 on {part}",
        )
        return part
