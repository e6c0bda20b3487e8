"""Image builds without building: the commands as data, failure explanations, layers, and
the mount bookkeeping of chroot.mounted() against a fake mount table."""

from __future__ import annotations

import os
import pickle
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from corral.errors import CommandFailed
from corral.images.build import BUILDERS, BuildSpec, UnknownFamily, builder_for
from corral.images.build import debootstrap as build_mod
from corral.images.build.debootstrap import DebootstrapBuilder, default_mirror
from corral.images.build.dnf import DnfBuilder
from corral.images.build.errors import BuildError, DiskFull, UnknownPackage
from corral.images.build.explain import explain, full_directory, unknown_packages
from corral.images.chroot import (
    CHROOT_ENV,
    POLICY_RC_D,
    MountError,
    active_mounts_under,
    chroot_run,
    cleanup_mounts,
    daemons_disabled,
    mount_commands,
    mounted,
)
from corral.images.layers import (
    Layer,
    LayerError,
    apply_layers,
    copy_overlay,
    install_argv,
    resolve_in_root,
    validate_layers,
)

ROOT = Path("/srv/stage")
CACHE = Path("/var/cache/corral")
BOOT_DEBIAN = (
    "linux-image-amd64,initramfs-tools,zstd,grub-pc-bin,grub-efi-amd64-bin,grub2-common,"
    "systemd-sysv,udev,dbus,iproute2,openssh-server,systemd-resolved"
)
APT_INSTALL = [
    "apt-get", "install", "-y", "--no-install-recommends",
    "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
]  # fmt: skip


def debian_spec(**changes: object) -> BuildSpec:
    fields: dict[str, object] = {
        "distro": "debian12",
        "family": "debian",
        "release": "bookworm",
        "mirror": "http://mirror.example/debian",
        "packages": ["less", "vim-tiny"],
        "layers": [Layer("hpc", ["slurmd", "munge"]), Layer("site", overlay=None)],
        "cache_dir": CACHE,
    }
    fields.update(changes)
    return BuildSpec(**fields)  # type: ignore[arg-type]


# --- commands as data ------------------------------------------------------------------


def test_debootstrap_commands() -> None:
    commands = builder_for("debian").commands(debian_spec(), ROOT)
    cache = "/var/cache/corral/debootstrap/debian-bookworm-amd64"
    assert commands == [
        [
            "debootstrap", "--variant=minbase", "--arch=amd64", "--components=main",
            f"--include={BOOT_DEBIAN}", f"--cache-dir={cache}/archives",
            "bookworm", "/srv/stage", "http://mirror.example/debian",
        ],
        [
            "chroot", "/srv/stage", "systemctl", "enable", "systemd-networkd.service",
            "systemd-resolved.service", "corral-ssh-keys.service",
        ],
        ["chroot", "/srv/stage", "update-initramfs", "-c", "-k", "all"],
        ["chroot", "/srv/stage", "apt-get", "update"],
        ["chroot", "/srv/stage", *APT_INSTALL, "less", "vim-tiny"],
        ["chroot", "/srv/stage", *APT_INSTALL, "slurmd", "munge"],
        ["chroot", "/srv/stage", "apt-get", "clean"],
    ]  # fmt: skip


def test_image_packages_are_installed_by_apt_not_debootstrap() -> None:
    # debootstrap's --include resolves no alternatives nor virtual packages (bsd-mailx,
    # "Depends: default-mta | mail-transport-agent", fails there, bookworm 2026-11), so
    # the image's own packages go to apt inside the tree instead.
    packages = ["less", "vim-tiny", "bsd-mailx", "less", "python3-numpy"]
    spec = debian_spec(packages=packages, layers=[], cache_dir=None)
    commands = builder_for("debian").commands(spec, ROOT)
    include = next(a for a in commands[0] if a.startswith("--include="))
    assert include == f"--include={BOOT_DEBIAN}"
    assert commands[3:] == [
        ["chroot", "/srv/stage", "apt-get", "update"],
        ["chroot", "/srv/stage", *APT_INSTALL, "less", "vim-tiny", "bsd-mailx", "python3-numpy"],
        ["chroot", "/srv/stage", "apt-get", "clean"],
    ]  # fmt: skip
    whats = [step.what for step in DebootstrapBuilder().plan(spec, ROOT)]
    assert whats.index("use the build host's DNS resolver") < whats.index(
        "install the image's packages"
    )
    assert whats.index("restore the image's resolv.conf") > whats.index(
        "install the image's packages"
    )


def test_cli_packages_are_comma_separated_or_repeated() -> None:
    from corral.cli.image import _split_packages

    assert _split_packages(["less,vim-tiny", " htop ", "a,,b"]) == [
        "less", "vim-tiny", "htop", "a", "b",
    ]  # fmt: skip
    assert _split_packages(None) == []


def test_debootstrap_steps_say_what_they_need() -> None:
    builder = DebootstrapBuilder()
    steps = builder.plan(debian_spec(), ROOT)
    by_what = {step.what: step for step in steps}
    assert by_what["bootstrap the base system"].env == {"INITRD": "No"}
    assert by_what["bootstrap the base system"].mounts == "none"
    assert by_what["make the initramfs"].mounts == "base"
    assert by_what["install the packages of layer 'hpc'"].mounts == "cache"
    assert by_what["install the packages of layer 'hpc'"].layer == "hpc"
    assert by_what["install the image's packages"].mounts == "cache"
    assert by_what["install the image's packages"].layer is None
    assert by_what["install the image's packages"].inside
    assert by_what["remove downloaded packages"].mounts == "none"  # the cache is not bound
    assert builder.binds(debian_spec()) == {
        "/var/cache/apt/archives": CACHE / "debootstrap/debian-bookworm-amd64/archives",
        "/var/lib/apt/lists": CACHE / "debootstrap/debian-bookworm-amd64/lists",
    }


def test_debootstrap_without_cache_layers_or_boot() -> None:
    spec = debian_spec(packages=[], layers=[], cache_dir=None, bootable=False)
    assert builder_for("debian").commands(spec, ROOT) == [
        [
            "debootstrap", "--variant=minbase", "--arch=amd64", "--components=main",
            "bookworm", "/srv/stage", "http://mirror.example/debian",
        ],
        ["chroot", "/srv/stage", "apt-get", "clean"],
    ]  # fmt: skip


def test_ubuntu_kernel_and_resolved() -> None:
    jammy = BuildSpec("ubuntu22", "ubuntu", "jammy", mirror="http://mirror.example/ubuntu")
    debootstrap = builder_for("ubuntu").commands(jammy, ROOT)[0]
    include = next(a for a in debootstrap if a.startswith("--include="))
    assert "linux-image-generic" in include
    assert "linux-image-amd64" not in include
    assert "systemd-resolved" not in include  # still part of systemd in jammy
    noble = BuildSpec("ubuntu24", "ubuntu", "noble", mirror="http://mirror.example/ubuntu")
    assert "systemd-resolved" in builder_for("ubuntu").commands(noble, ROOT)[0][4]


def test_ubuntu_needs_a_mirror() -> None:
    with pytest.raises(BuildError, match="ubuntu images need a mirror"):
        builder_for("ubuntu").commands(BuildSpec("u", "ubuntu", "jammy"), ROOT)


def test_debian_mirror_defaults_to_apt_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_mod, "default_mirror", lambda: "http://apt.example/debian")
    commands = builder_for("debian").commands(debian_spec(mirror=None), ROOT)
    assert commands[0][-1] == "http://apt.example/debian"


def test_default_mirror_deb822(tmp_path: Path) -> None:
    sources = tmp_path / "sources.list.d/debian.sources"
    sources.parent.mkdir()
    sources.write_text(
        "Types: deb\n"
        "# http://snapshot.debian.org/archive/debian/20250520T000000Z\n"
        "URIs: http://local.mirror/debian/\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main\n"
        "\n"
        "Types: deb\n"
        "URIs: http://local.mirror/debian-security\n"
        "Suites: bookworm-security\n"
    )
    assert default_mirror(sources) == "http://local.mirror/debian"


def test_default_mirror_security_first_and_one_line(tmp_path: Path) -> None:
    sources = tmp_path / "sources.list.d/debian.sources"
    sources.parent.mkdir()
    sources.write_text("Types: deb\nURIs: http://sec/debian-security\nSuites: bookworm-security\n")
    assert default_mirror(sources) is None
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [arch=amd64] http://one.line/debian bookworm main\n"
    )
    assert default_mirror(sources) == "http://one.line/debian"


def rocky_spec(**changes: object) -> BuildSpec:
    fields: dict[str, object] = {
        "distro": "rocky9",
        "family": "rhel",
        "release": "9",
        "arch": "x86_64",
        "mirror": "http://mirror.example/rocky/9/",
        "packages": ["vim-enhanced"],
        "layers": [Layer("hpc", ["slurm-slurmd"])],
        "cache_dir": CACHE,
    }
    fields.update(changes)
    return BuildSpec(**fields)  # type: ignore[arg-type]


def test_dnf_commands() -> None:
    commands = builder_for("rhel").commands(rocky_spec(), ROOT)
    assert commands == [
        [
            "dnf", "--installroot=/srv/stage", "--releasever=9",
            "--setopt=reposdir=/srv/stage/etc/yum.repos.d", "--repo=corral-*",
            "--setopt=install_weak_deps=False",
            "--setopt=cachedir=/var/cache/corral/dnf/rhel-9-x86_64", "--setopt=keepcache=True",
            "-y", "install", "@core", "kernel", "grub2-pc", "grub2-efi-x64", "shim-x64",
            "efibootmgr", "dracut", "openssh-server",
        ],
        [
            "dnf", "--installroot=/srv/stage", "--releasever=9",
            "--setopt=reposdir=/srv/stage/etc/yum.repos.d", "--repo=corral-*",
            "--setopt=install_weak_deps=False",
            "--setopt=cachedir=/var/cache/corral/dnf/rhel-9-x86_64", "--setopt=keepcache=True",
            "-y", "install", "vim-enhanced",
        ],
        [
            "chroot", "/srv/stage", "dnf", "--repo=corral-*", "-y",
            "--setopt=install_weak_deps=False", "--setopt=keepcache=True", "install",
            "slurm-slurmd",
        ],
    ]  # fmt: skip
    steps = DnfBuilder().plan(rocky_spec(), ROOT)
    # Scriptlets need /proc, for the base system and the image's packages alike.
    assert [s.mounts for s in steps if s.argv] == ["base", "base", "cache"]
    assert [s.inside for s in steps if s.argv] == [False, False, True]
    bare = builder_for("rhel").commands(rocky_spec(packages=[], layers=[]), ROOT)
    assert len(bare) == 1 and bare[0][-1] == "openssh-server"
    assert DnfBuilder().binds(rocky_spec()) == {"/var/cache/dnf": CACHE / "dnf/rhel-9-x86_64"}


def test_dnf_repo_files() -> None:
    rhel = DnfBuilder().repo_file(rocky_spec(gpg_key="file:///keys/RPM-GPG-KEY-Rocky-9"))
    assert "[corral-baseos]\n" in rhel
    assert "baseurl=http://mirror.example/rocky/9/BaseOS/$basearch/os/\n" in rhel
    assert "baseurl=http://mirror.example/rocky/9/AppStream/$basearch/os/\n" in rhel
    assert rhel.count("gpgcheck=1\ngpgkey=file:///keys/RPM-GPG-KEY-Rocky-9\n") == 2
    fedora = DnfBuilder().repo_file(
        BuildSpec("f40", "fedora", "40", mirror="http://mirror.example/fedora/linux")
    )
    assert "baseurl=http://mirror.example/fedora/linux/releases/$releasever/Everything/" in fedora
    assert "[corral-updates]" in fedora
    assert "gpgcheck=0" in fedora


def test_dnf_needs_a_mirror() -> None:
    with pytest.raises(BuildError, match="rhel images need a mirror"):
        builder_for("rhel").commands(rocky_spec(mirror=None), ROOT)


def test_registry() -> None:
    assert set(BUILDERS) == {"debootstrap", "dnf"}
    assert builder_for("Debian").name == "debootstrap"
    assert builder_for("ubuntu").name == "debootstrap"
    assert builder_for("fedora").name == "dnf"
    assert builder_for("rhel").name == "dnf"


def test_unknown_family_names_it_and_the_supported_ones() -> None:
    with pytest.raises(UnknownFamily) as caught:
        builder_for("gentoo")
    assert str(caught.value) == "unknown distribution family 'gentoo'"
    assert caught.value.hint == "supported families: debian, ubuntu, rhel, fedora"
    assert caught.value.exit_code == 2


def test_builder_refuses_other_families_and_arches() -> None:
    with pytest.raises(BuildError, match="cannot build rhel images"):
        DebootstrapBuilder().commands(rocky_spec(), ROOT)
    with pytest.raises(BuildError, match="unsupported architecture 'arm64'"):
        DebootstrapBuilder().commands(debian_spec(arch="arm64"), ROOT)


def test_spec_validation() -> None:
    with pytest.raises(LayerError, match="invalid package name '--force-yes'"):
        debian_spec(packages=["--force-yes"])
    with pytest.raises(BuildError, match="invalid release"):
        debian_spec(release="../etc")


# --- explaining failures ---------------------------------------------------------------

DEBOOTSTRAP_UNKNOWN = """\
I: Retrieving InRelease
I: Checking Release signature
I: Valid Release signature (key id 4D64FEC119C2029067D6E791F8D2585B8783D481)
I: Retrieving Packages
I: Validating Packages
I: Resolving dependencies of required packages...
I: Resolving dependencies of base packages...
I: Checking component main on http://deb.debian.org/debian...
E: Couldn't find these debs: nosuchpkg-corral other-missing
"""

APT_UNKNOWN = """\
Reading package lists...
Building dependency tree...
Reading state information...
E: Unable to locate package corral-no-such-package
E: Unable to locate package another-one
"""

DNF_UNKNOWN = """\
Last metadata expiration check: 0:00:01 ago on Tue 25 Nov 2025 10:00:00 AM UTC.
No match for argument: slurm-nope
Error: Unable to find a match: slurm-nope
"""

DPKG_FULL = """\
Unpacking linux-image-6.1.0-50-amd64 (6.1.153-1) ...
dpkg: error processing archive /var/cache/apt/archives/linux-image-6.1.0-50-amd64_6.1.153-1\
_amd64.deb (--unpack):
 cannot copy extracted data for './usr/lib/modules/6.1.0-50-amd64/kernel/drivers/net/\
ethernet/mellanox/mlx5/core/mlx5_core.ko' to '/usr/lib/modules/6.1.0-50-amd64/kernel/\
drivers/net/ethernet/mellanox/mlx5/core/mlx5_core.ko.dpkg-new': failed to write \
(No space left on device)
"""

APT_CACHE_FULL = """\
Reading package lists...
E: You don't have enough free space in /var/cache/apt/archives/.
"""


def test_unknown_package_names() -> None:
    assert unknown_packages(DEBOOTSTRAP_UNKNOWN) == ["nosuchpkg-corral", "other-missing"]
    assert unknown_packages(APT_UNKNOWN) == ["corral-no-such-package", "another-one"]
    assert unknown_packages(DNF_UNKNOWN) == ["slurm-nope"]
    assert unknown_packages("E: Package 'python' has no installation candidate") == ["python"]
    assert unknown_packages(DPKG_FULL) == []


def test_unknown_package_in_debootstrap() -> None:
    error = explain(
        DEBOOTSTRAP_UNKNOWN,
        what="bootstrap the base system",
        returncode=1,
        spec=debian_spec(packages=["nosuchpkg-corral", "other-missing"]),
        root=ROOT,
    )
    assert isinstance(error, UnknownPackage)
    assert str(error) == (
        "unknown packages 'nosuchpkg-corral', 'other-missing' in the image's packages "
        "(debian12: debian bookworm)"
    )
    assert error.packages == ["nosuchpkg-corral", "other-missing"]
    assert error.hint is not None and "apt-cache policy" in error.hint


def test_unknown_package_in_a_layer() -> None:
    error = explain(
        APT_UNKNOWN,
        what="install the packages of layer 'hpc'",
        returncode=100,
        spec=debian_spec(),
        root=ROOT,
        layer="hpc",
    )
    assert str(error) == (
        "unknown packages 'corral-no-such-package', 'another-one' in layer 'hpc' "
        "(debian12: debian bookworm)"
    )
    error = explain(
        DNF_UNKNOWN, what="install", returncode=1, spec=rocky_spec(), root=ROOT, layer="hpc"
    )
    assert str(error) == "unknown package 'slurm-nope' in layer 'hpc' (rocky9: rhel 9)"
    assert error.hint is not None and "dnf search" in error.hint


APT_VIRTUAL = """\
Reading package lists...
Building dependency tree...
Reading state information...
Package mail-transport-agent is a virtual package provided by:
  postfix 3.7.11-0+deb12u1
  exim4-daemon-light 4.96-15+deb12u6
  exim4-daemon-heavy 4.96-15+deb12u6

You should explicitly select one to install.

E: Package 'mail-transport-agent' has no installation candidate
"""


def test_virtual_package_names_its_providers() -> None:
    error = explain(
        APT_VIRTUAL,
        what="install the image's packages",
        returncode=100,
        spec=debian_spec(packages=["mail-transport-agent"]),
        root=ROOT,
    )
    assert isinstance(error, UnknownPackage)
    assert str(error) == (
        "unknown package 'mail-transport-agent' in the image's packages (debian12: debian bookworm)"
    )
    assert error.hint == (
        "'mail-transport-agent' is a virtual package: name one of the packages that provide "
        "it instead (postfix, exim4-daemon-light, exim4-daemon-heavy)"
    )


def test_unknown_boot_package_says_so() -> None:
    error = explain(
        "E: Couldn't find these debs: systemd-resolved",
        what="bootstrap the base system",
        returncode=1,
        spec=debian_spec(release="lunar", family="ubuntu"),
        root=ROOT,
        boot_packages=["systemd-resolved"],
    )
    assert "among the packages corral installs to make the image bootable" in str(error)


def test_disk_full_in_the_tree() -> None:
    assert full_directory(DPKG_FULL, ROOT) == ROOT
    error = explain(
        DPKG_FULL,
        what="bootstrap the base system",
        returncode=1,
        spec=debian_spec(),
        root=ROOT,
    )
    assert isinstance(error, DiskFull)
    assert error.directory == ROOT
    assert str(error).startswith("no space left on device in /srv/stage")
    assert str(error).endswith("while bootstrap the base system")


def test_disk_full_in_the_cache() -> None:
    binds = {"/var/cache/apt/archives": CACHE / "archives", "/var/lib/apt/lists": CACHE / "lists"}
    # apt inside the tree, with the cache bound where it writes.
    assert full_directory(APT_CACHE_FULL, ROOT, binds, bound=True) == CACHE / "archives"
    # Not bound: /var/cache/apt/archives is the tree's own.
    assert full_directory(APT_CACHE_FULL, ROOT, binds, bound=False) == ROOT
    # debootstrap copying into its --cache-dir, seen from the host.
    cp_error = (
        "cp: error writing '/var/cache/corral/archives/bash_5.2.15-2+b13_amd64.deb': "
        "No space left on device"
    )
    assert full_directory(cp_error, ROOT, binds) == CACHE / "archives"
    assert full_directory("At least 312MB more space needed on the / filesystem.", ROOT) == ROOT
    assert full_directory(APT_UNKNOWN, ROOT, binds) is None


def test_other_failures_keep_the_tools_words() -> None:
    error = explain(
        "W: Failure trying to run: chroot /srv/stage dpkg --force-depends --install x.deb\n"
        "W: See /srv/stage/debootstrap/debootstrap.log for details\n",
        what="bootstrap the base system",
        returncode=1,
        spec=debian_spec(),
        root=ROOT,
    )
    assert type(error) is BuildError
    assert str(error).startswith("bootstrap the base system failed (exit code 1): W: Failure")
    assert "debootstrap.log" in str(error)
    error = explain(
        "E: No such script: /usr/share/debootstrap/scripts/bookwurm",
        what="bootstrap the base system",
        returncode=1,
        spec=debian_spec(release="bookwurm"),
        root=ROOT,
    )
    assert str(error) == (
        "bootstrap the base system: release 'bookwurm' not found at http://mirror.example/debian"
    )


def test_errors_survive_pickling(tmp_path: Path) -> None:
    for error in (
        UnknownFamily("arch"),
        UnknownPackage(["x"], "in layer 'a'", "check it"),
        DiskFull(tmp_path, "doing things"),
        BuildError("boom", "hint"),
    ):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error)
        assert str(back) == str(error)


# --- layers ----------------------------------------------------------------------------


def test_layer_names() -> None:
    Layer("hpc-tools_2")
    for bad in ("", "HPC", "-x", "_x", "a b", "a/b"):
        with pytest.raises(LayerError, match="invalid layer name"):
            Layer(bad)
    with pytest.raises(LayerError, match="layer 'a': invalid package name '-y'"):
        Layer("a", ["-y"])


def test_layer_overlay_must_exist(tmp_path: Path) -> None:
    with pytest.raises(LayerError, match=r"layer 'site': overlay .*/nope does not exist"):
        validate_layers([Layer("site", overlay=tmp_path / "nope")])
    (tmp_path / "file").write_text("")
    with pytest.raises(LayerError, match="is not a directory"):
        validate_layers([Layer("site", overlay=tmp_path / "file")])
    with pytest.raises(LayerError, match="layer 'a' is listed twice"):
        validate_layers([Layer("a"), Layer("a")])


def test_install_argv() -> None:
    assert install_argv("apt", ["less"]) == [*APT_INSTALL, "less"]
    assert install_argv("dnf", ["less"]) == [
        "dnf", "-y", "--setopt=install_weak_deps=False", "--setopt=keepcache=True",
        "install", "less",
    ]  # fmt: skip


def test_resolve_in_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/lib").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    (root / "etc").mkdir()
    (root / "etc/abs").symlink_to("/usr/lib")  # absolute: means root/usr/lib, not the host's
    (root / "etc/up").symlink_to("../../../../..")
    assert resolve_in_root(root, "lib/x") == root / "usr/lib/x"
    assert resolve_in_root(root, "etc/abs/x") == root / "usr/lib/x"
    assert resolve_in_root(root, "etc/up/etc") == root / "etc"
    (root / "loop").symlink_to("loop")
    with pytest.raises(LayerError, match="too many levels"):
        resolve_in_root(root, "loop/x")


def test_copy_overlay(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/lib").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    (root / "etc").mkdir(mode=0o755)
    (root / "etc/mtab").symlink_to("/proc/self/mounts")
    outside = tmp_path / "outside"
    outside.write_text("host file\n")
    (root / "etc/escape").symlink_to(str(outside))

    overlay = tmp_path / "overlay"
    (overlay / "etc/corral").mkdir(parents=True)
    (overlay / "etc").chmod(0o700)  # an existing directory keeps its mode
    (overlay / "etc/corral").chmod(0o750)  # a new one gets the overlay's
    (overlay / "etc/corral/secret").write_text("s3cret\n")
    (overlay / "etc/corral/secret").chmod(0o600)
    (overlay / "etc/corral/run.sh").write_text("#!/bin/sh\n")
    (overlay / "etc/corral/run.sh").chmod(0o755)
    (overlay / "etc/escape").write_text("image file\n")  # replaces the link, not its target
    (overlay / "lib/modules-load.d").mkdir(parents=True)
    (overlay / "lib/modules-load.d/ib.conf").write_text("ib_ipoib\n")
    (overlay / "etc/localtime").symlink_to("/usr/share/zoneinfo/UTC")

    count = copy_overlay(overlay, root)

    assert count == 7
    assert (root / "etc").stat().st_mode & 0o777 == 0o755
    assert (root / "etc/corral").stat().st_mode & 0o777 == 0o750
    assert (root / "etc/corral/secret").read_text() == "s3cret\n"
    assert (root / "etc/corral/secret").stat().st_mode & 0o777 == 0o600
    assert (root / "etc/corral/run.sh").stat().st_mode & 0o777 == 0o755
    assert outside.read_text() == "host file\n"
    assert (root / "etc/escape").read_text() == "image file\n"
    assert not (root / "etc/escape").is_symlink()
    assert (root / "usr/lib/modules-load.d/ib.conf").read_text() == "ib_ipoib\n"
    assert os.readlink(root / "etc/localtime") == "/usr/share/zoneinfo/UTC"
    if os.geteuid() == 0:
        assert (root / "etc/corral/secret").stat().st_uid == 0


def test_copy_overlay_conflicts(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/motd").mkdir(parents=True)
    overlay = tmp_path / "overlay"
    (overlay / "etc").mkdir(parents=True)
    (overlay / "etc/motd").write_text("hi\n")
    with pytest.raises(LayerError, match="is a file in the overlay but a directory"):
        copy_overlay(overlay, root)


# --- a fake mount table ----------------------------------------------------------------


class FakeSystem:
    """Stands in for run(): keeps a mount table in a mountinfo file; records every command.

    ``busy`` mount points refuse a plain umount (a lazy one works); ``on_command`` lets a
    test react to other commands (create files, fail, raise KeyboardInterrupt).
    """

    def __init__(self, tmp_path: Path) -> None:
        self.mountinfo = tmp_path / "mountinfo"
        self.points: list[str] = ["/", "/proc", "/dev", "/dev/pts"]
        self.busy: set[str] = set()
        self.fail_mount: str | None = None
        self.commands: list[list[str]] = []
        self.envs: list[Mapping[str, str] | None] = []
        self.on_command: dict[str, object] = {}
        self._write()

    def _write(self) -> None:
        lines = [
            f"{i + 20} 1 0:{i} / {p.replace(' ', chr(92) + '040')} rw - fake fake rw"
            for i, p in enumerate(self.points)
        ]
        self.mountinfo.write_text("\n".join(lines) + "\n")

    def under(self, root: Path) -> list[str]:
        return active_mounts_under(root, self.mountinfo)

    def __call__(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(a) for a in argv]
        self.commands.append(argv)
        self.envs.append(env)
        code, out, err = 0, "", ""
        if argv[0] == "mount":
            if self.fail_mount and argv[-1].endswith(self.fail_mount):
                code, err = 32, f"mount: {argv[-1]}: permission denied"
            else:
                self.points.append(argv[-1])
        elif argv[0] == "umount":
            target = argv[-1]
            children = [p for p in self.points if p.startswith(target + "/")]
            if "--lazy" in argv:
                for child in [*children, target]:
                    if child in self.points:
                        self.points.reverse()
                        self.points.remove(child)
                        self.points.reverse()
            elif target not in self.points:
                code, err = 32, f"umount: {target}: not mounted."
            elif children or target in self.busy:
                code, err = 32, f"umount: {target}: target is busy."
            else:
                self.points.reverse()
                self.points.remove(target)
                self.points.reverse()
        else:
            key = argv[2] if argv[0] == "chroot" else argv[0]
            reaction = self.on_command.get(key)
            if callable(reaction):
                result = reaction(argv)
                if isinstance(result, tuple):
                    code, out, err = result
        self._write()
        if check and code:
            raise CommandFailed(argv, code, err)
        return subprocess.CompletedProcess(argv, code, out, err)


@pytest.fixture
def fake(tmp_path: Path) -> FakeSystem:
    return FakeSystem(tmp_path)


def test_mount_commands() -> None:
    assert mount_commands(ROOT, {"/var/cache/apt/archives": CACHE}) == [
        ["mount", "-t", "proc", "-o", "nosuid,nodev,noexec", "--make-private", "proc",
         "/srv/stage/proc"],
        ["mount", "-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "--make-private", "sysfs",
         "/srv/stage/sys"],
        ["mount", "--bind", "--make-private", "/dev", "/srv/stage/dev"],
        ["mount", "-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec",
         "--make-private", "devpts", "/srv/stage/dev/pts"],
        ["mount", "-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "--make-private", "tmpfs",
         "/srv/stage/run"],
        ["mount", "--bind", "--make-private", "/var/cache/corral",
         "/srv/stage/var/cache/apt/archives"],
    ]  # fmt: skip


def test_active_mounts_under(fake: FakeSystem, tmp_path: Path) -> None:
    root = tmp_path / "my root"
    fake.points += [f"{root}/proc", f"{root}x/proc", str(root), f"{root}/dev", f"{root}/dev/pts"]
    fake._write()
    assert fake.under(root) == [f"{root}/proc", f"{root}/dev", f"{root}/dev/pts"]


def test_mounted_mounts_and_unmounts_in_reverse(fake: FakeSystem, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    with mounted(root, binds={"/var/cache/x": cache}, runner=fake, mountinfo=fake.mountinfo):
        inside = fake.under(root)
        assert inside == [f"{root}/{p}" for p in ("proc", "sys", "dev", "dev/pts", "run")] + [
            f"{root}/var/cache/x"
        ]
        assert (root / "proc").stat().st_mode & 0o777 == 0o555
    assert fake.under(root) == []
    unmounts = [c[-1] for c in fake.commands if c[0] == "umount"]
    assert unmounts == list(reversed(inside))


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_mounted_cleans_up_on_exceptions(
    fake: FakeSystem, tmp_path: Path, exc: BaseException
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(type(exc)), mounted(root, runner=fake, mountinfo=fake.mountinfo):
        raise exc
    assert fake.under(root) == []


def test_mounted_goes_lazy_when_busy_and_sweeps_strays(fake: FakeSystem, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with mounted(root, runner=fake, mountinfo=fake.mountinfo):
        fake.busy.add(f"{root}/dev")
        # what a package script might mount: under ours, and beside them
        fake.points += [f"{root}/proc/sys/fs/binfmt_misc", f"{root}/mnt"]
        fake._write()
    assert fake.under(root) == []
    assert ["umount", "--lazy", f"{root}/dev"] in fake.commands
    unmounts = [c[-1] for c in fake.commands if c[0] == "umount"]
    assert unmounts.index(f"{root}/proc/sys/fs/binfmt_misc") < unmounts.index(f"{root}/proc")


def test_mounted_leaves_earlier_mounts_alone(fake: FakeSystem, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    fake.points.append(f"{root}/srv")  # somebody else's, from before
    fake._write()
    with mounted(root, runner=fake, mountinfo=fake.mountinfo):
        pass
    assert fake.under(root) == [f"{root}/srv"]


def test_mount_failure_midway_undoes_the_others(fake: FakeSystem, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    fake.fail_mount = "/dev/pts"
    with (
        pytest.raises(MountError, match=r"cannot mount dev/pts in .*: permission denied"),
        mounted(root, runner=fake, mountinfo=fake.mountinfo),
    ):
        pytest.fail("the body must not run")
    assert fake.under(root) == []


def test_mounted_refuses_symlinks_out(fake: FakeSystem, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "run").symlink_to("/run")
    with (
        pytest.raises(MountError, match="it is a symbolic link"),
        mounted(root, runner=fake, mountinfo=fake.mountinfo),
    ):
        pass
    assert fake.under(root) == []


def test_mount_that_will_not_go_is_reported(fake: FakeSystem, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()

    def stubborn(argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        if argv[0] == "umount" and argv[-1].endswith("/sys"):
            raise CommandFailed(list(argv), 32, "umount: target is busy")
        return fake(argv, **kwargs)  # type: ignore[arg-type]

    with (
        pytest.raises(MountError, match=r"mounts left under .*: .*/sys"),
        mounted(root, runner=stubborn, mountinfo=fake.mountinfo),
    ):
        pass
    assert fake.under(root) == [f"{root}/sys"]


def test_cleanup_mounts(fake: FakeSystem, tmp_path: Path) -> None:
    root = tmp_path / "root"
    fake.points += [f"{root}/proc", f"{root}/dev", f"{root}/dev/pts", f"{root}/dev/pts"]
    fake.busy.add(f"{root}/proc")
    fake._write()
    done = cleanup_mounts(root, runner=fake, mountinfo=fake.mountinfo)
    assert done == [f"{root}/dev/pts", f"{root}/dev/pts", f"{root}/dev", f"{root}/proc"]
    assert fake.under(root) == []
    assert fake.points[:4] == ["/", "/proc", "/dev", "/dev/pts"]  # the host's stay


# --- running inside --------------------------------------------------------------------


def test_chroot_run_environment_and_policy(fake: FakeSystem, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/sbin").mkdir(parents=True)
    seen: list[str] = []
    fake.on_command["apt-get"] = lambda argv: seen.append((root / POLICY_RC_D).read_text())
    chroot_run(root, ["apt-get", "install", "-y", "x"], env={"FOO": "1"}, runner=fake)
    assert fake.commands == [["chroot", str(root), "apt-get", "install", "-y", "x"]]
    assert fake.envs[0] == {**CHROOT_ENV, "FOO": "1"}
    assert "exit 101" in seen[0]
    assert not (root / POLICY_RC_D).exists()


def test_daemons_disabled_keeps_an_existing_policy(tmp_path: Path) -> None:
    root = tmp_path
    (root / "usr/sbin").mkdir(parents=True)
    (root / POLICY_RC_D).write_text("#!/bin/sh\nexit 0\n")
    with daemons_disabled(root):
        assert "exit 101" in (root / POLICY_RC_D).read_text()
        with daemons_disabled(root):  # nested: left alone
            pass
        assert "exit 101" in (root / POLICY_RC_D).read_text()
    assert (root / POLICY_RC_D).read_text() == "#!/bin/sh\nexit 0\n"


def test_apply_layers(fake: FakeSystem, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    overlay = tmp_path / "overlay"
    (overlay / "etc").mkdir(parents=True)
    (overlay / "etc/issue").write_text("corral\n")
    apply_layers(root, [Layer("a", ["less"]), Layer("b", overlay=overlay)], runner=fake)
    assert fake.commands == [["chroot", str(root), *APT_INSTALL, "less"]]
    assert (root / "etc/issue").read_text() == "corral\n"


# --- a whole build against fakes ------------------------------------------------------


def fake_debootstrap(argv: Sequence[str]) -> None:
    """Lay out the few files a debootstrap build is checked for."""
    root = Path(argv[-2])
    for directory in ("boot", "usr/sbin", "etc/ssh", "var/lib/dpkg", "var/lib/dbus", "tmp"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "boot/vmlinuz-6.1.0-50-amd64").write_text("")
    (root / "usr/sbin/grub-install").write_text("")
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("secret")
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "var/lib/dbus/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "etc/resolv.conf").symlink_to("../run/systemd/resolve/stub-resolv.conf")
    (root / "tmp/junk").write_text("")
    (root / "var/lib/dpkg/status").write_text(
        "Package: less\nStatus: install ok installed\nVersion: 590-2\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n"
    )


@pytest.fixture
def fake_builder(
    fake: FakeSystem, monkeypatch: pytest.MonkeyPatch
) -> tuple[DebootstrapBuilder, FakeSystem]:
    monkeypatch.setattr("corral.images.build.engine.shutil.which", lambda name: f"/usr/sbin/{name}")
    fake.on_command["debootstrap"] = fake_debootstrap
    fake.on_command["update-initramfs"] = lambda argv: Path(
        argv[1], "boot/initrd.img-6.1.0-50-amd64"
    ).write_text("")
    return DebootstrapBuilder(runner=fake, mountinfo=fake.mountinfo), fake


def test_build_runs_exactly_its_commands(
    fake_builder: tuple[DebootstrapBuilder, FakeSystem], tmp_path: Path
) -> None:
    builder, fake = fake_builder
    overlay = tmp_path / "overlay"
    (overlay / "etc").mkdir(parents=True)
    (overlay / "etc/motd").write_text("welcome\n")
    spec = debian_spec(layers=[Layer("tools", ["less"], overlay)], cache_dir=tmp_path / "cache")
    staging = tmp_path / "staging"
    resolv_during_install: list[str] = []
    fake.on_command["apt-get"] = lambda argv: resolv_during_install.append(
        "link" if Path(argv[1], "etc/resolv.conf").is_symlink() else "file"
    )

    result = builder.build(spec, staging)

    run_commands = [c for c in fake.commands if c[0] not in ("mount", "umount")]
    assert run_commands == builder.commands(spec, staging) == result.commands
    assert fake.under(staging) == []
    assert result.kernel == "vmlinuz-6.1.0-50-amd64"
    assert result.initrd == "initrd.img-6.1.0-50-amd64"
    assert result.packages == {"less": "590-2"}
    assert (staging / "etc/motd").read_text() == "welcome\n"
    assert (staging / "etc/machine-id").read_text() == ""
    assert os.readlink(staging / "var/lib/dbus/machine-id") == "/etc/machine-id"
    assert list((staging / "etc/ssh").glob("ssh_host_*")) == []
    assert list((staging / "tmp").iterdir()) == []
    assert not (staging / DebootstrapBuilder.UNSAFE_IO).exists()
    assert not (staging / POLICY_RC_D).exists()
    assert (staging / "etc/systemd/network/80-corral-dhcp.network").is_file()
    # apt downloaded with the host's resolver; the image keeps its resolved link
    assert resolv_during_install[:2] == ["file", "file"]
    assert os.readlink(staging / "etc/resolv.conf") == "../run/systemd/resolve/stub-resolv.conf"
    # the cache was bound while the layer's packages were installed
    apt_install = fake.commands.index(["chroot", str(staging), *APT_INSTALL, "less"])
    binds = [c for c in fake.commands[:apt_install] if c[-1].endswith("var/cache/apt/archives")]
    assert binds and binds[-1][0] == "mount"
    debootstrap_env = fake.envs[fake.commands.index(run_commands[0])]
    assert debootstrap_env == {"LC_ALL": "C", "INITRD": "No"}


def test_failed_build_names_the_package_and_empties_staging(
    fake_builder: tuple[DebootstrapBuilder, FakeSystem], tmp_path: Path
) -> None:
    builder, fake = fake_builder

    def apt(argv: Sequence[str]) -> tuple[int, str, str] | None:
        if "install" in argv:
            assert fake.under(Path(argv[1]))  # midway: mounted
            return 100, "Reading package lists...\n", APT_UNKNOWN
        return None

    fake.on_command["apt-get"] = apt
    staging = tmp_path / "staging"
    spec = debian_spec(packages=[], layers=[Layer("tools", ["corral-no-such-package"])])
    with pytest.raises(UnknownPackage, match="'corral-no-such-package', 'another-one' in layer"):
        builder.build(spec, staging)
    assert fake.under(staging) == []
    assert staging.is_dir() and list(staging.iterdir()) == []


def test_unknown_image_package_is_named(
    fake_builder: tuple[DebootstrapBuilder, FakeSystem], tmp_path: Path
) -> None:
    builder, fake = fake_builder

    def apt(argv: Sequence[str]) -> tuple[int, str, str] | None:
        if "install" in argv:
            return 100, "Reading package lists...\n", "E: Unable to locate package nosuchpkg\n"
        return None

    fake.on_command["apt-get"] = apt
    staging = tmp_path / "staging"
    spec = debian_spec(packages=["less", "nosuchpkg"], layers=[])
    with pytest.raises(UnknownPackage) as caught:
        builder.build(spec, staging)
    assert str(caught.value) == (
        "unknown package 'nosuchpkg' in the image's packages (debian12: debian bookworm)"
    )
    assert "\n" not in str(caught.value)
    debootstrap = next(c for c in fake.commands if c[0] == "debootstrap")
    assert not any("nosuchpkg" in a for a in debootstrap)  # apt met it, not debootstrap
    assert list(staging.iterdir()) == []


def test_interrupted_build_leaves_nothing(
    fake_builder: tuple[DebootstrapBuilder, FakeSystem], tmp_path: Path
) -> None:
    builder, fake = fake_builder

    def interrupt(argv: Sequence[str]) -> None:
        raise KeyboardInterrupt

    fake.on_command["update-initramfs"] = interrupt
    staging = tmp_path / "staging"
    with pytest.raises(KeyboardInterrupt):
        builder.build(debian_spec(), staging)
    assert fake.under(staging) == []
    assert list(staging.iterdir()) == []


def test_disk_full_during_build(
    fake_builder: tuple[DebootstrapBuilder, FakeSystem], tmp_path: Path
) -> None:
    builder, fake = fake_builder

    def full(argv: Sequence[str]) -> tuple[int, str, str]:
        fake_debootstrap(argv)
        return 1, "", DPKG_FULL

    fake.on_command["debootstrap"] = full
    staging = tmp_path / "staging"
    with pytest.raises(DiskFull) as caught:
        builder.build(debian_spec(), staging)
    assert caught.value.directory == staging
    assert list(staging.iterdir()) == []


def test_build_refuses_a_non_empty_staging_dir(
    fake_builder: tuple[DebootstrapBuilder, FakeSystem], tmp_path: Path
) -> None:
    builder, fake = fake_builder
    (tmp_path / "staging").mkdir()
    (tmp_path / "staging/keep").write_text("mine")
    with pytest.raises(BuildError, match="is not empty"):
        builder.build(debian_spec(), tmp_path / "staging")
    assert (tmp_path / "staging/keep").read_text() == "mine"
    assert fake.commands == []
