"""Receivers: how an image's bytes reach the node's mounted root filesystem.

Every transport (``plan.transport.name``) has one receiver class, in :data:`RECEIVERS`,
which this package fills from explicit imports: a new transport adds a module (or a
package) with a subclass of :class:`~corral.agent.receivers.base.Receiver` and a line
here. The installer knows nothing else of them.

- ``base``: the interface (:class:`~corral.agent.receivers.base.Receiver`) and the
  skeleton that the receivers of the chunked stream share
  (:class:`~corral.agent.receivers.base.StreamReceiver`: the verified stream, the
  unpacking, the HTTP catch-up, finish and abort); ``stream``: the verified stream and
  the unpacker themselves;
- ``http``, ``rsync``, ``multicast``: one module each; ``chain``, ``bittorrent``: a
  package each (relay, upstream choice, window; swarm, seed use, feed, libtorrent).

What the server's transports share with them (the chain's wire protocol, bencode) is in
:mod:`corral.agent.wire`.
"""

from __future__ import annotations

from corral.agent.errors import ReceiveError
from corral.agent.receivers.base import Context, Receiver
from corral.agent.receivers.bittorrent.receiver import BitTorrentReceiver
from corral.agent.receivers.chain.receiver import ChainReceiver
from corral.agent.receivers.http import HttpReceiver
from corral.agent.receivers.multicast import MulticastReceiver
from corral.agent.receivers.rsync import RsyncReceiver

#: transport name -> its receiver class
RECEIVERS: dict[str, type[Receiver]] = {
    cls.name: cls
    for cls in (
        HttpReceiver,
        RsyncReceiver,
        MulticastReceiver,
        ChainReceiver,
        BitTorrentReceiver,
    )
}


def receiver_class(transport: str) -> type[Receiver]:
    try:
        return RECEIVERS[transport]
    except KeyError:
        known = ", ".join(sorted(RECEIVERS))
        raise ReceiveError(f"unknown transport {transport!r}: this agent has {known}") from None


def make_receiver(transport: str, context: Context) -> Receiver:
    return receiver_class(transport)(context)
