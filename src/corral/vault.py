"""Secrets corral must read back (BMC passwords), sealed at rest.

A hash would not do: corral hands the password to the BMC. So the inventory keeps it
encrypted with Fernet (AES-128-CBC and an HMAC-SHA256, from ``cryptography``) under a key
that never enters the database: ``$CORRAL_HOME/secret-key``, mode 0600, beside the API
token. A database dump or backup alone reveals no password; the home and the database
together do, as they must for corral to power nodes unattended.

A sealed value is text, ``fernet:<token>``, kept in the entry's spec like any other field.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from corral.config import make_private_dir, restrict_file
from corral.errors import ConfigError

KEY_FILE = "secret-key"
PREFIX = "fernet:"


def is_sealed(value: str) -> bool:
    return value.startswith(PREFIX)


class Vault:
    """Seals and opens secrets with the key in ``home`` (made on first seal)."""

    def __init__(self, home: Path) -> None:
        self.path = home / KEY_FILE
        self._fernet: Fernet | None = None

    def _key(self, create: bool) -> Fernet:
        if self._fernet is not None:
            return self._fernet
        try:
            key = self.path.read_bytes().strip()
            restrict_file(self.path)
        except FileNotFoundError:
            if not create:
                raise ConfigError(
                    f"the key that sealed corral's BMC passwords is missing ({self.path})",
                    "restore it from a backup of corral's home, or set the passwords again "
                    "with 'corral node set NODES --ask-bmc-password'",
                ) from None
            key = self._make_key()
        try:
            self._fernet = Fernet(key)
        except ValueError:
            raise ConfigError(
                f"{self.path} is not a key corral made",
                "restore it from a backup of corral's home; if it is lost, remove it and "
                "set the BMC passwords again",
            ) from None
        return self._fernet

    def _make_key(self) -> bytes:
        make_private_dir(self.path.parent)
        key = Fernet.generate_key()
        tmp = self.path.with_name(f".{KEY_FILE}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(key + b"\n")
        try:
            os.link(tmp, self.path)  # never replaces a key another process made meanwhile
        except FileExistsError:
            key = self.path.read_bytes().strip()
        finally:
            tmp.unlink()
        return key

    def seal(self, secret: str) -> str:
        return PREFIX + self._key(create=True).encrypt(secret.encode()).decode()

    def open(self, sealed: str, what: str = "a secret") -> str:
        """The secret in ``sealed``; ConfigError naming ``what`` if this key did not seal it."""
        try:
            return self._key(create=False).decrypt(sealed.removeprefix(PREFIX)).decode()
        except InvalidToken:
            raise ConfigError(
                f"cannot decrypt {what}: it was sealed with another key than {self.path}",
                "restore the key from a backup of corral's home, or set the password again",
            ) from None


def process_vault() -> Vault:
    """The vault of the process's home ($CORRAL_HOME, corral.toml)."""
    from corral.inventory import db

    return Vault(db.settings().home)
