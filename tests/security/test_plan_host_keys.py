"""Item 1 of issue 12, second half: a deployment node's plan carries its SSH host private
keys once; whoever asks again (a rebooted agent, or someone with a stolen token) gets a
plan without host keys, and a later deployment of the node carries them again."""

from __future__ import annotations

from pathlib import Path

from corral.agent.plan import Plan
from corral.deploy.store import Deployments
from corral.images.store import ImageVersion
from corral.inventory import db
from tests.unit.test_deployments import _service, fake_transport, image, nodes, start

__all__ = ["fake_transport", "image", "nodes"]  # fixtures, used by name


def fetch(home: Path, node: str = "n01") -> Plan:
    with _service(home) as service:
        return Plan.from_dict(service.plan(node, "good", "10.0.0.11") or {})


def test_host_private_keys_go_out_once_per_deployment_node(
    home: Path, nodes: None, image: ImageVersion
) -> None:
    ident = start("n01")
    first = fetch(home)
    assert (
        "-----BEGIN OPENSSH PRIVATE KEY-----"
        in first.identity.ssh_host_keys["ssh_host_ed25519_key"]
    )
    again = fetch(home)
    assert again.deployment == ident and again.image.chunks  # still a plan to install by
    assert again.identity.ssh_host_keys == {}
    assert not any("PRIVATE KEY" in v for v in again.identity.ssh_host_keys.values())
    # a new deployment of the node: the same keys again, once
    with db.session() as s:
        Deployments(s).cancel(ident)
    start("n01")
    assert fetch(home).identity.ssh_host_keys == first.identity.ssh_host_keys
    assert fetch(home).identity.ssh_host_keys == {}
