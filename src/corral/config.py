"""Where corral keeps its state, and the settings a site may change.

Settings come from ``$CORRAL_HOME/corral.toml`` (or the file named by ``CORRAL_CONFIG``);
every key has a default, so a fresh machine needs no file at all.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from corral.errors import ConfigError


def default_home() -> Path:
    if "CORRAL_HOME" in os.environ:
        return Path(os.environ["CORRAL_HOME"])
    if os.geteuid() == 0:
        return Path("/var/lib/corral")
    return Path.home() / ".local" / "share" / "corral"


@dataclass(frozen=True)
class Settings:
    home: Path
    # SQLAlchemy URL; empty means SQLite in the home directory.
    database_url: str = ""
    # Base URL at which nodes reach corral's HTTP server; rendered into boot files.
    server_url: str = "http://10.0.0.1:8080"
    # Site templates that override the packaged ones, file by file.
    template_dir: str = ""

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'corral.db'}"

    @property
    def templates(self) -> Path:
        return Path(self.template_dir) if self.template_dir else self.home / "templates"


def load_settings(home: Path | None = None) -> Settings:
    home = home or default_home()
    path = Path(os.environ.get("CORRAL_CONFIG", home / "corral.toml"))
    values: dict[str, str] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        known = {f.name for f in fields(Settings)} - {"home"}
        for key, value in data.items():
            if key not in known:
                raise ConfigError(
                    f"unknown key '{key}' in {path}", f"known keys: {', '.join(sorted(known))}"
                )
            if not isinstance(value, str):
                raise ConfigError(f"key '{key}' in {path} must be a string")
            values[key] = value
    return Settings(home=home, **values)
