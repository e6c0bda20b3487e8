"""The Jinja2 environment: packaged templates, overridable file by file by a site."""

from __future__ import annotations

import hashlib
from pathlib import Path

import jinja2

from corral.errors import RenderError

PACKAGED = Path(__file__).parent / "templates"


def make_environment(site_dir: Path | None) -> jinja2.Environment:
    search = [str(site_dir)] if site_dir and site_dir.is_dir() else []
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader([*search, str(PACKAGED)]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
        auto_reload=False,
    )


def load_template(env: jinja2.Environment, name: str) -> jinja2.Template:
    try:
        return env.get_template(name)
    except jinja2.TemplateSyntaxError as exc:
        raise RenderError(
            f"template {exc.filename or exc.name or name}:{exc.lineno}: {exc.message}",
            "fix the template's syntax",
        ) from None
    except jinja2.TemplateNotFound as exc:
        raise RenderError(
            f"template '{exc.name}' not found",
            f"put it in the site template directory or use one of: {', '.join(packaged_names())}",
        ) from None


def packaged_names() -> list[str]:
    return sorted(p.name for p in PACKAGED.iterdir() if p.suffix == ".j2")


def fingerprint(site_dir: Path | None) -> str:
    """Changes whenever a template that rendering may use changes."""
    digest = hashlib.sha256()
    dirs = [PACKAGED] + ([site_dir] if site_dir and site_dir.is_dir() else [])
    for directory in dirs:
        for path in sorted(directory.iterdir()):
            if path.is_file():
                digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
