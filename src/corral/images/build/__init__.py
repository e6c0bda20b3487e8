"""Building an OS image: a distribution's root tree, made from scratch in a staging directory.

A :class:`~corral.images.build.spec.Builder` turns a
:class:`~corral.images.build.spec.BuildSpec` into a finished root tree. Its work is a plan
of :class:`~corral.images.build.spec.Step` s, and its ``commands()`` shows every command of
that plan as data (argv lists, the way they will run), so what a build does can be read and
tested without running it. :data:`BUILDERS` holds one builder per tool; :func:`builder_for`
picks the one for a distribution family.

- ``debootstrap`` (Debian, Ubuntu): ``debootstrap --variant=minbase`` with the packages a
  disk boot needs (kernel, initramfs-tools, GRUB for BIOS and UEFI, systemd, networkd with
  DHCP, OpenSSH), then the spec's packages and each layer's installed by apt inside the
  tree.
- ``dnf`` (RHEL and its rebuilds, Fedora): ``dnf --installroot`` of ``@core``, kernel,
  GRUB, shim and dracut from the spec's mirror, then the spec's packages by a second
  ``dnf --installroot``, then the layers by dnf inside the tree.

The spec's own packages are never part of the base system's command: debootstrap's
``--include`` resolves dependencies naively (no alternatives, no virtual packages, no
version constraints), so a big or unusual package set fails there while apt installs it.
A separate step also names the packages at fault correctly when one does not exist.

Downloaded packages are kept in ``spec.cache_dir`` (one directory per family, release and
architecture, locked while a build uses it), so the next build downloads only what changed.

Whatever ends a build early (a failure, Ctrl-C) leaves no mount behind and the staging
directory empty. Tool failures are explained: an unknown package is named, a full disk
names the directory that filled up.

The finished tree has no identity: ``/etc/machine-id`` is empty (systemd makes one at first
boot), there are no SSH host keys (made per node when deployed, or at first boot), no apt
lists, no package cache, nothing in ``/tmp``.

The modules of this package:

- :mod:`~corral.images.build.spec`: what to build (:class:`BuildSpec`), the steps of a
  plan, the result, the :class:`Builder` interface;
- :mod:`~corral.images.build.errors` and :mod:`~corral.images.build.explain`: how a build
  fails, and what a tool's output says went wrong;
- :mod:`~corral.images.build.tree`: what a build does to the tree itself (its identity,
  its size, emptying it after a failure);
- :mod:`~corral.images.build.engine`: what both builders share, running a plan;
- :mod:`~corral.images.build.debootstrap` and :mod:`~corral.images.build.dnf`: the
  builders;
- this one: the registry.
"""

from __future__ import annotations

from pathlib import Path

from corral.images.build.debootstrap import DebootstrapBuilder
from corral.images.build.dnf import DnfBuilder
from corral.images.build.errors import BuildError
from corral.images.build.spec import Builder, BuildResult, BuildSpec

__all__ = [
    "BUILDERS",
    "FAMILIES",
    "BuildResult",
    "BuildSpec",
    "Builder",
    "UnknownFamily",
    "build_image",
    "builder_for",
]

FAMILIES = ("debian", "ubuntu", "rhel", "fedora")

BUILDERS: dict[str, Builder] = {
    "debootstrap": DebootstrapBuilder(),
    "dnf": DnfBuilder(),
}


class UnknownFamily(BuildError):
    exit_code = 2

    def __init__(self, family: str) -> None:
        super().__init__(
            f"unknown distribution family '{family}'",
            f"supported families: {', '.join(FAMILIES)}",
        )
        self.family = family
        self.args = (family,)


def builder_for(family: str) -> Builder:
    """The builder of a distribution family; :class:`UnknownFamily` names the known ones."""
    for builder in BUILDERS.values():
        if family.lower() in builder.families:
            return builder
    raise UnknownFamily(family)


def build_image(spec: BuildSpec, staging: Path) -> BuildResult:
    """Build ``spec`` into ``staging`` with the builder of its family."""
    return builder_for(spec.family).build(spec, staging)
