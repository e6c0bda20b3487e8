"""The ramdisk's tree: merged /usr, pruning, busybox's applets, the agent and the files
that boot it, the check that every program is there, and the cpio archive."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from corral import agent
from corral.cpio import CpioWriter
from corral.images.ramdisk.contents import AGENT_DIR, DIST_PACKAGES_DIR, LIB_DIRS, REQUIRED_TOOLS
from corral.images.ramdisk.errors import RamdiskError
from corral.images.templates import render_template
from corral.run import run

#: The agent's program, which /init runs, and the list of modules /init loads.
AGENT_PROGRAM = "usr/bin/corral-agent"
MODULES_LOAD = "etc/corral/modules.load"

AGENT_PACKAGE_INIT = '"""corral, as much of it as the deploy ramdisk carries: the agent."""\n'


def walk_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def tree_command(root: Path, program: str, argv0: str | None = None) -> list[str]:
    """argv that runs ``program`` (a path inside the tree) on this machine without chroot:
    through the tree's own dynamic loader and libraries."""
    libdir = root / LIB_DIRS[0]
    argv = [str(libdir / "ld-linux-x86-64.so.2"), "--library-path", str(libdir)]
    if argv0:
        argv += ["--argv0", argv0]
    return [*argv, str(root / program)]


def agent_source() -> Path:
    """The ``corral/agent`` package this build copies into the ramdisk."""
    return Path(agent.__file__).resolve().parent


def merge_usr(root: Path) -> None:
    """Debian's merged /usr: /bin, /sbin, /lib* become symlinks into /usr."""
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        top, usr = root / name, root / "usr" / name
        if top.is_symlink():
            continue
        if top.is_dir():
            usr.mkdir(parents=True, exist_ok=True)
            for entry in sorted(top.iterdir()):
                target = usr / entry.name
                if target.is_dir() and entry.is_dir() and not entry.is_symlink():
                    shutil.copytree(entry, target, symlinks=True, dirs_exist_ok=True)
                    shutil.rmtree(entry)
                else:
                    if target.exists() or target.is_symlink():
                        if target.is_dir() and not target.is_symlink():
                            shutil.rmtree(target)
                        else:
                            target.unlink()
                    entry.rename(target)
            top.rmdir()
        if usr.exists():
            top.symlink_to(f"usr/{name}")


def prune(root: Path, patterns: Iterable[str]) -> int:
    freed = 0
    for pattern in patterns:
        for path in sorted(root.glob(pattern), reverse=True):
            if path.is_dir() and not path.is_symlink():
                freed += sum(f.lstat().st_size for f in walk_files(path))
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                freed += path.lstat().st_size
                path.unlink()
    return freed


def install_busybox_links(root: Path) -> int:
    """Symlink every busybox applet that no real program of the tree provides."""
    busybox = root / "usr" / "bin" / "busybox"
    out = run([str(busybox), "--list-full"])
    made = 0
    for rel in out.stdout.split():
        rel = rel.strip("/")
        head, _, rest = rel.partition("/")
        if head in ("bin", "sbin"):
            rel = f"usr/{head}/{rest}"
        path = root / rel
        if path.exists() or path.is_symlink():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to("/usr/bin/busybox")
        made += 1
    return made


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def init_script() -> str:
    """The ramdisk's ``/init``: mount the kernel's file systems, load drivers, run the agent."""
    return render_template("ramdisk-init.sh.j2", modules_load=MODULES_LOAD, agent=AGENT_PROGRAM)


def agent_wrapper() -> str:
    """The agent's program: ``python3 -m corral.agent`` with the ramdisk's module path."""
    return render_template(
        "ramdisk-agent.sh.j2", agent_dir=AGENT_DIR, dist_packages_dir=DIST_PACKAGES_DIR
    )


def install_agent(root: Path, boot_modules: Sequence[str]) -> None:
    pkg = root / AGENT_DIR / "corral"
    shutil.copytree(
        agent_source(), pkg / "agent", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    _write(pkg / "__init__.py", AGENT_PACKAGE_INIT)
    _write(root / AGENT_PROGRAM, agent_wrapper(), 0o755)
    _write(root / "init", init_script(), 0o755)
    _write(root / MODULES_LOAD, "".join(f"{m}\n" for m in boot_modules))
    _write(root / "etc" / "passwd", "root:x:0:0:root:/root:/bin/sh\n")
    _write(root / "etc" / "group", "root:x:0:\ntty:x:5:\ndisk:x:6:\n")
    _write(root / "etc" / "hostname", "corral-ramdisk\n")
    _write(
        root / "etc" / "profile",
        "export PATH=/usr/sbin:/usr/bin:/sbin:/bin\nexport PS1='corral-ramdisk# '\n",
    )
    _write(root / "etc" / "os-release", 'NAME="corral deploy ramdisk"\nID=corral-ramdisk\n')
    mtab = root / "etc" / "mtab"
    if not mtab.is_symlink():
        mtab.unlink(missing_ok=True)
        mtab.symlink_to("/proc/self/mounts")
    for d in ("dev", "proc", "sys", "run", "tmp", "mnt", "root", "var/log", "var/tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)


def check_tools(root: Path) -> None:
    """Every program of :data:`REQUIRED_TOOLS` is there and executable."""
    absent = []
    for rel in REQUIRED_TOOLS:
        path = root / rel
        target = path
        # Absolute symlinks point into the ramdisk, not into the build machine.
        for _ in range(10):
            if not target.is_symlink():
                break
            link = os.readlink(target)
            target = root / link.lstrip("/") if link.startswith("/") else target.parent / link
        if not (target.is_file() and os.access(target, os.X_OK)):
            absent.append(rel)
    if absent:
        raise RamdiskError(f"the ramdisk lacks {', '.join(absent)}")


def pack(root: Path, cpio: Path) -> int:
    """Write ``root`` as a newc archive plus ``/dev/console``; return its size."""
    with cpio.open("wb") as out:
        writer = CpioWriter(out)
        writer.tree(root)
        # The kernel opens /dev/console for /init before anything mounts devtmpfs.
        writer.entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
        writer.finish()
        return writer.size
