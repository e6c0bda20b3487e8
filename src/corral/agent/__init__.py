"""The node agent: what runs inside corral's deploy ramdisk.

It reads its orders from the kernel command line (``corral.server=``, ``corral.node=``,
``corral.mode=``, ``corral.discover=``, ``corral.agent_exit=``), brings up the network
with busybox ``udhcpc``, reports to corral's server and then waits for further work.

Constraint: this package is copied as-is into the ramdisk, next to a pruned Python
standard library. It imports the standard library only, and nothing from ``corral``
outside ``corral.agent``. Start it with ``python3 -m corral.agent``.
"""
