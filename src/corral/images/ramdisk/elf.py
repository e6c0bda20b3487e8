"""ELF: which shared libraries a program needs, and removing those no program of the tree
needs."""

from __future__ import annotations

import struct
from pathlib import Path

from corral.images.ramdisk.contents import DLOPENED, LIB_DIRS
from corral.images.ramdisk.errors import RamdiskError
from corral.images.ramdisk.tree import walk_files


def elf_needed(path: Path) -> list[str] | None:
    """The ``DT_NEEDED`` names of a 64-bit little-endian ELF file; None if not one."""
    try:
        with path.open("rb") as f:
            if f.read(6) != b"\x7fELF\x02\x01":
                return None
            data = f.read()
    except OSError:
        return None
    data = b"\x7fELF\x02\x01" + data
    try:
        phoff = struct.unpack_from("<Q", data, 0x20)[0]
        phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
        loads: list[tuple[int, int, int]] = []
        dynamic: tuple[int, int] | None = None
        for i in range(phnum):
            p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(
                "<IIQQQQ", data, phoff + i * phentsize
            )
            if p_type == 1:  # PT_LOAD
                loads.append((p_vaddr, p_offset, p_filesz))
            elif p_type == 2:  # PT_DYNAMIC
                dynamic = (p_offset, p_filesz)
        if dynamic is None:
            return []
        needed: list[int] = []
        strtab = None
        for j in range(dynamic[1] // 16):
            tag, value = struct.unpack_from("<qQ", data, dynamic[0] + 16 * j)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                needed.append(value)
            elif tag == 5:  # DT_STRTAB (an address)
                strtab = value
        if strtab is None:
            return []
        for vaddr, offset, size in loads:
            if vaddr <= strtab < vaddr + size:
                strtab = strtab - vaddr + offset
                break
        names = []
        for off in needed:
            end = data.index(b"\0", strtab + off)
            names.append(data[strtab + off : end].decode())
        return names
    except (struct.error, ValueError):
        return None


def _find_library(root: Path, name: str) -> Path | None:
    for d in LIB_DIRS:
        candidate = root / d / name
        if candidate.exists():
            return candidate
    return None


def prune_libraries(root: Path) -> tuple[list[str], int]:
    """Remove shared libraries no program of the tree needs; return them and bytes freed.

    Raises :class:`RamdiskError` if a program needs a library the tree lacks.
    """
    lib_dir = root / LIB_DIRS[0]
    libs = {p for p in lib_dir.iterdir() if ".so" in p.name} if lib_dir.is_dir() else set()
    roots = [
        p
        for p in walk_files(root)
        if not p.is_symlink() and p.parent != lib_dir and elf_needed(p) is not None
    ]
    keep: set[Path] = {p for p in libs if DLOPENED.match(p.name)}
    missing: dict[str, set[str]] = {}
    todo = list(roots) + [p.resolve() for p in keep if p.exists()]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in elf_needed(path) or []:
            found = _find_library(root, name)
            if found is None:
                missing.setdefault(name, set()).add(str(path.relative_to(root)))
                continue
            keep.add(found)
            real = found.resolve()
            keep.add(real)
            todo.append(real)
    if missing:
        detail = "; ".join(f"{lib} (for {', '.join(sorted(u)[:3])})" for lib, u in missing.items())
        raise RamdiskError(f"the ramdisk lacks shared libraries: {detail}")
    removed, freed = [], 0
    kept_real = {k.resolve() for k in keep}
    for lib in sorted(libs):
        if lib in keep or lib.resolve() in kept_real:
            continue
        freed += lib.lstat().st_size
        removed.append(lib.name)
        lib.unlink()
    return removed, freed
