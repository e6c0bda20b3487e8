"""The server's side of a transport: one small interface (:class:`ServerTransport`), what
the unicast ones share (:class:`Unicast`), and a session's :class:`Member`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from corral.config import Settings
from corral.images.exports import Chunked


@dataclass(frozen=True)
class Member:
    """A node in a transfer session: its name and the address it receives on."""

    node: str
    ip: str | None


class ServerTransport(Protocol):
    """The server's side of a transport.

    The manager calls :meth:`prepare` for each export a deployment needs (an image
    version's stream for installs, its squashfs for diskless boots: a :class:`Chunked`), then
    :meth:`start` once per session (the nodes of one deployment that get the same image by
    this transport) before it reboots them, and :meth:`finish` when every node of the
    session has ended; after a restart of corral serve, :meth:`start` is called again with
    the nodes still going. :meth:`params` goes into each node's plan.
    """

    name: str
    #: the export the transport sends: "stream" (chunked tar) or "tree"
    export: str

    def prepare(self, payload: Chunked) -> None: ...

    def start(self, deployment: int, payload: Chunked, members: Sequence[Member]) -> None: ...

    def params(self, payload: Chunked, node: str) -> dict[str, Any]: ...

    def finish(self, deployment: int, payload: Chunked) -> None: ...

    def close(self) -> None: ...


class Unicast:
    """Sessions mean nothing to a transport that serves each node on its own."""

    def start(self, deployment: int, payload: Chunked, members: Sequence[Member]) -> None:
        pass

    def finish(self, deployment: int, payload: Chunked) -> None:
        pass


def url_host(url: str) -> str:
    """The host part of ``url`` (what nodes connect to), ``localhost`` if it has none."""
    return urlsplit(url).hostname or "localhost"


Factory = Callable[[Settings], ServerTransport]
