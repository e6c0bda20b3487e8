"""Receiver ``bittorrent``: the image's chunks from a swarm of the session's nodes and
corral's seed, exchanged by libtorrent, unpacked in order as soon as they are complete.

The torrent (made by :mod:`corral.deploy.transports.bittorrent`, handed over base64 in
``plan.transport.params["torrent"]``) is a private, v1, multi-file torrent whose files are
the chunk files of the stream export, ``chunks/00000000.bin`` ..., and whose piece size
divides the chunk size. So chunk *i* is exactly a run of whole pieces
(:class:`PieceMap`): "chunk *i* can be unpacked" is "these pieces are all here", and the
server seeds the export's own files where they lie.

How a node receives (:class:`Feeder`):

- libtorrent downloads into a scratch directory on the *target filesystem*
  (``<target>/.corral-bittorrent``, removed at the end). A node has to keep every piece it
  holds to serve its peers, and the deploy ramdisk's RAM may be smaller than the image's
  stream, while the target disk must hold the unpacked tree anyway: the scratch costs the
  stream's size on it for the time of the transfer. A target with too little room for both
  (checked first) receives by plain HTTP instead.
- The node asks corral's seed only for its *stripe* (every N-th piece, its own 1/N of the
  stream: ``params["stripe"]``), then keeps the seed away and gets the rest from its peers,
  going back to the seed only for pieces no peer can give it (:class:`SeedUse`): that is
  what keeps the server's egress near one copy of the stream. Among the peers, pieces come
  in libtorrent's rarest-first order, except that those of the next :data:`AHEAD_CHUNKS`
  chunks to unpack come first, so the stream is fed to ``zstd -d | tar -x`` nearly as it
  arrives.
- In a rack, a node brings its share of the other racks' pieces (its *lane*) into its
  rack, then trades with its rack only. In small racks it does both at once: the lane in
  a second libtorrent session of the same torrent, on :data:`LANE_PORT`, that only its
  lane partners elsewhere can reach, while its first session, kept to its rack, trades
  with the rack (:class:`SeedUse`, :data:`LANE_SESSION_SHARE`).
- Each chunk, read back through libtorrent (``read_piece``: coherent with its own disk
  cache), is checked against the plan's sha256 before a byte of it is unpacked.
- When the swarm brings no new piece for :data:`STALL_TIMEOUT` seconds (no seed, a dead
  tracker, a server restart), the chunks still missing are fetched over HTTP with
  :meth:`StreamReceiver.fetch_chunk` and handed to libtorrent (``add_piece``) so that the
  node can serve them too; the swarm is used again as soon as it moves.
- Once everything is unpacked the node keeps seeding while it is of use: peers still
  downloading at LAN speed, or members that have not joined yet (corral's tracker counts
  them), for at most :data:`LINGER_MAX` seconds (see :func:`linger`); then it leaves and
  deletes the scratch.

libtorrent is imported lazily: the agent stays stdlib-only (the deploy ramdisk ships
Debian's ``python3-libtorrent``); an agent without it receives by HTTP, saying so in its log.
"""
