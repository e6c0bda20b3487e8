"""The ``http`` receiver: the image's zstd tar stream, chunk by chunk, each checked against
the plan before one of its bytes reaches ``zstd -d | tar -x``: nothing unverified is ever
unpacked, and no copy of the whole stream is kept (a node's RAM disk could not hold it)."""

from __future__ import annotations

import logging

from corral.agent.errors import ReceiveError
from corral.agent.receivers.base import Job, Received, StreamReceiver

log = logging.getLogger("corral.agent")


class HttpReceiver(StreamReceiver):
    """Chunks of the zstd tar stream over HTTP, checked one by one, unpacked on arrival."""

    name = "http"

    def receive(self, job: Job) -> Received:
        if self.context.client is None:
            raise ReceiveError("transport http needs corral.server= to download from")
        image = job.plan.image
        stream = self.unpack(job, lambda _stream: None)
        log.info(
            "received %s: %d bytes in %d chunks (%d fetched again, %d resumed)",
            image.ref,
            stream.done,
            len(image.chunks),
            len(self.refetched),
            len(self.resumed),
        )
        return Received(
            stream.done,
            {
                "chunks": len(image.chunks),
                "refetched": len(self.refetched),
                "resumed": len(self.resumed),
            },
        )
