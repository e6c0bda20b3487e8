"""Noderanges as cluster administrators write them: ``r[1-4]n[01-32],head,-r2n07``.

An item is a name pattern whose ``[...]`` groups hold comma lists of numbers and ranges;
several groups form a cartesian product. Top-level items are unioned in order, and an item
starting with ``-`` removes its names from the result so far.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable
from typing import TypeAlias

from corral.errors import NodeRangeError

__all__ = ["MAX_NODES", "NodeRangeError", "expand", "fold", "is_noderange", "numbered"]

MAX_NODES: int = 100_000

_LITERAL = re.compile(r"[A-Za-z0-9._-]*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DIGITS = re.compile(r"[0-9]+")
_BRACKET = re.compile(r"(\[[^\]]*\])")
_NUMERIC_SUFFIX = re.compile(r"(.*?)([0-9]+)")

# A bracket group is a list of (low, high, width) ranges; width is the zero-padded width
# taken from the lower bound as written.
_Range: TypeAlias = tuple[int, int, int]
_Segment: TypeAlias = str | list[_Range]


def _error(text: str, problem: str) -> NodeRangeError:
    return NodeRangeError(f"bad noderange '{text}': {problem}")


def _split_items(text: str) -> list[str]:
    """Split on top-level commas, checking bracket balance and nesting."""
    items: list[str] = []
    depth = start = 0
    for pos, char in enumerate(text):
        if char == "[":
            if depth:
                raise _error(text, f"nested bracket at position {pos}")
            depth = 1
        elif char == "]":
            if not depth:
                raise _error(text, f"unbalanced ']' at position {pos}")
            depth = 0
        elif char == "," and not depth:
            items.append(text[start:pos])
            start = pos + 1
    if depth:
        raise _error(text, "unbalanced '['")
    items.append(text[start:])
    return items


def _parse_bracket(text: str, body: str) -> list[_Range]:
    ranges: list[_Range] = []
    for part in body.split(","):
        if not part:
            raise _error(text, f"empty range in '[{body}]'")
        low, _, high = part.partition("-") if "-" in part else (part, "", part)
        if not (_DIGITS.fullmatch(low) and _DIGITS.fullmatch(high)):
            raise _error(text, f"range bounds '{part}' are not numbers")
        if int(low) > int(high):
            raise _error(text, f"range {part} is descending")
        ranges.append((int(low), int(high), len(low)))
    return ranges


def _parse_item(text: str, pattern: str) -> list[_Segment]:
    segments: list[_Segment] = []
    for piece in _BRACKET.split(pattern):
        if piece.startswith("["):
            segments.append(_parse_bracket(text, piece[1:-1]))
        elif piece:
            if not _LITERAL.fullmatch(piece):
                bad = next(c for c in piece if not _LITERAL.fullmatch(c))
                raise _error(text, f"invalid character {bad!r} in '{pattern}'")
            segments.append(piece)
    first = segments[0]
    if isinstance(first, str) and not first[0].isalnum():
        raise _error(text, f"'{pattern}' must start with a letter or digit")
    return segments


def _count(segments: list[_Segment]) -> int:
    return math.prod(
        1 if isinstance(seg, str) else sum(high - low + 1 for low, high, _ in seg)
        for seg in segments
    )


def _names(segments: list[_Segment]) -> list[str]:
    options = [
        [seg]
        if isinstance(seg, str)
        else [f"{n:0{width}d}" for low, high, width in seg for n in range(low, high + 1)]
        for seg in segments
    ]
    return ["".join(parts) for parts in itertools.product(*options)]


def expand(text: str, limit: int = MAX_NODES) -> list[str]:
    """Expand a noderange into its names, in order of first appearance, without duplicates."""
    result: dict[str, None] = {}
    for number, item in enumerate(_split_items(text), start=1):
        exclude = item.startswith("-")
        pattern = item[1:] if exclude else item
        if not pattern:
            raise _error(text, f"item {number} is empty")
        segments = _parse_item(text, pattern)
        # Sized from the parsed ranges so a huge range fails before any name is built.
        count = _count(segments)
        if count > limit:
            raise _error(text, f"'{pattern}' would expand to {count} names (limit {limit})")
        names = _names(segments)
        if exclude:
            for name in names:
                result.pop(name, None)
            continue
        total = len(result) + len({name for name in names if name not in result})
        if total > limit:
            raise _error(text, f"would expand to {total} names (limit {limit})")
        result.update(dict.fromkeys(names))
    return list(result)


def _runs(by_width: dict[int, set[int]]) -> list[list[int]]:
    """Merge the numbers of one prefix into [low, high, width] runs.

    Numbers are keyed by their written width. A run may carry on into the next width only
    with unpadded numbers (n9 -> n10, n099 -> n100), which is how expand() renders them.
    """
    runs: list[list[int]] = []
    for width in sorted(by_width):
        for value in sorted(by_width[width]):
            last = runs[-1] if runs else None
            if (
                last is not None
                and value == last[1] + 1
                and (last[2] == width or value >= 10 ** (width - 1))
            ):
                last[1] = value
            else:
                runs.append([value, value, width])
    return sorted(runs)


def fold(names: Iterable[str]) -> str:
    """Compress names into a noderange; ``set(expand(fold(x))) == set(x)``."""
    plain: list[tuple[str, int, str]] = []
    groups: dict[str, dict[int, set[int]]] = {}
    for name in set(names):
        if not _NAME.fullmatch(name):
            raise NodeRangeError(f"cannot fold invalid node name '{name}'")
        match = _NUMERIC_SUFFIX.fullmatch(name)
        if match is None:
            plain.append((name, -1, name))
            continue
        prefix, digits = match.groups()
        groups.setdefault(prefix, {}).setdefault(len(digits), set()).add(int(digits))
    items = plain
    for prefix, by_width in groups.items():
        runs = _runs(by_width)
        parts = [
            f"{low:0{width}d}" if low == high else f"{low:0{width}d}-{high:0{width}d}"
            for low, high, width in runs
        ]
        low, high, _ = runs[0]
        single = len(runs) == 1 and low == high
        text = f"{prefix}{parts[0]}" if single else f"{prefix}[{','.join(parts)}]"
        items.append((prefix, low, text))
    return ",".join(text for _, _, text in sorted(items))


def numbered(name: str) -> tuple[str, int, int] | None:
    """(prefix, number, digits as written) of a name ending in digits (``n007``:
    ``("n", 7, 3)``); None for a name without a number at its end."""
    match = _NUMERIC_SUFFIX.fullmatch(name)
    if match is None:
        return None
    prefix, digits = match.groups()
    return prefix, int(digits), len(digits)


def is_noderange(text: str) -> bool:
    """Whether text is more than a single plain name."""
    return "[" in text or "," in text or text.startswith("-")
