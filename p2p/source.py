"""PeerSource: the fetcher's peer tier — ask a chunk's home before the origin.

For a chunk missing from the cache, the fetcher calls :meth:`PeerSource.fetch`.
The live members are ranked for the chunk (rendezvous hashing); the first
``candidates`` of them are asked in order, each with at most ``timeout``
seconds.  A candidate fetches the chunk from the origin itself when it does
not hold it (it is the chunk's home: everybody asks it, it fetches once), so
the origin sees each chunk about once.  When this node is the next candidate,
the answer is ``None`` and the fetcher goes to the origin — this node is then
the one everyone else asks.

When a candidate reports that the origin is failing (or this node's own origin
requests are), the remaining live members are asked for cached copies only:
with the origin down, the cluster still serves whatever any node holds.  A
candidate that answered so is no chunk's candidate for a short while
(:meth:`p2p.membership.Membership.origin_failed`): its chunks go to their next
candidate, and it is still asked for cached copies.

Peers are untrusted: every answer goes through the fetcher's verifier (BLAKE3
against the manifest) before it is returned; a peer that sends bad bytes, or an
answer of the wrong length, is marked bad (see :class:`p2p.membership.Membership`)
and the next one is tried.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
import time
from collections.abc import Callable
from typing import Protocol

from lazyfs.config import PeerConfig
from lazyfs.errors import IntegrityError
from lazyfs.fetch import Data, Priority, Verifier, unpack_zstd
from lazyfs.manifest import Chunk
from p2p import protocol, trace
from p2p.client import PeerClient, PeerError
from p2p.membership import Membership
from p2p.schedule import HomeFetches

__all__ = ["CpuGauge", "PeerSource"]

log = logging.getLogger(__name__)

READAHEAD_TIMEOUTS = 3
# Compressed answers (zstd, see p2p.server) trade CPU for link time: a 4 MiB bf16 chunk is ~0.9 MB
# smaller, 40 ms less at 200 Mbit/s, 8 ms at 1 Gbit/s, for ~10-15 ms of decompression here (and
# compressing it once at the home).  Worth it while the machine has CPU to spare; when it is this
# busy (all cores, sampled every CPU_SAMPLE s) the link is not what limits a read: take raw bytes.
ZSTD_BUSY_LIMIT = 0.85
CPU_SAMPLE = 0.5


# Idle connections to peers are kept this long: shorter than the servers' (p2p.server.KEEPALIVE).
CLIENT_KEEPALIVE = 15.0

class _OriginState(Protocol):
    @property
    def origin_available(self) -> bool: ...


class CpuGauge:
    """How busy the whole machine's CPUs were over the last ``CPU_SAMPLE`` s (Linux /proc/stat; 0 elsewhere)."""

    def __init__(self, path: str = "/proc/stat", clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.clock = clock
        self._at = -CPU_SAMPLE
        self._last: tuple[int, int] | None = None
        self._busy = 0.0

    def _read(self) -> tuple[int, int] | None:
        try:
            with open(self.path) as f:
                v = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        if len(v) < 5:
            return None
        return sum(v) - v[3] - v[4], sum(v)  # (busy, all) jiffies; idle and iowait are not busy

    def busy(self) -> float:
        now = self.clock()
        if now - self._at >= CPU_SAMPLE:
            self._at = now
            sample = self._read()
            if sample is not None and self._last is not None and sample[1] > self._last[1]:
                self._busy = (sample[0] - self._last[0]) / (sample[1] - self._last[1])
            self._last = sample
        return self._busy


class _Answer(enum.Enum):
    MISS = "miss"  # the peer does not have it (404): healthy, just not a holder
    FAILED = "failed"  # refused, reset, timed out, bad bytes: try the next one
    ORIGIN_DOWN = "origin down"  # the peer could not reach the origin either


class PeerSource:
    name = "peers"

    def __init__(self, config: PeerConfig, members: Membership, client_ssl: ssl.SSLContext | None) -> None:
        self.config = config
        self.members = members
        self._ssl = client_ssl
        self._peers: PeerClient | None = None
        self._origin: _OriginState | None = None
        self._home: HomeFetches | None = None
        self._cpu = CpuGauge()
        self.requests_sent = 0
        self.bytes_received = 0
        self.bad_chunks = 0
        self.errors = 0

    def attach(self, origin_state: _OriginState, home: HomeFetches | None = None) -> None:
        """Tell the source how this node's own origin requests are going (the fetcher), and where
        this node's origin fetches of its home chunks queue (shared with the peer server)."""
        self._origin = origin_state
        self._home = home

    def _index(self, chunk: Chunk) -> int | None:
        index_of = getattr(self._origin, "index_of", None)
        return None if index_of is None else index_of(chunk.digest)

    def _client(self) -> PeerClient:
        if self._peers is None:
            self._peers = PeerClient(
                {"Authorization": protocol.bearer(self.config.token)},
                max_connections=self.config.max_connections, keepalive=CLIENT_KEEPALIVE, ssl_context=self._ssl,
            )
        return self._peers

    async def aclose(self) -> None:
        if self._peers is not None:
            await self._peers.aclose()
            self._peers = None

    async def fetch(self, chunk: Chunk, priority: Priority, deadline: float, verify: Verifier) -> Data | None:
        trace.event("fetch", d=chunk.digest.hex()[:12], prio=int(priority))
        ranked = self.members.ranked(chunk.digest)
        # Members whose origin just failed fetch nothing for us (each ask would be answered "503
        # origin" again); the chunk's next candidates take their place, on every node alike.
        eligible = [key for key in ranked if not self.members.origin_held(key)]
        asked: set[str] = set()
        origin_down = self._origin is not None and not self._origin.origin_available
        loop = asyncio.get_running_loop()
        for i, key in enumerate(eligible[: self.config.candidates]):
            if loop.time() >= deadline:
                break
            if key == self.members.self_key:
                # This node is the one to fetch it from the origin.  The next candidate was its
                # home before this node joined (rendezvous order without us): it may hold it.
                nxt = eligible[i + 1] if i + 1 < len(eligible) else None
                if nxt is not None and not origin_down:
                    answer = await self._ask(nxt, chunk, priority, deadline, verify, cached_only=True)
                    if not isinstance(answer, _Answer):
                        return answer
                    asked.add(nxt)
                if not origin_down and self._home is not None and (index := self._index(chunk)) is not None:
                    # Wait for this node's turn at the origin (most urgent first, see p2p.schedule).
                    await self._home.turn(index, priority, deadline)
                break
            asked.add(key)
            answer = await self._ask(key, chunk, priority, deadline, verify, cached_only=False)
            if not isinstance(answer, _Answer):
                return answer
            origin_down = origin_down or answer is _Answer.ORIGIN_DOWN
        if origin_down:
            # Whoever holds it can still serve it: ask the rest for cached copies.
            for key in ranked:
                if key in asked or key == self.members.self_key:
                    continue
                if loop.time() >= deadline:
                    break
                answer = await self._ask(key, chunk, priority, deadline, verify, cached_only=True)
                if not isinstance(answer, _Answer):
                    return answer
        return None

    async def _ask(
        self, key: str, chunk: Chunk, priority: Priority, deadline: float, verify: Verifier, cached_only: bool
    ) -> Data | _Answer:
        loop = asyncio.get_running_loop()
        # A blocked reader's request gets one peer timeout.  A read-ahead request gets three: the
        # home may be working through a queue of them (its own origin fetches, at link rate), and
        # giving up early only fetches the chunk from the origin twice.  A dead peer still costs
        # one timeout: the first failure backs it off for every chunk.
        allowance = self.config.timeout * (1 if priority is Priority.DEMAND else READAHEAD_TIMEOUTS)
        budget = min(deadline - loop.time(), allowance)
        if budget <= 0:
            return _Answer.FAILED
        path = protocol.CHUNK_PATH.format(digest=chunk.digest.hex())
        t0 = loop.time()
        trace.event("ask", d=chunk.digest.hex()[:12], peer=key, prio=int(priority), cached=cached_only)
        headers = {protocol.PRIORITY: str(int(priority)), protocol.TIMEOUT: f"{budget:.3f}"}
        if self._cpu.busy() < ZSTD_BUSY_LIMIT:
            headers["Accept-Encoding"] = protocol.ZSTD
        if cached_only:
            headers[protocol.CACHED_ONLY] = "1"
        self.requests_sent += 1
        try:
            async with asyncio.timeout(budget):
                # A peer never redirects: following one would send this node's requests (and,
                # with TLS, its client certificate) wherever the peer says.  (PeerClient follows nothing.)
                async with self._client().get(key, path, headers) as resp:
                    trace.event("answer", d=chunk.digest.hex()[:12], peer=key, status=resp.status,
                                dt=round(loop.time() - t0, 4))
                    if resp.status == 404:
                        return _Answer.MISS
                    if resp.status == 503 and resp.header(protocol.REASON) == "origin":
                        if not cached_only:
                            self.members.origin_failed(key, "HTTP 503: the origin failed there")
                        return _Answer.ORIGIN_DOWN
                    if resp.status == 401:
                        if self.members.state(key) == "ok":
                            log.warning("peer %s refused this node's token: is --peer-token-file the same?", key)
                        return self._failed(key, "HTTP 401 (token refused)")
                    if 300 <= resp.status < 400:
                        return self._bad(key, f"HTTP {resp.status} redirect (peers do not redirect)")
                    if resp.status != 200:
                        return self._failed(key, f"HTTP {resp.status}")
                    encoding = resp.header("Content-Encoding").lower()
                    packed = encoding == protocol.ZSTD
                    if encoding and not (packed and "Accept-Encoding" in headers):
                        return self._bad(key, f"Content-Encoding {encoding!r}, which this node did not offer")
                    # A length other than the chunk's is a protocol violation, like bad bytes: an
                    # honest peer always sends the chunk it verified, with its exact Content-Length.
                    if packed:
                        # Compressed: the body is at most the chunk (the server sends it raw otherwise).
                        length = resp.content_length
                        if length is None or not 0 < length <= chunk.size:
                            return self._bad(key, f"compressed body of {length} bytes for a {chunk.size}-byte chunk")
                    else:
                        length = chunk.size
                        if resp.content_length is not None and resp.content_length != chunk.size:
                            announced = resp.content_length
                            return self._bad(key, f"{announced} bytes announced for a {chunk.size}-byte chunk")
                    body, got = await resp.read(length)
                    if got < length:
                        # The body ended where its framing (Content-Length, chunked encoding) said it
                        # would, short of the chunk: a lie.  A connection cut before the announced end
                        # is not one (a peer that crashed or was killed mid-reply): the client raises
                        # PeerError or OSError for that, a transport failure handled below.
                        return self._bad(key, f"body ended after {got} of {length} bytes")
                    if got > length:
                        return self._bad(key, f"more than {length} bytes for the chunk")
        except TimeoutError:
            return self._failed(key, f"no answer within {budget:.1f} s")
        except (PeerError, OSError) as exc:
            return self._failed(key, f"{type(exc).__name__}: {exc}")
        try:
            raw: Data = await asyncio.to_thread(_unpack, chunk, body) if packed else body
            data = await verify(chunk, raw)
        except IntegrityError as exc:
            return self._bad(key, str(exc))
        trace.event("got", d=chunk.digest.hex()[:12], peer=key, dt=round(loop.time() - t0, 4))
        self.bytes_received += len(data)
        self.members.succeeded(key, len(data))
        return data

    def _bad(self, key: str, reason: str) -> _Answer:
        """The peer broke the protocol or sent bytes that are not the chunk: hold it as bad."""
        self.bad_chunks += 1
        self.members.sent_bad(key, reason)
        return _Answer.FAILED

    def _failed(self, key: str, reason: str) -> _Answer:
        self.errors += 1
        self.members.failed(key, reason)
        return _Answer.FAILED


def _unpack(chunk: Chunk, packed: bytearray) -> bytes:
    """A compressed answer's chunk bytes (still to be verified); IntegrityError for bad data."""
    return unpack_zstd(chunk, memoryview(packed), " from a peer")
