"""Nodes' SSH host keys, kept by corral so that a re-deployed node keeps its identity.

Without this, every re-install gives a node new host keys and every user's
``known_hosts`` shouts about a man in the middle. Keys are made with ``ssh-keygen`` the
first time a node is deployed and kept under ``$CORRAL_HOME/keys/<node>/`` (mode 0700).
Ed25519 and ECDSA only: they take milliseconds to make, where RSA takes a large part of
a second per node; a Debian sshd serves the keys it finds.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

from corral.config import make_private_dir
from corral.run import run

KEY_TYPES = ("ed25519", "ecdsa")
_lock = threading.Lock()


def host_keys(home: Path, node: str) -> dict[str, str]:
    """``{"ssh_host_ed25519_key": ..., "ssh_host_ed25519_key.pub": ...}`` for the node."""
    directory = home / "keys" / node
    with _lock:
        if not all((directory / f"ssh_host_{t}_key.pub").is_file() for t in KEY_TYPES):
            _generate(directory, node)
    keys: dict[str, str] = {}
    for kind in KEY_TYPES:
        name = f"ssh_host_{kind}_key"
        keys[name] = (directory / name).read_text()
        keys[name + ".pub"] = (directory / (name + ".pub")).read_text()
    return keys


def _generate(directory: Path, node: str) -> None:
    """Make the keys in a scratch directory and rename it in: never half a set."""
    make_private_dir(directory.parent.parent)
    directory.parent.mkdir(mode=0o700, exist_ok=True)
    directory.parent.chmod(0o700)  # corral's own: private even if made looser before
    scratch = Path(tempfile.mkdtemp(prefix=f".{node}.", dir=directory.parent))
    try:
        for kind in KEY_TYPES:
            path = scratch / f"ssh_host_{kind}_key"
            run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", f"root@{node}", "-f", str(path)])
        shutil.rmtree(directory, ignore_errors=True)
        scratch.rename(directory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
