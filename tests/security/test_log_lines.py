"""Item 7 of issue 12: what clients send cannot forge log lines, and node tokens given in
a URL's query are not written to the access log."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import httpx
import pytest

from corral.logfmt import OneLineFormatter, escape_controls
from corral.serve.server import MaskTokens
from tests.security.serving import corral_serve
from tests.unit.test_access_log import access_record

#: its integration tests share nothing of the host: `make test` runs them on every core
pytestmark = pytest.mark.parallel_safe


def test_control_characters_are_escaped() -> None:
    assert escape_controls("a\nb\r\tc\x1b[31md\x7f") == "a\\nb\\r\\tc\\x1b[31md\\x7f"
    assert escape_controls("plain: /boot/ipxe é") == "plain: /boot/ipxe é"


def test_a_message_is_one_line_whatever_its_arguments() -> None:
    record = logging.LogRecord(
        "corral.serve", logging.INFO, __file__, 1, "unknown MAC %s", ("x\n1999 FORGED",), None
    )
    line = OneLineFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert line == "INFO corral.serve: unknown MAC x\\n1999 FORGED"


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        ("/scripts/c01/post?token=s3cret", "/scripts/c01/post?token=***"),
        ("/scripts/c01/pre?a=1&TOKEN=s3cret&b=2", "/scripts/c01/pre?a=1&TOKEN=***&b=2"),
        ("/boot/ipxe", "/boot/ipxe"),
        ("/x?notatoken=1", "/x?notatoken=1"),
    ],
)
def test_tokens_in_queries_are_masked(path: str, logged: str) -> None:
    record = access_record("GET", path, 200)
    assert MaskTokens().filter(record)
    assert isinstance(record.args, tuple) and record.args[2] == logged


@pytest.mark.integration
def test_the_real_access_log_has_no_token_and_no_forged_line(
    home: Path, fixture_cluster: None
) -> None:
    forged = "2026-01-01 00:00:00,000 WARNING corral.serve: FORGED"
    with corral_serve(home) as served:
        httpx.get(f"{served.url}/scripts/c01/post", params={"token": "s3cret-token"})
        httpx.get(f"{served.url}/boot/zz%0a{forged.replace(' ', '%20')}.ipxe")
        httpx.get(f"{served.url}/boot/52-54-00-00-99-%0a.ipxe")
    log = served.output()
    assert "/scripts/c01/post?token=*** HTTP/1.1" in log
    assert "s3cret-token" not in log
    assert not any(line.startswith(forged[:20]) for line in log.splitlines())
    assert not re.search(r"^\S* ?WARNING corral.serve: FORGED", log, re.M)
