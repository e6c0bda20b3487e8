"""How a ramdisk build fails."""

from __future__ import annotations

from corral.errors import CorralError


class RamdiskError(CorralError):
    """The ramdisk could not be built."""
