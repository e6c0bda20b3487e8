"""``corral deploy --transport chain`` on the virtual cluster: the server sends the image to
the first node only, each node relays it to the next (real agents, real TCP relays), and
every node ends with exactly the image's files under 1% loss. The transports' contract
(every file on every disk, sent about once; a node killed in the middle of the chain
bypassed; cancel) is test_deploy_contract.py's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from corral.deploy.store import Deployments
from corral.inventory import db
from corral.run import run
from corral.testbed import cluster
from tests.integration.deploybed import add_image, deploy_everywhere

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and loop devices"),
]


def last_deployment() -> tuple[str, dict[str, tuple[str, int, int, str]]]:
    with db.session() as s:
        d = Deployments(s).recent()[0]
        return d.state, {n.node: (n.phase, n.bytes, n.total, n.message) for n in d.nodes}


def test_chain_under_one_percent_loss(testbed: cluster.Testbed, tmp_path: Path) -> None:
    home = testbed.settings.home
    state = testbed.require_state()
    ports = [info.port for info in state.nodes]
    lines = [line for port in ports for line in cluster.loss_filter(port, 0.01)]
    run(["tc", "-n", cluster.HUB, "-batch", "-"], input="\n".join(lines) + "\n")
    try:
        version = add_image(home, tmp_path, seed=22, random_mb=6)
        deploy_everywhere(testbed, version, tmp_path, "--transport", "chain")
    finally:
        for port in ports:
            run(["tc", "-n", cluster.HUB, "qdisc", "del", "dev", port, "clsact"], check=False)


def _state(ident: int) -> str:
    with db.session() as s:
        return Deployments(s).get(ident).state


def _wait(check: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.3)
