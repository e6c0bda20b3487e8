"""corral serve: the boot server."""

from __future__ import annotations

import logging
from dataclasses import replace

import typer

from corral.cli.common import engine, settings
from corral.config import Settings, listening_url

log = logging.getLogger(__name__)


def _from_config(key: str) -> str:
    default = getattr(Settings, key)
    shown = f"'{default}'" if default == "" else default
    return f"[config: {key}; default: {shown}]"


def serve(
    address: str | None = typer.Option(
        None, help=f"address to listen on {_from_config('address')}"
    ),
    http_port: int | None = typer.Option(None, help=f"HTTP port {_from_config('http_port')}"),
    tftp_port: int | None = typer.Option(
        None, help=f"TFTP port, 0 for none {_from_config('tftp_port')}"
    ),
    dhcp: str | None = typer.Option(None, help=f"off, full or proxy {_from_config('dhcp')}"),
    dhcp_interface: str | None = typer.Option(
        None, help=f"interface for DHCP {_from_config('dhcp_interface')}"
    ),
    dhcp_range: str | None = typer.Option(
        None,
        help="FIRST,LAST addresses for unknown machines (full mode) " + _from_config("dhcp_range"),
    ),
) -> None:
    """Serve DHCP, TFTP and HTTP boot files live from the inventory, until SIGTERM/SIGINT.

    Settings come from the options, else from corral.toml (top level or its [serve]
    table). Nodes fetch from server_url, else from http://ADDRESS:HTTP_PORT when corral
    listens on one address (else http://10.0.0.1:8080); corral serve logs that URL.
    """
    from corral.serve.server import ServeOptions
    from corral.serve.server import serve as run_server

    cfg = settings()
    options = ServeOptions(
        address=address if address is not None else cfg.address,
        http_port=http_port if http_port is not None else cfg.http_port,
        tftp_port=tftp_port if tftp_port is not None else cfg.tftp_port,
        dhcp=dhcp if dhcp is not None else cfg.dhcp,
        dhcp_interface=dhcp_interface if dhcp_interface is not None else cfg.dhcp_interface,
        dhcp_range=dhcp_range if dhcp_range is not None else cfg.dhcp_range,
    )
    derived = (Settings.server_url, listening_url(cfg.address, cfg.http_port))
    here = listening_url(options.address, options.http_port)
    if cfg.server_url in derived and here:
        # No server URL configured: nodes reach corral where it listens.
        cfg = replace(cfg, server_url=here)
    log.info("nodes fetch their boot files from %s (server_url)", cfg.server_url)
    where = "api_token in the config" if cfg.api_token else str(cfg.home / "api-token")
    log.info("admin API (/api/v1) bearer token: %s", where)
    run_server(cfg, engine(), options)
