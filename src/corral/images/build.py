"""Building an OS image: a distribution's root tree, made from scratch in a staging directory.

A :class:`Builder` turns a :class:`BuildSpec` into a finished root tree. Its work is a plan
of :class:`Step` s, and :meth:`Builder.commands` shows every command of that plan as data
(argv lists, the way they will run), so what a build does can be read and tested without
running it. :data:`BUILDERS` holds one builder per tool; :func:`builder_for` picks the one
for a distribution family.

- ``debootstrap`` (Debian, Ubuntu): ``debootstrap --variant=minbase`` with the packages a
  disk boot needs (kernel, initramfs-tools, GRUB for BIOS and UEFI, systemd, networkd with
  DHCP, OpenSSH), then the spec's packages and each layer's installed by apt inside the
  tree.
- ``dnf`` (RHEL and its rebuilds, Fedora): ``dnf --installroot`` of ``@core``, kernel,
  GRUB, shim and dracut from the spec's mirror, then the spec's packages by a second
  ``dnf --installroot``, then the layers by dnf inside the tree.

The spec's own packages are never part of the base system's command: debootstrap's
``--include`` resolves dependencies naively (no alternatives, no virtual packages, no
version constraints), so a big or unusual package set fails there while apt installs it.
A separate step also names the packages at fault correctly when one does not exist.

Downloaded packages are kept in ``spec.cache_dir`` (one directory per family, release and
architecture, locked while a build uses it), so the next build downloads only what changed.

Whatever ends a build early (a failure, Ctrl-C) leaves no mount behind and the staging
directory empty. Tool failures are explained: an unknown package is named, a full disk
names the directory that filled up.

The finished tree has no identity: ``/etc/machine-id`` is empty (systemd makes one at first
boot), there are no SSH host keys (made per node when deployed, or at first boot), no apt
lists, no package cache, nothing in ``/tmp``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar, Literal, Protocol

from corral.errors import CommandFailed, CorralError
from corral.images.chroot import (
    MOUNTINFO,
    Runner,
    active_mounts_under,
    chroot_command,
    chroot_run,
    cleanup_mounts,
    kill_processes_inside,
    mounted,
    sigint_deferred,
)
from corral.images.layers import (
    Layer,
    PackageTool,
    check_package_names,
    copy_overlay,
    install_argv,
    validate_layers,
)
from corral.run import run

log = logging.getLogger("corral.images")

FAMILIES = ("debian", "ubuntu", "rhel", "fedora")
APT_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
#: Where ``commands()`` puts the root when no real staging directory is given.
ROOT_PLACEHOLDER = Path("/ROOT")

#: Releases whose systemd package still contains systemd-resolved (later ones split it out).
RESOLVED_IN_SYSTEMD = frozenset({"buster", "bullseye", "bionic", "focal", "jammy"})

Mounts = Literal["none", "base", "cache"]


# --- errors ----------------------------------------------------------------------------


class BuildError(CorralError):
    """An image build that failed (nothing is left in the staging directory)."""


class UnknownFamily(BuildError):
    exit_code = 2

    def __init__(self, family: str) -> None:
        super().__init__(
            f"unknown distribution family '{family}'",
            f"supported families: {', '.join(FAMILIES)}",
        )
        self.family = family
        self.args = (family,)


class UnknownPackage(BuildError):
    exit_code = 2

    def __init__(self, packages: Sequence[str], where: str, hint: str | None = None) -> None:
        names = ", ".join(f"'{p}'" for p in packages)
        plural = "s" if len(packages) > 1 else ""
        super().__init__(f"unknown package{plural} {names} {where}", hint)
        self.packages = list(packages)
        self.where = where
        self.args = (list(packages), where, hint)


class DiskFull(BuildError):
    def __init__(self, directory: Path, what: str) -> None:
        free = ""
        try:
            usage = shutil.disk_usage(directory)
            free = f" ({usage.free / 2**20:.0f} MiB free of {usage.total / 2**30:.1f} GiB)"
        except OSError:
            pass
        super().__init__(
            f"no space left on device in {directory}{free} while {what}",
            "free some space there or build somewhere bigger (a minimal bootable image "
            "needs about 1 GiB, its package cache a few hundred MiB)",
        )
        self.directory = directory
        self.args = (directory, what)


# --- what to build ---------------------------------------------------------------------


@dataclass
class BuildSpec:
    """What image to build.

    ``release`` is a suite for Debian/Ubuntu (``bookworm``, ``jammy``) and a version for
    RPM distributions (``9``, ``40``). ``mirror`` defaults, for Debian, to the machine's
    apt sources; the others need one (RHEL-like: the tree holding ``BaseOS/`` and
    ``AppStream/``; Fedora: the tree holding ``releases/`` and ``updates/``). ``packages``
    come on top of what makes the image bootable; ``layers`` are applied after, in order.
    ``bootable=False`` leaves the boot packages out: a bare tree, for containers or tests.
    """

    distro: str
    family: str
    release: str
    arch: str = "amd64"
    mirror: str | None = None
    packages: list[str] = field(default_factory=list)
    layers: list[Layer] = field(default_factory=list)
    cache_dir: Path | None = None
    components: list[str] = field(default_factory=lambda: ["main"])
    gpg_key: str | None = None  # RPM repositories: URL of the signing key (else no check)
    bootable: bool = True  # False: no kernel, bootloader, network or SSH (a bare chroot tree)

    def __post_init__(self) -> None:
        self.family = self.family.lower()
        self.packages = list(self.packages)
        self.layers = list(self.layers)
        check_package_names(self.packages, f"image '{self.distro}'")
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.release):
            raise BuildError(f"invalid release {self.release!r}")

    def cache_for(self, tool: str) -> Path | None:
        """This spec's own directory in the shared package cache (None: no cache)."""
        if self.cache_dir is None:
            return None
        return self.cache_dir.resolve() / tool / f"{self.family}-{self.release}-{self.arch}"


@dataclass(frozen=True)
class Step:
    """One thing a build does: a command (run on the host or inside the tree) or an action.

    ``mounts`` is what the tree needs mounted meanwhile: nothing, the API file systems
    (``base``), or those plus the package cache bound into it (``cache``).
    """

    what: str
    argv: tuple[str, ...] = ()
    inside: bool = False
    action: Callable[[], object] | None = None
    mounts: Mounts = "none"
    layer: str | None = None
    timeout: float | None = None
    env: Mapping[str, str] = field(default_factory=dict)  # on top of run()'s environment

    def command(self, root: Path) -> list[str]:
        return chroot_command(root, self.argv) if self.inside else list(self.argv)


@dataclass(frozen=True)
class BuildResult:
    """A finished root tree and what is known about it."""

    root: Path
    spec: BuildSpec
    kernel: str | None  # file name in /boot (None when the spec is not bootable)
    initrd: str | None  # file name in /boot
    packages: dict[str, str]  # installed package -> version
    size_bytes: int
    seconds: float
    commands: list[list[str]]


class Builder(Protocol):
    """Builds the root trees of some distribution families."""

    name: ClassVar[str]
    families: ClassVar[tuple[str, ...]]

    def commands(self, spec: BuildSpec, root: Path = ROOT_PLACEHOLDER) -> list[list[str]]:
        """Every command :meth:`build` runs to make and change the tree, in order.

        (Mounting, and reading the package list of the result, are not in it.)
        """
        ...

    def build(self, spec: BuildSpec, staging: Path) -> BuildResult:
        """Build the tree of ``spec`` in ``staging`` (empty or missing; emptied on failure)."""
        ...


# --- shared pieces ---------------------------------------------------------------------


def default_mirror(sources: Path = APT_SOURCES) -> str | None:
    """The Debian archive this machine's apt uses: the first ``deb`` source that is not
    a security archive (deb822 ``debian.sources``, else one-line ``sources.list``)."""
    if sources.is_file():
        for stanza in re.split(r"\n\s*\n", sources.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                key, sep, value = line.partition(":")
                if sep and not line.startswith(("#", " ", "\t")):
                    fields[key.strip().lower()] = value.strip()
            suites = fields.get("suites", "").split()
            if (
                "deb" in fields.get("types", "").split()
                and fields.get("enabled", "yes").lower() != "no"
                and fields.get("uris")
                and not all(s.endswith("-security") for s in suites)
            ):
                return fields["uris"].split()[0].rstrip("/")
    one_line = sources.parent.parent / "sources.list"
    if one_line.is_file():
        for line in one_line.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb" and not words[2].endswith("-security"):
                return words[1].rstrip("/")
    return None


class _HostDns:
    """The build host's resolver inside the tree while packages are downloaded in it.

    Installing systemd-resolved turns ``/etc/resolv.conf`` into a link to a file only a
    running resolved writes; apt inside the tree would then resolve nothing.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / "etc/resolv.conf"
        self.link: str | None = None
        self.content: bytes | None = None

    def use(self) -> None:
        if self.path.is_symlink():
            self.link = os.readlink(self.path)
        elif self.path.exists():
            self.content = self.path.read_bytes()
        host = Path("/etc/resolv.conf")
        if self.path.is_symlink() or self.path.exists():
            self.path.unlink()
        self.path.write_bytes(host.read_bytes() if host.exists() else b"")

    def restore(self) -> None:
        self.path.unlink(missing_ok=True)
        if self.link is not None:
            self.path.symlink_to(self.link)
        elif self.content is not None:
            self.path.write_bytes(self.content)


def _empty_dir(path: Path) -> None:
    """Remove what ``path`` holds, not ``path`` itself."""
    if not path.is_dir() or path.is_symlink():
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a file of the tree; a link there is replaced, never followed out of the tree."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    path.write_text(text)
    path.chmod(mode)


HOSTS = """127.0.0.1\tlocalhost
::1\t\tlocalhost ip6-localhost ip6-loopback
ff02::1\t\tip6-allnodes
ff02::2\t\tip6-allrouters
"""


def strip_identity(root: Path) -> None:
    """Remove what makes the tree one particular machine: machine id, SSH host keys,
    hostname (and empty its scratch directories)."""
    machine_id = root / "etc/machine-id"
    machine_id.unlink(missing_ok=True)
    _write(machine_id, "", 0o444)
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.parent.is_dir():
        dbus_id.unlink(missing_ok=True)
        dbus_id.symlink_to("/etc/machine-id")
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    _write(root / "etc/hostname", "localhost\n")
    if not (root / "etc/hosts").exists():
        _write(root / "etc/hosts", HOSTS)
    for scratch in ("tmp", "var/tmp"):
        _empty_dir(root / scratch)


def image_size(root: Path) -> int:
    """Bytes in the files of ``root`` (each hard-linked file counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            info = os.lstat(os.path.join(dirpath, name))
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_size
    return total


@contextmanager
def _cache_lock(cache: Path | None) -> Iterator[None]:
    """One build at a time per cache directory (debootstrap itself does not lock it)."""
    if cache is None:
        yield
        return
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another build using %s", cache)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def discard(staging: Path, *, runner: Runner = run, mountinfo: Path = MOUNTINFO) -> None:
    """Empty ``staging`` after a failed build: processes and mounts first, then the files.

    A killed debootstrap leaves its children running inside the tree and its own ``/proc``
    mounted; they go first. Nothing is deleted while a mount remains below ``staging`` (a
    bound ``/dev`` would go with it).
    """
    with sigint_deferred():
        for attempt in range(3):
            kill_processes_inside(staging)
            cleanup_mounts(staging, runner=runner, mountinfo=mountinfo)
            left = active_mounts_under(staging, mountinfo)
            if left:  # cleanup_mounts raises first; this is the last line of defence
                raise BuildError(f"not removing {staging}: still mounted below it: {left}")
            try:
                _empty_dir(staging)
                return
            except OSError as exc:  # something still running wrote meanwhile
                if attempt == 2:
                    raise BuildError(
                        f"could not empty {staging} after a failed build: {exc}",
                        f"remove it by hand once nothing runs in it ('fuser -vm {staging}')",
                    ) from exc


# --- explaining failures ---------------------------------------------------------------

_UNKNOWN = [
    re.compile(r"Couldn't find these debs: (?P<names>.+)"),
    re.compile(r"Unable to locate package (?P<names>\S+)"),
    re.compile(r"Package '(?P<names>[^']+)' has no installation candidate"),
    re.compile(r"Couldn't find any package by (?:glob|regex) '(?P<names>[^']+)'"),
    re.compile(r"No match for argument: (?P<names>\S+)"),
    re.compile(r"Unable to find a match: (?P<names>.+)"),
]
_FULL = re.compile(
    r"No space left on device|ENOSPC|You don't have enough free space in (?P<apt>\S+?)\.?$"
    r"|more space needed on the (?P<rpm>\S+) filesystem",
    re.MULTILINE,
)
_PATH = re.compile(r"(/[^\s'\"`:,;()]+)")


def unknown_packages(output: str) -> list[str]:
    """Package names a package tool's output says it could not find (in order, once)."""
    names: list[str] = []
    for line in output.splitlines():
        for pattern in _UNKNOWN:
            match = pattern.search(line)
            if match:
                for name in match.group("names").split():
                    name = name.strip("'\".,")
                    if name and name not in names:
                        names.append(name)
    return names


def virtual_providers(output: str, name: str) -> list[str]:
    """The packages apt lists as providing ``name`` when it refuses to pick one for a
    virtual package (empty when ``name`` is not one)."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"Package {name} is a virtual package provided by:":
            providers = []
            for follow in lines[i + 1 :]:
                if not follow.startswith(" ") or not follow.strip():
                    break
                providers.append(follow.split()[0])
            return providers
    return []


def full_directory(
    output: str, root: Path, binds: Mapping[str, Path] | None = None, *, bound: bool = False
) -> Path | None:
    """Which directory filled up, if ``output`` says a disk is full (else None).

    A path in the message decides: one in a package cache (``binds`` maps its place in the
    tree to the host directory; when ``bound``, it is mounted there, so paths seen from
    inside the tree count too) names that cache; anything else is the tree itself.
    """
    binds = binds or {}
    found = False
    for line in output.splitlines():
        match = _FULL.search(line)
        if not match:
            continue
        found = True
        candidates = [match.group("apt") or "", *_PATH.findall(line)]
        for path in filter(None, candidates):
            for inside, host in binds.items():
                inside = "/" + inside.strip("/")
                prefixes = [str(host), inside, f"{root}{inside}"] if bound else [str(host)]
                for prefix in prefixes:
                    if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                        return host
    return root if found else None


def explain(
    output: str,
    *,
    what: str,
    returncode: int,
    spec: BuildSpec,
    root: Path,
    binds: Mapping[str, Path] | None = None,
    bound: bool = False,
    layer: str | None = None,
    boot_packages: Sequence[str] = (),
) -> BuildError:
    """The error a failed step raises: an unknown package, a full disk, or the tool's words."""
    directory = full_directory(output, root, binds, bound=bound)
    if directory is not None:
        return DiskFull(directory, what)
    names = unknown_packages(output)
    if names:
        if layer is not None:
            where = f"in layer '{layer}'"
        elif any(n in boot_packages and n not in spec.packages for n in names):
            where = "among the packages corral installs to make the image bootable"
        else:
            where = "in the image's packages"
        debian = spec.family in ("debian", "ubuntu")
        check = "'apt-cache policy NAME'" if debian else "'dnf search NAME'"
        hint = (
            f"no such package in {spec.mirror or 'the mirror'} for {spec.release}; check the "
            f"name with {check} on a {spec.family} {spec.release} system"
        )
        for name in names:
            providers = virtual_providers(output, name)
            if providers:
                hint = (
                    f"'{name}' is a virtual package: name one of the packages that provide "
                    f"it instead ({', '.join(providers[:6])})"
                )
                break
        return UnknownPackage(names, f"{where} ({spec.distro}: {spec.family} {spec.release})", hint)
    if "Release signed by unknown key" in output or "NO_PUBKEY" in output:
        return BuildError(
            f"{what}: cannot verify {spec.mirror}: signed by an unknown key",
            "install the distribution's keyring on this machine "
            "(ubuntu-keyring for Ubuntu on a Debian host)",
        )
    if re.search(r"No such script|Failed getting release file|Release file .* not found", output):
        return BuildError(
            f"{what}: release '{spec.release}' not found at {spec.mirror}",
            "check the release name and the mirror",
        )
    tail = " | ".join(line for line in output.strip().splitlines()[-4:] if line.strip())
    return BuildError(f"{what} failed (exit code {returncode}): {tail}")


# --- the common engine -----------------------------------------------------------------


class _PlanBuilder:
    """What both builders share: running a plan, and all of a build around it."""

    name: ClassVar[str]
    families: ClassVar[tuple[str, ...]]
    tool: ClassVar[PackageTool]
    program: ClassVar[str]
    host_package: ClassVar[str]

    def __init__(self, runner: Runner = run, mountinfo: Path = MOUNTINFO) -> None:
        self.runner = runner
        self.mountinfo = mountinfo

    # Subclasses define these.
    def plan(self, spec: BuildSpec, root: Path) -> list[Step]:
        raise NotImplementedError

    def binds(self, spec: BuildSpec) -> dict[str, Path]:
        raise NotImplementedError

    def boot_packages(self, spec: BuildSpec) -> list[str]:
        raise NotImplementedError

    def installed_packages(self, root: Path) -> dict[str, str]:
        raise NotImplementedError

    def boot_files(self, root: Path) -> tuple[str, str]:
        raise NotImplementedError

    # Shared.
    def check(self, spec: BuildSpec) -> None:
        """Everything that can be found wrong before the first command runs."""
        if spec.family not in self.families:
            raise BuildError(
                f"the {self.name} builder cannot build {spec.family} images",
                f"it builds: {', '.join(self.families)}; see builder_for()",
            )
        if spec.arch not in ("amd64", "x86_64"):
            raise BuildError(f"unsupported architecture '{spec.arch}'", "supported: amd64 (x86_64)")
        validate_layers(spec.layers)

    def commands(self, spec: BuildSpec, root: Path = ROOT_PLACEHOLDER) -> list[list[str]]:
        self.check(spec)
        return [step.command(root) for step in self.plan(spec, root) if step.argv]

    def build(self, spec: BuildSpec, staging: Path) -> BuildResult:
        started = time.monotonic()
        self.check(spec)
        if shutil.which(self.program) is None:
            raise BuildError(
                f"{self.program} is not installed on this machine",
                f"install it: apt-get install {self.host_package}",
            )
        if os.uname().machine != "x86_64":
            raise BuildError(f"cannot build {spec.arch} images on {os.uname().machine}")
        staging = Path(staging)
        staging.mkdir(parents=True, exist_ok=True)
        root = staging.resolve()
        if any(root.iterdir()):
            raise BuildError(
                f"staging directory {root} is not empty", "builds start from an empty directory"
            )
        root.chmod(0o755)  # it becomes the image's /
        plan = self.plan(spec, root)
        try:
            with _cache_lock(spec.cache_for(self.name)):
                self._execute(plan, spec, root)
            kernel, initrd = self.boot_files(root) if spec.bootable else (None, None)
            packages = self.installed_packages(root)
        except BaseException:
            discard(root, runner=self.runner, mountinfo=self.mountinfo)
            raise
        result = BuildResult(
            root=root,
            spec=spec,
            kernel=kernel,
            initrd=initrd,
            packages=packages,
            size_bytes=image_size(root),
            seconds=time.monotonic() - started,
            commands=[step.command(root) for step in plan if step.argv],
        )
        mib = result.size_bytes / 2**20
        log.info(
            "built %s: %d packages, %.0f MiB, %.0f s", root, len(packages), mib, result.seconds
        )
        return result

    def _execute(self, plan: Sequence[Step], spec: BuildSpec, root: Path) -> None:
        binds = self.binds(spec)
        for path in binds.values():
            path.mkdir(parents=True, exist_ok=True)
            if self.tool == "apt":
                (path / "partial").mkdir(exist_ok=True)
        with ExitStack() as stack:
            state: Mounts = "none"
            for step in plan:
                if step.mounts != state:
                    stack.close()
                    if step.mounts != "none":
                        stack.enter_context(
                            mounted(
                                root,
                                binds=binds if step.mounts == "cache" else None,
                                runner=self.runner,
                                mountinfo=self.mountinfo,
                            )
                        )
                    state = step.mounts
                log.info("%s: %s", spec.distro, step.what)
                self._step(step, spec, root, binds)

    def _step(self, step: Step, spec: BuildSpec, root: Path, binds: dict[str, Path]) -> None:
        try:
            if step.action is not None:
                step.action()
                return
            if step.inside:
                proc = chroot_run(
                    root,
                    step.argv,
                    env=step.env,
                    check=False,
                    timeout=step.timeout,
                    runner=self.runner,
                )
            else:
                env = {"LC_ALL": "C", **step.env}
                proc = self.runner(step.argv, check=False, env=env, timeout=step.timeout)
        except CommandFailed as exc:  # a timeout
            raise BuildError(f"{step.what}: {exc}") from exc
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFull(root, step.what) from exc
            raise
        if proc.returncode != 0:
            output = f"{proc.stdout}\n{proc.stderr}"
            tool_log = root / "debootstrap/debootstrap.log"
            if tool_log.is_file():
                output += "\n" + "\n".join(tool_log.read_text(errors="replace").splitlines()[-40:])
            log.debug("%s failed:\n%s", step.what, output)
            raise explain(
                output,
                what=step.what,
                returncode=proc.returncode,
                spec=spec,
                root=root,
                binds=binds,
                bound=step.mounts == "cache",
                layer=step.layer,
                boot_packages=self.boot_packages(spec),
            )
        log.debug("%s:\n%s", step.what, proc.stdout[-2000:])


def _dedupe(names: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _latest(paths: Sequence[Path]) -> str | None:
    def key(path: Path) -> list[int | str]:
        return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]

    return sorted(paths, key=key)[-1].name if paths else None


# --- debootstrap -----------------------------------------------------------------------

NETWORKD_DHCP = """# corral: every wired interface asks DHCP (replace per node when deployed)
[Match]
Name=en* eth*

[Network]
DHCP=yes
"""

SSH_KEYS_UNIT = """[Unit]
Description=Create SSH host keys if there are none (corral image)
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
"""


def _layer_steps(
    layers: Sequence[Layer], root: Path, install: Callable[[Layer], list[str]]
) -> list[Step]:
    """Each layer's package install (``install`` gives its argv), then its overlay."""
    steps: list[Step] = []
    for layer in layers:
        if layer.packages:
            steps.append(
                Step(
                    f"install the packages of layer '{layer.name}'",
                    tuple(install(layer)),
                    inside=True,
                    mounts="cache",
                    layer=layer.name,
                    timeout=3600,
                )
            )
        if layer.overlay is not None:
            steps.append(
                Step(
                    f"copy the overlay of layer '{layer.name}'",
                    action=partial(copy_overlay, layer.overlay, root),
                    layer=layer.name,
                )
            )
    return steps


def _package_steps(
    spec: BuildSpec, install: Callable[[list[str]], list[str]], *, inside: bool, mounts: Mounts
) -> list[Step]:
    """The install of the spec's own packages (``install`` gives its argv) after the base
    system, as a step of its own like a layer's; none when the spec has none."""
    if not spec.packages:
        return []
    argv = install(_dedupe(spec.packages))
    return [
        Step(
            "install the image's packages",
            tuple(argv),
            inside=inside,
            mounts=mounts,
            timeout=3600,
        )
    ]


def _dnf_layer_argv(layer: Layer) -> list[str]:
    argv = install_argv("dnf", layer.packages)
    argv[1:1] = ["--repo=corral-*"]  # only the image's own repositories, not the host's
    return argv


class DebootstrapBuilder(_PlanBuilder):
    """Debian and Ubuntu trees, made by debootstrap and finished with apt in a chroot."""

    name = "debootstrap"
    families: ClassVar[tuple[str, ...]] = ("debian", "ubuntu")
    tool = "apt"
    program = "debootstrap"
    host_package = "debootstrap"

    def mirror(self, spec: BuildSpec) -> str:
        if spec.mirror:
            return spec.mirror.rstrip("/")
        if spec.family == "debian":
            found = default_mirror()
            if found:
                return found
            raise BuildError(
                f"no mirror for {spec.distro}, and none in {APT_SOURCES}",
                "give the image a mirror (a Debian archive URL)",
            )
        raise BuildError(
            f"{spec.family} images need a mirror ({spec.distro} has none)",
            "give the image a mirror, e.g. the URL of an Ubuntu archive",
        )

    def boot_packages(self, spec: BuildSpec) -> list[str]:
        if not spec.bootable:
            return []
        kernel = "linux-image-generic" if spec.family == "ubuntu" else "linux-image-amd64"
        packages = [
            kernel,
            "initramfs-tools",
            "zstd",  # initramfs-tools compresses with it (else falls back to slow gzip)
            "grub-pc-bin",  # the BIOS GRUB modules and grub-install; grub-pc's postinst
            "grub-efi-amd64-bin",  # would install to a disk, these do not
            "grub2-common",
            "systemd-sysv",
            "udev",
            "dbus",
            "iproute2",
            "openssh-server",
        ]
        if spec.release not in RESOLVED_IN_SYSTEMD:
            packages.append("systemd-resolved")
        return packages

    def binds(self, spec: BuildSpec) -> dict[str, Path]:
        cache = spec.cache_for(self.name)
        if cache is None:
            return {}
        return {
            "/var/cache/apt/archives": cache / "archives",
            "/var/lib/apt/lists": cache / "lists",
        }

    def plan(self, spec: BuildSpec, root: Path) -> list[Step]:
        cache = spec.cache_for(self.name)
        include = self.boot_packages(spec)  # the spec's packages: by apt, below
        debootstrap = [
            "debootstrap",
            "--variant=minbase",
            "--arch=amd64",
            f"--components={','.join(spec.components)}",
        ]
        if include:
            debootstrap.append(f"--include={','.join(include)}")
        if cache is not None:
            debootstrap.append(f"--cache-dir={cache / 'archives'}")
        debootstrap += [spec.release, str(root), self.mirror(spec)]
        units = ["systemd-networkd.service", "systemd-resolved.service", "corral-ssh-keys.service"]
        dns = _HostDns(root)
        steps = [
            Step("let dpkg skip fsync while building", action=partial(self._unsafe_io, root)),
            # INITRD=No: the kernel's postinst makes no initramfs, update-initramfs below
            # makes it once (debootstrap would make it twice: for the kernel, then again
            # when initramfs-tools' trigger runs; about 30 s each).
            Step(
                "bootstrap the base system",
                tuple(debootstrap),
                timeout=3600,
                env={"INITRD": "No"},
            ),
        ]
        if spec.bootable:
            steps += [
                Step("configure the network and SSH", action=partial(self._configure, root)),
                Step(
                    "enable networkd, resolved and SSH host keys",
                    ("systemctl", "enable", *units),
                    inside=True,
                    mounts="base",
                ),
                Step(
                    "make the initramfs",
                    ("update-initramfs", "-c", "-k", "all"),
                    inside=True,
                    mounts="base",
                    timeout=1800,
                ),
            ]
        apt = bool(spec.packages) or any(layer.packages for layer in spec.layers)
        if apt:
            steps += [
                Step("use the build host's DNS resolver", action=dns.use),
                Step(
                    "update the package lists",
                    ("apt-get", "update"),
                    inside=True,
                    mounts="cache",
                    timeout=1800,
                ),
            ]
        steps += _package_steps(spec, partial(install_argv, "apt"), inside=True, mounts="cache")
        steps += _layer_steps(spec.layers, root, lambda layer: install_argv("apt", layer.packages))
        if apt:
            steps.append(Step("restore the image's resolv.conf", action=dns.restore))
        steps += [
            Step("remove downloaded packages", ("apt-get", "clean"), inside=True),
            Step("remove the machine's identity and caches", action=partial(self._clean, root)),
        ]
        return steps

    UNSAFE_IO = "etc/dpkg/dpkg.cfg.d/corral-unsafe-io"

    @classmethod
    def _unsafe_io(cls, root: Path) -> None:
        # A build that crashes is thrown away, so dpkg need not sync every file it writes.
        _write(root / cls.UNSAFE_IO, "force-unsafe-io\n")

    @staticmethod
    def _configure(root: Path) -> None:
        _write(root / "etc/systemd/network/80-corral-dhcp.network", NETWORKD_DHCP)
        _write(root / "etc/systemd/system/corral-ssh-keys.service", SSH_KEYS_UNIT)

    @classmethod
    def _clean(cls, root: Path) -> None:
        (root / cls.UNSAFE_IO).unlink(missing_ok=True)
        _empty_dir(root / "var/lib/apt/lists")
        for binary in (root / "var/cache/apt").glob("*.bin"):
            binary.unlink()
        strip_identity(root)

    def installed_packages(self, root: Path) -> dict[str, str]:
        packages: dict[str, str] = {}
        status = root / "var/lib/dpkg/status"
        for stanza in status.read_text().split("\n\n"):
            fields = {}
            for line in stanza.splitlines():
                key, sep, value = line.partition(":")
                if sep and line[:1] not in (" ", "\t"):
                    fields[key] = value.strip()
            if fields.get("Status", "").endswith(" installed") and "Package" in fields:
                packages[fields["Package"]] = fields.get("Version", "")
        return packages

    def boot_files(self, root: Path) -> tuple[str, str]:
        kernel = _latest(list((root / "boot").glob("vmlinuz-*")))
        initrd = _latest(list((root / "boot").glob("initrd.img-*")))
        if kernel is None or initrd is None:
            raise BuildError(f"the image in {root} has no kernel or no initramfs in /boot")
        if not (root / "usr/sbin/grub-install").exists():
            raise BuildError(f"the image in {root} has no grub-install")
        return kernel, initrd


# --- dnf -------------------------------------------------------------------------------


class DnfBuilder(_PlanBuilder):
    """RHEL-like and Fedora trees, made by ``dnf --installroot`` from the spec's mirror."""

    name = "dnf"
    families: ClassVar[tuple[str, ...]] = ("rhel", "fedora")
    tool = "dnf"
    program = "dnf"
    host_package = "dnf"

    REPO_FILE = "etc/yum.repos.d/corral.repo"

    def boot_packages(self, spec: BuildSpec) -> list[str]:
        if not spec.bootable:
            return ["@core"]
        return [
            "@core",
            "kernel",
            "grub2-pc",
            "grub2-efi-x64",
            "shim-x64",
            "efibootmgr",
            "dracut",
            "openssh-server",
        ]

    def binds(self, spec: BuildSpec) -> dict[str, Path]:
        cache = spec.cache_for(self.name)
        return {} if cache is None else {"/var/cache/dnf": cache}

    def build(self, spec: BuildSpec, staging: Path) -> BuildResult:
        if not spec.gpg_key:
            log.warning("%s: no gpg_key, packages are not signature-checked", spec.distro)
        return super().build(spec, staging)

    def repo_file(self, spec: BuildSpec) -> str:
        """The ``.repo`` file that points dnf at the spec's mirror."""
        if not spec.mirror:
            raise BuildError(
                f"{spec.family} images need a mirror ({spec.distro} has none)",
                "give the image a mirror: the URL of a tree with BaseOS/ and AppStream/ "
                "(RHEL-like) or releases/ and updates/ (Fedora)",
            )
        base = spec.mirror.rstrip("/")
        if spec.family == "fedora":
            repos = {
                "fedora": f"{base}/releases/$releasever/Everything/$basearch/os/",
                "updates": f"{base}/updates/$releasever/Everything/$basearch/",
            }
        else:
            repos = {
                "baseos": f"{base}/BaseOS/$basearch/os/",
                "appstream": f"{base}/AppStream/$basearch/os/",
            }
        check = f"gpgcheck=1\ngpgkey={spec.gpg_key}\n" if spec.gpg_key else "gpgcheck=0\n"
        return "".join(
            f"[corral-{repo}]\nname={spec.distro} {repo}\nbaseurl={url}\nenabled=1\n{check}\n"
            for repo, url in repos.items()
        )

    def plan(self, spec: BuildSpec, root: Path) -> list[Step]:
        cache = spec.cache_for(self.name)
        repo_text = self.repo_file(spec)
        dnf = [
            "dnf",
            f"--installroot={root}",
            f"--releasever={spec.release}",
            f"--setopt=reposdir={root / 'etc/yum.repos.d'}",
            "--repo=corral-*",
            "--setopt=install_weak_deps=False",
        ]
        if cache is not None:
            dnf += [f"--setopt=cachedir={cache}", "--setopt=keepcache=True"]
        base = [*dnf, "-y", "install", *self.boot_packages(spec)]
        dns = _HostDns(root)
        steps = [
            Step(
                "write the repository file",
                action=partial(_write, root / self.REPO_FILE, repo_text),
            ),
            # Package scripts (dracut, grub2) run chrooted into the tree: it needs /proc...
            Step("install the base system", tuple(base), mounts="base", timeout=3600),
        ]
        # ...and so do those of the spec's packages, installed into the tree the same way.
        steps += _package_steps(
            spec, lambda names: [*dnf, "-y", "install", *names], inside=False, mounts="base"
        )
        steps.append(Step("use the build host's DNS resolver", action=dns.use))
        steps += _layer_steps(spec.layers, root, _dnf_layer_argv)
        steps += [
            Step("restore the image's resolv.conf", action=dns.restore),
            Step("remove the machine's identity and caches", action=partial(self._clean, root)),
        ]
        return steps

    @staticmethod
    def _clean(root: Path) -> None:
        _empty_dir(root / "var/cache/dnf")
        strip_identity(root)

    def installed_packages(self, root: Path) -> dict[str, str]:
        proc = self.runner(
            ["rpm", f"--root={root}", "-qa", "--queryformat", r"%{NAME}\t%{VERSION}-%{RELEASE}\n"]
        )
        return dict(line.split("\t", 1) for line in proc.stdout.splitlines() if "\t" in line)

    def boot_files(self, root: Path) -> tuple[str, str]:
        kernel = _latest(list((root / "boot").glob("vmlinuz-*")))
        initrd = _latest(
            [p for p in (root / "boot").glob("initramfs-*.img") if "rescue" not in p.name]
        )
        if kernel is None or initrd is None:
            raise BuildError(f"the image in {root} has no kernel or no initramfs in /boot")
        if not (root / "usr/sbin/grub2-install").exists():
            raise BuildError(f"the image in {root} has no grub2-install")
        return kernel, initrd


# --- the registry ----------------------------------------------------------------------

BUILDERS: dict[str, Builder] = {
    "debootstrap": DebootstrapBuilder(),
    "dnf": DnfBuilder(),
}


def builder_for(family: str) -> Builder:
    """The builder of a distribution family; :class:`UnknownFamily` names the known ones."""
    for builder in BUILDERS.values():
        if family.lower() in builder.families:
            return builder
    raise UnknownFamily(family)


def build_image(spec: BuildSpec, staging: Path) -> BuildResult:
    """Build ``spec`` into ``staging`` with the builder of its family."""
    return builder_for(spec.family).build(spec, staging)
