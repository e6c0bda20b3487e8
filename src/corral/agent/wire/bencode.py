"""BitTorrent's bencoding (BEP 3), the encoding half: what corral's torrents and its
tracker's answers are written in (libtorrent decodes them). Stdlib only."""

from __future__ import annotations

from typing import Any


def bencode(value: Any) -> bytes:
    """BitTorrent's encoding (BEP 3) of ints, bytes, str, lists and dicts (keys sorted)."""
    out: list[bytes] = []

    def put(v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int | bytes | str | list | tuple | dict):
            raise TypeError(f"cannot bencode {type(v).__name__}")
        if isinstance(v, int):
            out.append(b"i%de" % v)
        elif isinstance(v, str | bytes):
            raw = v.encode() if isinstance(v, str) else v
            out.append(b"%d:" % len(raw) + raw)
        elif isinstance(v, list | tuple):
            out.append(b"l")
            for item in v:
                put(item)
            out.append(b"e")
        else:
            out.append(b"d")
            keys = {(k.encode() if isinstance(k, str) else k): val for k, val in v.items()}
            for key in sorted(keys):
                put(key)
                put(keys[key])
            out.append(b"e")

    put(value)
    return b"".join(out)
