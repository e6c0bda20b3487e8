"""Layers: what an image adds to its distribution's base system.

A :class:`Layer` is a name, packages to install and an optional overlay: a directory whose
tree is copied over the image's root (``overlay/etc/motd`` becomes ``/etc/motd``). Layers
apply in order, each one's packages before its overlay, so a later layer's files win.

Overlay files keep their permission bits and times; they become owned by root (they are
usually written by whoever keeps the overlay, whose uid means nothing in the image).
Symbolic links inside the image are followed as they would be inside it: an overlay never
writes outside the root, even through an absolute link such as ``/etc/mtab``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from corral.errors import InvalidValue
from corral.images.chroot import Runner, chroot_run
from corral.run import run

NAME = re.compile(r"[a-z0-9][a-z0-9_-]*\Z")
#: Debian and RPM package names (``name``, ``name=version``, ``name:arch``, ``@group``);
#: never an option (a leading ``-``), never blanks.
PACKAGE = re.compile(r"[A-Za-z0-9@_+][A-Za-z0-9@_+.:=~/-]*\Z")

PackageTool = Literal["apt", "dnf"]

APT_INSTALL = shlex.split(
    "apt-get install -y --no-install-recommends"
    " -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"
)
DNF_INSTALL = shlex.split("dnf -y --setopt=install_weak_deps=False --setopt=keepcache=True install")


class LayerError(InvalidValue):
    """A layer that is not well formed (name, packages, overlay)."""


def check_package_names(names: Sequence[str], where: str) -> None:
    """Raise :class:`LayerError` for a name that cannot be a package (``where`` says whose)."""
    for name in names:
        if not isinstance(name, str) or not PACKAGE.match(name):
            raise LayerError(
                f"{where}: invalid package name {name!r}",
                "a package name is letters, digits and + . - _ (no blanks, no leading '-')",
            )


@dataclass
class Layer:
    """Packages and an overlay directory to put on top of a base image."""

    name: str
    packages: list[str] = field(default_factory=list)
    overlay: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME.match(self.name):
            raise LayerError(
                f"invalid layer name {self.name!r}",
                "a layer name is lower-case letters, digits, '-' and '_', starting with a "
                "letter or digit",
            )
        self.packages = list(self.packages)
        check_package_names(self.packages, f"layer '{self.name}'")
        if self.overlay is not None:
            self.overlay = Path(self.overlay)

    def validate(self) -> None:
        """Check what only the file system can tell: the overlay directory exists."""
        if self.overlay is not None and not self.overlay.is_dir():
            what = "is not a directory" if self.overlay.exists() else "does not exist"
            raise LayerError(
                f"layer '{self.name}': overlay {self.overlay} {what}",
                "an overlay is a directory laid out like the image's root (etc/, usr/...)",
            )


def validate_layers(layers: Sequence[Layer]) -> None:
    """Validate every layer, and that no two share a name."""
    seen: set[str] = set()
    for layer in layers:
        layer.validate()
        if layer.name in seen:
            raise LayerError(f"layer '{layer.name}' is listed twice")
        seen.add(layer.name)


def install_argv(tool: PackageTool, packages: Sequence[str]) -> list[str]:
    """The command that installs ``packages`` when run inside the image."""
    if tool == "apt":
        return [*APT_INSTALL, *packages]
    return [*DNF_INSTALL, *packages]


def resolve_in_root(root: Path, path: str) -> Path:
    """``root/path`` with every symbolic link followed as if ``root`` were ``/``."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = root.joinpath(*done, part)
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise LayerError(f"too many levels of symbolic links at {candidate}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        done.append(part)
    return root.joinpath(*done)


def _own(path: Path) -> None:
    if os.geteuid() == 0:
        os.chown(path, 0, 0, follow_symlinks=False)


def copy_overlay(overlay: Path, root: Path) -> int:
    """Copy the tree ``overlay`` over ``root``; return how many entries were written.

    Directories that exist in the image keep their mode and owner; new ones get the
    overlay's mode. Files and links replace what is there (a link is copied as a link).
    """
    count = 0
    for dirpath, dirnames, filenames in os.walk(overlay):
        here = Path(dirpath)
        relative = here.relative_to(overlay).as_posix()
        base = resolve_in_root(root, relative)
        if not base.is_dir():
            raise LayerError(
                f"overlay {overlay}: /{relative} is a directory there but not in the image"
            )
        for name in sorted(dirnames + filenames):
            source = here / name
            info = source.lstat()
            target = base / name
            if stat.S_ISDIR(info.st_mode):
                if source.is_symlink():
                    raise LayerError(f"overlay {overlay}: unexpected link {source}")
                real = resolve_in_root(root, f"{relative}/{name}")
                if real.is_dir():
                    continue
                if real.exists() or real.is_symlink():
                    raise LayerError(
                        f"overlay {overlay}: /{relative}/{name} is a directory in the overlay "
                        "but not in the image"
                    )
                real.mkdir()
                real.chmod(stat.S_IMODE(info.st_mode))
                _own(real)
            elif stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode):
                if target.is_dir() and not target.is_symlink():
                    raise LayerError(
                        f"overlay {overlay}: /{relative}/{name} is a file in the overlay but "
                        "a directory in the image"
                    )
                if target.exists() or target.is_symlink():
                    target.unlink()
                if stat.S_ISLNK(info.st_mode):
                    target.symlink_to(os.readlink(source))
                else:
                    shutil.copy2(source, target, follow_symlinks=False)
                _own(target)
            else:
                raise LayerError(
                    f"overlay {overlay}: {source} is neither a file, a link nor a directory"
                )
            count += 1
    return count


def apply_layers(
    root: Path, layers: Sequence[Layer], *, tool: PackageTool = "apt", runner: Runner = run
) -> None:
    """Apply ``layers`` to the tree ``root``, in order: packages, then the overlay.

    Packages are installed by ``tool`` inside the image, so ``root`` must already be
    mounted (:func:`corral.images.chroot.mounted`) and its package lists current. A failing
    install raises :class:`corral.errors.CommandFailed` (the builder explains it).
    """
    validate_layers(layers)
    for layer in layers:
        if layer.packages:
            chroot_run(root, install_argv(tool, layer.packages), runner=runner)
        if layer.overlay is not None:
            copy_overlay(layer.overlay, root)
