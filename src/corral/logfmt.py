"""How corral's log lines are written: one record, one line.

Log messages quote what clients send (URL paths, MACs, node names); a control
character in one of them must not start a forged line or move the terminal's cursor,
so the message part of every line shows them escaped (``\\n``, ``\\x1b``).
Tracebacks, which only ``--debug`` shows with an error, keep their lines.
"""

from __future__ import annotations

import logging
import re

_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """``text`` with each control character written as an escape sequence."""
    return _CONTROLS.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


class OneLineFormatter(logging.Formatter):
    """A formatter whose messages cannot span lines (see the module's docstring)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)
