from __future__ import annotations

import pytest

from corral.errors import InvalidValue
from corral.inventory.schema import DistroSpec, InterfaceSpec, NodeSpec, ProfileSpec, parse


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("52:54:00:AA:bb:cc", "52:54:00:aa:bb:cc"),
        ("52-54-00-aa-bb-cc", "52:54:00:aa:bb:cc"),
        ("525400aabbcc", "52:54:00:aa:bb:cc"),
    ],
)
def test_mac_spellings_are_normalised(given: str, stored: str) -> None:
    assert InterfaceSpec(mac=given).mac == stored


@pytest.mark.parametrize("mac", ["52:54:00:aa:bb", "zz:54:00:aa:bb:cc", "52:54-00:aa:bb:cc"])
def test_invalid_mac_is_refused_with_its_value(mac: str) -> None:
    with pytest.raises(InvalidValue, match=f"invalid MAC address '{mac}'"):
        parse(NodeSpec, {"name": "n1", "interfaces": [{"mac": mac}]}, "node n1")


def test_invalid_ip_names_the_field_and_value() -> None:
    with pytest.raises(InvalidValue) as info:
        parse(NodeSpec, {"name": "n1", "interfaces": [{"ip": "10.0.0.300"}]}, "node n1")
    assert str(info.value) == "node n1: interfaces.0.ip: invalid IPv4 address '10.0.0.300'"


def test_netmask_accepts_prefix_length() -> None:
    assert InterfaceSpec(netmask="/20").netmask == "255.255.240.0"


def test_unknown_field_is_refused() -> None:
    with pytest.raises(InvalidValue, match="node n1: colour: unknown field"):
        parse(NodeSpec, {"name": "n1", "colour": "red"}, "node n1")


def test_names_are_restricted() -> None:
    with pytest.raises(InvalidValue, match="invalid name 'a b'"):
        parse(NodeSpec, {"name": "a b"}, "node")


def test_root_password_must_be_a_sha512_crypt_hash() -> None:
    with pytest.raises(InvalidValue, match=r"SHA-512 crypt hash"):
        parse(ProfileSpec, {"name": "p", "root_password_hash": "plaintext"}, "profile p")


def test_kickstart_distro_needs_a_known_version() -> None:
    base = {"name": "d", "family": "rhel", "kernel": "k", "initrd": "i"}
    parse(DistroSpec, dict(base, os_version="RHEL9"), "distro d")
    with pytest.raises(InvalidValue, match="os_version 'RHEL99'"):
        parse(DistroSpec, dict(base, os_version="RHEL99"), "distro d")
    # Debian versions are not kickstart versions and are not checked against pykickstart.
    parse(DistroSpec, dict(base, family="debian", os_version="bookworm"), "distro d")
