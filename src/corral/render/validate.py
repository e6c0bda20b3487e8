"""Checking generated boot files before they are written.

Kickstarts are parsed by pykickstart for the distro's version (:mod:`kscheck`), GRUB
scripts by the real ``grub-script-check`` (:mod:`grubcheck`). Both are built for a full
sync's thousands of files.
"""

from corral.render.grubcheck import GRUB_SCRIPT_CHECK, check_grub
from corral.render.kscheck import (
    PARALLEL_THRESHOLD,
    KickstartValidator,
    check_kickstarts,
    get_validator,
)
from corral.render.problem import Problem

__all__ = [
    "GRUB_SCRIPT_CHECK",
    "PARALLEL_THRESHOLD",
    "KickstartValidator",
    "Problem",
    "check_grub",
    "check_kickstarts",
    "get_validator",
]
