"""Who the peers are, which of them are healthy, and which one is this node.

Members come from a static list (``--peers``) and a DNS name (``--peers-dns``,
the Kubernetes headless-Service pattern: one A/AAAA record per pod), both
resolved again every ``refresh_interval``.  A member's key is ``IP:PORT``
(``[IP]:PORT`` for IPv6) of the resolved address, so every node computes the
same keys and so the same placement.

Health is local: a peer that fails (refused, reset, timed out, 5xx) is skipped
for a backoff that doubles per consecutive failure; one that sent bytes that
failed verification (or otherwise broke the protocol) is skipped for
``bad_hold`` seconds and counted; that hold is kept by address, so leaving the
member set and rejoining does not end it.  One whose own origin fetch failed
("503 origin") stays live, for its cached copies, but is no chunk's candidate
for ``ORIGIN_HOLD`` seconds.  Skipped peers drop out of placement, so their
chunks go to each chunk's next candidate — on every node at about the same
time, since they all see the same failure.

This node is a member when one of the resolved addresses is its own: the port
it listens on, at an IP it can bind (or exactly its listen IP, when it listens
on a specific one).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from lazyfs.config import PeerConfig, parse_host_port
from p2p.placement import rank

__all__ = ["Membership", "PeerHealth", "Resolver", "format_key", "is_local_ip", "system_resolver"]

log = logging.getLogger(__name__)

# Bad-peer holds remembered at once.  They are kept by address, members or not (a peer that
# leaves and rejoins, by a DNS blip or a restart, is still held), so the set is not bounded by
# the member set: a cluster has at most a few hundred nodes, and an address held past this many
# others is the oldest hold, the first to end anyway (all holds last bad_hold).  ~100 bytes each.
MAX_BAD_HOLDS = 1024

# A peer that answered "503 origin" (it could not fetch a chunk from the origin) is nobody's
# candidate for this long (see Membership.origin_failed).  Per peer, not per chunk: an origin that
# fails for one chunk (credentials, a partition, an outage) fails for the next, and a node reads
# each chunk about once, so a per-chunk hold would save nothing; while held, each of its chunks
# costs nothing to skip, instead of a round trip (and, where this node comes next, a sweep of
# every member for copies).  Short: a home's origin may recover within seconds, and meanwhile its
# chunks' next candidate (the same one on every node) fetches them, so the origin still sees each
# chunk once.  About one peer timeout (PeerConfig.timeout), what a silent peer costs.
ORIGIN_HOLD = 5.0

# (host, port) -> IP addresses; raises OSError when the name does not resolve.
Resolver = Callable[[str, int], Awaitable[list[str]]]


def format_key(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


async def system_resolver(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def is_local_ip(ip: str) -> bool:
    """Whether this host (this network namespace) owns ``ip``: binding to it succeeds."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


@dataclass
class PeerHealth:
    failures: int = 0  # consecutive
    skip_until: float = 0.0
    origin_until: float = 0.0  # not asked to fetch from the origin before this (ORIGIN_HOLD)
    errors: int = 0  # all time
    bad: int = 0  # chunks that failed verification
    bytes: int = 0  # verified bytes received
    last_error: str = ""


class Membership:
    def __init__(
        self,
        config: PeerConfig,
        resolver: Resolver = system_resolver,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.resolver = resolver
        self.clock = clock
        self._static = [parse_host_port(p, "peer") for p in config.peers]
        self._dns = parse_host_port(config.peers_dns, "--peers-dns") if config.peers_dns else None
        self._listen = parse_host_port(config.listen, "--listen address") if config.listen else None
        self._by_source: dict[tuple[str, int], set[str]] = {}
        self.members: frozenset[str] = frozenset()
        self.self_key: str | None = None
        self.health: dict[str, PeerHealth] = {}
        # address -> end of its bad hold, in order of ending (every hold lasts bad_hold).
        self.bad_holds: OrderedDict[str, float] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._local: dict[str, bool] = {}

    # -- membership ------------------------------------------------------------

    async def refresh(self) -> None:
        """Resolve every source again; a source that fails to resolve keeps its last addresses."""
        sources = list(self._static)
        if self._dns is not None:
            sources.append(self._dns)
        for host, port in sources:
            if _is_ip(host):
                self._by_source[(host, port)] = {format_key(host, port)}
                continue
            try:
                ips = await self.resolver(host, port)
            except OSError as exc:
                if (host, port) in self._by_source:
                    log.info("cannot resolve %s (%s); keeping its last %d addresses",
                             host, exc, len(self._by_source[(host, port)]))
                else:
                    log.warning("cannot resolve peer name %s: %s", host, exc)
                continue
            self._by_source[(host, port)] = {format_key(ip, port) for ip in ips}
        self._set(set().union(*self._by_source.values()) if self._by_source else set())

    def _set(self, members: set[str]) -> None:
        new = frozenset(members)
        if new == self.members:
            return
        joined, left = sorted(new - self.members), sorted(self.members - new)
        if self.members:
            log.info("peers joined: %s; left: %s", joined or "-", left or "-")
        self.members = new
        self.self_key = next((m for m in sorted(new) if self._is_self(m)), None)
        for key in left:
            self.health.pop(key, None)

    def _is_self(self, key: str) -> bool:
        if self._listen is None:
            return False
        host, port = parse_host_port(key)
        listen_host, listen_port = self._listen
        if port != listen_port:
            return False
        unspecified = listen_host in ("", "0.0.0.0", "::")
        if not unspecified:
            with contextlib.suppress(ValueError):
                return ipaddress.ip_address(host) == ipaddress.ip_address(listen_host)
            return host == listen_host
        if host not in self._local:
            self._local[host] = is_local_ip(host)
        return self._local[host]

    async def run(self) -> None:
        """Refresh forever (cancel to stop)."""
        while True:
            await asyncio.sleep(self.config.refresh_interval)
            try:
                await self.refresh()
            except Exception:  # a bug here must not stop membership updates for good
                log.exception("refreshing the peer list failed")

    async def start(self) -> None:
        await self.refresh()
        if self._dns is not None or any(not _is_ip(h) for h, _ in self._static):
            self._task = asyncio.create_task(self.run())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- placement and health ----------------------------------------------------

    def live(self) -> list[str]:
        now = self.clock()
        out = []
        for key in self.members:
            h = self.health.get(key)
            if key == self.self_key or (
                (h is None or now >= h.skip_until) and now >= self.bad_holds.get(key, 0.0)
            ):
                out.append(key)
        return out

    def ranked(self, digest: bytes) -> list[str]:
        """Live members in this chunk's order of preference (this node included, if a member)."""
        return rank(self.live(), digest)

    def _health(self, key: str) -> PeerHealth:
        h = self.health.get(key)
        if h is None:
            h = self.health[key] = PeerHealth()
        return h

    def succeeded(self, key: str, nbytes: int) -> None:
        h = self._health(key)
        h.failures = 0
        h.skip_until = 0.0
        h.bytes += nbytes

    def failed(self, key: str, reason: str) -> None:
        h = self._health(key)
        h.errors += 1
        h.last_error = reason
        if self.clock() < h.skip_until:
            return  # requests that were in flight together failing together are one failure
        h.failures += 1
        backoff = min(self.config.backoff_initial * 2 ** (h.failures - 1), self.config.backoff_max)
        h.skip_until = self.clock() + backoff
        log.info("peer %s failed (%s); skipping it for %.1f s", key, reason, backoff)

    def origin_failed(self, key: str, reason: str) -> None:
        """``key`` could not fetch a chunk from the origin ("503 origin"): for ``ORIGIN_HOLD`` it is
        no chunk's candidate (:meth:`origin_held`).  Not a failure of the peer: it stays live,
        and is still asked for copies it holds when the origin is down for this node too."""
        h = self._health(key)
        h.last_error = reason
        h.origin_until = self.clock() + ORIGIN_HOLD
        log.info("peer %s cannot reach the origin (%s); not asking it to fetch for %.0f s", key, reason, ORIGIN_HOLD)

    def origin_held(self, key: str) -> bool:
        h = self.health.get(key)
        return h is not None and self.clock() < h.origin_until

    def sent_bad(self, key: str, reason: str) -> None:
        h = self._health(key)
        h.bad += 1
        h.errors += 1
        h.last_error = reason
        now = self.clock()
        self.bad_holds.pop(key, None)
        self.bad_holds[key] = now + self.config.bad_hold
        while self.bad_holds:  # at most len(bad_holds) steps
            first, until = next(iter(self.bad_holds.items()))
            if until > now and len(self.bad_holds) <= MAX_BAD_HOLDS:
                break
            del self.bad_holds[first]
        log.warning("peer %s sent bad bytes or broke the protocol (%s); not asking it for %.0f s",
                    key, reason, self.config.bad_hold)

    def state(self, key: str) -> str:
        if key == self.self_key:
            return "self"
        h = self.health.get(key)
        now = self.clock()
        if now < self.bad_holds.get(key, 0.0):
            return "bad"
        if h is None:
            return "ok"
        if now < h.skip_until:
            return "backoff"
        return "ok"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
