"""The ``chain`` receiver: the image flows from node to node over TCP, as in Kadeploy's
Kascade, so the server sends it about once whatever the number of nodes.

The wire protocol and the server's side (the head of the chain) are described in
:mod:`corral.deploy.transports.chain`. The code that both ends run (the protocol, the
sending end) is in :mod:`corral.agent.wire`, because the agent is stdlib-only and cannot
import the server's modules (the server imports those).

What one node does, in :meth:`ChainReceiver.receive`:

- it listens on :data:`RELAY_PORT` for nodes after it (:class:`Relay`);
- it connects *upstream* (:class:`Picker`): to the node just before it, or to the head for
  the first node, says which chunk it needs next, and reads pieces of chunks;
- every piece is put in a :class:`Window` as it arrives and forwarded at once to whoever
  pulls from this node (cut-through: a hop costs one 16 KiB piece, not a 4 MiB chunk, so
  a hundred hops add about a second, not minutes); a whole chunk is checked against the
  plan's sha256 before a byte of it is unpacked, and a node that pulled a corrupt piece
  finds out the same way;
- it feeds the checked chunks to ``zstd -d | tar -x``
  (:class:`~corral.agent.receivers.stream.Unpacker`).

Why nodes pull (connect upstream) rather than push: a node's recovery is then its own
decision, made with the one fact that matters, the next chunk *it* needs, which it says in
its hello; no upstream has to find out that its successor died and which node should
take its place, and a node whose upstream died does not wait for someone to come. The
server orders the nodes that are up (:mod:`corral.deploy.transports.chain`) and a node
only ever pulls from a node before it in its plan (or the head, or the tail once passed).

An uplink feeds one successor (:class:`~corral.agent.wire.chain_sender.Slot`): a node that
passes its upstream names it in its hello, and the node it reaches hands that node's slot
over to it; the passed node is refused there from then on, and so is any node that would
be a second successor (busy): such a node pulls from the tail of the chain, whose uplink
feeds nobody, or else takes the rest over HTTP (at once if a node after it still pulls
from it: the tail is behind it, and each would wait for the other).

Failures, without restarting anyone:

- the upstream drops, or goes silent for :data:`SILENCE` seconds (it sends a heartbeat
  every second while it has nothing): the node tries it again for
  :data:`RECONNECT_GRACE` seconds, then pulls from the node before it, and so on up to the
  head (a node before that does not answer at once is passed at once: it died or has
  finished and gone; after :data:`MAX_WALK` of those, the head); the one it reaches
  resumes from the chunk and byte the hello names. A direct predecessor that has not
  started listening yet gets :data:`START_PATIENCE` seconds (nodes boot at slightly
  different times) before it is bypassed;
- the upstream no longer holds the chunk it needs (a relay keeps the last
  :data:`WINDOW_CHUNKS` chunks in memory, since what is unpacked is gone, and holds the
  stream for the node after it, one that has not come yet included, at most
  :data:`HOLD_SECONDS` within 30 s, while that node still needs the oldest): it says so
  (``SKIP``) and the node fetches the gap from the server over HTTP
  (:meth:`~corral.agent.receivers.base.StreamReceiver.fetch_chunk`, checked), then goes on
  reading from the same upstream;
- the upstream says it fell :data:`LAG_SECONDS` behind its own upstream, in seconds of
  that upstream's pace, within the last 30 s (a slow node): the node pulls from the node
  before it instead (the head too), so one slow node does not slow everyone after it;
- the head cannot be reached either: one chunk over HTTP, then the head again.

When a node has the whole image it keeps serving until the node after it has everything
too, or nobody came or was served for :data:`DRAIN_IDLE` seconds, then closes its relay;
it waits for that up to :data:`LINGER` seconds, then goes on with its install while the
relay serves on in the background (as long as the agent runs: its exit waits for it).
"""
