"""Real image builds: debootstrap of Debian bookworm from the machine's apt mirror, as root.

The downloaded packages are kept between runs in ``$CORRAL_TEST_CACHE`` (default
``~/.cache/corral-test``): a first run downloads about 130 MB, later ones only what changed.
One bootable build (about 1.5 min with a warm cache) is shared by most tests; two bare
builds (``bootable=False``, about 20 s each) fail on purpose.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.images.build import BuildResult, BuildSpec, build_image
from corral.images.build.errors import UnknownPackage
from corral.images.chroot import (
    POLICY_RC_D,
    active_mounts_under,
    chroot_run,
    mount_points,
    mounted,
    processes_inside,
)
from corral.images.layers import Layer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.heavy,
    pytest.mark.minutes(1.5),
    pytest.mark.skipif(os.geteuid() != 0, reason="building images needs root"),
    pytest.mark.skipif(shutil.which("debootstrap") is None, reason="apt-get install debootstrap"),
]

CACHE = Path(os.environ.get("CORRAL_TEST_CACHE", Path.home() / ".cache/corral-test"))


def remove_tree(path: Path) -> None:
    """Delete a test's image tree, never while something is mounted below it."""
    if path.exists():
        assert active_mounts_under(path) == []
        shutil.rmtree(path)


@pytest.fixture(scope="module")
def overlay(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("overlay")
    (path / "etc/corral").mkdir(parents=True)
    (path / "etc/corral/layer.conf").write_text("layer = tools\n")
    (path / "etc/corral/layer.conf").chmod(0o640)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, overlay: Path) -> Iterator[BuildResult]:
    spec = BuildSpec(
        distro="debian12",
        family="debian",
        release="bookworm",
        layers=[Layer("tools", ["less"], overlay)],
        cache_dir=CACHE,
    )
    staging = tmp_path_factory.mktemp("image") / "root"
    result = build_image(spec, staging)
    print(
        f"\nbuilt {spec.distro} in {result.seconds:.0f} s: {len(result.packages)} packages, "
        f"{result.size_bytes / 2**20:.0f} MiB (cache {CACHE})"
    )
    yield result
    remove_tree(staging)  # 650 MiB: not for pytest's kept temporary directories


def test_image_boots_from_disk(built: BuildResult) -> None:
    root = built.root
    assert built.kernel is not None and built.kernel.startswith("vmlinuz-")
    assert built.initrd is not None and built.initrd.startswith("initrd.img-")
    assert list((root / "boot").glob("vmlinuz-*")) == [root / "boot" / built.kernel]
    assert (root / "boot" / built.initrd).stat().st_size > 5_000_000
    assert (root / "usr/sbin/grub-install").is_file()
    assert (root / "usr/lib/grub/i386-pc/normal.mod").is_file()  # BIOS
    assert (root / "usr/lib/grub/x86_64-efi/normal.mod").is_file()  # UEFI
    assert os.readlink(root / "sbin/init").endswith("systemd")
    assert (root / "usr/sbin/sshd").is_file()
    for package in ("linux-image-amd64", "initramfs-tools", "openssh-server", "systemd-sysv"):
        assert package in built.packages
    assert "grub-pc" not in built.packages  # its postinst wants a disk
    wants = root / "etc/systemd/system/multi-user.target.wants"
    assert {"systemd-networkd.service", "ssh.service", "corral-ssh-keys.service"} <= {
        p.name for p in wants.iterdir()
    }
    assert "DHCP=yes" in (root / "etc/systemd/network/80-corral-dhcp.network").read_text()


def test_layer_is_applied(built: BuildResult) -> None:
    root = built.root
    assert (root / "usr/bin/less").is_file()
    assert "less" in built.packages
    conf = root / "etc/corral/layer.conf"
    assert conf.read_text() == "layer = tools\n"
    assert conf.stat().st_mode & 0o777 == 0o640
    assert conf.stat().st_uid == 0


def test_image_has_no_identity_and_no_leftovers(built: BuildResult) -> None:
    root = built.root
    assert (root / "etc/machine-id").read_text() == ""
    assert list((root / "etc/ssh").glob("ssh_host_*")) == []
    assert (root / "etc/hostname").read_text() == "localhost\n"
    assert list((root / "var/lib/apt/lists").iterdir()) == []
    assert list((root / "var/cache/apt/archives").glob("*.deb")) == []
    assert list((root / "tmp").iterdir()) == []
    assert not (root / POLICY_RC_D).exists()
    assert not (root / "etc/dpkg/dpkg.cfg.d/corral-unsafe-io").exists()
    assert os.readlink(root / "etc/resolv.conf") == "../run/systemd/resolve/stub-resolv.conf"
    assert root.stat().st_mode & 0o777 == 0o755


def test_no_mounts_remain(built: BuildResult) -> None:
    assert active_mounts_under(built.root) == []
    assert processes_inside(built.root) == []


def test_ctrl_c_inside_mounted_leaves_no_mounts(built: BuildResult) -> None:
    root = built.root
    host_pts = mount_points().count("/dev/pts")
    with pytest.raises(KeyboardInterrupt), mounted(root):
        mounts = chroot_run(root, ["cat", "/proc/self/mounts"]).stdout
        for line in ("proc /proc proc", "devpts /dev/pts devpts", "tmpfs /run tmpfs"):
            assert line in mounts
        assert "sysfs /sys sysfs ro," in mounts
        # daemons may not start while inside
        assert chroot_run(root, ["/usr/sbin/policy-rc.d"], check=False).returncode == 101
        assert chroot_run(root, ["dpkg-query", "-W", "less"]).stdout.startswith("less\t")
        # a private devpts: nothing shows up on the host's /dev/pts
        assert mount_points().count("/dev/pts") == host_pts
        raise KeyboardInterrupt
    assert active_mounts_under(root) == []
    assert mount_points().count("/dev/pts") == host_pts
    assert not (root / POLICY_RC_D).exists()


def test_interactive_shell(built: BuildResult) -> None:
    """``corral image shell`` reads the terminal; here a pipe stands in for it."""
    script = (
        "import sys\n"
        "from corral.images.chroot import interactive_shell\n"
        f"sys.exit(interactive_shell({str(built.root)!r}))\n"
    )
    commands = "test -r /proc/self/status && test -d /run && /usr/sbin/policy-rc.d; exit $?\n"
    proc = subprocess.run(
        [sys.executable, "-c", script], input=commands, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 101, proc.stderr
    assert active_mounts_under(built.root) == []


def bare_spec(*layers: Layer) -> BuildSpec:
    return BuildSpec(
        "debian12-bare", "debian", "bookworm", layers=list(layers), cache_dir=CACHE, bootable=False
    )


def test_failed_build_leaves_no_mounts_and_an_empty_staging_dir(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    with pytest.raises(UnknownPackage) as caught:
        build_image(bare_spec(Layer("broken", ["corral-no-such-package"])), staging)
    assert str(caught.value) == (
        "unknown package 'corral-no-such-package' in layer 'broken' "
        "(debian12-bare: debian bookworm)"
    )
    assert active_mounts_under(staging) == []
    assert staging.is_dir()
    assert list(staging.iterdir()) == []


BUILD_SCRIPT = """
import signal
# as in a terminal: a shell's background job starts with SIGINT ignored, and Python
# then never turns it into KeyboardInterrupt
signal.signal(signal.SIGINT, signal.default_int_handler)
from pathlib import Path
from corral.images.build import BuildSpec, build_image
from corral.images.layers import Layer
spec = BuildSpec("debian12-bare", "debian", "bookworm", layers=[Layer("tools", ["less"])],
                 cache_dir=Path({cache!r}), bootable=False)
build_image(spec, Path({staging!r}))
"""


def test_ctrl_c_during_a_build(tmp_path: Path) -> None:
    """SIGINT to corral alone (not its children) as soon as something is mounted in the
    tree (debootstrap's own /proc, or ours): debootstrap is killed without cleaning up
    after itself, so corral must stop what runs inside and unmount for it."""
    staging = tmp_path / "staging"
    script = BUILD_SCRIPT.format(cache=str(CACHE), staging=str(staging))
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (staging.is_dir() and active_mounts_under(staging)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "nothing was ever mounted"
            time.sleep(0.05)
        seen = active_mounts_under(staging)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in stderr, stderr
    assert seen
    assert active_mounts_under(staging) == []
    assert processes_inside(staging) == []
    assert list(staging.iterdir()) == []
