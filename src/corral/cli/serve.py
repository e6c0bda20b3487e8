"""corral serve: the boot server."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import typer

from corral.cli.common import engine, settings
from corral.config import SERVE_OPTIONS, Setting, with_serve_options

log = logging.getLogger(__name__)


def _from_config(s: Setting) -> str:
    shown = f"'{s.default}'" if s.default == "" else s.default
    return f"[config: {s.name}; default: {shown}]"


def _option(s: Setting) -> inspect.Parameter:
    """The option of corral serve that overrides setting ``s`` (None: the config's)."""
    option = typer.Option(None, s.flag, help=f"{s.flag_help} {_from_config(s)}")
    kind = inspect.Parameter.KEYWORD_ONLY
    return inspect.Parameter(s.name, kind, default=option, annotation=s.type | None)


def serve(**given: Any) -> None:
    """Serve DHCP, TFTP and HTTP boot files live from the inventory, until SIGTERM/SIGINT.

    Settings come from the options, else from corral.toml (top level or its [serve]
    table). Nodes fetch from server_url, else from http://ADDRESS:HTTP_PORT when corral
    listens on one address (else http://10.0.0.1:8080); corral serve logs that URL.
    """
    from corral.serve.server import serve as run_server

    cfg = with_serve_options(settings(), given)
    log.info("nodes fetch their boot files from %s (server_url)", cfg.server_url)
    where = "api_token in the config" if cfg.api_token else str(cfg.home / "api-token")
    log.info("admin API (/api/v1) bearer token: %s", where)
    log.info("dashboard: %s/dashboard (log in with that token)", cfg.server_url.rstrip("/"))
    run_server(cfg, engine())


# Typer reads the options from the signature: one per setting with a flag, in the table.
serve.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [_option(s) for s in SERVE_OPTIONS], return_annotation=None
)
