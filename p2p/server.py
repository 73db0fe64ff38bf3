"""PeerServer: serves verified chunks to peers, by digest, and nothing else.

A chunk of the mounted manifest is served from the fetcher: from memory or the
cache when held, otherwise fetched from the origin first (this node is its
home; concurrent requests share that one fetch) — but never from another peer,
so two nodes can never wait on each other.  A chunk of another manifest is
served only if the shared cache holds it.  See :mod:`p2p.protocol` for the
wire format.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import zstandard
from aiohttp import web

from lazyfs.config import parse_host_port
from lazyfs.errors import DeadlineError, LazyfsError, OriginError, UnavailableError, UsageError
from lazyfs.fetch import Data, Priority
from lazyfs.manifest import Codec, Manifest
from p2p import protocol, trace
from p2p.schedule import HomeFetches, PrioritySlots, urgency

__all__ = ["ChunkProvider", "PeerServer", "ServerCounters"]

log = logging.getLogger(__name__)

MAX_TIMEOUT = 300.0
# Replies written at once.  Each reply is a whole chunk; sent together they share the link and
# all arrive late, sent a few at a time the most urgent arrives first and readers keep moving.
SEND_SLOTS = 2
# Bytes written per step of a reply (the writer drains between steps: a slot is held while the
# chunk actually leaves, not just while it is copied into a buffer).
SEND_PIECE = 256 * 1024
# After the asker's deadline a reply is abandoned (the slot freed, the connection aborted); the grace
# covers clock skew between the two sides' event loops and the last piece in flight.
SEND_GRACE = 1.0
# Replies are zstd-compressed for askers that accept it (protocol.accepts_zstd) when the seeder
# stored the chunk compressed: the origin sent it compressed, and a peer link should not carry
# more than the origin link did (bf16 weights: 0.78x, i.e. 22 % less time on a network-bound link).
# Level 1 as the seeder's default: ~300 MB/s per core, decompression faster still.
PACK_LEVEL = 1
# Compressed chunks kept for the next asker (a chunk goes to every other node at about the same time).
PACKED_BYTES = 64 * 1024 * 1024


@dataclass(eq=False)
class _SharedRead:
    """One cache read of a chunk outside the manifest, held while any request for it is being answered."""

    future: asyncio.Future[Data | None]
    users: int = 0


class ChunkProvider(Protocol):
    """What the server needs from the fetcher (and, for foreign chunks, the store)."""

    def index_of(self, digest: bytes) -> int | None: ...

    async def cached(self, index: int) -> Data | None: ...

    async def get(
        self, index: int, priority: Priority = ..., deadline: float | None = ..., *, use_sources: bool = ...
    ) -> Data: ...

    @property
    def origin_available(self) -> bool: ...


class BlobStore(Protocol):
    def read(self, digest: bytes, offset: int = 0, length: int | None = None) -> bytes | None: ...


@dataclass
class ServerCounters:
    requests_served: int = 0
    bytes_served: int = 0  # chunk bytes (uncompressed)
    bytes_sent: int = 0  # reply bodies as sent (compressed where the asker accepts zstd)
    requests_refused: int = 0  # no or wrong token
    connections_refused: int = 0  # over MAX_CLIENTS at once: closed unread
    not_found: int = 0
    server_errors: int = 0  # origin down, deadline, bugs
    frames_reused: int = 0  # compressed replies that are the origin's own frame, not compressed here


# A connection with no request in progress is closed after this long, including one that has
# not finished its first request line (aiohttp's default, an hour, let anyone who can reach the
# port hold a descriptor per connection, no token needed).  Longer than the clients' own
# keep-alive (p2p.source.CLIENT_KEEPALIVE), so a client never reuses a connection the server
# is closing.
KEEPALIVE = 30.0
# Connections held at once; one more is closed as soon as it is accepted.  With the keep-alive
# above, a flood of connections (no token needed to open one) would otherwise take every file
# descriptor the daemon has (1,024 by default) within seconds.  Peers open at most
# PeerConfig.max_connections (32) each, and only as many as they have requests in flight.
MAX_CLIENTS = 512


class _Refuse(asyncio.Protocol):
    """What a connection over MAX_CLIENTS gets: closed at once, nothing read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()

class PeerServer:
    def __init__(self, listen: str, token: bytes, store: BlobStore, server_ssl: ssl.SSLContext | None) -> None:
        self.host, self.port = parse_host_port(listen, "--listen address")
        self.token = token
        self.store = store
        self._ssl = server_ssl
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._provider: ChunkProvider | None = None
        self._home: HomeFetches | None = None
        # Replies go out SEND_SLOTS at a time, most urgent first (see p2p.schedule).
        self._send = PrioritySlots(SEND_SLOTS)
        self._packs: OrderedDict[int, bytes] = OrderedDict()  # index -> compressed (b"": not worth it)
        self._packs_bytes = 0
        self._packing: dict[int, asyncio.Future[bytes]] = {}
        # Chunks of other manifests, read from the shared cache, by digest: the requests for one
        # digest share one read and one buffer until the last of them is answered (see _join).
        self._foreign: dict[bytes, _SharedRead] = {}
        self.counters = ServerCounters()

    async def start(self, provider: ChunkProvider, home: HomeFetches | None = None) -> None:
        self._provider = provider
        self._home = home
        keep = getattr(provider, "keep_stored", None)
        if keep is not None:
            keep(PACKED_BYTES)  # the origin's frames: sent on as they are instead of compressed again
        app = web.Application()
        app.router.add_get(protocol.CHUNK_PATH, self._handle)
        self._runner = runner = web.AppRunner(
            app, access_log=None, handle_signals=False, keepalive_timeout=KEEPALIVE
        )
        await runner.setup()
        server = runner.server
        assert server is not None
        limit = MAX_CLIENTS

        def protocol_factory() -> asyncio.Protocol:
            if len(server.connections) >= limit:
                self.counters.connections_refused += 1
                return _Refuse()
            return server()

        try:
            self._listener = await asyncio.get_running_loop().create_server(
                protocol_factory, self.host or None, self.port, ssl=self._ssl, reuse_address=True
            )
        except OSError as exc:
            await runner.cleanup()
            self._runner = None
            raise UsageError(f"cannot listen for peers on {self.host}:{self.port}: {exc.strerror or exc}") from exc

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.close()  # no new connections; the runner's cleanup ends the open ones
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        c = self.counters
        if not protocol.token_matches(request.headers.get("Authorization"), self.token):
            c.requests_refused += 1
            return web.Response(status=401, text="a valid peer token is required\n")
        digest = protocol.digest_from_hex(request.match_info["digest"])
        priority_s = request.headers.get(protocol.PRIORITY, "1")
        timeout_s = request.headers.get(protocol.TIMEOUT, "30")
        try:
            priority = Priority(int(priority_s))
            timeout = min(max(float(timeout_s), 0.0), MAX_TIMEOUT)
        except ValueError:
            return web.Response(status=400, text="bad priority or timeout header\n")
        if digest is None or timeout != timeout:  # NaN
            return web.Response(status=400, text="bad request\n")
        cached_only = request.headers.get(protocol.CACHED_ONLY) == "1"
        deadline = asyncio.get_running_loop().time() + timeout
        assert self._provider is not None
        if self._provider.index_of(digest) is not None:
            return await self._answer(request, digest, priority, deadline, cached_only)
        self._join(digest)
        try:
            return await self._answer(request, digest, priority, deadline, cached_only)
        finally:
            self._leave(digest)

    def _join(self, digest: bytes) -> None:
        """Count a request for a chunk outside the manifest, starting its cache read if none is held.

        Each request holds the chunk until its reply has been sent, which may wait for a send
        slot until the asker's deadline (up to MAX_TIMEOUT): a read per request made a token
        holder's concurrent requests for one cached chunk hold a chunk-sized copy each (200 of a
        4 MiB chunk: 795 MiB), now one.  An unknown digest allocates nothing either way (an index
        lookup; 14 KiB per request, all of it aiohttp's).
        """
        shared = self._foreign.get(digest)
        if shared is None:
            read: asyncio.Future[Data | None] = asyncio.ensure_future(asyncio.to_thread(self.store.read, digest))
            shared = self._foreign[digest] = _SharedRead(read)
        shared.users += 1

    def _leave(self, digest: bytes) -> None:
        shared = self._foreign[digest]
        shared.users -= 1
        if shared.users == 0:
            del self._foreign[digest]  # the next request reads again: the chunk may have arrived or gone
            shared.future.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody may be waiting

    async def _answer(
        self, request: web.Request, digest: bytes, priority: Priority, deadline: float, cached_only: bool
    ) -> web.StreamResponse:
        c = self.counters
        t0 = asyncio.get_running_loop().time()
        trace.event("req", d=digest.hex()[:12], prio=int(priority), cached=cached_only)
        try:
            data = await self._lookup(digest, priority, deadline, cached_only)
            trace.event("have", d=digest.hex()[:12], found=data is not None,
                        dt=round(asyncio.get_running_loop().time() - t0, 4))
        except DeadlineError:
            c.server_errors += 1
            assert self._provider is not None
            if not self._provider.origin_available:
                return web.Response(status=503, headers={protocol.REASON: "origin"}, text="origin unavailable\n")
            return web.Response(status=504, text="not fetched in time\n")
        except (OriginError, UnavailableError) as exc:
            c.server_errors += 1
            return web.Response(status=503, headers={protocol.REASON: "origin"}, text=f"{exc}\n")
        except LazyfsError as exc:
            c.server_errors += 1
            return web.Response(status=500, text=f"{exc}\n")
        if data is None:
            c.not_found += 1
            return web.Response(status=404, text="not here\n")
        assert self._provider is not None
        return await self._reply(request, data, priority, self._provider.index_of(digest), deadline)

    async def _reply(
        self, request: web.Request, data: Data, priority: Priority, index: int | None, deadline: float
    ) -> web.StreamResponse:
        total = len(data)
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        status, body = 200, memoryview(data)
        if "Range" in request.headers:
            try:
                rng = request.http_range
                start, stop, step = rng.indices(total)
            except ValueError:
                start, stop, step = 0, 0, 1
            if step != 1 or start >= stop:
                headers["Content-Range"] = f"bytes */{total}"
                return web.Response(status=416, headers=headers)
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{total}"
            status, body = 206, body[start:stop]
        else:
            start, stop = 0, total
        if status == 200 and index is not None and protocol.accepts_zstd(request.headers.get("Accept-Encoding")):
            packed = await self._packed(index, data)
            if packed is not None:
                headers["Content-Encoding"] = protocol.ZSTD
                body = memoryview(packed)
        key = urgency(priority, index if index is not None else 1 << 62)
        try:
            async with asyncio.timeout_at(deadline):
                await self._send.acquire(key, bypass=priority is Priority.DEMAND)
        except TimeoutError:
            self.counters.server_errors += 1
            return web.Response(status=504, text="not sent in time\n")
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(body)
        try:
            # The asker stops waiting at the deadline (its own timeout): an asker that stopped
            # reading without closing (a frozen host, a partition) must not hold a send slot until
            # TCP gives up, ~15 minutes later.
            async with asyncio.timeout_at(deadline + SEND_GRACE):
                await resp.prepare(request)
                for pos in range(0, len(body), SEND_PIECE):
                    await resp.write(body[pos : pos + SEND_PIECE])
                await resp.write_eof()
        except ConnectionError:  # the asker gave up (its timeout) and closed the connection
            return resp
        except TimeoutError:
            self.counters.server_errors += 1
            if request.transport is not None:
                request.transport.abort()  # a half-sent body: the connection cannot be reused
            return resp
        finally:
            self._send.release()
        self.counters.requests_served += 1
        self.counters.bytes_served += stop - start if status == 206 else total
        self.counters.bytes_sent += len(body)
        return resp

    async def _packed(self, index: int, data: Data) -> bytes | None:
        """Chunk ``index`` compressed for the wire, or None where that does not pay (see PACK_LEVEL).

        A home sends each chunk to every other node: it is compressed once and kept
        (``PACKED_BYTES`` of the most recent) for the next asker.
        """
        packed = self._packs.get(index)
        if packed is not None:
            self._packs.move_to_end(index)
            return packed or None
        provider = self._provider
        manifest = getattr(provider, "manifest", None)
        if not isinstance(manifest, Manifest) or manifest.chunks[index].codec is not Codec.ZSTD:
            return None  # the seeder found it incompressible: so is it now
        pending = self._packing.get(index)
        if pending is None:
            # The frame the origin sent, when the fetcher kept it (and this node fetched the chunk
            # from the origin: its home chunks): compressing the chunk again cost this node ~3 ms
            # of a core per MiB it served.
            take = getattr(provider, "take_stored", None)
            stored = take(index) if take is not None else None
            if stored is not None:
                self.counters.frames_reused += 1
                pending = asyncio.get_running_loop().create_future()
                pending.set_result(stored)
            else:
                pending = asyncio.ensure_future(asyncio.to_thread(_compress, data))
            self._packing[index] = pending
            try:
                packed = await asyncio.shield(pending)
            finally:
                del self._packing[index]
            self._packs[index] = packed
            self._packs_bytes += len(packed)
            while self._packs_bytes > PACKED_BYTES:
                _, old = self._packs.popitem(last=False)
                self._packs_bytes -= len(old)
        else:
            packed = await asyncio.shield(pending)
        return packed or None


    async def _lookup(self, digest: bytes, priority: Priority, deadline: float, cached_only: bool) -> Data | None:
        provider = self._provider
        assert provider is not None
        index = provider.index_of(digest)
        if index is None:
            # Not in the mounted manifest: only what the shared cache already holds (verified),
            # read once for all the requests that hold it (see _join).
            return await asyncio.shield(self._foreign[digest].future)
        if cached_only:
            return await provider.cached(index)
        if self._home is not None:
            return await self._home.get(index, priority, deadline)
        return await provider.get(index, priority, deadline, use_sources=False)


def _compress(data: Data) -> bytes:
    """``data`` as one zstd frame, or b"" when that saves under 10 % (the seeder's rule)."""
    packed = zstandard.ZstdCompressor(level=PACK_LEVEL).compress(data)
    return packed if len(packed) <= 0.9 * len(data) else b""
