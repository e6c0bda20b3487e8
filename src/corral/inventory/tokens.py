"""Per-node tokens that authenticate a node's callbacks.

A token is derived from a site secret and the node's name (HMAC-SHA256), so it is
stable across renders (an unchanged node renders byte-identical files) and nothing
secret is stored per node. The secret lives in ``$CORRAL_HOME/secret`` (mode 0600).
"""

from __future__ import annotations

import hmac
import os
import secrets
from hashlib import sha256
from pathlib import Path


def site_secret(home: Path) -> bytes:
    path = home / "secret"
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    home.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".secret.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    try:
        os.link(tmp, path)  # first writer wins; a racing process reads the winner's secret
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return bytes.fromhex(path.read_text().strip())


def node_token(secret: bytes, node: str) -> str:
    return hmac.new(secret, f"node-token:{node}".encode(), sha256).hexdigest()[:40]


def check_token(secret: bytes, node: str, presented: str) -> bool:
    return hmac.compare_digest(node_token(secret, node), presented)
