"""What to build, and the pieces of a build's plan: the spec, its steps, the result, and
the interface every builder has."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Protocol

from corral.images.build.errors import BuildError
from corral.images.chroot import chroot_command
from corral.images.layers import Layer, check_package_names

#: Where ``commands()`` puts the root when no real staging directory is given.
ROOT_PLACEHOLDER = Path("/ROOT")

Mounts = Literal["none", "base", "cache"]


@dataclass
class BuildSpec:
    """What image to build.

    ``release`` is a suite for Debian/Ubuntu (``bookworm``, ``jammy``) and a version for
    RPM distributions (``9``, ``40``). ``mirror`` defaults, for Debian, to the machine's
    apt sources; the others need one (RHEL-like: the tree holding ``BaseOS/`` and
    ``AppStream/``; Fedora: the tree holding ``releases/`` and ``updates/``). ``packages``
    come on top of what makes the image bootable; ``layers`` are applied after, in order.
    ``bootable=False`` leaves the boot packages out: a bare tree, for containers or tests.
    """

    distro: str
    family: str
    release: str
    arch: str = "amd64"
    mirror: str | None = None
    packages: list[str] = field(default_factory=list)
    layers: list[Layer] = field(default_factory=list)
    cache_dir: Path | None = None
    components: list[str] = field(default_factory=lambda: ["main"])
    gpg_key: str | None = None  # RPM repositories: URL of the signing key (else no check)
    bootable: bool = True  # False: no kernel, bootloader, network or SSH (a bare chroot tree)

    def __post_init__(self) -> None:
        self.family = self.family.lower()
        self.packages = list(self.packages)
        self.layers = list(self.layers)
        check_package_names(self.packages, f"image '{self.distro}'")
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.release):
            raise BuildError(f"invalid release {self.release!r}")

    def cache_for(self, tool: str) -> Path | None:
        """This spec's own directory in the shared package cache (None: no cache)."""
        if self.cache_dir is None:
            return None
        return self.cache_dir.resolve() / tool / f"{self.family}-{self.release}-{self.arch}"


@dataclass(frozen=True)
class Step:
    """One thing a build does: a command (run on the host or inside the tree) or an action.

    ``mounts`` is what the tree needs mounted meanwhile: nothing, the API file systems
    (``base``), or those plus the package cache bound into it (``cache``).
    """

    what: str
    argv: tuple[str, ...] = ()
    inside: bool = False
    action: Callable[[], object] | None = None
    mounts: Mounts = "none"
    layer: str | None = None
    timeout: float | None = None
    env: Mapping[str, str] = field(default_factory=dict)  # on top of run()'s environment

    def command(self, root: Path) -> list[str]:
        return chroot_command(root, self.argv) if self.inside else list(self.argv)


@dataclass(frozen=True)
class BuildResult:
    """A finished root tree and what is known about it."""

    root: Path
    spec: BuildSpec
    kernel: str | None  # file name in /boot (None when the spec is not bootable)
    initrd: str | None  # file name in /boot
    packages: dict[str, str]  # installed package -> version
    size_bytes: int
    seconds: float
    commands: list[list[str]]


class Builder(Protocol):
    """Builds the root trees of some distribution families."""

    name: ClassVar[str]
    families: ClassVar[tuple[str, ...]]

    def commands(self, spec: BuildSpec, root: Path = ROOT_PLACEHOLDER) -> list[list[str]]:
        """Every command :meth:`build` runs to make and change the tree, in order.

        (Mounting, and reading the package list of the result, are not in it.)
        """
        ...

    def build(self, spec: BuildSpec, staging: Path) -> BuildResult:
        """Build the tree of ``spec`` in ``staging`` (empty or missing; emptied on failure)."""
        ...
