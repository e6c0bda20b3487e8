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


@pytest.mark.parametrize(
    ("mac", "message"),
    [
        ("ff:ff:ff:ff:ff:ff", "is the broadcast address"),
        ("01:00:5e:00:00:01", "is a multicast address"),
        ("33:33:00:00:00:01", "is a multicast address"),
        ("00:00:00:00:00:00", "is not a card's address"),
    ],
)
def test_broadcast_and_multicast_macs_are_refused(mac: str, message: str) -> None:
    with pytest.raises(InvalidValue, match=f"interfaces.0.mac: MAC address {mac} {message}"):
        parse(NodeSpec, {"name": "n1", "interfaces": [{"mac": mac}]}, "node n1")


@pytest.mark.parametrize(
    ("ip", "message"),
    [
        ("0.0.0.0", "the unspecified address"),
        ("255.255.255.255", "the broadcast address"),
        ("127.0.0.1", "a loopback address"),
        ("224.0.0.1", "a multicast address"),
    ],
)
def test_addresses_no_host_can_have_are_refused(ip: str, message: str) -> None:
    with pytest.raises(InvalidValue, match=f"IPv4 address {ip} is {message}"):
        parse(NodeSpec, {"name": "n1", "interfaces": [{"ip": ip}]}, "node n1")


@pytest.mark.parametrize(
    ("iface", "message"),
    [
        ({"ip": "10.0.7.255"}, "ip 10.0.7.255 is the broadcast address of 10.0.7.0/24"),
        ({"ip": "10.0.7.0"}, "ip 10.0.7.0 is the network address of 10.0.7.0/24"),
        ({"ip": "10.0.15.255", "netmask": "20"}, "broadcast address of 10.0.0.0/20"),
        (
            {"ip": "10.0.7.5", "gateway": "10.0.7.255"},
            "gateway 10.0.7.255 is the broadcast address",
        ),
        (
            {"ip": "10.0.7.5", "gateway": "10.0.8.1"},
            "gateway 10.0.8.1 is outside the interface's subnet 10.0.7.0/24",
        ),
    ],
)
def test_interface_addresses_must_fit_their_subnet(iface: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidValue, match=message):
        parse(NodeSpec, {"name": "n1", "interfaces": [iface]}, "node n1")


def test_wide_subnets_and_point_to_point_links_keep_their_addresses() -> None:
    assert InterfaceSpec(ip="10.0.7.255", netmask="16", gateway="10.0.0.1").ip == "10.0.7.255"
    assert InterfaceSpec(ip="10.0.7.0", netmask="31").ip == "10.0.7.0"
    assert InterfaceSpec(gateway="10.9.9.9").gateway == "10.9.9.9"  # no ip: nothing to check
