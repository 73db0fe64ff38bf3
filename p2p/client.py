"""PeerClient: the HTTP/1.1 client that asks peers for chunks, reading each body into its final buffer.

A peer's answer is a whole chunk (4 MiB by default) and most of a node's bytes come
from peers, so the receive path is where a cluster's CPU goes.  A general client
(aiohttp) copies every body byte three times in user space: out of the event loop's
receive buffer into a ``bytes`` per read, out of that into a ``bytes`` per parsed body
piece, and out of the pieces into the joined body (about 0.6 CPU-s per GiB on these
machines, against 0.2 for this client, each with the kernel's own copy).  Here the
connection is an :class:`asyncio.BufferedProtocol`: while a body is being read, the
event loop reads the socket straight into the chunk's buffer.  Only heads, chunk-size
lines and whatever arrived with them pass through a small scratch buffer.

It speaks only what the peer protocol needs (``GET``, keep-alive, ``Content-Length``,
``chunked`` or close-delimited bodies, TLS), and treats every answer as untrusted:
bounded heads and lines, strict numbers, no ``Content-Length`` beside ``chunked``,
no body past the caller's limit.  An answer that breaks the framing raises
:class:`PeerError`; a connection that fails raises ``OSError`` (``ssl.SSLError`` is
one); either way the connection is dropped, never reused.

Connections are kept per peer (at most ``max_connections`` in use at once; more
requests wait for one) and reused while idle for less than ``keepalive`` seconds.
Idle connections past that are closed, and peers no longer asked are forgotten, by a
sweep that the next request runs (at most once per ``keepalive``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import cast

from lazyfs.config import parse_host_port
from lazyfs.errors import LazyfsError

__all__ = ["PeerClient", "PeerError", "Reply"]

# A head (status line and headers) larger than this is not a peer's: ours are ~200 bytes.
MAX_HEAD = 16 * 1024
MAX_HEADERS = 64
# A chunk-size line (hex size, extensions) or trailer line longer than this is hostile.
MAX_LINE = 1024
# The scratch buffer the socket is read into outside bodies; bytes that arrive here beyond
# what is parsed wait in a queue, and reading pauses while that queue is this large.
SCRATCH = 64 * 1024
# The body of an answer the caller does not read (a 404's text) is read and dropped up to this
# size so the connection can be reused; a longer one closes the connection instead.
DRAIN_LIMIT = 64 * 1024
# A Content-Length beyond this is nonsense for any chunk (and guards int parsing).
MAX_LENGTH = 1 << 40

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_STATUS = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: [^\r\n]*)?")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")


class PeerError(LazyfsError):
    """A peer's answer broke HTTP/1.1 framing, or its connection ended before the answer did."""


class _Connection(asyncio.BufferedProtocol):
    """One connection's receiving side: a queue of received bytes, or a target buffer to fill."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        # A view, not the bytearray, is handed out: asyncio's TLS transport fills what it got in
        # several reads, into ``buffer[offset:]``, which for a bytearray is a copy (bytes lost).
        self._scratch = memoryview(bytearray(SCRATCH))
        self._queue = bytearray()  # received, not yet consumed
        self._target: memoryview | None = None  # while set, the socket is read into it
        self._filled = 0
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._error: BaseException | None = None
        self._paused = False
        self.answered = False  # anything received since the last request was sent
        self.idle_since = 0.0

    # -- asyncio.BufferedProtocol ----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None:
            return self._target[self._filled :]
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        self.answered = True
        if self._target is not None:
            self._filled += nbytes
            if self._filled == len(self._target):
                self._target = None
                self._wake()
            return
        self._queue += self._scratch[:nbytes]
        if len(self._queue) >= SCRATCH and not self._paused and self.transport is not None:
            self._paused = True  # nobody is reading: a peer sending unasked-for bytes waits
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if exc is not None:
            self._error = exc
        self._wake()

    # -- the reading side ------------------------------------------------------

    @property
    def reusable(self) -> bool:
        """Open, and nothing received that no request asked for."""
        return not self._eof and not self._queue and self.transport is not None and not self.transport.is_closing()

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.answered = False
        self.transport.write(request)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def lost(self, what: str) -> BaseException:
        if self._error is not None:
            return self._error if isinstance(self._error, OSError) else PeerError(f"{what}: {self._error}")
        return PeerError(f"connection closed {what}")

    def _take(self, n: int) -> bytearray:
        out = self._queue[:n]
        del self._queue[:n]
        if self._paused and len(self._queue) < SCRATCH and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return out

    async def read_line(self, limit: int, what: str) -> bytes:
        """The bytes up to the next CRLF (without it); PeerError past ``limit`` bytes."""
        start = 0
        while (end := self._queue.find(b"\r\n", start)) < 0:
            if len(self._queue) > limit:
                raise PeerError(f"{what} longer than {limit} bytes")
            if self._eof:
                raise self.lost(f"in the middle of the {what}")
            start = max(0, len(self._queue) - 1)
            await self._wait()
        if end > limit:
            raise PeerError(f"{what} longer than {limit} bytes")
        return bytes(self._take(end + 2)[:-2])

    async def fill(self, view: memoryview) -> int:
        """Fill ``view`` from the connection; how much was filled (less only if the peer closed it)."""
        n = min(len(view), len(self._queue))
        if n:
            view[:n] = self._take(n)
        if n == len(view) or self._eof:
            return n
        self._target, self._filled = view, n
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        try:
            while self._target is not None and not self._eof:
                await self._wait()
        finally:
            filled, self._target = self._filled, None
        if filled < len(view) and self._error is not None:
            raise self.lost("in the middle of a body")
        return filled


@dataclass
class Reply:
    """A peer's answer: its status and headers (names in lower case), and a way to read its body once."""

    status: int
    headers: Mapping[str, str]
    content_length: int | None
    _conn: _Connection
    _chunked: bool
    _keep_alive: bool
    _done: bool = False

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)

    async def read(self, limit: int) -> tuple[bytearray, int]:
        """The body in a buffer of ``limit`` bytes, and how many bytes the body had.

        Fewer than ``limit``: the body ended there, as its framing said (a ``Content-Length``,
        the last HTTP chunk, the peer closing a close-delimited body).  More than ``limit``:
        the body was longer (it is not read past that, and where a Content-Length said so, not
        read at all: the buffer is then empty; the connection is dropped either way).  A
        connection cut before the framing's end raises ``OSError`` or :class:`PeerError`.
        """
        if self._done:
            raise RuntimeError("the body was read already")
        self._done = True
        conn = self._conn
        if self.content_length is not None and self.content_length > limit:
            self._keep_alive = False
            return bytearray(), self.content_length  # announced too long: nothing read, nothing allocated
        buf = bytearray(limit)
        view = memoryview(buf)
        if self.content_length is not None:
            got = await conn.fill(view[: self.content_length])
            if got < self.content_length:
                raise conn.lost(f"after {got} of {self.content_length} bytes")
            return buf, got
        if not self._chunked:  # close-delimited: the body is whatever comes until the peer closes
            self._keep_alive = False
            got = await conn.fill(view)
            if got == limit and await conn.fill(memoryview(bytearray(1))):
                got += 1
            return buf, got
        got = 0
        while True:
            size = _chunk_size(await conn.read_line(MAX_LINE, "chunk-size line"))
            if size == 0:
                break
            if got + size > limit:
                self._keep_alive = False
                return buf, got + size
            if await conn.fill(view[got : got + size]) < size:
                raise conn.lost("in the middle of an HTTP chunk")
            got += size
            if await conn.read_line(2, "HTTP chunk end") != b"":
                raise PeerError("an HTTP chunk longer than its size line said")
        for _ in range(MAX_HEADERS + 1):  # trailers, unused, up to the empty line
            if await conn.read_line(MAX_LINE, "trailer") == b"":
                return buf, got
        raise PeerError(f"more than {MAX_HEADERS} trailer lines")

    async def _finish(self) -> bool:
        """Read and drop an unread body (if short enough); whether the connection can be reused."""
        if not self._done and self._keep_alive:
            try:
                _, got = await self.read(DRAIN_LIMIT)
            except (PeerError, OSError):
                return False
            if got > DRAIN_LIMIT:
                return False
        return self._keep_alive and self._conn.reusable


def _chunk_size(line: bytes) -> int:
    size = line.split(b";", 1)[0].strip(b" \t")
    if _HEX.fullmatch(size) is None:
        raise PeerError(f"bad chunk-size line {line[:40]!r}")
    return int(size, 16)


def _parse_head(lines: list[bytes]) -> tuple[int, bool, dict[str, str]]:
    """(status, HTTP/1.1?, headers) from a head's lines; PeerError for anything malformed."""
    m = _STATUS.fullmatch(lines[0])
    if m is None:
        raise PeerError(f"bad status line {lines[0][:60]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or _TOKEN.fullmatch(name) is None:
            raise PeerError(f"bad header line {line[:60]!r}")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key not in headers:
            headers[key] = text
        elif key in ("content-length", "transfer-encoding"):
            if headers[key] != text:  # a smuggling classic: which one would the other side believe?
                raise PeerError(f"two different {key} headers")
        else:
            headers[key] += ", " + text
    return int(m.group(2)), m.group(1) == b"1", headers


def _body_framing(status: int, http11: bool, headers: Mapping[str, str]) -> tuple[int | None, bool, bool]:
    """(Content-Length, chunked?, keep-alive?) of an answer to a GET, checked."""
    connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "close" not in connection if http11 else "keep-alive" in connection
    if status in (204, 304):
        return 0, False, keep_alive
    encoding = headers.get("transfer-encoding")
    length_text = headers.get("content-length")
    if encoding is not None:
        if encoding.lower() != "chunked" or not http11:
            raise PeerError(f"unsupported Transfer-Encoding {encoding!r}")
        if length_text is not None:
            raise PeerError("both Content-Length and Transfer-Encoding")
        return None, True, keep_alive
    if length_text is not None:
        if not length_text.isascii() or not length_text.isdigit() or len(length_text) > 15:
            raise PeerError(f"bad Content-Length {length_text[:40]!r}")
        length = int(length_text)
        if length > MAX_LENGTH:
            raise PeerError(f"Content-Length {length} is too large")
        return length, False, keep_alive
    return None, False, False


@dataclass
class _Pool:
    slots: asyncio.Semaphore
    idle: list[_Connection] = field(default_factory=list)
    busy: int = 0  # requests holding a slot


class PeerClient:
    """Keep-alive HTTP/1.1 ``GET`` to peers named ``HOST:PORT`` (see the module docstring)."""

    def __init__(
        self,
        headers: Mapping[str, str],
        max_connections: int,
        keepalive: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._headers = _encode_headers(headers)
        self._max = max(1, max_connections)
        self._keepalive = keepalive
        self._ssl = ssl_context
        self._pools: dict[str, _Pool] = {}
        self._closed = False
        self._swept = 0.0

    @contextlib.asynccontextmanager
    async def get(self, key: str, path: str, headers: Mapping[str, str]) -> AsyncIterator[Reply]:
        """Send ``GET path`` to the peer ``key`` and yield its answer's head; read the body with
        :meth:`Reply.read` inside the block.  The connection goes back to the pool only after a
        complete answer (an unread body is drained first, if short); on any error, or a
        cancellation, it is closed."""
        if self._closed:
            raise PeerError("the peer client is closed")
        self._sweep()
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(asyncio.Semaphore(self._max))
        request = b"GET %s HTTP/1.1\r\nHost: %s\r\n%s%s\r\n" % (
            path.encode("ascii"), key.encode("ascii"), self._headers, _encode_headers(headers)
        )
        pool.busy += 1  # a pool in use is never forgotten by _sweep
        try:
            async with pool.slots:
                conn, reused = await self._connection(key, pool)
                keep = False
                try:
                    conn.send(request)
                    try:
                        reply = await _read_head(conn)
                    except (PeerError, OSError):
                        # The peer may have closed an idle connection just as it was taken: a request
                        # that got no byte back on a reused connection is sent once more on a new one.
                        if not reused or conn.answered:
                            raise
                        conn.close()
                        conn = await self._connect(key)
                        conn.send(request)
                        reply = await _read_head(conn)
                    yield reply
                    keep = await reply._finish() and not self._closed
                finally:
                    if keep:
                        conn.idle_since = asyncio.get_running_loop().time()
                        pool.idle.append(conn)
                    else:
                        conn.close()
        finally:
            pool.busy -= 1

    def _sweep(self) -> None:
        """Close idle connections past ``keepalive`` and forget peers nobody is asking (at most once
        per ``keepalive``).  Without it a connection to a peer that left the cluster stayed open
        until that peer closed it, which a node that died without a FIN never does."""
        now = asyncio.get_running_loop().time()
        if now - self._swept < self._keepalive:
            return
        self._swept = now
        for key, pool in list(self._pools.items()):
            fresh = []
            for conn in pool.idle:
                if self._fresh(conn, now):
                    fresh.append(conn)
                else:
                    conn.close()
            pool.idle = fresh
            if not fresh and not pool.busy:
                del self._pools[key]

    def _fresh(self, conn: _Connection, now: float) -> bool:
        """An idle connection that may carry the next request."""
        return conn.reusable and now - conn.idle_since < self._keepalive

    async def _connection(self, key: str, pool: _Pool) -> tuple[_Connection, bool]:
        """An idle connection to ``key`` (True) or a new one (False)."""
        now = asyncio.get_running_loop().time()
        while pool.idle:
            conn = pool.idle.pop()
            if self._fresh(conn, now):
                return conn, True
            conn.close()
        return await self._connect(key), False

    async def _connect(self, key: str) -> _Connection:
        host, port = parse_host_port(key, "peer")
        _, conn = await asyncio.get_running_loop().create_connection(
            _Connection, host, port, ssl=self._ssl, server_hostname=host if self._ssl is not None else None
        )
        return conn

    async def aclose(self) -> None:
        self._closed = True
        for pool in self._pools.values():
            for conn in pool.idle:
                conn.close()
            pool.idle.clear()
        await asyncio.sleep(0)  # let the transports finish closing


async def _read_head(conn: _Connection) -> Reply:
    lines: list[bytes] = []
    size = 0
    while True:
        line = await conn.read_line(MAX_HEAD - size, "answer head")
        if not line:
            if not lines:
                raise PeerError("an empty line where a status line should be")
            break
        if line[:1] in (b" ", b"\t"):
            raise PeerError("a folded header line")
        lines.append(line)
        size += len(line) + 2
        if len(lines) > MAX_HEADERS + 1:
            raise PeerError(f"more than {MAX_HEADERS} headers")
    status, http11, headers = _parse_head(lines)
    if status < 200:
        raise PeerError(f"an interim answer ({status}) to a GET")
    length, chunked, keep_alive = _body_framing(status, http11, headers)
    return Reply(status, headers, length, conn, chunked, keep_alive)


def _encode_headers(headers: Mapping[str, str]) -> bytes:
    out = bytearray()
    for name, value in headers.items():
        raw_name, raw_value = name.encode("ascii"), value.encode("latin-1")
        if _TOKEN.fullmatch(raw_name) is None or b"\r" in raw_value or b"\n" in raw_value:
            raise ValueError(f"bad request header {name!r}")
        out += raw_name + b": " + raw_value + b"\r\n"
    return bytes(out)
