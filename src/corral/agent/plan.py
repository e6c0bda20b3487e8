"""The install plan: what corral's server tells a node's agent to do, and how it answers.

The server builds a plan with :meth:`Plan.to_dict` and serves it as JSON; the agent reads it
with :meth:`Plan.from_dict`. Both sides import this module, so it is stdlib-only like the
rest of the agent.

The conversation, all over HTTP with ``Authorization: Bearer <node token>``:

``GET  /api/v1/nodes/{node}/plan?wait=SECONDS``
    200 with a plan, or 204 when the node has nothing to do (the agent asks again). With
    ``wait``, corral holds the request up to that long and answers as soon as there is a
    plan (a chain forms when its last node asks: the others learn it then).
``POST /api/v1/deployments/{deployment}/nodes/{node}/progress``
    a :class:`Progress` as JSON, about once a second and at every change of phase; the
    answer is ``{"cancel": bool}`` (true: stop, the deployment was cancelled).
``GET  {transport.params["base"]}/chunks/{index:08d}.bin`` (transport ``http``)
    one chunk of the image's zstd tar stream (of its squashfs for a diskless boot, whose
    base ends in ``/squashfs``); ``Range: bytes=N-`` resumes inside it.

A chunk is checked against ``image.chunks[index].sha256`` before its bytes are unpacked;
a chunk that does not match is fetched again (``Settings.tries`` times), and the whole
stream is checked against ``image.stream_sha256`` at the end.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Chunk:
    sha256: str
    size: int


@dataclass(frozen=True)
class ImageInfo:
    ref: str  # NAME:VERSION
    stream_sha256: str  # of the whole compressed stream
    stream_size: int
    chunk_size: int
    chunks: list[Chunk]
    tree_bytes: int  # unpacked size: what the root filesystem must hold
    files: int


@dataclass(frozen=True)
class TransportInfo:
    """``name`` picks the agent's receiver; ``params`` are that receiver's own.

    - ``http``: ``{"base": "http://server:port/images/NAME/VERSION"}``
    - ``rsync``: ``{"url": "rsync://server:port/MODULE/"}``
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Partition:
    mount: str  # "/", "/boot", "swap", "biosboot" ...
    fstype: str  # ext4, xfs, vfat, efi, swap, biosboot
    size_mb: int
    grow: bool = False


@dataclass(frozen=True)
class Disk:
    #: Block device to install on; "" means the first disk the agent finds.
    device: str
    label: str  # "gpt" or "dos"
    partitions: list[Partition]
    #: erase a partition table corral did not make (the profile's wipe_disk)
    wipe: bool = False


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str | None
    ip: str | None  # None: DHCP
    netmask: str
    gateway: str | None


@dataclass(frozen=True)
class Identity:
    hostname: str
    interfaces: list[Interface]
    #: file name under /etc/ssh -> content (private keys and their .pub), kept by the
    #: server so that a re-deployed node keeps its host keys
    ssh_host_keys: dict[str, str]
    authorized_keys: list[str]  # for root
    root_password_hash: str | None
    #: /etc/machine-id; "" lets systemd make one at first boot (an installed node), a
    #: diskless node gets the same one at every boot
    machine_id: str = ""


@dataclass(frozen=True)
class Diskless:
    """How a diskless node runs its image: the squashfs in RAM under a tmpfs overlay."""

    #: the overlay's tmpfs: MiB ("2048") or a share of RAM ("25%")
    overlay_size: str = "25%"
    #: paths kept on a local partition (``/var/log``, ``/scratch``); none: no disk is touched
    persistent: list[str] = field(default_factory=list)
    #: the file system label the partition is found by
    label: str = "corral-state"
    #: the disk that gets the partition when none has it; "" means the first disk
    device: str = ""
    #: a disk holding something that is not corral's may be erased for it (wipe_disk)
    wipe: bool = False


@dataclass(frozen=True)
class Plan:
    deployment: int
    node: str
    image: ImageInfo
    transport: TransportInfo
    disk: Disk
    identity: Identity
    bootloader: str  # "grub" or "none"
    post_script: str  # bash, run in the installed system's chroot; "" for none
    report_interval: float = 1.0
    #: words added to the installed system's kernel command line (by its GRUB config)
    kernel_args: list[str] = field(default_factory=list)
    #: "install" (the image onto the disk) or "diskless" (the squashfs into RAM, then run)
    mode: str = "install"
    diskless: Diskless | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Build a plan from its JSON form; raises ValueError naming a missing or bad key."""
        try:
            image = dict(data["image"])
            image["chunks"] = [Chunk(**c) for c in image["chunks"]]
            disk = dict(data["disk"])
            disk["partitions"] = [Partition(**p) for p in disk["partitions"]]
            identity = dict(data["identity"])
            identity["interfaces"] = [Interface(**i) for i in identity["interfaces"]]
            return cls(
                deployment=int(data["deployment"]),
                node=str(data["node"]),
                image=ImageInfo(**image),
                transport=TransportInfo(**data["transport"]),
                disk=Disk(**disk),
                identity=Identity(**identity),
                bootloader=str(data["bootloader"]),
                post_script=str(data.get("post_script", "")),
                report_interval=float(data.get("report_interval", 1.0)),
                kernel_args=[str(a) for a in data.get("kernel_args", [])],
                mode=str(data.get("mode", "install")),
                diskless=Diskless(**data["diskless"]) if data.get("diskless") else None,
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed plan: {exc}") from None


@dataclass(frozen=True)
class Progress:
    """One report of a node's progress in a deployment."""

    phase: str
    bytes: int = 0  # image bytes received so far (compressed stream, or rsync's count)
    total: int = 0  # bytes expected; 0 when unknown
    message: str = ""
    #: the last lines of the agent's log, sent with ``failed`` (and ``done``)
    log_tail: str = ""
    #: with ``done``: the installed system will report its first boot (corral's unit)
    first_boot: bool = False
    #: with ``done``: the agent reboots the machine now, into the installed system
    reboot: bool = False
    #: the tag of the transfer session the node's receiver has just joined (multicast)
    joined: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
