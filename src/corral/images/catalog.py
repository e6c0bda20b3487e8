"""Where corral keeps images and layers, and the distributions it can build.

Images live in ``$CORRAL_HOME/images`` (:class:`~corral.images.store.ImageStore`),
layers in ``$CORRAL_HOME/layers/<name>/`` (``layer.json`` and an ``overlay/`` tree).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from corral.errors import AlreadyExists, NotFound, UsageError
from corral.images.layers import Layer
from corral.images.store import ImageStore, check_name, write_json_atomic


@dataclass(frozen=True)
class Release:
    family: str
    release: str


# Distribution names ``corral image build --distro`` knows without an inventory entry.
RELEASES = {
    "debian-11": Release("debian", "bullseye"),
    "debian-12": Release("debian", "bookworm"),
    "debian-13": Release("debian", "trixie"),
    "ubuntu-22.04": Release("ubuntu", "jammy"),
    "ubuntu-24.04": Release("ubuntu", "noble"),
    "rocky-9": Release("rhel", "9"),
    "almalinux-9": Release("rhel", "9"),
    "fedora-40": Release("fedora", "40"),
}


def release_of(distro: str) -> Release:
    try:
        return RELEASES[distro]
    except KeyError:
        raise UsageError(
            f"unknown distro '{distro}'", f"use one of: {', '.join(sorted(RELEASES))}"
        ) from None


def image_store(home: Path) -> ImageStore:
    return ImageStore(home / "images")


class LayerCatalog:
    def __init__(self, home: Path) -> None:
        self.root = home / "layers"

    def add(self, name: str, packages: list[str], overlay: Path | None) -> Layer:
        check_name(name)
        directory = self.root / name
        if directory.exists():
            raise AlreadyExists(
                f"layer '{name}' exists already", f"remove it first with 'corral layer rm {name}'"
            )
        if overlay is not None and not overlay.is_dir():
            raise UsageError(f"overlay {overlay} is not a directory")
        layer = Layer(name=name, packages=packages, overlay=None)  # validates names
        staging = self.root / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if overlay is not None:
            shutil.copytree(overlay, staging / "overlay", symlinks=True)
        write_json_atomic(staging / "layer.json", {"name": name, "packages": packages})
        staging.rename(directory)
        return self.get(layer.name)

    def get(self, name: str) -> Layer:
        directory = self.root / name
        try:
            data = json.loads((directory / "layer.json").read_text())
        except FileNotFoundError:
            raise NotFound("layer", name) from None
        overlay = directory / "overlay"
        return Layer(
            name=name,
            packages=list(data["packages"]),
            overlay=overlay if overlay.is_dir() else None,
        )

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "layer.json").is_file())

    def remove(self, name: str) -> None:
        self.get(name)
        shutil.rmtree(self.root / name)
