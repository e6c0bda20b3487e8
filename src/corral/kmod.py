"""Linux kernel modules: names, ``modules.dep``, and the order to load them in.

Shared by the deploy ramdisk and the test VMs' initramfs, which both copy a few
modules out of a Debian kernel package and load them at boot.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from corral.errors import CorralError

COMPRESSED_SUFFIXES = (".ko.xz", ".ko.gz", ".ko.zst")


class KernelModuleError(CorralError):
    """A kernel's modules do not fit together (a cycle, a module nowhere)."""


def module_name(path: str) -> str:
    """``kernel/drivers/net/virtio_net.ko.xz`` -> ``virtio_net`` (dashes as underscores)."""
    base = os.path.basename(path)
    for suffix in (*COMPRESSED_SUFFIXES, ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def read_modules_dep(moddir: Path) -> dict[str, tuple[str, list[str]]]:
    """``modules.dep`` as ``name -> (path relative to moddir, dependency names)``."""
    table: dict[str, tuple[str, list[str]]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        target, sep, deps = line.partition(":")
        if sep:
            table[module_name(target)] = (target, [module_name(d) for d in deps.split()])
    return table


def builtin_modules(moddir: Path) -> set[str]:
    """Modules compiled into the kernel (``modules.builtin``), which need no loading."""
    path = moddir / "modules.builtin"
    return {module_name(line) for line in path.read_text().split()} if path.exists() else set()


def load_order(
    table: Mapping[str, tuple[object, Sequence[str]]],
    roots: Iterable[str],
    builtin: Iterable[str] = (),
) -> list[str]:
    """``roots`` and everything they need, each after its dependencies; built-in
    modules are left out, and a module neither in ``table`` nor built in is an error."""
    skip = set(builtin)
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order or name in skip:
            return
        if name in visiting:
            raise KernelModuleError(f"kernel module dependency cycle through {name}")
        if name not in table:
            raise KernelModuleError(f"kernel module {name} is neither in modules.dep nor built in")
        visiting.add(name)
        # modprobe loads the listed dependencies last-to-first.
        for dep in reversed(table[name][1]):
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for root in roots:
        visit(root)
    return order
