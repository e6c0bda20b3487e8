"""The CLI and the REST API are two doors onto the same domain functions: the same edits
through each leave the same inventory (they did not: a PATCH of `variables` replaced them
where `corral ... set --var` merged)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from corral.inventory import db
from corral.inventory.clusterfile import apply_cluster, load_cluster
from corral.serve.boot import BootService
from corral.serve.http import create_app

pytestmark = pytest.mark.integration

DATA = Path(__file__).parents[1] / "data" / "cluster.yaml"

#: (CLI arguments, REST method path and body) of one edit each
EDITS: list[tuple[list[str], tuple[str, dict[str, Any]]]] = [
    (["node", "set", "c01", "--var", "rack=r7", "--var", "slot=3"],
     ("/api/v1/nodes/c01", {"variables": {"rack": "r7", "slot": 3}})),
    (["group", "set", "compute", "--var", "site=hall-b"],
     ("/api/v1/groups/compute", {"variables": {"site": "hall-b"}})),
    (["profile", "set", "compute", "--var", "role=gpu", "--kernel-arg", "nomodeset"],
     ("/api/v1/profiles/compute", {"variables": {"role": "gpu"}, "kernel_args": ["nomodeset"]})),
    (["group", "set", "compute", "--profile", "base"],
     ("/api/v1/groups/compute", {"profiles": ["base"]})),
]  # fmt: skip


def inventory_of(home: Path) -> dict[str, Any]:
    os.environ["CORRAL_HOME"] = str(home)
    db.close()
    with db.inventory() as inv:
        return {
            kind: [s.model_dump(mode="json") for s in inv.specs(kind)]
            for kind in ("distro", "profile", "group", "node")
        }


def fresh(home: Path) -> None:
    os.environ["CORRAL_HOME"] = str(home)
    db.close()
    with db.inventory() as inv:
        apply_cluster(inv, load_cluster(DATA.read_text(), "fixture"))


def test_the_same_edits_through_the_cli_and_rest_give_the_same_inventory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path / "cli"))
    cli, rest = tmp_path / "cli", tmp_path / "rest"
    fresh(cli)
    for argv, _ in EDITS:
        result = subprocess.run(
            [sys.executable, "-m", "corral", *argv],
            env=dict(os.environ, CORRAL_HOME=str(cli)),
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"{argv}: {result.stderr}"
    fresh(rest)  # this process's settings and engine: the REST door's home
    service = BootService(db.settings(), db.engine())
    with TestClient(create_app(service, "admin")) as client:
        for _, (path, body) in EDITS:
            answer = client.patch(path, json=body, headers={"Authorization": "Bearer admin"})
            assert answer.status_code == 200, f"{path}: {answer.text}"
    by_cli, by_rest = inventory_of(cli), inventory_of(rest)
    assert json.dumps(by_cli, sort_keys=True) == json.dumps(by_rest, sort_keys=True)
    c01 = next(n for n in by_rest["node"] if n["name"] == "c01")
    assert c01["variables"] == {"rack": "r7", "slot": 3}  # merged into, not replaced
    group = next(g for g in by_rest["group"] if g["name"] == "compute")
    assert group["variables"] == {"role": "worker", "site": "hall-b"}
    profile = next(p for p in by_rest["profile"] if p["name"] == "compute")
    assert profile["variables"] == {"site": "hall-a", "role": "gpu"}
