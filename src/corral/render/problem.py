"""What a checker reports about a generated file."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """Why one generated file is unusable.

    ``path`` is the file's label (e.g. ``kickstart/n001.ks``), ``line`` is 1-based, or 0
    when the checker could not say which line is at fault.
    """

    path: str
    line: int
    message: str


def one_line(text: str) -> str:
    return " ".join(text.split())
