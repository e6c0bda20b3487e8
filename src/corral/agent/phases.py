"""One node life cycle: every phase a node goes through, named once for the server and the
agent (both import this module, so it is stdlib-only like the rest of the agent).

A node's *state* says where it stands (``armed``, ``installing``, ``deployed``,
``installed``, ``failed``, ``discovered``: :mod:`corral.inventory.state`); its *phase* says
what it did last. The phases, in the order a node meets them::

    power ─▶ dhcp ─▶ loader ─▶ boot-config ─▶ kernel ─▶ initrd   (what corral did and served)

    ─▶ booted ─┬─▶ waiting          (deploy ramdisk, no deployment for it yet)
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

#: A power operation corral ran on the node (on, off, cycle through its BMC): a phase of
#: its own, before any boot step; also the reason of a node failed by one (:data:`POWER`).
POWER_OPERATION = "power"

#: The boot steps corral serves a node before its own software runs, recorded by the server
#: (dnsmasq's DHCP log, the TFTP server, the HTTP boot routes): DHCP acknowledged an address,
#: the network boot program (ipxe.efi, pxelinux.0, grubx64.efi) was sent, then its
#: configuration (iPXE script, pxelinux.cfg, grub.cfg), then the kernel and the initrd.
DHCP = "dhcp"
LOADER = "loader"
BOOT_CONFIG = "boot-config"
KERNEL = "kernel"
INITRD = "initrd"
BOOT_STEPS = (DHCP, LOADER, BOOT_CONFIG, KERNEL, INITRD)

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
    POWER_OPERATION,
    *BOOT_STEPS,
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

#: Why a node failed, for machines (metrics, scripts): every failure event carries one.
TIMEOUT = "timeout"  # a phase lasted longer than its timeout (corral.toml)
SILENT = "silent"  # no report for deploy_node_timeout mid-deployment: dead or cut off
NODE_ERROR = "node-error"  # the node's agent or installer reported the failure
POWER = "power"  # its BMC or power command failed (also the phase of a power operation)
NO_IMAGE = "no-image"  # corral could not serve its image
REFUSED = "refused"  # corral refused the node (diskless: RAM, disk), with the fix
REMOVED = "removed"  # the node left the inventory mid-deployment
REASONS = (TIMEOUT, SILENT, NODE_ERROR, POWER, NO_IMAGE, REFUSED, REMOVED)
