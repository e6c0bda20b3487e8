"""The ``corral`` command."""

from __future__ import annotations

import logging
import sys

import typer

from corral.cli import (
    boot,
    cluster,
    deploy,
    distro,
    group,
    image,
    layer,
    node,
    profile,
    ramdisk,
    serve,
    testbed,
    watch,
)
from corral.cli.common import err, out
from corral.errors import CorralError
from corral.logfmt import OneLineFormatter
from corral.run import unwind_on_sigterm

app = typer.Typer(
    help="corral provisions clusters from bare metal.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Help as plain text, for every subcommand: Rich markup would swallow a help text's
    # "[config: address]" and show each --flag/--no-flag pair as taking a "<bool>".
    rich_markup_mode=None,
)
app.add_typer(distro.app, name="distro")
app.add_typer(profile.app, name="profile")
app.add_typer(group.app, name="group")
app.add_typer(node.app, name="node")
app.add_typer(image.app, name="image")
app.add_typer(layer.app, name="layer")
app.add_typer(ramdisk.app, name="ramdisk")
app.add_typer(testbed.app, name="testbed")
app.command("apply")(cluster.apply)
app.command("export")(cluster.export)
app.command("render")(boot.render)
app.command("sync")(boot.sync)
app.command("serve")(serve.serve)
app.command("deploy")(deploy.deploy)
app.command("boot")(deploy.boot)
app.add_typer(deploy.app, name="deployment")
app.command("watch")(watch.watch)

_debug = False


def _version(given: bool) -> None:
    if given:
        from corral import __version__

        out.print(f"corral {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="log commands run and show tracebacks"),
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_version, help="print the version and exit"
    ),
) -> None:
    global _debug
    _debug = debug
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler])
    if not debug:  # a fresh database's migrations are not news
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # corral watch's requests


def main() -> None:
    unwind_on_sigterm()
    try:
        app()
    except CorralError as exc:
        if _debug:
            raise
        err.print(f"error: {exc.message}", markup=False)
        if exc.hint:
            err.print(f"hint: {exc.hint}", markup=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        sys.exit(130)
