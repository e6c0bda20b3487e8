"""What the feed needs of a BitTorrent engine (:class:`Swarm`), and where the stream's
chunks lie in the torrent's pieces (:class:`PieceMap`, :func:`stripe`)."""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class Swarm(Protocol):
    """What :class:`Feeder` needs of a BitTorrent engine (libtorrent, or a fake)."""

    def pieces(self) -> Sequence[bool]:
        """Which pieces are here and verified."""
        ...

    def downloaded(self) -> int:
        """Bytes of the torrent here and verified."""
        ...

    def received(self) -> int:
        """Payload bytes taken from peers so far, pieces still incomplete included."""
        ...

    def read(self, pieces: Sequence[int], timeout: float) -> dict[int, bytes]:
        """The bytes of these pieces (those that could be read within ``timeout``)."""
        ...

    def add(self, pieces: Mapping[int, bytes]) -> None:
        """Pieces that came by another way, to be checked, kept and served."""
        ...

    def prioritize(self, urgent: Sequence[int]) -> None:
        """Fetch these pieces first."""
        ...

    def want(self, pieces: Sequence[int] | None) -> None:
        """Fetch only these pieces (None: all of them, at the normal priority)."""
        ...

    def use_seed(self, on: bool) -> None:
        """Connect to corral's seed, or keep away from it (as at the start)."""
        ...

    def keep_to(self, addresses: Collection[str] | None) -> None:
        """Let only peers at these addresses reach the node (corral's seed aside, which
        :meth:`use_seed` decides); None: anyone."""
        ...

    def lacking(self, pieces: Collection[int]) -> set[str]:
        """The addresses of the connected peers that lack any of ``pieces``."""
        ...

    def availability(self) -> Sequence[int]:
        """For each piece, how many connected peers have it."""
        ...

    def present(self) -> tuple[int, int]:
        """This node's position among itself and the connected peers that still download
        (by address), and their count."""
        ...

    def peers_in_need(self, min_rate: float, known_for: float = 0.0) -> int:
        """Connected peers that still want pieces from this node and download at
        ``min_rate`` bytes/s or more, by the pieces they gained since this node first saw
        them (or not judged yet: seen for less than two pieces' time at that rate); with
        ``known_for``, by their pieces over that many seconds: in a swarm that everyone
        joined that long ago, a peer's pieces are its pace."""
        ...

    def wait(self, seconds: float) -> None:
        """Sleep until something happens in the swarm, or ``seconds``."""
        ...

    def heard(self) -> bool:
        """Whether the tracker has answered once: before, "no peer has it" means nothing."""
        ...

    def connected(self) -> int:
        """Peers connected (the seed aside, and connections not yet established)."""
        ...

    def addresses(self) -> set[str]:
        """The addresses of the peers :meth:`connected` counts."""
        ...

    def meet(self, dial: bool = True) -> None:
        """Connect to the peers the node reaches by itself, not through the tracker (a
        lane's partners), unless not ``dial``; called once a look."""
        ...


@dataclass(frozen=True)
class PieceMap:
    """Where each chunk of the stream lies in the torrent's pieces.

    The torrent's files are the chunks in order, so the torrent's bytes are the stream's;
    a piece may only straddle two chunks if the piece size does not divide the chunk size
    (corral's own torrents never do that, but the map does not depend on it).
    """

    piece_size: int
    chunk_sizes: tuple[int, ...]
    offsets: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.piece_size <= 0:
            raise ValueError(f"bad piece size {self.piece_size}")
        offsets, at = [], 0
        for size in self.chunk_sizes:
            offsets.append(at)
            at += size
        object.__setattr__(self, "offsets", tuple(offsets))

    @property
    def total(self) -> int:
        return sum(self.chunk_sizes)

    @property
    def num_pieces(self) -> int:
        return -(-self.total // self.piece_size)

    def piece_length(self, piece: int) -> int:
        return min(self.piece_size, self.total - piece * self.piece_size)

    def pieces(self, chunk: int) -> range:
        """The pieces holding any byte of ``chunk``."""
        start = self.offsets[chunk]
        end = start + self.chunk_sizes[chunk]
        if end == start:
            return range(0)
        return range(start // self.piece_size, -(-end // self.piece_size))

    def whole_pieces(self, chunk: int) -> range:
        """The pieces that lie entirely inside ``chunk`` (the ones it alone can fill)."""
        start = self.offsets[chunk]
        end = start + self.chunk_sizes[chunk]
        first = -(-start // self.piece_size)
        last = end // self.piece_size  # exclusive, unless the stream's short last piece
        if end == self.total:
            last = self.num_pieces
        return range(first, max(first, last))

    def chunk_bytes(self, chunk: int, data: Mapping[int, bytes]) -> bytes:
        """Chunk ``chunk`` cut out of its pieces' bytes."""
        span = self.pieces(chunk)
        joined = b"".join(data[p] for p in span)
        skip = self.offsets[chunk] - span.start * self.piece_size if span else 0
        return joined[skip : skip + self.chunk_sizes[chunk]]

    def split(self, chunk: int, data: bytes) -> dict[int, bytes]:
        """The whole pieces of ``chunk`` cut out of its bytes."""
        out = {}
        for piece in self.whole_pieces(chunk):
            start = piece * self.piece_size - self.offsets[chunk]
            out[piece] = data[start : start + self.piece_length(piece)]
        return out


def stripe(num_pieces: int, index: int, count: int, turn: int = 0) -> list[int]:
    """The pieces member ``index`` of ``count`` takes from the seed: every count-th one,
    so that the members' first requests to the seed never overlap and the early chunks
    (unpacked first) are spread over all of them. A torrent rarely has a multiple of
    ``count`` pieces: the pieces left over at the end go one each to the stripes
    :func:`spare_stripes` picks (``turn``: see there)."""
    if count <= 0 or not 0 <= index < count:
        return list(range(num_pieces))
    whole = num_pieces - num_pieces % count
    out = list(range(index, whole, count))
    spare = spare_stripes(num_pieces % count, count, turn).get(index)
    if spare is not None:
        out.append(whole + spare)
    return out


@functools.lru_cache(maxsize=16)
def spare_stripes(extra: int, count: int, turn: int = 0) -> Mapping[int, int]:
    """Which ``extra`` of the ``count`` stripes hold a piece more (the pieces left over
    when the torrent's are not a multiple of ``count``), as {stripe: which spare piece}.

    Without racks (``turn`` 0), the first ones. In racks, the session deals its stripes
    to the racks in turns of ``turn`` stripes, one per rack (``by_stripe``), and a node
    brings into its rack the stripes of one turn from the other racks (its lane:
    ``bittorrent_tracker.lanes``). The first stripes would all fall in the first turn, and
    one node of each rack would bring in all the spare pieces: at N = 100 in 20 racks of
    5 with 120 pieces, lanes of 38 pieces beside lanes of 19, and each rack waited for
    its long lane, or asked the seed for the rest of it. So the spare pieces are spread
    over the turns and over the racks: spare piece ``r`` goes to the stripe of rack
    ``r mod turn`` in turn ``r * turns // extra``; lanes then differ by a piece or so, and
    each rack still holds its share (a stripe taken twice, where racks are uneven, gives
    way to the first stripe free)."""
    if turn <= 0:
        return {r: r for r in range(extra)}
    turns = -(-count // turn)
    spread: dict[int, int] = {}
    unplaced = []
    for r in range(extra):
        g = r % turn + turn * (r * turns // extra)
        if g < count and g not in spread:
            spread[g] = r
        else:
            unplaced.append(r)
    free = (g for g in range(count) if g not in spread)
    for r in unplaced:
        spread[next(free)] = r
    return spread


def pieces(count: int) -> str:
    """A count of pieces for the log: "1 piece", "3 pieces"."""
    return f"{count} piece" if count == 1 else f"{count} pieces"
