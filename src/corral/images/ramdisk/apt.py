"""apt on a private, empty package status: the ramdisk's packages resolved for an empty
system, and downloaded."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from corral.images.ramdisk.errors import RamdiskError
from corral.run import run

log = logging.getLogger("corral.images")


def debian_suite() -> str:
    """The codename of the machine's Debian release (``bookworm``)."""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "VERSION_CODENAME" and value.strip('"'):
                return value.strip('"')
    except OSError:
        pass
    return "bookworm"


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    architecture: str

    @property
    def filename(self) -> str:
        # apt's name for a downloaded package; an epoch's ':' becomes '%3a'.
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.architecture}.deb"


PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_INST = re.compile(r"^Inst (\S+) (?:\[[^\]]*\] )?\((\S+) .*\[([^\]]+)\]\)")


class Apt:
    """apt-get and apt-cache on a private, empty package status in ``state``.

    Packages resolve as for an empty system, so every dependency is downloaded (into
    ``archives``, which keeps them between builds). With ``mirror``, the package lists
    come from that mirror into ``state/lists`` too, instead of the machine's apt sources.
    """

    def __init__(self, state: Path, archives: Path, mirror: str | None = None) -> None:
        self.state = state
        self.archives = archives
        self.mirror = mirror.rstrip("/") if mirror else None
        self.status = state / "status"
        (archives / "partial").mkdir(parents=True, exist_ok=True)
        state.mkdir(parents=True, exist_ok=True)
        if not self.status.exists():
            self.status.write_text("")

    def options(self) -> list[str]:
        opts = {
            "Dir::State::status": str(self.status),
            "Dir::Cache::archives": str(self.archives),
            "Dir::Cache::pkgcache": "",
            "Dir::Cache::srcpkgcache": "",
            "APT::Install-Recommends": "false",
            "APT::Install-Suggests": "false",
            "APT::Sandbox::User": "root",
            "Acquire::Retries": "3",
        }
        if self.mirror:
            opts["Dir::Etc::SourceList"] = str(self.state / "sources.list")
            opts["Dir::Etc::SourceParts"] = str(self.state / "sources.list.d")
            opts["Dir::State::Lists"] = str(self.state / "lists")
        return [arg for k, v in opts.items() for arg in ("-o", f"{k}={v}")]

    def update(self, max_age: float = 86400.0) -> None:
        """With a mirror: fetch its package lists (at most once per ``max_age`` seconds)."""
        if not self.mirror:
            return
        suite = debian_suite()
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        lines = [
            f"deb [signed-by={keyring}] {self.mirror} {s} main" for s in (suite, f"{suite}-updates")
        ]
        sources = self.state / "sources.list"
        text = "\n".join(lines) + "\n"
        lists = self.state / "lists"
        stamp = self.state / "lists.stamp"
        fresh = (
            sources.exists()
            and sources.read_text() == text
            and stamp.exists()
            and time.time() - stamp.stat().st_mtime < max_age
        )
        if fresh:
            return
        sources.write_text(text)
        (self.state / "sources.list.d").mkdir(exist_ok=True)
        (lists / "partial").mkdir(parents=True, exist_ok=True)
        log.info("fetching package lists from %s (%s)", self.mirror, suite)
        run(["apt-get", "-q", *self.options(), "update"], timeout=600)
        stamp.write_text(f"{time.time()}\n")

    def show(self, names: Iterable[str]) -> list[dict[str, str]]:
        """The candidate stanzas of ``names``; unknown names are skipped."""
        out = run(["apt-cache", *self.options(), "show", "--no-all-versions", *names], check=False)
        stanzas = []
        for block in out.stdout.split("\n\n"):
            fields: dict[str, str] = {}
            for line in block.splitlines():
                key, sep, value = line.partition(":")
                if sep and not line.startswith(" ") and key not in fields:
                    fields[key] = value.strip()
            if "Package" in fields:
                stanzas.append(fields)
        return stanzas

    def depends(self, package: str) -> str:
        """The (first real) package that metapackage ``package`` depends on."""
        out = run(["apt-cache", *self.options(), "depends", package], check=False)
        for line in out.stdout.splitlines():
            m = re.match(r"\s*\|?Depends:\s*(\S+)", line)
            if m and not m.group(1).startswith("<"):
                return m.group(1)
        raise RamdiskError(
            f"cannot find the package {package} depends on",
            "run 'apt-get update' (apt-cache says: " + (out.stderr.strip() or "nothing") + ")",
        )

    def declare_installed(self, names: Iterable[str]) -> None:
        """Make apt believe ``names`` are installed: they satisfy dependencies, but are not
        downloaded. Fields come from the candidates, so version constraints hold."""
        self.status.write_text("")
        entries = []
        for fields in self.show(names):
            entry = [
                f"Package: {fields['Package']}",
                "Status: install ok installed",
                f"Version: {fields['Version']}",
                f"Architecture: {fields.get('Architecture', 'all')}",
                "Maintainer: corral <corral@localhost>",
                "Description: left out of the corral ramdisk",
            ]
            for key in ("Multi-Arch", "Provides", "Essential"):
                if key in fields:
                    entry.append(f"{key}: {fields[key]}")
            entries.append("\n".join(entry) + "\n")
        self.status.write_text("\n".join(entries))

    def resolve(self, packages: Sequence[str]) -> list[Package]:
        """What ``apt-get install packages`` would install on this empty system."""
        out = run(["apt-get", "-q", *self.options(), "-s", "install", *packages], check=False)
        if out.returncode != 0:
            raise RamdiskError(
                "apt cannot resolve the ramdisk's packages: "
                + " | ".join(out.stderr.strip().splitlines()[-4:]),
                "check the names given with --add-package; run 'apt-get update'",
            )
        found = []
        for line in out.stdout.splitlines():
            m = _INST.match(line)
            if m:
                found.append(Package(m.group(1), m.group(2), m.group(3)))
        if not found:
            raise RamdiskError("apt resolved no packages:\n" + out.stdout[-1000:])
        return found

    def download(self, packages: Sequence[Package]) -> list[Path]:
        """The .deb files of ``packages`` in the archives directory (downloaded if missing)."""
        missing = [p for p in packages if not (self.archives / p.filename).exists()]
        if missing:
            log.info("downloading %d packages", len(missing))
            run(
                [
                    "apt-get",
                    "-q",
                    "-y",
                    *self.options(),
                    "--download-only",
                    "install",
                    *(f"{p.name}={p.version}" for p in missing),
                ],
                timeout=1800,
            )
        debs = [self.archives / p.filename for p in packages]
        lost = [d.name for d in debs if not d.exists()]
        if lost:
            raise RamdiskError(f"apt did not download {', '.join(lost)}")
        return debs
