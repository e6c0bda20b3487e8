"""What the CLI prints: data shown as it is (never as Rich markup), times and sizes as
people read them, YAML that reads back, and the same refusal of unknown nodes everywhere."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from corral.inventory import db
from corral.inventory import models as m
from corral.inventory.state import NodeStates
from tests.conftest import corral

pytestmark = [pytest.mark.integration, pytest.mark.parallel_safe]

MARKUP = "disk [/] full: [bold]x[/bold] [/red]"


def test_node_status_prints_messages_as_text(home: Path, fixture_cluster: None) -> None:
    with db.session() as s:
        NodeStates(s).record("c01", "failed", MARKUP, "test")
    result = corral("node", "status", "c01", home=home)
    assert result.returncode == 0, result.stderr
    assert MARKUP in result.stdout


def test_node_status_refuses_an_unknown_node_like_node_list(
    home: Path, fixture_cluster: None
) -> None:
    for verb in ("status", "list"):
        result = corral("node", verb, "c01,bonded,zz", home=home)
        assert result.returncode == 2, (verb, result.stdout)
        assert result.stderr.splitlines()[0] == "error: unknown node 'zz'"


def _deployment(message: str, size: int) -> int:
    with db.session() as s:
        row = m.Deployment(
            created=time.mktime((2026, 12, 3, 4, 12, 5, 0, 0, -1)),
            finished=None,
            state="running",
            noderange="c01",
            image="tiny",
            transport="http",
        )
        row.nodes.append(
            m.DeploymentNode(
                node="c01",
                image="tiny:1",
                transport="http",
                phase="failed",
                bytes=size,
                total=size,
                message=message,
                log_tail="",
                updated=time.time(),
            )
        )
        s.add(row)
        s.flush()
        return row.id


def test_deployment_show_reads_as_text(home: Path, fixture_cluster: None) -> None:
    ident = _deployment(MARKUP, 15_000)
    result = corral("deployment", "show", str(ident), home=home)
    assert result.returncode == 0, result.stderr
    assert MARKUP in result.stdout
    assert "created: '2026-12-03 04:12:05'" in result.stdout  # quoted: YAML keeps it text
    assert "finished: null" in result.stdout
    assert "15.0 kB/15.0 kB" in result.stdout
    listing = corral("deployment", "list", home=home)
    assert listing.returncode == 0 and "2026-12-03 04:12:05" in listing.stdout


def test_profile_show_for_a_node_prints_yaml_that_reads_back(
    home: Path, fixture_cluster: None
) -> None:
    result = corral("profile", "show", "base", "--node", "c01", home=home)
    assert result.returncode == 0, result.stderr
    assert "image: null" in result.stdout
    data = yaml.safe_load(result.stdout)
    assert data["image"] is None and data["kickstart_template"] is None
    assert data["distro"] == "rhel9"
