"""The ``manual`` driver: a node with no BMC corral drives. Nothing is sent anywhere; the
outcome (ok, why "manual") tells a person what to do."""

from __future__ import annotations

from corral.power.model import MANUAL, Answer, Bmc, Deadline, Driver, PowerContext


def instruction(node: str, action: str, netboot: bool) -> str:
    boot = ", and have it boot from the network (PXE)" if netboot else ""
    return {
        "on": f"switch {node} on yourself{boot}: corral drives no BMC for it",
        "cycle": f"reboot {node} yourself (or switch it on){boot}: corral drives no BMC for it",
        "off": f"switch {node} off yourself: corral drives no BMC for it",
        "status": f"look at {node} yourself: corral drives no BMC for it, so it cannot tell",
    }[action]


class ManualDriver(Driver):
    name = "manual"

    def run(
        self, bmc: Bmc, action: str, *, netboot: bool, deadline: Deadline, context: PowerContext
    ) -> Answer:
        return Answer(None, instruction(bmc.node, action, netboot), MANUAL)
