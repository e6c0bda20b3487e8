"""The virtual cluster for deployment tests: one 5-node testbed per test module, shaped
fast (400 Mbit/s), and checks that a node's disk holds exactly an image's files.

The testbed's names are fixed (``ctb-*``, one per machine), so a module fails at once if
one is up already rather than take it down.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.images.catalog import image_store
from corral.images.exports import STREAM_INDEX
from corral.images.store import ImageVersion
from corral.inventory import db
from corral.inventory.schema import ProfileSpec
from corral.run import run
from corral.testbed import cluster
from corral.testbed.netns import list_namespaces
from tests.conftest import corral

NODES = 5
RANGE = f"tb[001-{NODES:03d}]"
#: The testbed's links when no test shapes them.
LINK = "400mbit"
#: Files the agent writes into the installed system: the node's identity.
IDENTITY = {
    "etc/hostname",
    "etc/hosts",
    "etc/fstab",
    "etc/machine-id",
    "etc/shadow",
    "root/.ssh/authorized_keys",
    # directories the agent makes for them when the image has none
    "root",
    "root/.ssh",
    "etc/ssh",
    "etc/systemd",
    "etc/systemd/network",
    "etc/network",
    "etc/corral",
}
IDENTITY_DIRS = ("etc/ssh/", "etc/systemd/network/", "etc/network/", "etc/corral/")


def make_tree(root: Path, seed: int = 0, random_mb: int = 2) -> None:
    """A small system-like tree: text, a random blob, symlinks, a hard link, odd modes."""
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "os-release").write_text("ID=corraltest\nVERSION_ID=1\n")
    (root / "usr" / "bin").mkdir(parents=True)
    blob = hashlib.sha256(str(seed).encode()).digest() * (3 << 15)  # 3 MiB, compressible-ish
    (root / "usr" / "bin" / "tool").write_bytes(os.urandom(random_mb << 20) + blob)
    (root / "usr" / "bin" / "tool").chmod(0o755)
    os.link(root / "usr" / "bin" / "tool", root / "usr" / "bin" / "tool-link")
    (root / "bin").symlink_to("usr/bin")
    (root / "srv" / "data").mkdir(parents=True)
    for i in range(200):
        (root / "srv" / "data" / f"f{i:03d}.txt").write_text(f"file {i} seed {seed}\n" * 50)
    (root / "etc" / "secret").write_text("s3cret\n")
    (root / "etc" / "secret").chmod(0o600)
    for d in ("proc", "sys", "dev", "run", "tmp", "boot"):
        (root / d).mkdir()


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256 or link target, mode), identity files left out."""
    out: dict[str, tuple[str, int]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel in IDENTITY or rel.startswith(IDENTITY_DIRS) or rel.startswith("lost+found"):
            continue
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("-> " + os.readlink(path), 0)
        elif stat.S_ISREG(st.st_mode):
            out[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), stat.S_IMODE(st.st_mode))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode))
    return out


def node_root_digest(loop: str, where: Path) -> dict[str, tuple[str, int]]:
    """Mount the node's root partition read-only here and digest it."""
    where.mkdir(parents=True, exist_ok=True)
    parts = sorted(Path("/dev").glob(Path(loop).name + "p*"))
    assert parts, f"no partitions on {loop}"
    root = None
    for part in parts:
        kind = run(["blkid", "-o", "value", "-s", "TYPE", str(part)], check=False).stdout.strip()
        if kind in ("ext4", "xfs"):
            root = part
    assert root is not None, f"no root filesystem on {loop}"
    run(["mount", "-o", "ro", str(root), str(where)])
    try:
        return tree_digest(where)
    finally:
        run(["umount", str(where)])


@pytest.fixture(scope="module")
def testbed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[cluster.Testbed]:
    """The module's testbed; its corral.toml is the module's ``CORRAL_TOML``, if it has one."""
    if any(n.startswith(cluster.PREFIX) for n in list_namespaces()):
        pytest.fail("a ctb-* testbed is up already: take it down with 'corral testbed down'")
    home = tmp_path_factory.mktemp("deploy") / "home"
    config = getattr(request.module, "CORRAL_TOML", "")
    if config:
        home.mkdir(parents=True)
        (home / "corral.toml").write_text(config)
    os.environ["CORRAL_HOME"] = str(home)
    db.close()
    bed = cluster.Testbed(db.settings())
    try:
        bed.up(NODES, LINK, disk_size="256M", http_port=8080)
        with db.inventory() as inv:
            inv.add(
                "profile",
                [
                    ProfileSpec(
                        name="tbimage",
                        image="small",
                        variables={
                            "bootloader": "none",
                            "ssh_authorized_keys": ["ssh-ed25519 AAAAC3 t@x"],
                        },
                    )
                ],
            )
            inv.update("group", [cluster.GROUP], {"profiles": ["tbimage"]})
        yield bed
    finally:
        bed.down(forget=True)
        db.close()
        os.environ.pop("CORRAL_HOME", None)


def add_image(home: Path, tmp: Path, seed: int, random_mb: int = 2) -> ImageVersion:
    tree = tmp / f"tree{seed}"
    make_tree(tree, seed, random_mb)
    return image_store(home).import_tree("small", tree)


def deploy(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return corral("deploy", RANGE, *args, "--wait", home=home)


def stream_size(version: ImageVersion) -> int:
    """The size of the image's stream export (S of the figures): made for its first
    deployment that needs it."""
    return int(json.loads((version.path / STREAM_INDEX).read_text())["size"])


def deploy_everywhere(bed: cluster.Testbed, version: ImageVersion, tmp: Path, *args: str) -> int:
    """Deploy ``version`` to every node with ``args`` (its transport) and wait; check that
    every node is done with exactly the image's files. Returns the bytes that left the
    server meanwhile."""
    before = bed.server_egress_bytes()
    result = deploy(bed.settings.home, "--image", version.ref, *args)
    egress = bed.server_egress_bytes() - before
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{NODES} done" in result.stdout
    check_nodes(bed, version, tmp)
    return egress


def check_nodes(bed: cluster.Testbed, version: ImageVersion, tmp: Path) -> None:
    expected = tree_digest(version.rootfs)
    state = bed.require_state()
    for info in state.nodes:
        got = node_root_digest(info.loop, tmp / f"mnt-{info.name}")
        missing = sorted(set(expected) - set(got))[:5]
        extra = sorted(set(got) - set(expected))[:5]
        wrong = sorted(k for k in expected if k in got and got[k] != expected[k])[:5]
        assert not (missing or extra or wrong), f"{info.name}: {missing=} {extra=} {wrong=}"


def shape(bed: cluster.Testbed, rate: str, loss: float = 0.0) -> None:
    """Every node's link at ``rate`` both ways, with ``loss`` on what they receive."""
    bps = cluster.parse_rate(rate)
    for node in bed.require_state().nodes:
        line = cluster.tbf(node.port, bps).replace("qdisc add", "qdisc replace", 1)
        run(["tc", "-n", cluster.HUB, *line.split()])
        run(["tc", "-n", node.namespace, "qdisc", "del", "dev", "eth0", "root"], check=False)
        lines = cluster.host_shaping("eth0", bps)
        run(["tc", "-n", node.namespace, "-batch", "-"], input="\n".join(lines) + "\n")
        run(["tc", "-n", cluster.HUB, "qdisc", "del", "dev", node.port, "clsact"], check=False)
        if loss > 0:
            for line in cluster.loss_filter(node.port, loss):
                run(["tc", "-n", cluster.HUB, *shlex.split(line)])
