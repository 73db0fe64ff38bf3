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
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from lazyfs.config import parse_host_port
from lazyfs.errors import DeadlineError, LazyfsError, OriginError, UnavailableError, UsageError
from lazyfs.fetch import Priority
from p2p import protocol

__all__ = ["ChunkProvider", "PeerServer", "ServerCounters"]

log = logging.getLogger(__name__)

MAX_TIMEOUT = 300.0


class ChunkProvider(Protocol):
    """What the server needs from the fetcher (and, for foreign chunks, the store)."""

    def index_of(self, digest: bytes) -> int | None: ...

    async def cached(self, index: int) -> bytes | None: ...

    async def get(
        self, index: int, priority: Priority = ..., deadline: float | None = ..., *, use_sources: bool = ...
    ) -> bytes: ...

    @property
    def origin_available(self) -> bool: ...


class BlobStore(Protocol):
    def read(self, digest: bytes, offset: int = 0, length: int | None = None) -> bytes | None: ...


@dataclass
class ServerCounters:
    requests_served: int = 0
    bytes_served: int = 0
    requests_refused: int = 0  # no or wrong token
    not_found: int = 0
    server_errors: int = 0  # origin down, deadline, bugs


class PeerServer:
    def __init__(self, listen: str, token: bytes, store: BlobStore, server_ssl: ssl.SSLContext | None) -> None:
        self.host, self.port = parse_host_port(listen, "--listen address")
        self.token = token
        self.store = store
        self._ssl = server_ssl
        self._runner: web.AppRunner | None = None
        self._provider: ChunkProvider | None = None
        self.counters = ServerCounters()

    async def start(self, provider: ChunkProvider) -> None:
        self._provider = provider
        app = web.Application()
        app.router.add_get(protocol.CHUNK_PATH, self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host or None, self.port, ssl_context=self._ssl, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise UsageError(f"cannot listen for peers on {self.host}:{self.port}: {exc.strerror or exc}") from exc

    async def aclose(self) -> None:
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
        try:
            deadline = asyncio.get_running_loop().time() + timeout
            data = await self._lookup(digest, priority, deadline, cached_only)
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
        return self._reply(request, data)

    def _reply(self, request: web.Request, data: bytes) -> web.Response:
        total = len(data)
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if "Range" not in request.headers:
            self.counters.requests_served += 1
            self.counters.bytes_served += total
            return web.Response(body=data, headers=headers)
        try:
            rng = request.http_range
            start, stop, step = rng.indices(total)
        except ValueError:
            start, stop, step = 0, 0, 1
        if step != 1 or start >= stop:
            headers["Content-Range"] = f"bytes */{total}"
            return web.Response(status=416, headers=headers)
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{total}"
        self.counters.requests_served += 1
        self.counters.bytes_served += stop - start
        return web.Response(status=206, body=memoryview(data)[start:stop], headers=headers)

    async def _lookup(self, digest: bytes, priority: Priority, deadline: float, cached_only: bool) -> bytes | None:
        provider = self._provider
        assert provider is not None
        index = provider.index_of(digest)
        if index is None:
            # Not in the mounted manifest: only what the shared cache already holds (verified).
            return await asyncio.to_thread(self.store.read, digest)
        if cached_only:
            return await provider.cached(index)
        return await provider.get(index, priority, deadline, use_sources=False)
