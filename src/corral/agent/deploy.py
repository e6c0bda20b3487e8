"""Installing a node from its plan: disk, image, identity, bootloader, post-install script.

:class:`Installer` runs the phases of :data:`corral.agent.phases.DEPLOY_STEPS` in order and tells
the server where it stands: at every change of phase and every ``plan.report_interval``
seconds in between, from a thread of its own, so that a slow server never slows the
install and a stuck step is still seen alive (or cancelled: the server's answer
``{"cancel": true}`` stops the work at the next command, chunk or read).

Whatever happens, everything mounted under the work directory is unmounted before the
final report, which is ``done``, or ``failed`` with a one-line reason and the last lines of
the agent's log.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from corral.agent import disk, firstboot, identity
from corral.agent.errors import Cancelled, InstallError
from corral.agent.phases import DEPLOY_STEPS
from corral.agent.plan import Plan, Progress
from corral.agent.receivers import RECEIVERS
from corral.agent.receivers.base import Context, Job, Received, Receiver
from corral.agent.report import Client, Rejected, ReportError
from corral.agent.run import Result, Runner, check

log = logging.getLogger("corral.agent")

BOOTLOADERS = ("grub", "none")

#: Where the post-install script is written in the installed root (and removed after).
POST_SCRIPT = "root/corral-post-install.sh"

#: GRUB settings corral adds in the installed system (the node's kernel arguments).
GRUB_DEFAULTS = "etc/default/grub.d/50-corral.cfg"

#: PATH inside the installed system.
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class InstallSettings:
    #: where the target's filesystems are mounted
    work_dir: Path = Path("/run/corral/target")
    #: the disk to install on, over the plan's ``disk.device``
    disk: str | None = None
    #: the machine booted by UEFI (no BIOS boot partition, GRUB for EFI)
    efi: bool = False
    tries: int = 5
    post_timeout: float = 3600.0
    grub_timeout: float = 600.0
    mkfs_timeout: float = 1800.0
    #: seconds to wait for the kernel to show new partitions
    partition_timeout: float = 20.0
    log_lines: int = 60
    #: the agent reboots the machine once installed (into the installed system)
    reboot: bool = False


class _Tail(logging.Handler):
    """The agent's last log lines, for the final report."""

    def __init__(self, lines: int) -> None:
        super().__init__(logging.DEBUG)
        self.lines: collections.deque[str] = collections.deque(maxlen=lines)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.extend(self.format(record).splitlines())
        except Exception:  # a log line must never break the install
            self.handleError(record)

    def text(self) -> str:
        return "\n".join(self.lines)


class _Stop:
    pass


class Reporter:
    """Sends progress from one thread, in order: queued phase changes first, the current
    state at every interval; sets ``cancel`` when the server asks for it."""

    def __init__(
        self,
        client: Client | None,
        path: str,
        interval: float,
        cancel: threading.Event,
    ) -> None:
        self.client = client
        self.path = path
        self.interval = max(interval, 0.05)
        self.cancel = cancel
        self.current = Progress("waiting")
        self._lock = threading.Lock()
        self._queue: queue.Queue[Progress | _Stop] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="corral-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def update(self, progress: Progress, *, now: bool = False) -> None:
        with self._lock:
            self.current = progress
        if now:
            self._queue.put(progress)

    def tell(self, progress: Progress) -> None:
        """Send ``progress`` once, next, without making it the state sent at every
        interval (an event, such as a session joined)."""
        self._queue.put(progress)

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            self._queue.put(_Stop())
            self._thread.join(timeout)

    def _loop(self) -> None:
        try:
            while True:
                try:
                    item = self._queue.get(timeout=self.interval)
                except queue.Empty:
                    with self._lock:
                        item = self.current
                if isinstance(item, _Stop):
                    return
                self.send(item)
        finally:
            if self.client is not None:
                self.client.close()  # this thread's kept connection

    def send(self, progress: Progress) -> None:
        """POST one report; a server that does not answer is logged, never fatal."""
        if self.client is None:
            return
        try:
            answer = self.client.post(self.path, progress.to_dict())
        except Rejected as exc:
            log.error("corral refused the progress report: %s", exc)
            return
        except ReportError as exc:
            log.warning("progress not delivered: %s", exc)
            return
        if isinstance(answer, dict) and answer.get("cancel") and not self.cancel.is_set():
            log.warning("corral cancelled the deployment")
            self.cancel.set()


def progress_path(plan: Plan) -> str:
    node = urllib.parse.quote(plan.node, safe="")
    return f"/api/v1/deployments/{plan.deployment}/nodes/{node}/progress"


class Installer:
    """Runs one plan on this machine; :meth:`run` returns the final :class:`Progress`."""

    def __init__(
        self,
        plan: Plan,
        client: Client | None,
        runner: Runner,
        settings: InstallSettings | None = None,
        *,
        receivers: Mapping[str, type[Receiver]] = RECEIVERS,
        sleep: Callable[[float], None] = time.sleep,
        exists: Callable[[str], bool] | None = None,
    ) -> None:
        self.plan = plan
        self.client = client
        self.runner = runner
        self.settings = settings or InstallSettings()
        self.receivers = receivers
        self.sleep = sleep
        self.exists = exists
        self.cancel = threading.Event()
        self.reporter = Reporter(client, progress_path(plan), plan.report_interval, self.cancel)
        self.mounts = disk.Mounts(runner, sleep=sleep)
        self.phase = "waiting"
        self.phases: list[str] = []
        self.bytes = 0
        self.total = 0
        self.layout: disk.Layout | None = None
        self.reused = False
        #: the installed system got the unit that reports its first boot
        self.first_boot = False
        self.received: Received | None = None
        self.receiver: Receiver | None = None
        #: the work ended well (a diskless boot then keeps its mounts)
        self.succeeded = False

    # --- helpers ---------------------------------------------------------------------

    def run_command(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        timeout: float = 600.0,
        env: Mapping[str, str] | None = None,
        cancel: threading.Event | None = None,
    ) -> Result:
        """The runner, stopped by a cancel of the deployment (a :data:`Runner`)."""
        if self.cancel.is_set():
            raise Cancelled()
        result = self.runner(argv, input=input, timeout=timeout, env=env, cancel=self.cancel)
        if self.cancel.is_set():
            raise Cancelled()
        return result

    def _enter(self, phase: str, message: str = "") -> None:
        if phase not in DEPLOY_STEPS:
            raise ValueError(f"unknown phase {phase!r}")
        if self.cancel.is_set():
            raise Cancelled()
        self.phase = phase
        self.phases.append(phase)
        log.info("phase %s%s", phase, f": {message}" if message else "")
        self.reporter.update(Progress(phase, self.bytes, self.total, message), now=True)

    def _progress(self, done: int, total: int) -> None:
        self.bytes, self.total = done, total
        self.reporter.update(Progress(self.phase, done, total))

    def _joined(self, tag: str) -> None:
        self.reporter.tell(Progress(self.phase, self.bytes, self.total, joined=tag))

    def context(self) -> Context:
        """What this run's receiver may use."""
        return Context(self.client, tries=self.settings.tries, joined=self._joined)

    @property
    def device(self) -> str:
        return self.settings.disk or self.plan.disk.device

    @property
    def target(self) -> Path:
        return self.settings.work_dir

    # --- the run ---------------------------------------------------------------------

    def run(self) -> Progress:
        tail = _Tail(self.settings.log_lines)
        logger = logging.getLogger("corral.agent")
        logger.addHandler(tail)
        level = logger.level
        if logger.getEffectiveLevel() > logging.DEBUG:
            logger.setLevel(logging.DEBUG)  # the tail is the log file's, which has it all
        started = time.monotonic()
        self.reporter.start()
        try:
            try:
                self._install()
                self.succeeded = True
            finally:
                left = self.release()
            if left:
                raise InstallError(f"could not unmount {', '.join(sorted(set(left)))}")
            final = self.done(time.monotonic() - started)
        except Cancelled:
            log.error("deployment cancelled")
            final = Progress("failed", self.bytes, self.total, "cancelled")
        except InstallError as exc:
            log.error("deployment failed in %s: %s", self.phase, exc)
            final = Progress("failed", self.bytes, self.total, _one_line(str(exc)))
        except Exception as exc:
            log.exception("deployment failed in %s", self.phase)
            reason = _one_line(f"{self.phase}: {type(exc).__name__}: {exc}")
            final = Progress("failed", self.bytes, self.total, reason)
        finally:
            self.reporter.stop()
            logger.removeHandler(tail)
            logger.setLevel(level)
        final = dataclasses.replace(final, log_tail=tail.text())
        self.phases.append(final.phase)
        self.reporter.send(final)
        if self.client is not None:
            self.client.close()  # the connection the final report kept, in this thread
        return final

    def release(self) -> list[str]:
        """Unmount what the run mounted; the mount points that stayed."""
        return self.mounts.unmount_all() + disk.mounts_under(self.target)

    def done(self, seconds: float) -> Progress:
        """The final report of a run that succeeded."""
        log.info("installed %s on %s in %.0f s", self.plan.image.ref, self.device, seconds)
        then = "rebooting into it" if self.settings.reboot else "not rebooting"
        return Progress(
            "done",
            self.bytes,
            self.total,
            f"installed in {seconds:.0f} s; {then}",
            first_boot=self.first_boot,
            reboot=self.settings.reboot,
        )

    def _install(self) -> None:
        plan = self.plan
        if plan.bootloader not in BOOTLOADERS:
            raise InstallError(f"unknown bootloader {plan.bootloader!r}: use grub or none")
        if plan.transport.name not in self.receivers:
            known = ", ".join(sorted(self.receivers))
            raise InstallError(f"unknown transport {plan.transport.name!r}: this agent has {known}")
        if not self.device:
            raise InstallError("no disk to install on (none in the plan, none found)")
        context = self.context()
        self.receiver = receiver = self.receivers[plan.transport.name](context)

        self._enter("partitioning", self.device)
        layout = disk.make_layout(
            plan.disk, self.device, bootloader=plan.bootloader, efi_firmware=self.settings.efi
        )
        size = disk.disk_size(self.run_command, self.device)
        disk.check_size(layout, plan.image.tree_bytes, size)
        self.mounts.clear(self.target)
        self.target.mkdir(parents=True, exist_ok=True)
        reused = None
        if receiver.incremental:
            reused = disk.find_reusable(
                self.run_command,
                self.mounts,
                layout,
                self.target,
                sleep=self.sleep,
                exists=self.exists,
            )
        if reused is not None:
            layout, self.reused = reused, True
        else:
            self.check_wipe()
            disk.partition(
                self.run_command,
                layout,
                size,
                timeout=self.settings.partition_timeout,
                sleep=self.sleep,
                exists=self.exists,
            )
            disk.make_filesystems(self.run_command, layout, timeout=self.settings.mkfs_timeout)
        self.layout = layout
        context.mount_points = tuple(
            v.mount for v in layout.volumes if v.mounted and v.mount != "/"
        )
        disk.mount_layout(self.mounts, layout, self.target)
        disk.write_stamp(self.target, layout)

        self.total = receiver.expected_bytes(plan)
        self._enter("receiving", f"{plan.image.ref} by {plan.transport.name}")
        self.received = receiver.receive(Job(plan, self.target, self._progress, self.cancel))
        self.bytes = self.received.bytes

        self._enter("configuring", plan.identity.hostname)
        identity.configure(self.target, plan.identity, layout)
        self.install_first_boot()

        chroot_ready = False
        if plan.bootloader == "grub":
            self._enter("bootloader", "grub")
            self._chroot_mounts()
            chroot_ready = True
            self.install_grub(layout)
        if plan.post_script.strip():
            self._enter("post-install")
            if not chroot_ready:
                self._chroot_mounts()
            self.run_post_script()
        # this disk's filesystems only: a plain sync flushes every filesystem of the host
        # (on the testbed, 100 nodes each flushing all the others' disks)
        points = [self.target / v.mount.lstrip("/") for v in layout.volumes if v.mounted]
        self.run_command(["sync", "-f", *map(str, points)], timeout=600)

    def check_wipe(self) -> None:
        """Erase a disk that corral did not partition only when the plan says so (the
        profile's ``wipe_disk``): a disk with another system's partitions is refused."""
        found = disk.foreign_table(self.run_command, self.mounts, self.device, self.target)
        if found is None:
            return
        if not self.plan.disk.wipe:
            raise InstallError(
                f"{self.device} holds {found}, not made by corral: not erased; "
                "set wipe_disk: true in the node's profile to let corral erase it"
            )
        log.warning("erasing %s: it holds %s, and the plan says wipe_disk", self.device, found)

    # --- inside the installed system -------------------------------------------------

    def install_first_boot(self) -> None:
        """Leave the unit by which the installed system tells corral it is up: only for a
        system that corral's GRUB boots and that runs systemd."""
        client, plan = self.client, self.plan
        if plan.bootloader != "grub" or client is None or not client.token:
            return
        if not firstboot.has_systemd(self.target):
            log.warning("the image has no systemd: corral will not hear of its first boot")
            return
        firstboot.install(self.target, client.server, plan.node, client.token)
        self.first_boot = True

    def _chroot_mounts(self) -> None:
        """The kernel's filesystems inside the target, as tools run in it expect."""
        for name in ("dev", "proc", "sys"):
            self.mounts.bind(f"/{name}", self.target / name)

    def _in_target(self, *relatives: str) -> str | None:
        """The first of ``relatives`` that the installed system has, as its own path."""
        for rel in relatives:
            if os.path.lexists(self.target / rel):
                return "/" + rel
        return None

    def chroot_env(self) -> dict[str, str]:
        return {
            "PATH": CHROOT_PATH,
            "HOME": "/root",
            "LC_ALL": "C",
            "DEBIAN_FRONTEND": "noninteractive",
            "CORRAL_NODE": self.plan.node,
            "CORRAL_DEPLOYMENT": str(self.plan.deployment),
            "CORRAL_IMAGE": self.plan.image.ref,
        }

    def _chroot(self, argv: Sequence[str], what: str, timeout: float) -> Result:
        result = self.run_command(
            ["chroot", str(self.target), *argv], timeout=timeout, env=self.chroot_env()
        )
        return check(result, what)

    def install_grub(self, layout: disk.Layout) -> None:
        """GRUB for BIOS when it has somewhere to live (a DOS disk, or a GPT disk with a
        BIOS boot partition) and for UEFI when there is an EFI system partition.

        The EFI copy goes to the removable-media path (EFI/BOOT/BOOTX64.EFI) and no NVRAM
        entry is made: the firmware's boot order stays corral's (network first), and the
        disk is found by the path every firmware looks at.
        """
        install = self._in_target("usr/sbin/grub-install", "usr/sbin/grub2-install")
        if install is None:
            raise InstallError("the image has no grub-install: install GRUB in it")
        timeout = self.settings.grub_timeout
        if self.plan.kernel_args:
            # sourced by grub-mkconfig after /etc/default/grub (the image's own settings)
            args = " ".join(self.plan.kernel_args).replace('"', "")
            text = f'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX {args}"\n'
            identity.write_atomic(
                self.target / GRUB_DEFAULTS, "# corral: installed_kernel_args\n" + text
            )
        esp = layout.esp
        bios = layout.label == "dos" or layout.has_biosboot
        if not bios and esp is None:
            raise InstallError(
                "GRUB has nowhere to go: a gpt disk needs a biosboot or an EFI partition"
            )
        if bios:
            self._chroot([install, "--target=i386-pc", layout.device], "grub-install", timeout)
        if esp is not None:
            argv = [
                install,
                "--target=x86_64-efi",
                f"--efi-directory={esp.mount}",
                "--removable",
                "--no-nvram",
            ]
            self._chroot(argv, "grub-install (EFI)", timeout)
        update = self._in_target("usr/sbin/update-grub")
        if update is not None:
            self._chroot([update], "update-grub", timeout)
            return
        mkconfig = self._in_target("usr/sbin/grub-mkconfig", "usr/sbin/grub2-mkconfig")
        if mkconfig is None:
            raise InstallError("the image has neither update-grub nor grub-mkconfig")
        config = "/boot/grub2/grub.cfg" if "grub2" in mkconfig else "/boot/grub/grub.cfg"
        self._chroot([mkconfig, "-o", config], "grub-mkconfig", timeout)

    def run_post_script(self) -> None:
        """The plan's script, by bash (sh without it) in the installed system; its output
        goes to the log, a non-zero exit fails the deployment."""
        path = self.target / POST_SCRIPT
        identity.write_atomic(path, self.plan.post_script, 0o700)
        shell = self._in_target("usr/bin/bash", "bin/bash") or "/bin/sh"
        try:
            result = self.run_command(
                ["chroot", str(self.target), shell, "/" + POST_SCRIPT],
                timeout=self.settings.post_timeout,
                env=self.chroot_env(),
            )
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for line in (result.stdout + result.stderr).splitlines():
            log.info("post-install: %s", line)
        if result.returncode == 124:
            raise InstallError(
                f"post-install script did not finish in {self.settings.post_timeout:.0f} s"
            )
        if not result.ok:
            last = (result.stderr.strip() or result.stdout.strip()).splitlines()
            raise InstallError(
                f"post-install script exited with {result.returncode}"
                + (f": {last[-1].strip()}" if last else "")
            )


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
