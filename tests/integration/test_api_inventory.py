"""The admin REST API's inventory routes: what a PATCH may and may not change."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from corral.config import Settings
from corral.inventory import db
from corral.serve.boot import BootService
from corral.serve.http import create_app

pytestmark = [pytest.mark.integration, pytest.mark.parallel_safe]


@pytest.fixture
def admin(fixture_cluster: None, settings: Settings) -> Iterator[TestClient]:
    service = BootService(settings, db.engine())
    with TestClient(create_app(service, "admin-secret")) as client:
        client.headers["Authorization"] = "Bearer admin-secret"
        yield client


def test_patch_that_renames_a_node_is_refused_with_a_clear_message(admin: TestClient) -> None:
    before = admin.get("/api/v1/nodes/c01").json()
    response = admin.patch("/api/v1/nodes/c01", json={"name": "c99"})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail == "node 'c01' cannot be renamed to 'c99'"
    assert "MAC" not in detail
    assert admin.get("/api/v1/nodes/c01").json() == before
    assert admin.get("/api/v1/nodes/c99").status_code == 404


def test_patch_that_breaks_a_nodes_files_is_refused_as_profile_set_is(admin: TestClient) -> None:
    """A post snippet with an undefined variable, PATCHed onto a profile in use: the
    nodes that use it are rendered with the change and it is refused, nothing stored."""
    before = admin.get("/api/v1/profiles/base").json()
    response = admin.patch("/api/v1/profiles/base", json={"post": ["echo {{ vars.nope }}"]})
    assert response.status_code == 422, response.text
    assert "profile base: the change breaks node" in response.json()["detail"]
    assert admin.get("/api/v1/profiles/base").json() == before
    fine = admin.patch("/api/v1/profiles/base", json={"post": ["echo {{ node.name }}"]})
    assert fine.status_code == 200, fine.text


def test_patch_of_variables_that_are_no_mapping_is_refused_not_a_server_error(
    admin: TestClient,
) -> None:
    before = admin.get("/api/v1/nodes/c01").json()
    response = admin.patch("/api/v1/nodes/c01", json={"variables": "row=r7"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == "node c01: variables: Input should be a valid dictionary"
    assert admin.get("/api/v1/nodes/c01").json() == before
