"""How image bytes leave the server: one small interface, and a registry of transports.

A server transport gets an image version ready to serve (:meth:`ServerTransport.prepare`,
called once per version and again after a restart) and tells each node's agent how to
receive it (:meth:`ServerTransport.params`, which becomes the plan's
``transport.params``). The agent's side of each transport is in
:mod:`corral.agent.receivers`, under the same name.

- ``http``: corral's own HTTP server streams the chunked export
  (``/images/NAME/VERSION/chunks/N.bin``, with Range requests); nothing to start.
- ``rsync``: one rsync daemon started by corral, with a read-only module per image
  version; a node re-deployed with a newer version of its image receives only what changed.
- broadcast transports: ``multicast`` (udpcast), ``chain`` (a pipelined TCP relay from node
  to node), ``bittorrent`` (a swarm of the session's nodes and corral's seed).

Each transport is a module of this package; :data:`REGISTRY` is filled here by explicit
imports (tests add fakes with :func:`register`).
"""

from __future__ import annotations

import logging
import threading

from corral.config import Settings
from corral.deploy.transports.base import Factory, ServerTransport
from corral.deploy.transports.bittorrent import BitTorrentTransport
from corral.deploy.transports.chain import ChainTransport
from corral.deploy.transports.http import HttpTransport
from corral.deploy.transports.multicast import MulticastTransport
from corral.deploy.transports.rsync import RsyncTransport

log = logging.getLogger("corral.deploy")

#: name -> factory; the order is the order of ``--transport`` choices in help texts.
REGISTRY: dict[str, Factory] = {
    "http": HttpTransport,
    "rsync": RsyncTransport,
    "bittorrent": BitTorrentTransport,
    "chain": ChainTransport,
    "multicast": MulticastTransport,
}


def register(name: str, factory: Factory) -> None:
    REGISTRY[name] = factory


def names() -> list[str]:
    return list(REGISTRY)


class Transports:
    """The transports one server runs, each made on first use and closed at the end."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._live: dict[str, ServerTransport] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> ServerTransport:
        with self._lock:
            if name not in self._live:
                self._live[name] = REGISTRY[name](self.settings)
            return self._live[name]

    def sent(self) -> dict[str, dict[str, int]]:
        """What each transport started so far sent of each export, by its own means."""
        with self._lock:
            live = list(self._live.items())
        out = {}
        for name, transport in live:
            try:
                out[name] = transport.sent()
            except Exception:  # the metrics go on without it
                log.exception("reading what transport %s sent", name)
        return out

    def close(self) -> None:
        with self._lock:
            for transport in self._live.values():
                try:
                    transport.close()
                except Exception:
                    log.exception("closing transport %s", transport.name)
            self._live.clear()
