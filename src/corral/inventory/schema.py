"""The inventory's fields, declared once.

These models are the cluster file format, the shape the store keeps and returns, and
(later) the REST API's schema. Validation lives here and nowhere else.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from collections.abc import Iterator
from enum import StrEnum
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from corral.errors import InvalidValue

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}([:-]?)[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")
_SHA512_CRYPT_RE = re.compile(r"^\$6\$(rounds=\d+\$)?[./0-9A-Za-z]{1,16}\$[./0-9A-Za-z]{86}$")


def _name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            f"invalid name '{value}': use letters, digits, '-', '_' or '.', "
            "starting with a letter or digit, at most 63 characters"
        )
    return value


def normalize_mac(value: str) -> str:
    """Return ``aa:bb:cc:dd:ee:ff`` for any common spelling, or raise ValueError."""
    text = value.strip().lower()
    if not _MAC_RE.match(text):
        raise ValueError(
            f"invalid MAC address '{value}': expected six hex pairs like 52:54:00:12:34:56"
        )
    digits = re.sub(r"[:-]", "", text)
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def _unicast_mac(value: str) -> str:
    """A MAC a network card can have: not the broadcast one, not a multicast group."""
    if value == "ff:ff:ff:ff:ff:ff":
        raise ValueError(f"MAC address {value} is the broadcast address: give the node's own")
    if int(value[:2], 16) & 1:
        raise ValueError(
            f"MAC address {value} is a multicast address (its first octet is odd): "
            "give the node's own"
        )
    if value == "00:00:00:00:00:00":
        raise ValueError(f"MAC address {value} is not a card's address: give the node's own")
    return value


def _ipv4(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value.strip()))
    except ValueError:
        raise ValueError(f"invalid IPv4 address '{value}'") from None


def _number(address: str) -> int:
    """An address already in dotted-quad form (as validated) as a number: faster than
    ipaddress, which every sync's validation of every node would pay for."""
    return int.from_bytes(socket.inet_aton(address), "big")


def _host_ipv4(value: str) -> str:
    """An address a host can be given: not 0.0.0.0, broadcast, loopback or multicast."""
    address = _ipv4(value)
    number = _number(address)
    first = number >> 24
    why = (
        "the unspecified address"
        if number == 0
        else "the broadcast address"
        if number == 0xFFFFFFFF
        else "a loopback address"
        if first == 127
        else "a multicast address"
        if 224 <= first <= 239
        else ""
    )
    if why:
        raise ValueError(f"IPv4 address {address} is {why}: give a host's address")
    return address


def _netmask(value: str) -> str:
    text = value.strip().lstrip("/")
    try:
        return str(ipaddress.IPv4Network(f"0.0.0.0/{text}").netmask)
    except ValueError:
        raise ValueError(f"invalid netmask '{value}': use 255.255.255.0 or 24") from None


def _profile_ref(value: str) -> str:
    _name(value.removeprefix("~"))
    return value


def _sha512_crypt(value: str) -> str:
    if not _SHA512_CRYPT_RE.match(value):
        raise ValueError(
            "root_password_hash must be a SHA-512 crypt hash ($6$...); "
            "set a password with 'corral profile set NAME --root-password'"
        )
    return value


#: The serialized (JSON) size a profile's, group's or node's variables may reach: ample for
#: settings, and a bound on what one entry can make the database store and every render read.
MAX_VARIABLES_BYTES = 64 * 1024
#: The variable that names a node's rack, a group: rack-aware transports order by it.
RACK = "rack"

_CONTROL_NAMES = {"\n": "a newline", "\r": "a carriage return", "\t": "a tab", "\0": "a NUL"}


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """Every string inside ``value`` (dict keys included), with where it sits."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key, where)
            yield from _strings(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for n, item in enumerate(value):
            yield from _strings(item, f"{where}.{n}")


#: Unicode's control characters (category Cc), all of them, and all but newline and tab.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")
_BODY_CONTROLS_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _control_character(text: str, body: bool) -> str | None:
    found = (_BODY_CONTROLS_RE if body else _CONTROLS).search(text)
    if found is None:
        return None
    char = found.group()
    return _CONTROL_NAMES.get(char, f"control character U+{ord(char):04X}")


def _variables_size(value: dict[str, Any]) -> dict[str, Any]:
    if not value:
        return value
    size = len(json.dumps(value, separators=(",", ":"), default=str))
    if size > MAX_VARIABLES_BYTES:
        raise ValueError(
            f"variables take {size} bytes, more than the {MAX_VARIABLES_BYTES} allowed; "
            "keep large data in files or snippets"
        )
    return value


Name = Annotated[str, AfterValidator(_name)]
Mac = Annotated[str, AfterValidator(normalize_mac), AfterValidator(_unicast_mac)]
IPv4 = Annotated[str, AfterValidator(_ipv4)]
HostIPv4 = Annotated[str, AfterValidator(_host_ipv4)]
Netmask = Annotated[str, AfterValidator(_netmask)]
ProfileRef = Annotated[str, AfterValidator(_profile_ref)]
Sha512Crypt = Annotated[str, AfterValidator(_sha512_crypt)]
Variables = Annotated[
    dict[Annotated[str, AfterValidator(_name)], Any], AfterValidator(_variables_size)
]
M = TypeVar("M", bound=BaseModel)


class Spec(BaseModel):
    """Base of every inventory model.

    Every text field reaches a line-based file (an iPXE script, a pxelinux or GRUB menu, a
    kickstart, a shell script), where a newline starts a command of its own. So no text
    may hold a control character, except the script bodies named in ``MULTILINE``, which
    may hold newlines and tabs.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    MULTILINE: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="after")
    def _no_control_characters(self) -> Spec:
        for field, value in self.__dict__.items():  # the fields' values, fast
            if isinstance(value, str):
                if _CONTROLS.search(value) is None:
                    continue  # the common case, without the walk below
            elif not value or not isinstance(value, (list, dict)):
                continue  # numbers, flags, None, nested Specs (checked on their own)
            elif all(isinstance(item, Spec) for item in value):
                continue
            body = field in self.MULTILINE
            for where, text in _strings(value, field):
                found = _control_character(text, body)
                if found:
                    fix = (
                        "; save the snippet with Unix line endings"
                        if body and found == _CONTROL_NAMES["\r"]
                        else ""
                        if body
                        else "; only pre/post snippets may span lines"
                    )
                    raise ValueError(f"{where}: {found} is not allowed here{fix}")
        return self


class Family(StrEnum):
    RHEL = "rhel"
    FEDORA = "fedora"
    DEBIAN = "debian"
    UBUNTU = "ubuntu"

    @property
    def uses_kickstart(self) -> bool:
        return self in (Family.RHEL, Family.FEDORA)


class InstallMethod(StrEnum):
    KICKSTART = "kickstart"
    IMAGE = "image"
    DISKLESS = "diskless"


class BootLoader(StrEnum):
    IPXE = "ipxe"
    PXELINUX = "pxelinux"
    GRUB = "grub"


class DistroSpec(Spec):
    name: Name
    family: Family
    os_version: str = Field(description="OS version for validation, e.g. RHEL9 or F40")
    arch: str = Field("x86_64", pattern=r"^(x86_64|aarch64)$")
    kernel: str = Field(description="kernel path or URL")
    initrd: str = Field(description="initrd path or URL")
    install_tree: str | None = Field(None, description="install tree URL")

    @model_validator(mode="after")
    def _known_version(self) -> DistroSpec:
        if self.family.uses_kickstart:
            from pykickstart.errors import KickstartVersionError
            from pykickstart.version import stringToVersion

            try:
                stringToVersion(self.os_version)
            except KickstartVersionError:
                raise ValueError(
                    f"os_version '{self.os_version}' is not a kickstart version pykickstart "
                    "knows; use e.g. RHEL8, RHEL9, RHEL10 or F40"
                ) from None
        return self


class Partition(Spec):
    mount: str = Field(pattern=r"^(/[^\s]*|swap|biosboot)$")
    fstype: str = Field("xfs", pattern=r"^(xfs|ext4|ext3|vfat|efi|swap|biosboot)$")
    size_mb: int = Field(1024, ge=1)
    grow: bool = False


class Repo(Spec):
    name: Name
    baseurl: str = Field(pattern=r"^(https?|ftp|file)://\S+$")


class PowerDriver(StrEnum):
    IPMI = "ipmi"  # IPMI 2.0 over LAN (lanplus)
    REDFISH = "redfish"
    COMMAND = "command"  # the administrator's own command line
    TESTBED = "testbed"  # corral's virtual cluster
    MANUAL = "manual"  # nothing to drive: corral says whom to power on


#: What ``corral export`` and every view show instead of a stored BMC password; ``corral
#: apply`` and ``set`` take it to mean "keep the one stored".
STORED = "(stored)"
#: The context that dumps a spec with its sealed secrets: only the store writes it so.
WITH_SECRETS = {"secrets": True}


class PowerSpec(Spec):
    """How corral powers a node: a driver and its BMC. Set on a profile, a group or the
    node; each field set more specifically wins (profile < group < node), so a group can
    hold the driver, user and password and each node its own address."""

    driver: PowerDriver | None = None
    address: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9\[][A-Za-z0-9._:/\[\]%-]*$",
        description="the BMC: host or host:port (IPMI), URL or host (Redfish)",
    )
    user: str | None = Field(None, min_length=1, max_length=64)
    password: str | None = Field(
        None, min_length=1, max_length=4096, description="kept encrypted; shown as (stored)"
    )
    system: str | None = Field(
        None, pattern=r"^[A-Za-z0-9/._-]+$", description="Redfish system id (default: the only one)"
    )
    cipher_suite: int | None = Field(None, ge=0, le=17, description="IPMI lanplus cipher suite")
    command: str | None = Field(
        None, min_length=1, description="command driver: a command line with {node} and {action}"
    )
    verify_tls: bool | None = Field(
        None,
        description="Redfish: check the BMC's TLS certificate (default: no, most are self-signed)",
    )

    @model_serializer(mode="wrap")
    def _hide_password(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("password") is not None and not (info.context or {}).get("secrets"):
            data["password"] = STORED
        return data


class ProfileSpec(Spec):
    name: Name
    distro: Name | None = None
    # Image installs: the image (NAME or NAME:VERSION) and the layers to put on it.
    image: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9._-]*(:[0-9]+)?$")
    layers: list[Name] = []
    kernel_args: list[str] = []
    kickstart_template: str | None = Field(None, description="template file name")
    disk: str | None = Field(None, pattern=r"^[A-Za-z0-9/_.-]+$")
    partitions: list[Partition] = []
    packages: list[str] = []
    repos: list[Repo] = []
    MULTILINE = frozenset({"pre", "post"})

    pre: list[str] = Field([], description="pre-install script snippets (bash)")
    post: list[str] = Field([], description="post-install script snippets (bash)")
    root_password_hash: Sha512Crypt | None = None
    timezone: str | None = None
    power: PowerSpec | None = None
    variables: Variables = {}


class InterfaceSpec(Spec):
    name: Name = "eth0"
    mac: Mac | None = None
    ip: HostIPv4 | None = None
    netmask: Netmask = "255.255.255.0"
    gateway: HostIPv4 | None = None
    vlan: int | None = Field(None, ge=1, le=4094)
    bond_members: list[Name] = []

    @model_validator(mode="after")
    def _addresses_fit_the_subnet(self) -> InterfaceSpec:
        # In integers: ipaddress's network objects cost more than the rest of a node's
        # validation, and every sync validates every node.
        if self.ip is None:
            return self
        mask = _number(self.netmask)
        network = _number(self.ip) & mask
        broadcast = network | (~mask & 0xFFFFFFFF)

        def subnet() -> str:
            return f"{ipaddress.IPv4Address(network)}/{mask.bit_count()}"

        for field, value in (("ip", self.ip), ("gateway", self.gateway)):
            number = _number(value) if value else None
            # /31 and /32 have no network or broadcast address
            if number in (network, broadcast) and broadcast - network > 1:
                which = "network" if number == network else "broadcast"
                raise ValueError(
                    f"{field} {value} is the {which} address of {subnet()}: "
                    "no host may have it (start a range elsewhere, or change the netmask)"
                )
        if self.gateway and _number(self.gateway) & mask != network:
            raise ValueError(
                f"gateway {self.gateway} is outside the interface's subnet {subnet()} "
                f"(ip {self.ip}, netmask {self.netmask}): fix the gateway or the netmask"
            )
        return self


class NodeSpec(Spec):
    name: Name
    interfaces: list[InterfaceSpec] = []
    groups: list[Name] = []
    profiles: list[ProfileRef] = []
    variables: Variables = {}
    install_method: InstallMethod = InstallMethod.KICKSTART
    netboot: bool = True
    # What DHCP hands this machine: iPXE, or pxelinux / GRUB (UEFI) for sites using them.
    boot_loader: BootLoader = BootLoader.IPXE
    power: PowerSpec | None = None


class GroupSpec(Spec):
    name: Name
    profiles: list[ProfileRef] = []
    power: PowerSpec | None = None
    variables: Variables = {}


class ClusterSpec(Spec):
    """A whole cluster file: what ``corral apply`` takes and ``corral export`` gives."""

    distros: list[DistroSpec] = []
    profiles: list[ProfileSpec] = []
    groups: list[GroupSpec] = []
    nodes: list[NodeSpec] = []


def describe(exc: ValidationError, what: str) -> str:
    """One line naming the first problem in a validation error."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    return f"{what}: {where}: {msg}" if where else f"{what}: {msg}"


def parse(model: type[M], data: Any, what: str) -> M:
    """Validate ``data`` as ``model``, raising :class:`InvalidValue` with one clear line."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidValue(describe(exc, what)) from None
