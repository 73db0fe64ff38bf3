"""The peer tier as the daemon sees it: membership + PeerSource + PeerServer.

Registered under the entry point group ``lazyfs.peer_tier`` (pyproject.toml),
so ``lazyfs mount --peers ...`` finds it without lazyfs importing p2p.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from dataclasses import dataclass
from typing import Any

from lazyfs.config import PeerConfig
from lazyfs.errors import UsageError
from lazyfs.fetch import ChunkFetcher
from p2p.membership import Membership, Resolver, system_resolver
from p2p.schedule import HomeFetches
from p2p.server import BlobStore, PeerServer
from p2p.source import PeerSource

__all__ = ["PeerStatistics", "PeerTier", "client_ssl_context", "server_ssl_context"]

# Origin requests for home chunks the whole cluster keeps going, at least MIN_ORIGIN_SLOTS per
# node (a blocked reader's request never waits).  Few, so that the origin sends chunks about in
# file order and peers can pass each on as it lands: with 4 nodes on 200 Mbit/s links and each
# node's read-ahead (32 chunks) all in flight at once, the chunk a reader waited for came last
# (see p2p.schedule).  A node alone (or in a pair) may keep more going: latency, not order, then
# limits it.
CLUSTER_ORIGIN_REQUESTS = 8
MIN_ORIGIN_SLOTS = 2


def origin_slots(live_members: int) -> int:
    """Concurrent origin fetches of home chunks for a node in a cluster of ``live_members``."""
    return max(MIN_ORIGIN_SLOTS, CLUSTER_ORIGIN_REQUESTS // max(1, live_members))


@dataclass(frozen=True, slots=True)
class PeerStatistics:
    members: int
    live: int
    requests_sent: int
    bytes_received: int
    bad_chunks: int
    errors: int
    requests_served: int
    bytes_served: int
    requests_refused: int
    connections_refused: int  # over the server's connection limit: closed unread
    per_peer_errors: dict[str, int]
    per_peer_bad: dict[str, int]
    per_peer_bytes: dict[str, int]


def _check_tls(config: PeerConfig) -> None:
    given = [config.tls_cert, config.tls_key, config.tls_ca]
    if any(given) and not all(given):
        raise UsageError("peer TLS needs all of --peer-tls-cert, --peer-tls-key and --peer-tls-ca")
    for path in given:
        if path and not os.path.isfile(path):
            raise UsageError(f"{path}: no such file (peer TLS)")


def server_ssl_context(config: PeerConfig) -> ssl.SSLContext | None:
    """TLS for the peer server; peers must present a certificate signed by the cluster CA."""
    if not config.tls_cert:
        return None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=config.tls_ca)
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the peer TLS files: {exc}") from exc
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_ssl_context(config: PeerConfig) -> ssl.SSLContext | None:
    """TLS for requests to peers: the server must chain to the cluster CA; we present our certificate.

    Peers are addressed by IP (DNS gives pod IPs), so the certificate's name is not
    checked: membership in the cluster is what the CA's signature says.
    """
    if not config.tls_cert:
        return None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.tls_ca)
        ctx.check_hostname = False
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the peer TLS files: {exc}") from exc
    return ctx


class PeerTier:
    """Factory signature: ``PeerTier(config, store)`` (what lazyfs.daemon.PeerTierFactory expects)."""

    def __init__(self, config: PeerConfig, store: BlobStore, resolver: Resolver = system_resolver) -> None:
        if not config.token:
            raise UsageError("the peer token is empty")
        if not all(0x21 <= b <= 0x7E for b in config.token):
            raise UsageError("the peer token must be one word of printable ASCII")
        if not (config.peers or config.peers_dns):
            raise UsageError("peer options need --peers or --peers-dns")
        _check_tls(config)
        self.config = config
        self.members = Membership(config, resolver)
        self.source = PeerSource(config, self.members, client_ssl_context(config))
        self.server = (
            PeerServer(config.listen, config.token, store, server_ssl_context(config)) if config.listen else None
        )
        self.home: HomeFetches | None = None

    async def start(self, fetcher: ChunkFetcher) -> None:
        # One queue of origin fetches for the chunks this node is home for, whoever asks.
        self.home = HomeFetches(fetcher, lambda: origin_slots(len(self.members.live())))
        self.source.attach(fetcher, self.home)
        if self.server is not None:
            await self.server.start(fetcher, self.home)
        await self.members.start()

    async def aclose(self) -> None:
        await self.members.aclose()
        if self.home is not None:
            self.home.aclose()  # first: requests queued for an origin slot end now, not at their deadline
        if self.server is not None:
            await self.server.aclose()
        await self.source.aclose()

    def statistics(self) -> PeerStatistics:
        h = self.members.health
        sc = self.server.counters if self.server is not None else None
        return PeerStatistics(
            members=len(self.members.members),
            live=len(self.members.live()),
            requests_sent=self.source.requests_sent,
            bytes_received=self.source.bytes_received,
            bad_chunks=self.source.bad_chunks,
            errors=self.source.errors,
            requests_served=sc.requests_served if sc else 0,
            bytes_served=sc.bytes_served if sc else 0,
            requests_refused=sc.requests_refused if sc else 0,
            connections_refused=sc.connections_refused if sc else 0,
            per_peer_errors={k: v.errors for k, v in h.items()},
            per_peer_bad={k: v.bad for k, v in h.items()},
            per_peer_bytes={k: v.bytes for k, v in h.items()},
        )

    def status(self) -> dict[str, Any]:
        stats = dataclasses.asdict(self.statistics())
        for k in ("per_peer_errors", "per_peer_bad", "per_peer_bytes"):
            del stats[k]
        h = self.members.health
        stats["self"] = self.members.self_key
        stats["listen"] = self.config.listen
        stats["peers"] = {
            key: {
                "state": self.members.state(key),
                "bytes": h[key].bytes if key in h else 0,
                "errors": h[key].errors if key in h else 0,
                "bad": h[key].bad if key in h else 0,
                "last_error": h[key].last_error if key in h else "",
            }
            for key in sorted(self.members.members)
        }
        if self.server is not None:
            stats["server"] = dataclasses.asdict(self.server.counters)
        return stats
