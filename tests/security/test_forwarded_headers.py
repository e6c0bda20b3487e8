"""Item 1 of issue 12: a client cannot claim a node's address with X-Forwarded-For, and
a node's SSH host private keys leave corral once per deployment node."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import corral
from tests.security.serving import corral_serve

pytestmark = [pytest.mark.integration, pytest.mark.parallel_safe]

#: c01 of tests/data/cluster.yaml is reserved 10.0.0.11 and armed until it installs.
CLAIM = {"X-Forwarded-For": "10.0.0.11"}


def test_forwarded_for_from_loopback_does_not_make_a_node(
    home: Path, fixture_cluster: None
) -> None:
    with corral_serve(home) as served:
        plain = httpx.get(f"{served.url}/ks/c01")
        claimed = httpx.get(f"{served.url}/ks/c01", headers=CLAIM)
        token = httpx.get(f"{served.url}/boot/token/c01.cpio.gz", headers=CLAIM)
    assert plain.status_code == 403
    assert claimed.status_code == 403, claimed.text[:200]
    assert "CORRAL_TOKEN" not in claimed.text
    assert token.status_code == 403
    assert "refused kickstart of node c01 to 127.0.0.1" in served.output()


def test_a_named_trusted_proxy_is_believed(home: Path, fixture_cluster: None) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "corral.toml").write_text('trusted_proxies = "127.0.0.1"\n')
    with corral_serve(home) as served:
        claimed = httpx.get(f"{served.url}/ks/c01", headers=CLAIM)
    assert claimed.status_code == 200
    assert "CORRAL_TOKEN=" in claimed.text


def test_a_bad_trusted_proxy_is_a_one_line_error(home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "corral.toml").write_text('trusted_proxies = "10.0.0.2, the-proxy"\n')
    result = corral("serve", "--http-port", "0", "--tftp-port", "0", home=home)
    assert result.returncode == 2
    assert "error: bad trusted_proxies entry 'the-proxy'" in result.stderr
    assert "Traceback" not in result.stderr
