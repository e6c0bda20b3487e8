"""The ``testbed`` driver: the nodes of corral's virtual cluster (:mod:`corral.testbed`),
powered in this process. Their firmware always boots from the network, so ``netboot``
changes nothing; "on" boots a node as "cycle" does; a node is on while anything runs in
its network namespace."""

from __future__ import annotations

from corral.errors import CorralError
from corral.power.model import (
    BMC_ERROR,
    Answer,
    Bmc,
    Deadline,
    Driver,
    PowerContext,
    PowerFailure,
)


class TestbedDriver(Driver):
    name = "testbed"

    def run(
        self, bmc: Bmc, action: str, *, netboot: bool, deadline: Deadline, context: PowerContext
    ) -> Answer:
        from corral.config import load_settings
        from corral.testbed.cluster import Testbed

        try:
            testbed = Testbed(load_settings(context.home))
            if action != "status":
                testbed.power(bmc.node, action)
            elif testbed.state is None:
                return Answer("off")  # this home's testbed is down (another's may be up)
            what, _ = testbed.node_power(bmc.node)
        except CorralError as exc:
            reason = f"{exc.message}: {exc.hint}" if exc.hint else exc.message
            raise PowerFailure(BMC_ERROR, f"testbed: {reason}") from exc
        return Answer("off" if what == "off" else "on")
