"""Item 3 of issue 12: a distro's local kernel and initrd are imported into corral's tree
after a look at their first bytes, and only that tree is served (HTTP and TFTP)."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from corral.config import Settings
from corral.cpio import newc_archive
from corral.errors import InvalidValue
from corral.inventory import db
from corral.inventory.bootfiles import imported
from corral.inventory.schema import DistroSpec
from corral.serve.boot import BootService
from corral.serve.http import create_app
from tests.conftest import corral

#: its integration tests share nothing of the host: `make test` runs them on every core
pytestmark = pytest.mark.parallel_safe

ADMIN = {"Authorization": "Bearer admin-secret"}


def fake_kernel(path: Path) -> Path:
    data = bytearray(4096)
    data[0x202:0x206] = b"HdrS"
    path.write_bytes(bytes(data))
    return path


def fake_initrd(path: Path) -> Path:
    path.write_bytes(gzip.compress(newc_archive({"init": (b"#!/bin/sh\n", 0o755)})))
    return path


@pytest.fixture
def boot_files(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "src").mkdir()
    return fake_kernel(tmp_path / "src" / "vmlinuz"), fake_initrd(tmp_path / "src" / "initrd.img")


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "shadow"
    path.write_text("root:$6$salt$hash:19000:0:99999:7:::\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def admin(home: Path, settings: Settings) -> Iterator[TestClient]:
    app = create_app(BootService(settings, db.engine()), "admin-secret")
    with TestClient(app, client=("10.0.0.99", 40000)) as c:
        yield c


def distro(name: str, kernel: Path | str, initrd: Path | str) -> dict[str, str]:
    return {
        "name": name,
        "family": "debian",
        "os_version": "12",
        "kernel": str(kernel),
        "initrd": str(initrd),
    }


def rotated_log(path: Path) -> Path:
    path.write_bytes(gzip.compress(b"Dec  3 sshd[1]: Accepted password for root\n"))
    return path


@pytest.mark.parametrize("which", ["kernel", "initrd"])
def test_import_refuses_what_is_no_boot_file(
    home: Path, boot_files: tuple[Path, Path], secret: Path, tmp_path: Path, which: str
) -> None:
    kernel, initrd = boot_files
    for bad in (secret, rotated_log(tmp_path / "auth.log.2.gz"), tmp_path, Path("/dev/zero")):
        given = {"kernel": kernel, "initrd": initrd, which: bad}
        with (
            pytest.raises(InvalidValue, match=f"{which} '{bad}'|cannot read {which}"),
            imported(home, "evil", {k: str(v) for k, v in given.items()}),
        ):
            pytest.fail("the block must not run")
    assert not (home / "distros").exists() or not any((home / "distros").iterdir())


def test_served_only_from_corrals_tree(
    admin: TestClient, settings: Settings, boot_files: tuple[Path, Path], secret: Path
) -> None:
    kernel, initrd = boot_files
    created = admin.post("/api/v1/distros", json=distro("deb", kernel, initrd), headers=ADMIN)
    assert created.status_code == 201, created.text
    tree = settings.home / "distros" / "deb"
    assert created.json()["kernel"] == str(tree / "vmlinuz")
    assert admin.get("/distros/deb/vmlinuz").content == kernel.read_bytes()
    assert admin.get("/distros/deb/initrd.img").content == initrd.read_bytes()
    service = BootService(settings, db.engine())
    assert service.tftp_resolve("distros/deb/initrd.img", "10.0.0.99") == initrd.read_bytes()
    # a distro that names a file outside the tree (an old inventory, a cluster file)
    with db.inventory() as inv:
        inv.add("distro", [DistroSpec(**distro("old", secret, initrd))])  # type: ignore[arg-type]
    assert admin.get("/distros/old/shadow").status_code == 404
    assert service.tftp_resolve("distros/old/shadow", "10.0.0.99") is None


def test_the_rest_api_refuses_any_file(
    admin: TestClient, settings: Settings, boot_files: tuple[Path, Path], secret: Path
) -> None:
    kernel, initrd = boot_files
    refused = admin.post("/api/v1/distros", json=distro("evil", secret, initrd), headers=ADMIN)
    assert refused.status_code == 422
    assert "not a Linux kernel" in refused.json()["detail"]
    assert admin.get("/api/v1/distros/evil", headers=ADMIN).status_code == 404
    assert admin.post("/api/v1/distros", json=distro("deb", kernel, initrd), headers=ADMIN)
    patched = admin.patch("/api/v1/distros/deb", json={"initrd": str(secret)}, headers=ADMIN)
    assert patched.status_code == 422
    stored = admin.get("/api/v1/distros/deb", headers=ADMIN).json()
    assert stored["initrd"] == str(settings.home / "distros" / "deb" / "initrd.img")
    assert admin.get("/distros/evil/shadow").status_code == 404
    assert admin.get("/distros/deb/shadow").status_code == 404
    assert {p.name for p in (settings.home / "distros").iterdir()} == {"deb"}


@pytest.mark.integration
def test_distro_add_with_a_secret_file_is_a_one_line_error(
    home: Path, boot_files: tuple[Path, Path], secret: Path
) -> None:
    kernel, initrd = boot_files
    argv = ["distro", "add", "evil", "--family", "debian", "--os-version", "12"]
    result = corral(*argv, "--kernel", str(secret), "--initrd", str(initrd), home=home)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: kernel '{secret}' is not a Linux kernel")
    assert "Traceback" not in result.stderr
    assert corral("distro", "show", "evil", home=home).returncode == 2  # unknown
    assert not (home / "distros" / "evil").exists()
    added = corral(*argv, "--kernel", str(kernel), "--initrd", str(initrd), home=home)
    assert added.returncode == 0, added.stderr
    assert (home / "distros" / "evil" / "vmlinuz").read_bytes() == kernel.read_bytes()
    changed = corral("distro", "set", "evil", "--initrd", str(secret), home=home)
    assert changed.returncode == 2 and changed.stderr.startswith("error: initrd ")
    assert not (home / "distros" / "evil" / "shadow").exists()
