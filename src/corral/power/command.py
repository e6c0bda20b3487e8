"""The ``command`` driver: the administrator's own command line, as ``power_command`` was.

The line is split into words like a shell would (shlex), then ``{node}`` and ``{action}``
are filled into each word, so that a node's name is one word whatever it holds; it runs
without a shell, through :func:`corral.run.run`, within the node's deadline.

A line without ``{action}`` is the old ``power_command``, which reboots a node: it runs for
cycle and on, and off and status are refused with the reason. The state is the first word
of what the command prints, when that is "on" or "off".
"""

from __future__ import annotations

import shlex

from corral.errors import CommandFailed, CorralError
from corral.power.model import (
    BMC_ERROR,
    CONFIG,
    TIMEOUT,
    Answer,
    Bmc,
    Deadline,
    Driver,
    PowerContext,
    PowerFailure,
)
from corral.run import run


def command_argv(line: str, node: str, action: str) -> list[str]:
    return [w.replace("{node}", node).replace("{action}", action) for w in shlex.split(line)]


class CommandDriver(Driver):
    name = "command"

    def run(
        self, bmc: Bmc, action: str, *, netboot: bool, deadline: Deadline, context: PowerContext
    ) -> Answer:
        line = bmc.command or ""
        if "{action}" not in line and action in ("off", "status"):
            raise PowerFailure(CONFIG, "the power command has no {action}: status and off need one")
        argv = command_argv(line, bmc.node, action)
        what = f"the power command ({argv[0]})"
        try:
            proc = run(argv, check=False, timeout=deadline.left(what))
        except CommandFailed as exc:
            raise PowerFailure(
                TIMEOUT, f"{what} did not finish within {deadline.seconds:g} s"
            ) from exc
        except CorralError as exc:
            raise PowerFailure(CONFIG, f"{exc.message}: fix power.command") from exc
        if proc.returncode != 0:
            said = [line for line in proc.stderr.splitlines() if line.strip()]
            tail = said[-1].strip() if said else "nothing on stderr"
            raise PowerFailure(BMC_ERROR, f"{what} exited with {proc.returncode}: {tail}")
        words = proc.stdout.split()
        first = words[0].strip(".,:;!").lower() if words else ""
        return Answer(first if first in ("on", "off") else None)
