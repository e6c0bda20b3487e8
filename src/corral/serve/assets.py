"""The static boot loaders corral's TFTP server hands out, from Debian's packages."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path

from corral.config import make_private_dir, restrict_file
from corral.errors import CorralError

log = logging.getLogger("corral.serve")

# TFTP name -> (Debian file, package)
LOADERS = {
    "undionly.kpxe": ("/usr/lib/ipxe/undionly.kpxe", "ipxe"),
    "ipxe.efi": ("/usr/lib/ipxe/ipxe.efi", "ipxe"),
    "snponly.efi": ("/usr/lib/ipxe/snponly.efi", "ipxe"),
    "pxelinux.0": ("/usr/lib/PXELINUX/pxelinux.0", "pxelinux"),
    "lpxelinux.0": ("/usr/lib/PXELINUX/lpxelinux.0", "pxelinux"),
    "ldlinux.c32": ("/usr/lib/syslinux/modules/bios/ldlinux.c32", "syslinux-common"),
    "grubnetx64.efi": ("/usr/lib/grub/x86_64-efi/monolithic/grubnetx64.efi", "grub-efi-amd64-bin"),
}


def prepare_tftp_root(root: Path) -> list[str]:
    """Copy the loaders that are installed into ``root`` (copies, not symlinks: the TFTP
    server refuses links that leave its root). Returns what is missing."""
    root.mkdir(parents=True, exist_ok=True)
    missing = []
    for name, (source, package) in LOADERS.items():
        src = Path(source)
        if not src.is_file():
            missing.append(f"{name} (package {package})")
            continue
        dest = root / name
        if dest.is_file() and dest.read_bytes() == src.read_bytes():
            continue
        tmp = dest.with_name(f".{name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    if missing:
        log.warning("boot loaders not installed: %s", ", ".join(missing))
    return missing


def api_token(home: Path) -> str:
    """The admin API's bearer token, made on first use ($CORRAL_HOME/api-token, 0600)."""
    path = home / "api-token"
    try:
        token = path.read_text().strip()
        if token:
            restrict_file(path)
            return token
    except FileNotFoundError:
        pass
    make_private_dir(home)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(".api-token.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    if not path.read_text().strip():
        raise CorralError(f"cannot write {path}")
    return token
