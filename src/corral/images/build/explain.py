"""What a package tool's output says went wrong: an unknown package, a full disk, an
unknown signing key or release; the error a failed step raises."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from corral.images.build.errors import BuildError, DiskFull, UnknownPackage
from corral.images.build.spec import BuildSpec

_UNKNOWN = [
    re.compile(r"Couldn't find these debs: (?P<names>.+)"),
    re.compile(r"Unable to locate package (?P<names>\S+)"),
    re.compile(r"Package '(?P<names>[^']+)' has no installation candidate"),
    re.compile(r"Couldn't find any package by (?:glob|regex) '(?P<names>[^']+)'"),
    re.compile(r"No match for argument: (?P<names>\S+)"),
    re.compile(r"Unable to find a match: (?P<names>.+)"),
]
_FULL = re.compile(
    r"No space left on device|ENOSPC|You don't have enough free space in (?P<apt>\S+?)\.?$"
    r"|more space needed on the (?P<rpm>\S+) filesystem",
    re.MULTILINE,
)
_PATH = re.compile(r"(/[^\s'\"`:,;()]+)")


def unknown_packages(output: str) -> list[str]:
    """Package names a package tool's output says it could not find (in order, once)."""
    names: list[str] = []
    for line in output.splitlines():
        for pattern in _UNKNOWN:
            match = pattern.search(line)
            if match:
                for name in match.group("names").split():
                    name = name.strip("'\".,")
                    if name and name not in names:
                        names.append(name)
    return names


def virtual_providers(output: str, name: str) -> list[str]:
    """The packages apt lists as providing ``name`` when it refuses to pick one for a
    virtual package (empty when ``name`` is not one)."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"Package {name} is a virtual package provided by:":
            providers = []
            for follow in lines[i + 1 :]:
                if not follow.startswith(" ") or not follow.strip():
                    break
                providers.append(follow.split()[0])
            return providers
    return []


def full_directory(
    output: str, root: Path, binds: Mapping[str, Path] | None = None, *, bound: bool = False
) -> Path | None:
    """Which directory filled up, if ``output`` says a disk is full (else None).

    A path in the message decides: one in a package cache (``binds`` maps its place in the
    tree to the host directory; when ``bound``, it is mounted there, so paths seen from
    inside the tree count too) names that cache; anything else is the tree itself.
    """
    binds = binds or {}
    found = False
    for line in output.splitlines():
        match = _FULL.search(line)
        if not match:
            continue
        found = True
        candidates = [match.group("apt") or "", *_PATH.findall(line)]
        for path in filter(None, candidates):
            for inside, host in binds.items():
                inside = "/" + inside.strip("/")
                prefixes = [str(host), inside, f"{root}{inside}"] if bound else [str(host)]
                for prefix in prefixes:
                    if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                        return host
    return root if found else None


def explain(
    output: str,
    *,
    what: str,
    returncode: int,
    spec: BuildSpec,
    root: Path,
    binds: Mapping[str, Path] | None = None,
    bound: bool = False,
    layer: str | None = None,
    boot_packages: Sequence[str] = (),
) -> BuildError:
    """The error a failed step raises: an unknown package, a full disk, or the tool's words."""
    directory = full_directory(output, root, binds, bound=bound)
    if directory is not None:
        return DiskFull(directory, what)
    names = unknown_packages(output)
    if names:
        if layer is not None:
            where = f"in layer '{layer}'"
        elif any(n in boot_packages and n not in spec.packages for n in names):
            where = "among the packages corral installs to make the image bootable"
        else:
            where = "in the image's packages"
        debian = spec.family in ("debian", "ubuntu")
        check = "'apt-cache policy NAME'" if debian else "'dnf search NAME'"
        hint = (
            f"no such package in {spec.mirror or 'the mirror'} for {spec.release}; check the "
            f"name with {check} on a {spec.family} {spec.release} system"
        )
        for name in names:
            providers = virtual_providers(output, name)
            if providers:
                hint = (
                    f"'{name}' is a virtual package: name one of the packages that provide "
                    f"it instead ({', '.join(providers[:6])})"
                )
                break
        return UnknownPackage(names, f"{where} ({spec.distro}: {spec.family} {spec.release})", hint)
    if "Release signed by unknown key" in output or "NO_PUBKEY" in output:
        return BuildError(
            f"{what}: cannot verify {spec.mirror}: signed by an unknown key",
            "install the distribution's keyring on this machine "
            "(ubuntu-keyring for Ubuntu on a Debian host)",
        )
    if re.search(r"No such script|Failed getting release file|Release file .* not found", output):
        return BuildError(
            f"{what}: release '{spec.release}' not found at {spec.mirror}",
            "check the release name and the mirror",
        )
    tail = " | ".join(line for line in output.strip().splitlines()[-4:] if line.strip())
    return BuildError(f"{what} failed (exit code {returncode}): {tail}")
