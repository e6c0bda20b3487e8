"""``corral deploy --transport multicast`` in async mode (``multicast_mode = "async"``) on
the virtual cluster: real udp-sender ``--async`` in corral serve's namespace, real
udp-receiver ``--ignore-lost-data`` in each node's, the real agent unpacking onto its
loop-device disk.

Every node must end with exactly the image's files. Without loss every chunk comes by
multicast (the session starts once all its nodes listen); under heavy loss some slices
are beyond the FEC, and the nodes fetch the chunks they damaged, alone, over HTTP.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.run import run
from corral.testbed import cluster
from tests.integration.deploybed import NODES, add_image, deploy_everywhere, stream_size

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and loop devices"),
]

CORRAL_TOML = 'multicast_mode = "async"\n'

RECEIVED = re.compile(
    r"received (\S+): \d+ bytes in (\d+) chunks, (\d+) by multicast, (\d+) by HTTP "
    r"\((\d+) repaired"
)
DAMAGED = re.compile(r"multicast: chunk (\d+) came damaged")


def received(bed: cluster.Testbed, node: str, ref: str) -> tuple[int, int, int, list[int]]:
    """(chunks by multicast, chunks by HTTP, chunks repaired, the chunks it saw damaged)
    of the node's last install of ``ref``."""
    text = (bed.nodes_dir / node / "console.log").read_text(errors="replace")
    found = [m for m in RECEIVED.finditer(text) if m.group(1) == ref]
    assert found, f"{node}: no 'received {ref}' line in its console log"
    last = found[-1]
    start = max((m.end() for m in RECEIVED.finditer(text[: last.start()])), default=0)
    damaged = [int(m.group(1)) for m in DAMAGED.finditer(text[start : last.start()])]
    return int(last.group(3)), int(last.group(4)), int(last.group(5)), damaged


def test_five_nodes_by_async_multicast(testbed: cluster.Testbed, tmp_path: Path) -> None:
    home = testbed.settings.home
    version = add_image(home, tmp_path, seed=21, random_mb=10)
    egress = deploy_everywhere(testbed, version, tmp_path, "--transport", "multicast")
    size = stream_size(version)
    for info in testbed.require_state().nodes:
        by_multicast, by_http, repaired, _ = received(testbed, info.name, version.ref)
        assert by_multicast > 0 and by_http == 0, f"{info.name} fell back to HTTP"
        assert repaired == 0
    sender_log = "".join(p.read_text(errors="replace") for p in (home / "multicast").glob("*.log"))
    assert "Starting transfer" in sender_log
    print(f"async multicast, {NODES} nodes: egress {egress / size:.2f} x S (S = {size} bytes)")
    assert egress <= 2 * size, f"{egress} bytes left the server for a {size}-byte stream"


@pytest.fixture
def heavy_loss(testbed: cluster.Testbed) -> Iterator[float]:
    """3 % of the packets toward every node dropped: with 8x8/128, about 2 % of the
    stripes (128 blocks and 8 FEC blocks) lose more than 8, a slice of 8 stripes is
    beyond repair 16 % of the time, and each 3.6 MiB chunk (2.5 slices) 36 %: most nodes
    see a damaged chunk or two. The curve is steep, so a busy host's own drops show: at
    4 % a chunk is damaged 87 % of the time, and a node loses three in a row."""
    ports = [info.port for info in testbed.require_state().nodes]
    lines = [line for port in ports for line in cluster.loss_filter(port, 0.03)]
    run(["tc", "-n", cluster.HUB, "-batch", "-"], input="\n".join(lines) + "\n")
    try:
        yield 0.03
    finally:
        for port in ports:
            run(["tc", "-n", cluster.HUB, "qdisc", "del", "dev", port, "clsact"], check=False)


def test_damaged_chunks_are_repaired_by_http(
    testbed: cluster.Testbed, tmp_path: Path, heavy_loss: float
) -> None:
    home = testbed.settings.home
    # five chunks, so that a node can lose one and keep the session
    version = add_image(home, tmp_path, seed=22, random_mb=18)
    egress = deploy_everywhere(testbed, version, tmp_path, "--transport", "multicast")
    size = stream_size(version)
    counts = {
        info.name: received(testbed, info.name, version.ref)
        for info in testbed.require_state().nodes
    }
    print(
        f"async multicast, {NODES} nodes, {heavy_loss:.0%} loss: egress {egress / size:.2f} "
        f"x S; (multicast, HTTP, repaired, damaged) per node: {counts}"
    )
    assert sum(c[2] for c in counts.values()) > 0, "no node repaired a chunk: no loss?"
    for node, (by_multicast, by_http, repaired, damaged) in counts.items():
        # each chunk the session damaged was fetched again, and only those, unless the
        # node left the session after three in a row
        assert repaired == len(damaged), node
        assert by_multicast + by_http >= repaired
    # Every byte is accounted for: the session's one copy (FEC, headers), and each chunk
    # a node fetched over HTTP, once. Whether that beats unicast is up to the loss: a
    # node that lost three chunks in a row left the session, and on a busy host four of
    # five once did (egress 5.03 x S, the five chunks 19 times over HTTP).
    chunks = max(m + h for m, h, _, _ in counts.values())
    over_http = sum(h for _, h, _, _ in counts.values()) * size / chunks
    assert egress < 1.5 * size + 1.2 * over_http, f"{egress / size:.2f} x S"
