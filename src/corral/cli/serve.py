"""corral serve: the boot server."""

from __future__ import annotations

from dataclasses import replace

import typer

from corral.cli.common import engine, settings
from corral.config import Settings


def serve(
    address: str | None = typer.Option(None, help="address to listen on [config: address]"),
    http_port: int | None = typer.Option(None, help="HTTP port [config: http_port]"),
    tftp_port: int | None = typer.Option(None, help="TFTP port, 0 for none [config: tftp_port]"),
    dhcp: str | None = typer.Option(None, help="off, full or proxy [config: dhcp]"),
    dhcp_interface: str | None = typer.Option(None, help="interface for DHCP [config]"),
    dhcp_range: str | None = typer.Option(
        None, help="FIRST,LAST addresses for unknown machines (full mode) [config]"
    ),
) -> None:
    """Serve DHCP, TFTP and HTTP boot files live from the inventory, until SIGTERM/SIGINT."""
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
    if cfg.server_url == Settings.server_url and options.address not in ("0.0.0.0", ""):
        # No server URL configured: nodes reach corral where it listens.
        cfg = replace(cfg, server_url=f"http://{options.address}:{options.http_port}")
    run_server(cfg, engine(), options)
