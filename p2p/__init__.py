"""Peer-to-peer chunk sharing for lazyfs: a cluster pulls each byte from the origin about once.

Every mount daemon runs a :class:`~p2p.server.PeerServer` (verified chunks by
digest) and gives its fetcher a :class:`~p2p.source.PeerSource` (ask the
chunk's home peer, chosen by rendezvous hashing, before the origin).
:class:`~p2p.tier.PeerTier` ties them to a :class:`~p2p.membership.Membership`.
:mod:`p2p.schedule` orders a home's work (its origin fetches, its replies) by
need, so the chunk every reader wants next arrives first.

p2p imports lazyfs; lazyfs never imports p2p: the daemon finds
:class:`PeerTier` through the ``lazyfs.peer_tier`` entry point.
"""

from p2p.membership import Membership
from p2p.placement import rank
from p2p.server import PeerServer
from p2p.source import PeerSource
from p2p.tier import PeerStatistics, PeerTier

__all__ = ["Membership", "PeerServer", "PeerSource", "PeerStatistics", "PeerTier", "rank"]
