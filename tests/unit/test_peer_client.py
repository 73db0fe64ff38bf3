"""p2p.client against scripted servers on loopback, under asyncio's loop and uvloop (the daemon's).

Each server reads request heads and answers from a script; it counts connections, so reuse
(and the lack of it after anything doubtful) is asserted, not assumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme
import uvloop

from p2p.client import DRAIN_LIMIT, MAX_HEAD, PeerClient, PeerError, _body_framing, _chunk_size, _parse_head

BODY = os.urandom(300_000)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY

Runner = Callable[[Coroutine[Any, Any, None]], None]
# What a script returns for one request: the bytes to send, and whether to close the connection after.
Script = Callable[[int, bytes], tuple[bytes, bool]]


@dataclass
class Scripted:
    """A loopback server answering request ``n`` (counted over all connections) with ``script(n, head)``."""

    script: Script
    heads: list[bytes] = field(default_factory=list)
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    server: asyncio.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    key: str = ""
    tls: ssl.SSLContext | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        self.writers.append(writer)
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                for _ in range(1000):  # requests on one connection; every test asks far fewer
                    head = await reader.readuntil(b"\r\n\r\n")
                    self.heads.append(head)
                    answer, close = self.script(len(self.heads) - 1, head)
                    writer.write(answer)
                    await writer.drain()
                    if close:
                        break
        finally:
            self.open_now -= 1
            writer.close()

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        self.key = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.transport.abort()
        await self.server.wait_closed()


def always(answer: bytes, close: bool = False) -> Script:
    return lambda n, head: (answer, close)


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Run a test's coroutine on a fresh loop of either kind."""
    def runner(coro: Coroutine[Any, Any, None]) -> None:
        if request.param == "uvloop":
            uvloop.run(coro)
        else:
            asyncio.run(coro)
    return runner


def client(**kw: Any) -> PeerClient:
    return PeerClient({"Authorization": "Bearer t"}, max_connections=kw.pop("max_connections", 4),
                      keepalive=kw.pop("keepalive", 15.0), **kw)


async def fetch(c: PeerClient, key: str, limit: int = len(BODY)) -> tuple[int, bytes, int]:
    async with c.get(key, "/v1/chunks/x", {"X-Lazyfs-Priority": "1"}) as reply:
        buf, got = await reply.read(limit)
        return reply.status, bytes(buf[: min(got, limit)]), got


def test_bodies_arrive_whole_and_the_connection_is_reused(run: Runner) -> None:
    async def main() -> None:
        async with Scripted(always(OK)) as srv:
            c = client()
            for _ in range(5):
                assert await fetch(c, srv.key) == (200, BODY, len(BODY))
            await c.aclose()
        assert srv.connections == 1
        head = srv.heads[0]
        assert head.startswith(b"GET /v1/chunks/x HTTP/1.1\r\n")
        assert b"\r\nHost: " + srv.key.encode() + b"\r\n" in head
        assert b"\r\nAuthorization: Bearer t\r\n" in head and b"\r\nX-Lazyfs-Priority: 1\r\n" in head
    run(main())


def chunked(body: bytes, step: int = 1, trailer: bytes = b"") -> bytes:
    out, pos = bytearray(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"), 0
    while pos < len(body):
        piece = body[pos : pos + step]
        out += b"%X;ext=1\r\n" % len(piece) + piece + b"\r\n"
        pos, step = pos + len(piece), step * 5 + 3
    return bytes(out + b"0\r\n" + trailer + b"\r\n")


def test_a_chunked_body_in_odd_pieces_with_trailers_is_one_body(run: Runner) -> None:
    async def main() -> None:
        async with Scripted(always(chunked(BODY, trailer=b"X-Check: 1\r\n"))) as srv:
            c = client()
            for _ in range(3):
                assert await fetch(c, srv.key) == (200, BODY, len(BODY))
            await c.aclose()
        assert srv.connections == 1
    run(main())


def test_lengths_other_than_the_limit_are_reported_not_trusted(run: Runner) -> None:
    """Short bodies (by Content-Length, the last HTTP chunk, or the peer closing) give fewer bytes;
    long ones more, without being read past the limit (and the connection is then not reused)."""
    n = len(BODY)
    cases = {
        "announced-short": (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + BODY[:10], 10, True),
        "announced-long": (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (n + 1) + BODY + b"!", n + 1, False),
        "chunked-short": (chunked(BODY[:1000]), 1000, True),
        "chunked-long": (chunked(BODY + b"!!"), n + 2, False),
        "closed-short": (b"HTTP/1.0 200 OK\r\n\r\n" + BODY[:99], 99, False),
        "closed-long": (b"HTTP/1.1 200 OK\r\n\r\n" + BODY + b"!", n + 1, False),
        "closed-exact": (b"HTTP/1.1 200 OK\r\n\r\n" + BODY, n, False),
    }

    async def main() -> None:
        for name, (answer, got, reused) in cases.items():
            head = answer.split(b"\r\n\r\n", 1)[0]
            close = head.startswith(b"HTTP/1.0") or (b"Length" not in head and b"chunked" not in head)
            async with Scripted(always(answer, close=close)) as srv:
                c = client()
                for _ in range(2):
                    status, body, n_got = await fetch(c, srv.key)
                    assert (status, n_got) == (200, got), name
                    assert body == BODY[: min(got, n)] or name.endswith("-long"), name
                await c.aclose()
            assert srv.connections == (1 if reused else 2), name
    run(main())


@pytest.mark.parametrize(
    "answer, message",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY[:5000], "after 5000 of"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n" + BODY[:100], "HTTP chunk"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "answer head"),
        (b"", "answer head"),
    ],
    ids=["content-length", "chunked", "head", "nothing"],
)
def test_a_connection_cut_before_the_framing_ends_raises(
    run: Runner, answer: bytes, message: str
) -> None:
    async def main() -> None:
        async with Scripted(always(answer, close=True)) as srv:
            c = client()
            with pytest.raises((PeerError, OSError), match=message):
                await fetch(c, srv.key)
            await c.aclose()
    run(main())


HOSTILE = {
    "head-too-long": b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * MAX_HEAD + b"\r\n\r\n",
    "too-many-headers": b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 100 + b"\r\n",
    "bad-status-line": b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n",
    "status-not-three-digits": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "interim": b"HTTP/1.1 100 Continue\r\n\r\n",
    "empty-status-line": b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "bad-header-name": b"HTTP/1.1 200 OK\r\nBad Name: 1\r\nContent-Length: 0\r\n\r\n",
    "no-colon": b"HTTP/1.1 200 OK\r\nContent-Length 0\r\n\r\n",
    "folded": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n  more\r\nContent-Length: 0\r\n\r\n",
    "length-and-chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "signed-length": b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
    "negative-length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "hex-length": b"HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n",
    "huge-length": b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    "gzip-encoding": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "bad-chunk-size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "chunk-size-overflow": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 40 + b"\r\n",
    "chunk-longer-than-said": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
    "endless-chunk-line": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1" + b"0" * 5000,
    "endless-trailers": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"X: 1\r\n" * 200 + b"\r\n",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_answers_raise_peer_error_and_drop_the_connection(
    run: Runner, name: str
) -> None:
    async def main() -> None:
        # After the hostile answer the same server answers properly: the client must use a new
        # connection for that (the old one may hold anything).
        async with Scripted(lambda n, head: (HOSTILE[name] if n == 0 else OK, False)) as srv:
            c = client()
            with pytest.raises(PeerError):
                await fetch(c, srv.key)
            assert await fetch(c, srv.key) == (200, BODY, len(BODY))
            await c.aclose()
        assert srv.connections == 2
    run(main())


def test_an_unread_body_is_drained_if_short_and_the_connection_closed_if_not(
    run: Runner,
) -> None:
    small = b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot here\n"
    large = b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n" % (DRAIN_LIMIT + 1) + b"x" * (DRAIN_LIMIT + 1)
    chunked_404 = chunked(b"not here\n").replace(b"200 OK", b"404 Not Found")

    async def main() -> None:
        for answer, connections in ((small, 1), (chunked_404, 1), (large, 3)):
            async with Scripted(always(answer)) as srv:
                c = client()
                for _ in range(3):
                    async with c.get(srv.key, "/", {}) as reply:
                        assert reply.status == 404
                await c.aclose()
            assert srv.connections == connections
    run(main())


def test_a_reply_abandoned_mid_body_closes_its_connection(run: Runner) -> None:
    async def main() -> None:
        half = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY[:1000]
        async with Scripted(lambda n, head: (half if n == 0 else OK, False)) as srv:
            c = client()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await fetch(c, srv.key)
            # The rest of the first body never comes; a reused connection would mistake the next
            # answer's bytes for it.
            assert await fetch(c, srv.key) == (200, BODY, len(BODY))
            await c.aclose()
        assert srv.connections == 2
    run(main())


def test_unasked_for_bytes_after_an_answer_retire_the_connection(run: Runner) -> None:
    async def main() -> None:
        async with Scripted(lambda n, head: (OK + b"HTTP/1.1 200 OK\r\n" if n == 0 else OK, False)) as srv:
            c = client()
            assert await fetch(c, srv.key) == (200, BODY, len(BODY))
            await asyncio.sleep(0.1)  # the extra bytes arrive while the connection is idle
            assert await fetch(c, srv.key) == (200, BODY, len(BODY))
            await c.aclose()
        assert srv.connections == 2
    run(main())


def test_a_connection_the_peer_closed_while_idle_is_replaced_without_an_error(
    run: Runner,
) -> None:
    """The server closes after every answer without saying so: each request that finds its idle
    connection closed (or closing under it) is sent once more on a new one."""
    async def main() -> None:
        async with Scripted(always(OK, close=True)) as srv:
            c = client()
            for i in range(4):
                assert await fetch(c, srv.key) == (200, BODY, len(BODY))
                if i % 2:
                    await asyncio.sleep(0.05)
            await c.aclose()
        assert srv.connections == 4
    run(main())


def test_at_most_max_connections_are_open_per_peer_and_idle_ones_expire(
    run: Runner,
) -> None:
    async def main() -> None:
        async with Scripted(always(OK)) as srv:
            c = client(max_connections=2)
            results = await asyncio.gather(*(fetch(c, srv.key) for _ in range(8)))
            assert all(r == (200, BODY, len(BODY)) for r in results)
            await c.aclose()
        assert srv.most_open <= 2 and srv.connections == 2
        async with Scripted(always(OK)) as srv:
            c = client(keepalive=0.0)
            for _ in range(3):
                assert await fetch(c, srv.key) == (200, BODY, len(BODY))
            await c.aclose()
        assert srv.connections == 3
    run(main())


def test_idle_connections_to_peers_no_longer_asked_are_closed_and_forgotten(run: Runner) -> None:
    """A peer that left the cluster is never asked again: its idle connection must not stay open
    (a node that died without a FIN never closes it from its side), nor its pool grow the client."""
    async def main() -> None:
        async with Scripted(always(OK)) as gone, Scripted(always(OK)) as stays:
            c = client(keepalive=0.1)
            assert await fetch(c, gone.key) == (200, BODY, len(BODY))
            assert await fetch(c, stays.key) == (200, BODY, len(BODY))
            assert gone.open_now == 1 and set(c._pools) == {gone.key, stays.key}
            for _ in range(3):  # stays is asked every 60 ms, gone never again
                await asyncio.sleep(0.06)
                assert await fetch(c, stays.key) == (200, BODY, len(BODY))
            for _ in range(100):
                if gone.open_now == 0:
                    break
                await asyncio.sleep(0.01)
            assert gone.open_now == 0 and set(c._pools) == {stays.key}
            assert stays.open_now == 1 and stays.connections == 1  # still reused within keepalive
            await c.aclose()
    run(main())


def test_request_headers_cannot_smuggle_lines() -> None:
    with pytest.raises(ValueError, match="bad request header"):
        PeerClient({"Authorization": "Bearer t\r\nX-Evil: 1"}, max_connections=1, keepalive=1.0)

    async def main() -> None:
        c = client()
        with pytest.raises(ValueError, match="bad request header"):
            async with c.get("127.0.0.1:9", "/", {"Bad Name": "1"}):
                pass
        await c.aclose()
    asyncio.run(main())


def test_bodies_arrive_whole_over_tls(run: Runner) -> None:
    """TLS transports fill a buffer in several record-sized reads (asyncio's writes each one into
    ``buffer[offset:]``): the body must still arrive whole, under either loop."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def main() -> None:
        async with Scripted(always(OK), tls=server_ctx) as srv:
            c = client(ssl_context=client_ctx)
            for _ in range(3):
                assert await fetch(c, srv.key) == (200, BODY, len(BODY))
            status, _, got = await fetch(c, srv.key, limit=len(BODY) - 1)  # announced too long: not read
            assert (status, got) == (200, len(BODY))
            assert await fetch(c, srv.key) == (200, BODY, len(BODY))
            await c.aclose()
        assert srv.connections == 2  # the too-long answer was not read to its end: its connection went
    run(main())


def test_random_heads_and_size_lines_parse_or_raise_peer_error() -> None:
    """The head and chunk-size parsers on mutated and random input: a PeerError or a result, never
    another exception (a UnicodeDecodeError or ValueError would escape PeerSource's handling)."""
    rng = random.Random(5)
    statuses = [b"HTTP/1.1 200 OK", b"HTTP/1.0 404 X", b"HTTP/1.1 204", b"HTTP/1.1 200 \xff\x00"]
    fields = [b"Content-Length: 12", b"Content-Length: \xb2", b"Transfer-Encoding: chunked", b"Connection: close",
              b"X-\xff: \x00\xff", b"Content-Length: 1 2", b":", b"", b"content-length: 0012",
              b"Transfer-Encoding: CHUNKED", b"X-A: \xe9t\xe9"]
    outcomes = {"parsed": 0, "refused": 0}
    for _ in range(3000):
        lines = [rng.choice(statuses)] + [rng.choice(fields) for _ in range(rng.randint(0, 4))]
        if rng.random() < 0.3:
            k = rng.randrange(len(lines))
            raw = bytearray(lines[k])
            for _ in range(rng.randint(1, 4)):
                raw.insert(rng.randint(0, len(raw)), rng.randrange(256))
            lines[k] = bytes(raw)
        try:
            status, http11, headers = _parse_head(lines)
            _body_framing(status, http11, headers)
            outcomes["parsed"] += 1
        except PeerError:
            outcomes["refused"] += 1
        line = bytes(rng.randrange(256) for _ in range(rng.randint(0, 20)))
        with contextlib.suppress(PeerError):
            assert 0 <= _chunk_size(line) < 16**15
    assert min(outcomes.values()) > 300, outcomes  # both paths exercised
