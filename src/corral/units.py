"""Quantities as people read them, for the CLI and for the messages the server stores."""

from __future__ import annotations


def human_size(size: float) -> str:
    """Bytes in decimal units: ``512 B``, ``15.0 kB``, ``4.2 MB``, ``1.2 GB``."""
    if size < 1000:
        return f"{size:.0f} B"
    for unit in ("kB", "MB", "GB", "TB"):
        size /= 1000
        if round(size, 1) < 1000 or unit == "TB":
            break
    return f"{size:.1f} {unit}"
