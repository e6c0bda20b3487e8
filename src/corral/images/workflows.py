"""What ``corral image`` does, for every door: the CLI, the REST API, the dashboard.

Each workflow ends in a new version of an image in the store. A tree being made is
staged inside the store (:func:`staging`: the same filesystem, so the version is a
rename); a change to an image (:func:`change_image`) works on a copy of a version and
strips the copy's identity, as a capture's, before it becomes the next version.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from corral.images.build import BuildResult, BuildSpec, build_image
from corral.images.build.tree import discard, strip_identity
from corral.images.capture.errors import SourceError
from corral.images.capture.source import Source, is_address, node_address
from corral.images.catalog import LayerCatalog, image_store, release_of
from corral.images.store import ImageStore, ImageVersion, check_name, copy_tree
from corral.inventory.store import Inventory


@contextmanager
def staging(store: ImageStore, name: str) -> Iterator[Path]:
    """A scratch tree inside the store, removed at the end with anything mounted in it."""
    path = store.root / f".staging-{name}-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        if path.exists():
            discard(path)  # unmounts anything left, then removes it
            shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class Built:
    version: ImageVersion
    result: BuildResult


def build_version(
    home: Path,
    name: str,
    distro: str,
    *,
    packages: Sequence[str] = (),
    layers: Sequence[str] = (),
    mirror: str | None = None,
) -> Built:
    """Build an image from scratch in a chroot, with ``layers`` (from the layer catalog)
    applied in order; the result is the next version of ``name``."""
    release = release_of(distro)
    spec = BuildSpec(
        distro=distro,
        family=release.family,
        release=release.release,
        mirror=mirror,
        packages=list(packages),
        layers=[LayerCatalog(home).get(n) for n in layers],
        cache_dir=home / "cache",
    )
    store = image_store(home)
    with staging(store, name) as tree:
        result = build_image(spec, tree)
        origin = f"build {distro}" + "".join(f" +{n}" for n in layers)
        version = store.add_version(name, result.root, origin=origin, move=True)
    return Built(version, result)


def import_version(store: ImageStore, name: str, source: Path) -> ImageVersion:
    """The next version of ``name`` from a root tree: a directory, or a tarball."""
    if source.is_dir():
        return store.import_tree(name, source)
    return store.import_tarball(name, source)


def capture_source(
    home: Path,
    image: str,
    node: str,
    inventory: Callable[[], AbstractContextManager[Inventory]],
    *,
    path: str = "/",
    user: str = "root",
    port: int = 22,
    key: Path | None = None,
) -> Source:
    """Where a capture into ``image`` copies from, checked before anything connects:
    ``node`` is an inventory node (reached at its first IP), else a host name or an
    address. ``inventory`` opens the inventory, only for a node given by name."""
    check_name(image)
    if key is not None and not (key.is_file() and os.access(key, os.R_OK)):
        raise SourceError(f"cannot read the SSH key {key}", "give a private key file")
    host, node_name = node, None
    if not is_address(node):
        with inventory() as inv:
            if inv.exists("node", node):
                host, node_name = node_address(inv.node(node)), node
    return Source(
        host=host,
        path=path,
        user=user,
        port=port,
        key=key,
        known_hosts=home / "ssh" / "known_hosts",
        node=node_name,
    )


@dataclass(frozen=True)
class Change:
    """A change to an image: the version it started from, and the version it made."""

    base: ImageVersion
    version: ImageVersion


def change_image(
    store: ImageStore, ref: str, origin: str, work: Callable[[Path], object]
) -> Change:
    """The next version of an image: a copy of version ``ref`` that ``work`` changes,
    its identity (machine id, host keys, ...) then stripped. ``origin`` says what the
    change was, in the version's manifest."""
    base = store.get_ref(ref)
    with staging(store, base.name) as scratch:
        tree = scratch / "rootfs"
        copy_tree(base.rootfs, tree)
        work(tree)
        strip_identity(tree)
        version = store.add_version(
            base.name, tree, origin=f"{origin} on v{base.version}", move=True
        )
    return Change(base, version)


def run_in_image(
    store: ImageStore, ref: str, command: Sequence[str], show: Callable[[str], None]
) -> Change:
    """Run ``command`` inside a copy of an image (with /proc, /sys and /dev mounted),
    ``show`` getting its output; the copy becomes the next version."""
    from corral.images.chroot import chroot_run, mounted

    def work(tree: Path) -> None:
        with mounted(tree):
            result = chroot_run(tree, list(command))
        show(result.stdout)

    return change_image(store, ref, "exec: " + " ".join(command), work)


def shell_in_image(store: ImageStore, ref: str) -> Change:
    """An interactive shell inside a copy of an image; on exit, the next version."""
    from corral.images.chroot import interactive_shell

    return change_image(store, ref, "shell", interactive_shell)
