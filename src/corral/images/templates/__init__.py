"""The files that image builds and the deploy ramdisk write, as Jinja2 templates.

They are package data next to this module, rendered with the boot templates' settings
(:func:`corral.render.environment.make_environment`: ``StrictUndefined``, the trailing
newline kept, block lines trimmed) but from this directory alone: a site's template
directory overrides boot files, not what goes into images. Their golden files are in
``tests/golden/images``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jinja2

from corral.render.environment import make_environment

PACKAGED = Path(__file__).parent


@functools.cache
def _environment() -> jinja2.Environment:
    return make_environment(None).overlay(loader=jinja2.FileSystemLoader(str(PACKAGED)))


def render_template(name: str, **context: object) -> str:
    """The packaged template ``name`` rendered with ``context``."""
    return _environment().get_template(name).render(**context)


def packaged_names() -> list[str]:
    return sorted(p.name for p in PACKAGED.iterdir() if p.suffix == ".j2")
