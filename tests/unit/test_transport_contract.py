"""The promises every transport keeps, one suite for all of them: each test runs once per
transport registered (the server's REGISTRY and the agent's RECEIVERS, which must name
the same ones), on the fakes of its rig (tests/transport_rigs.py) and real unpacking.

- every file is on every disk: each node ends with exactly the image's files;
- a bad chunk is fetched again: a chunk spoiled on the transport's own path is caught by
  its sha256 and fetched again;
- a killed peer is bypassed: the nodes that were taking from it go on without it (for
  the transports whose nodes take from each other);
- cancel stops it: the receive ends with :class:`Cancelled` half way, and every process
  and thread it started has ended.

The same promises on the real transports, on the virtual cluster:
tests/integration/test_deploy_contract.py.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.agent.errors import Cancelled
from corral.agent.receivers import RECEIVERS
from corral.deploy.transports import REGISTRY
from corral.images.exports import build_exports
from corral.images.store import ImageStore, ImageVersion
from tests.transport_rigs import RIGS, Image, Node, Rig, wait_for

#: The image's stream in chunks of this size (5 or so), its pieces for BitTorrent smaller.
CHUNK = 64 << 10
#: The chunk spoiled on the transport's own path, and where the source holds.
BAD, HALF = 3, 2


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (content or link target, mode), as deploybed's, without its list
    of the installer's own files (receivers write none)."""
    out: dict[str, tuple[str, int]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = ("-> " + os.readlink(path), 0)
        elif path.is_file():
            out[rel] = (path.read_bytes().hex(), st.st_mode & 0o7777)
        else:
            out[rel] = ("dir", st.st_mode & 0o7777)
    return out


def run_to_the_end(nodes: list[Node]) -> None:
    for node in nodes:
        node.start()
    for node in nodes:
        node.join()


def assert_received(nodes: list[Node], image: Image) -> None:
    """Each of ``nodes`` ended well, with exactly the image's tree."""
    expected = tree_digest(image.tree)
    for node in nodes:
        assert node.error is None, f"{node.name}: {node.error!r}"
        assert tree_digest(node.target) == expected, node.name


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    base = tmp_path_factory.mktemp("contract")
    tree = base / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text("ID=corraltest\n")
    (tree / "etc" / "secret").write_text("s3cret\n")
    (tree / "etc" / "secret").chmod(0o600)
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "usr" / "bin" / "tool").write_bytes(os.urandom(300 << 10))
    (tree / "usr" / "bin" / "tool").chmod(0o755)
    (tree / "bin").symlink_to("usr/bin")
    for i in range(20):
        (tree / "srv" / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (tree / "srv" / f"d{i % 3}" / f"f{i}.txt").write_text(f"file {i}\n" * 40)
    version = ImageStore(base / "images").import_tree("img", tree)
    build_exports(version, chunk_size=CHUNK, which=["stream"])
    version = ImageVersion.load(version.path)
    chunks = [p.read_bytes() for p in sorted((version.exports_dir / "chunks").glob("*.bin"))]
    assert len(chunks) > BAD + 1
    return Image(version, chunks)


def transports() -> list[str]:
    return sorted(set(REGISTRY) | set(RECEIVERS))


@pytest.fixture(params=transports())
def rig(
    request: pytest.FixtureRequest, image: Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Rig]:
    name: str = request.param
    if name not in RIGS:
        pytest.fail(f"transport {name} has no rig in tests/transport_rigs.py: add one")
    rig = RIGS[name](image, tmp_path, monkeypatch)
    try:
        yield rig
    finally:
        rig.release()
        rig.close()


def test_both_sides_have_the_same_transports() -> None:
    assert sorted(REGISTRY) == sorted(RECEIVERS)


def test_every_file_is_on_every_disk(rig: Rig, image: Image) -> None:
    nodes = rig.nodes(3)
    run_to_the_end(nodes)
    assert_received(nodes, image)


def test_a_bad_chunk_is_fetched_again(rig: Rig, image: Image) -> None:
    if rig.no_chunks:
        pytest.skip(f"{rig.name}: {rig.no_chunks}")
    rig.spoil(BAD)
    nodes = rig.nodes(2)
    run_to_the_end(nodes)
    assert_received(nodes, image)
    # the first node takes it from the transport's source (the others, in a chain, from
    # the first, which may have caught it before passing it on)
    assert rig.fetched_again(nodes[0], BAD), f"{nodes[0].name} did not fetch chunk {BAD} again"


def test_a_killed_peer_is_bypassed(rig: Rig, image: Image) -> None:
    if rig.no_peers:
        pytest.skip(f"{rig.name}: {rig.no_peers}")
    rig.hold(HALF)
    nodes = rig.nodes(3)
    for node in nodes:
        node.start()
    wait_for(lambda: all(rig.midway(n) for n in nodes), "every node half way")
    victim = nodes[1]
    rig.kill(victim)
    rig.release()
    for node in nodes:
        node.join()
    assert isinstance(victim.error, Cancelled), repr(victim.error)
    assert_received([nodes[0], nodes[2]], image)
    assert rig.bypassed(nodes[2], victim), f"{nodes[2].name} did not go on without {victim.name}"


def test_cancel_stops_it(rig: Rig, image: Image) -> None:
    before = set(threading.enumerate())
    rig.hold(HALF)
    nodes = rig.nodes(2)
    for node in nodes:
        node.start()
    wait_for(lambda: all(rig.midway(n) for n in nodes), "every node half way")
    for node in nodes:
        node.cancel.set()
    for node in nodes:
        node.join()
    expected = tree_digest(image.tree)
    for node in nodes:
        assert isinstance(node.error, Cancelled), f"{node.name}: {node.error!r}"
        assert tree_digest(node.target) != expected, f"{node.name} received it all"
    assert rig.processes, "the receivers started no process"
    for proc in rig.processes:
        assert proc.poll() is not None, f"{proc.args!r} still runs"

    def started() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in before and t.is_alive()]

    wait_for(lambda: not started(), "the receivers' threads to end", timeout=10)
