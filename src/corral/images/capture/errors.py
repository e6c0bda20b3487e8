"""How a capture fails."""

from __future__ import annotations

from corral.images.store import ImageError


class CaptureError(ImageError):
    """A capture that failed during the copy (no version was added)."""


class SourceError(CaptureError):
    """The machine to capture cannot be used as given: unreachable, login refused, no rsync
    there, no such directory, a node without an address (nothing was copied)."""

    exit_code = 2
