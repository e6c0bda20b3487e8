"""The checked stream every stream receiver (http, multicast, chain, bittorrent) feeds."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from corral.agent.errors import ReceiveError
from corral.agent.plan import Chunk, Disk, Identity, ImageInfo, Plan, TransportInfo
from corral.agent.receivers.stream import VerifiedStream, chunk_mismatch

PIECES = [b"a" * 5, b"b" * 5, b"c" * 3]
DATA = b"".join(PIECES)


def make_plan(pieces: list[bytes] = PIECES) -> Plan:
    data = b"".join(pieces)
    return Plan(
        deployment=1,
        node="n01",
        image=ImageInfo(
            ref="small:1",
            stream_sha256=hashlib.sha256(data).hexdigest(),
            stream_size=len(data),
            chunk_size=5,
            chunks=[Chunk(hashlib.sha256(p).hexdigest(), len(p)) for p in pieces],
            tree_bytes=0,
            files=0,
        ),
        transport=TransportInfo("http", {}),
        disk=Disk("", "gpt", []),
        identity=Identity("n01", [], {}, [], None),
        bootloader="none",
        post_script="",
    )


def test_chunks_are_written_in_order_and_counted() -> None:
    written: list[bytes] = []
    progress: list[tuple[int, int]] = []
    stream = VerifiedStream(make_plan(), written.append, lambda d, t: progress.append((d, t)))
    assert stream.total == len(DATA) and not stream.complete
    for piece in PIECES:
        assert stream.matches(piece)
        stream.add(piece)
    assert stream.complete and stream.index == 3 and stream.done == len(DATA)
    assert written == PIECES
    assert progress == [(5, 13), (10, 13), (13, 13)]
    assert stream.whole.hexdigest() == hashlib.sha256(DATA).hexdigest()
    stream.check()  # no error


def test_a_chunk_is_matched_against_the_next_one_in_the_plan() -> None:
    stream = VerifiedStream(make_plan(), lambda _: None, lambda _d, _t: None)
    assert not stream.matches(PIECES[1])  # right bytes, wrong place
    assert not stream.matches(PIECES[0][:4])  # too short
    stream.add(PIECES[0])
    assert stream.matches(PIECES[1])


def test_partial_progress_counts_from_the_chunks_already_written() -> None:
    progress: list[tuple[int, int]] = []
    stream = VerifiedStream(make_plan(), lambda _: None, lambda d, t: progress.append((d, t)))
    stream.add(PIECES[0])
    partial = stream.partial()
    partial(2)
    partial(5)
    assert progress[1:] == [(7, 13), (10, 13)]


def test_mismatch_says_what_arrived_and_what_the_plan_says() -> None:
    plan = make_plan()
    assert chunk_mismatch(plan, 0, PIECES[0]) == ""
    wrong = chunk_mismatch(plan, 0, b"x" * 5)
    assert wrong == (
        f"5 bytes with sha256 {hashlib.sha256(b'x' * 5).hexdigest()}, "
        f"the plan says 5 bytes with sha256 {plan.image.chunks[0].sha256}"
    )


def test_a_stream_short_of_the_plan_fails_the_check() -> None:
    stream = VerifiedStream(make_plan(), lambda _: None, lambda _d, _t: None)
    stream.add(PIECES[0])
    with pytest.raises(ReceiveError, match=r"image small:1: the stream is 5 bytes with sha256 "):
        stream.check()


def test_a_stream_whose_whole_digest_differs_fails_the_check() -> None:
    plan = make_plan()
    other = dataclasses.replace(plan.image, stream_sha256="0" * 64)
    stream = VerifiedStream(dataclasses.replace(plan, image=other), lambda _: None, lambda *_: None)
    for piece in PIECES:
        stream.add(piece)
    with pytest.raises(ReceiveError, match=r"the plan says 13 bytes with sha256 0{64}$"):
        stream.check()
