"""One node life cycle: every phase a node goes through, named once for the server and the
agent (both import this module, so it is stdlib-only like the rest of the agent).

A node's *state* says where it stands (``armed``, ``installing``, ``deployed``,
``installed``, ``failed``, ``discovered``: :mod:`corral.inventory.state`); its *phase* says
what it did last. The phases, in the order a node meets them::

    power on, PXE ─▶ booted ─┬─▶ waiting          (deploy ramdisk, no deployment for it yet)
                             │
                             ├─▶ pre-install ─▶ post-install ─▶ install-finished
                             │   (kickstart: the distribution's installer runs)
                             │
                             └─▶ partitioning ─▶ receiving ─▶ configuring ─▶ bootloader
                                 ─▶ post-install ─▶ done ─▶ rebooting | deployed
                                 (image: corral's agent writes it)        └─▶ first-boot

    power on, PXE ─▶ booted ─▶ waiting ─▶ receiving ─▶ configuring ─▶ post-install
                     ─▶ done ─▶ starting ─▶ running
                     (diskless: the squashfs into RAM, the image's systemd comes up)

    any phase ─▶ failed, or cancelled (by the administrator)

``install-finished`` and ``first-boot`` end an install: the node is ``installed``;
``running``, which the diskless system posts once systemd reached multi-user, ends a
diskless boot: the node is ``running``.
``docs/lifecycle.md`` draws the states and says who reports each phase.
"""

from __future__ import annotations

BOOTED = "booted"
WAITING = "waiting"
PRE_INSTALL = "pre-install"
PARTITIONING = "partitioning"
RECEIVING = "receiving"
CONFIGURING = "configuring"
BOOTLOADER = "bootloader"
POST_INSTALL = "post-install"
INSTALL_FINISHED = "install-finished"
DONE = "done"
REBOOTING = "rebooting"
DEPLOYED = "deployed"
FIRST_BOOT = "first-boot"
STARTING = "starting"
RUNNING = "running"
FAILED = "failed"
CANCELLED = "cancelled"

#: What a node itself reports through ``POST /api/v1/nodes/{node}/events``: its ramdisk
#: or installer came up, the kickstart's scripts ran, it failed, its installed system
#: came up (``first-boot``) or its diskless system did (``running``): those two only from
#: the node's own address.
NODE_REPORTS = (BOOTED, PRE_INSTALL, POST_INSTALL, INSTALL_FINISHED, FIRST_BOOT, RUNNING, FAILED)
#: The reports of a system that is up: from the node's own address, once per token.
SYSTEM_UP = (FIRST_BOOT, RUNNING)

#: A node's steps in a deployment, in order, as its agent reports them in its progress.
DEPLOY_STEPS = (
    WAITING,  # armed, the node has not asked for its plan yet
    PARTITIONING,
    RECEIVING,  # image bytes arriving and being unpacked
    CONFIGURING,  # identity: hostname, network, fstab, SSH keys
    BOOTLOADER,
    POST_INSTALL,
    DONE,
    FAILED,
)

#: The phases that end a node's part in a deployment.
FINAL = (DONE, FAILED, CANCELLED)

#: Every phase, in life-cycle order.
LIFE_CYCLE = (
    BOOTED,
    WAITING,
    PRE_INSTALL,
    PARTITIONING,
    RECEIVING,
    CONFIGURING,
    BOOTLOADER,
    POST_INSTALL,
    INSTALL_FINISHED,
    DONE,
    REBOOTING,
    DEPLOYED,
    FIRST_BOOT,
    STARTING,
    RUNNING,
    FAILED,
    CANCELLED,
)
