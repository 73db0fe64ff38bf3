"""The peer tier end to end: several nodes in one event loop, real HTTP (and TLS) between them on loopback.

Each node is what a mount daemon composes: a real on-disk ChunkStore, a ChunkFetcher whose
extra source is the node's PeerSource, and a PeerServer on its own port.  The origin is an
in-memory origin that counts every byte it serves (its egress), wrapped in a fault injector
where a test needs the origin down.  Hostile peers are real servers too: one that forges
bytes, one that dies mid-transfer, one that accepts connections and never answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import blake3
import pytest
import trustme
import zstandard
from aiohttp import web

from lazyfs.config import PeerConfig, SeedConfig
from lazyfs.daemon import PeerTierFactory
from lazyfs.fetch import ChunkFetcher, FetchConfig
from lazyfs.manifest import Codec, EntryType, Manifest, parse_ref
from lazyfs.origin.base import Origin
from lazyfs.seed import seed
from lazyfs.store import ChunkStore
from lazyfs.testing import FaultyOrigin, MemoryOrigin
from p2p import PeerTier, rank
from p2p.protocol import CHUNK_PATH

KiB = 1024
CHUNK = 64 * KiB
TOKEN = b"cluster-secret-for-tests"

ZSTD_MAGIC = (0xFD2FB528).to_bytes(4, "little")

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def always_offer_zstd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Peers ask for compressed replies only while the machine has CPU to spare; a test machine
    busy with other tests must not change what these tests see, so they always ask."""
    monkeypatch.setattr("p2p.source.ZSTD_BUSY_LIMIT", 2.0)  # busy() is a fraction <= 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def published(tmp_path: Path) -> AsyncIterator[tuple[MemoryOrigin, Manifest, dict[bytes, bytes]]]:
    src = tmp_path / "src"
    src.mkdir()
    files = {
        b"model.bin": os.urandom(CHUNK * 48 + 777),  # incompressible: stored raw
        b"config.json": b'{"layers": 2}\n' * 3000,  # compressible: zstd
        b"tiny": b"t",
    }
    for name, data in files.items():
        (src / os.fsdecode(name)).write_bytes(data)
    origin = MemoryOrigin()
    result = await seed(src, origin, parse_ref("m:1"), SeedConfig(chunk_size=CHUNK, pack_size=8 * CHUNK))
    origin.reset_statistics()
    yield origin, result.manifest, files
    await origin.aclose()


def stored_bytes(m: Manifest) -> int:
    return sum(c.stored_size for c in m.chunks)


@dataclass
class Node:
    key: str
    store: ChunkStore
    fetcher: ChunkFetcher
    tier: PeerTier

    async def read_all(self, m: Manifest) -> dict[bytes, bytes]:
        out = {}
        for e in m.entries:
            if e.type is EntryType.REG:
                parts = await asyncio.gather(*(self.fetcher.get(i) for i in e.chunks))
                out[e.path] = b"".join(parts)
        await self.fetcher.wait_idle()  # cache writes done: tests look at the store next
        return out

    async def close(self) -> None:
        await self.tier.aclose()
        await self.fetcher.aclose()
        self.store.close()


@dataclass
class Cluster:
    tmp_path: Path
    manifest: Manifest
    nodes: list[Node] = field(default_factory=list)

    async def start(
        self,
        origin: Origin,
        listen: str,
        peers: list[str],
        *,
        resolver: Callable[[str, int], Awaitable[list[str]]] | None = None,
        read_timeout: float = 20.0,
        **peer_options: Any,
    ) -> Node:
        store = ChunkStore.open(self.tmp_path / f"cache-{listen}", 1 << 30)
        config = PeerConfig(token=TOKEN, listen=listen, peers=tuple(peers), **peer_options)
        tier = PeerTier(config, store) if resolver is None else PeerTier(config, store, resolver)
        fetcher = ChunkFetcher(
            self.manifest, origin, store, FetchConfig(read_timeout=read_timeout), sources=[tier.source]
        )
        await tier.start(fetcher)
        node = Node(listen, store, fetcher, tier)
        self.nodes.append(node)
        return node

    async def close(self) -> None:
        for n in self.nodes:
            await n.close()
        self.nodes.clear()


@pytest.fixture
async def cluster(
    tmp_path: Path, published: tuple[MemoryOrigin, Manifest, dict[bytes, bytes]]
) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path, published[1])
    yield c
    await c.close()


def forget(node: Node, m: Manifest) -> None:
    """Drop every chunk from the node's cache and memory, so the next read fetches again."""
    node.store.evict(0)
    node.fetcher._memory.clear()


def cached_chunks_are_genuine(node: Node, m: Manifest) -> int:
    """Every chunk in the node's cache hashes to its digest; returns how many there are."""
    n = 0
    for c in m.chunks:
        data = node.store.read(c.digest)
        if data is not None:
            assert blake3.blake3(data).digest() == c.digest
            n += 1
    return n


def test_the_tier_is_what_the_daemon_expects() -> None:
    factory: PeerTierFactory = PeerTier  # mypy checks PeerTier against lazyfs.daemon.PeerTier
    assert callable(factory)


async def test_nodes_read_identical_bytes_and_the_origin_serves_each_chunk_once(
    cluster: Cluster, published: tuple[MemoryOrigin, Manifest, dict[bytes, bytes]]
) -> None:
    origin, m, files = published
    ports = [free_port() for _ in range(4)]
    peers = [f"127.0.0.1:{p}" for p in ports]
    nodes = [await cluster.start(origin, k, peers) for k in peers]
    results = await asyncio.gather(*(n.read_all(m) for n in nodes))
    for r in results:
        assert r == files
    # Each distinct chunk crossed the origin link once: its home fetched it, everyone else asked the home.
    assert origin.statistics().bytes_read == stored_bytes(m)
    distinct = len({c.digest for c in m.chunks})
    for n in nodes:
        st = n.tier.statistics()
        assert st.members == 4 and st.live == 4
        assert st.requests_served > 0 and st.bytes_served > 0, "every node is the home of some chunks"
        assert st.bad_chunks == 0 and st.errors == 0
        assert n.fetcher.statistics().bytes_from_peers > 0
        assert cached_chunks_are_genuine(n, m) == distinct
    # Each node served its home chunks (rendezvous placement) to the three others.  (How even the
    # homes are is placement's business, tested in tests/unit: 51 chunks on 4 random ports are not.)
    served = [n.tier.statistics().bytes_served for n in nodes]
    total = sum(f.size for f in m.chunks)
    assert sum(served) == pytest.approx(3 * total, rel=0.05)
    homes = {n.key: 0 for n in nodes}
    for c in {c.digest: c for c in m.chunks}.values():
        homes[rank(peers, c.digest)[0]] += 3 * c.size
    assert served == pytest.approx([homes[n.key] for n in nodes], rel=0.05, abs=3 * CHUNK)
    # Chunks the seeder compressed cross peer links compressed too; the others go as they are.
    packed = [c for c in m.chunks if c.codec is Codec.ZSTD]
    assert packed, "the test data has a compressible file"
    sent = sum(n.tier.server.counters.bytes_sent for n in nodes if n.tier.server is not None)
    saved = sum(3 * (c.size - c.stored_size) for c in packed)
    assert sum(served) - sent == pytest.approx(saved, rel=0.2)
    # A home sends on the frame the origin sent it, instead of compressing the chunk again.
    reused = sum(n.tier.server.counters.frames_reused for n in nodes if n.tier.server is not None)
    assert reused == len({c.digest for c in packed})


async def forged_server(port: int, m: Manifest, packed: str = "") -> web.AppRunner:
    """A peer that knows the token and the manifest, and answers with random bytes of the right length;
    ``packed``: claims a zstd body, a frame of zeros ("frame") or bytes that are not zstd ("garbage")."""
    sizes = {c.digest.hex(): c.size for c in m.chunks}

    async def handle(request: web.Request) -> web.Response:
        body = os.urandom(sizes.get(request.match_info["digest"], CHUNK))
        if not packed:
            return web.Response(body=body)
        if packed == "frame":  # a well-formed frame of the wrong bytes (zeros)
            body = zstandard.ZstdCompressor().compress(bytes(len(body)))
        elif packed == "oversize":  # a small, well-formed frame of 64 times the chunk's size
            body = zstandard.ZstdCompressor().compress(bytes(64 * len(body)))
        elif packed == "bomb":  # 17 bytes declaring a 2^50-byte frame (zstandard would allocate it)
            body = ZSTD_MAGIC + bytes([0xE0]) + (1 << 50).to_bytes(8, "little") + bytes([1, 0, 0])
        else:  # half the right length of no frame at all
            body = body[: len(body) // 2]
        return web.Response(body=body, headers={"Content-Encoding": "zstd"})

    app = web.Application()
    app.router.add_get(CHUNK_PATH, handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@pytest.mark.allow_warnings
@pytest.mark.parametrize(
    "packed",
    ["", "frame", "garbage", "oversize", "bomb"],
    ids=["raw", "zstd-frame", "zstd-garbage", "zstd-oversize", "zstd-bomb"],
)
async def test_a_peer_forging_bytes_is_never_believed_and_is_marked_bad(
    cluster: Cluster, published: tuple[MemoryOrigin, Manifest, dict[bytes, bytes]], packed: str
) -> None:
    origin, m, files = published
    evil_port, a_port, b_port = free_port(), free_port(), free_port()
    evil = await forged_server(evil_port, m, packed)
    try:
        peers = [f"127.0.0.1:{p}" for p in (evil_port, a_port)]
        a = await cluster.start(origin, f"127.0.0.1:{a_port}", peers)
        assert await a.read_all(m) == files
        st = a.tier.statistics()
        evil_key = f"127.0.0.1:{evil_port}"
        assert st.bad_chunks >= 1 and st.per_peer_bad[evil_key] == st.bad_chunks
        assert a.tier.members.state(evil_key) == "bad"
        # Frames that are not zstd, or that declare another size than the chunk's, are refused
        # before anything is decompressed or the fetcher's verifier sees them.
        refused_early = packed in ("garbage", "oversize", "bomb")
        assert a.fetcher.statistics().verify_failures == (0 if refused_early else st.bad_chunks)
        assert cached_chunks_are_genuine(a, m) == len({c.digest for c in m.chunks})
        # What a caches and serves onward is the real thing: b, asking a, gets genuine bytes.
        b = await cluster.start(origin, f"127.0.0.1:{b_port}", [*peers, f"127.0.0.1:{b_port}"])
        assert await b.read_all(m) == files
        assert a.tier.statistics().bytes_served > 0
    finally:
        await evil.cleanup()


@contextlib.asynccontextmanager
async def read_beside(
    cluster: Cluster,
    published: tuple[MemoryOrigin, Manifest, dict[bytes, bytes]],
    make_peer: Callable[[int], Awaitable[RawPeer]],
) -> AsyncIterator[tuple[Node, str]]:
    """A test-made peer (``make_peer(port)``) and a node whose one other member it is; the node has
    read every file (equal to the originals) when the body runs, and the peer is closed after."""
    origin, m, files = published
    port = free_port()
    peer = await make_peer(port)
    try:
        peer_key, key = f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"
        node = await cluster.start(origin, key, [peer_key, key])
        assert await node.read_all(m) == files
        yield node, peer_key
    finally:
        await peer.close()


@dataclass
class RawPeer:
    """A misbehaving peer on a plain asyncio server; ``close`` also ends the connections it holds."""

    server: asyncio.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.transport.abort()
        await self.server.wait_closed()
        await asyncio.sleep(0)


async def half_then_close_server(port: int, m: Manifest) -> RawPeer:
    """A peer that announces the whole chunk (its true size), sends half of it and drops the connection."""
    peer = RawPeer()
    sizes = {c.digest.hex().encode(): c.size for c in m.chunks}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer.writers.append(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        size = sizes.get(head.split(b" ", 2)[1].rsplit(b"/", 1)[-1], CHUNK)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"\0" * (size // 2))
        await writer.drain()
        writer.transport.abort()

    peer.server = await asyncio.start_server(handle, "127.0.0.1", port)
    return peer


async def silent_server(port: int, m: Manifest) -> RawPeer:
    """A peer that accepts connections and never answers."""
    peer = RawPeer()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer.writers.append(writer)
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the client gives up and closes

    peer.server = await asyncio.start_server(handle, "127.0.0.1", port)
    return peer


@pytest.mark.parametrize("make_peer", [half_then_close_server, silent_server], ids=["dies-mid-transfer", "silent"])
async def test_a_broken_peer_costs_at_most_one_deadline(
    cluster: Cluster,
    published: tuple[MemoryOrigin, Manifest, dict[bytes, bytes]],
    make_peer: Callable[[int, Manifest], Awaitable[RawPeer]],
) -> None:
    origin, m, files = published
    bad_port, a_port = free_port(), free_port()
    server = await make_peer(bad_port, m)
    try:
        bad_key = f"127.0.0.1:{bad_port}"
        a_key = f"127.0.0.1:{a_port}"
        a = await cluster.start(origin, a_key, [bad_key, a_key], timeout=0.5, backoff_initial=60)
        t0 = time.monotonic()
        assert await a.read_all(m) == files
        elapsed = time.monotonic() - t0
        # Chunks homed at the broken peer were asked for at once (one concurrent batch): the first
        # answers cost one 0.5 s deadline, then the peer is skipped and the rest go to the origin.
        assert elapsed < 0.5 + 1.5, elapsed
        st = a.tier.statistics()
        assert st.per_peer_errors[bad_key] >= 1
        assert a.tier.members.state(bad_key) == "backoff"
        assert a.tier.members.live() == [a.key]
        # Now skipped: reading everything again from a fresh cache does not wait for it.
        forget(a, m)
        t0 = time.monotonic()
        assert await a.read_all(m) == files
        assert time.monotonic() - t0 < 0.4
    finally:
        await server.close()


async def length_liar_server(port: int, m: Manifest, lie: str) -> RawPeer:
    """A keep-alive peer whose answers are framed correctly (nothing is cut) but are not the chunk's
    length: a Content-Length of half or more than the chunk, or a chunked body that ends short or
    runs long; for "zstd-unframed" a compressed body with no Content-Length at all."""
    peer = RawPeer()
    sizes = {c.digest.hex().encode(): c.size for c in m.chunks}

    def answer(size: int) -> bytes:
        if lie == "announced-short":
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (size // 2) + os.urandom(size // 2)
        if lie == "announced-long":
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (size + 7) + os.urandom(size + 7)
        n = {"chunked-short": size // 2, "chunked-long": size + 7, "zstd-unframed": size // 2}[lie]
        encoding = b"Content-Encoding: zstd\r\n" if lie == "zstd-unframed" else b""
        return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + encoding + b"\r\n"
                + b"%x\r\n" % n + os.urandom(n) + b"\r\n0\r\n\r\n")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer.writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            for _ in range(10_000):  # requests on this connection; the client gives up long before
                head = await reader.readuntil(b"\r\n\r\n")
                digest = head.split(b" ", 2)[1].rsplit(b"/", 1)[-1]
                writer.write(answer(max(sizes.get(digest, CHUNK), 2)))
                await writer.drain()

    peer.server = await asyncio.start_server(handle, "127.0.0.1", port)
    return peer


@pytest.mark.allow_warnings  # the node warns about the lying peer
@pytest.mark.parametrize("lie", ["announced-short", "announced-long", "chunked-short", "chunked-long", "zstd-unframed"])
async def test_a_peer_lying_about_the_length_is_marked_bad(
    cluster: Cluster, published: tuple[MemoryOrigin, Manifest, dict[bytes, bytes]], lie: str
) -> None:
    """A complete answer of the wrong length breaks the protocol as bad bytes do: the peer is held
    as bad (bad_hold), not merely backed off like a peer whose connection was cut (see above)."""
    m = published[1]
    async with read_beside(cluster, published, lambda port: length_liar_server(port, m, lie)) as (a, liar_key):
        st = a.tier.statistics()
        assert a.tier.members.state(liar_key) == "bad"
        assert st.per_peer_bad[liar_key] >= 1 and st.bad_chunks == st.per_peer_bad[liar_key]
        assert a.fetcher.statistics().verify_failures == 0, "refused before anything was verified"
        assert cached_chunks_are_genuine(a, m) == len({c.digest for c in m.chunks})


def chunk_bytes(m: Manifest, files: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """Every chunk's bytes by digest, cut from the published files."""
    out = {}
    for e in m.entries:
        if e.type is EntryType.REG:
            for k, i in enumerate(e.chunks):
                out[m.chunks[i].digest] = files[e.path][k * CHUNK : (k + 1) * CHUNK]
    return out


async def chunked_server(port: int, m: Manifest, files: dict[bytes, bytes]) -> RawPeer:
    """An honest keep-alive peer that sends each chunk as a chunked body of many HTTP chunks of
    odd sizes, each written and drained on its own, so the client sees many pieces and chunk ends."""
    peer = RawPeer()
    data = {d.hex().encode(): b for d, b in chunk_bytes(m, files).items()}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer.writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            for _ in range(10_000):  # requests on this connection; the test asks far fewer
                head = await reader.readuntil(b"\r\n\r\n")
                body = data[head.split(b" ", 2)[1].rsplit(b"/", 1)[-1]]
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                pos, step = 0, 1
                while pos < len(body):
                    piece = body[pos : pos + step]
                    writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                    await writer.drain()
                    pos, step = pos + len(piece), step * 7 + 3
                writer.write(b"0\r\n\r\n")
                await writer.drain()

    peer.server = await asyncio.start_server(handle, "127.0.0.1", port)
    return peer


async def test_a_chunked_answer_in_many_pieces_is_taken_whole(
    cluster: Cluster, published: tuple[MemoryOrigin, Manifest, dict[bytes, bytes]]
) -> None:
    """The client reads a body into the chunk's buffer piece by piece (p2p.client): an answer
    split into many HTTP chunks of odd sizes, arriving in many pieces, is one chunk."""
    origin, m, files = published
    async with read_beside(cluster, published, lambda port: chunked_server(port, m, files)) as (a, peer_key):
        st = a.tier.statistics()
        assert a.tier.members.state(peer_key) == "ok"
        assert st.bad_chunks == 0 and st.errors == 0
        # Every chunk came from the peer: it is the home of some, and a node about to fetch its
        # own home chunks from the origin first asks the next candidate (the peer) for a copy.
        assert st.per_peer_bytes[peer_key] == sum(len(b) for b in chunk_bytes(m, files).values())
        assert origin.statistics().bytes_read == 0
        assert cached_chunks_are_genuine(a, m) == len({c.digest for c in m.chunks})


async def origin_down_server(port: int) -> tuple[RawPeer, list[bool]]:
    """A keep-alive peer that answers every request at once with "503 origin" (it says it cannot
    reach the origin); returns it and, per request, whether the request was cached-only."""
    peer = RawPeer()
    asked: list[bool] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer.writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            for _ in range(10_000):  # requests on this connection; the test asks far fewer
                head = await reader.readuntil(b"\r\n\r\n")
                cached_only = b"x-lazyfs-cached-only: 1" in head.lower()
                asked.append(cached_only)
                if cached_only:
                    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 503 Service Unavailable\r\nX-Lazyfs-Reason: origin\r\n"
                                 b"Content-Length: 0\r\n\r\n")
                await writer.drain()

    peer.server = await asyncio.start_server(handle, "127.0.0.1", port)
    return peer, asked


async def test_a_peer_whose_origin_fails_is_not_asked_to_fetch_every_chunk(
    cluster: Cluster, published: tuple[MemoryOrigin, Manifest, dict[bytes, bytes]]
) -> None:
    """A home that answers "503 origin" (its own origin fetch failed, or it says so) is, for a short
    while (ORIGIN_HOLD), no chunk's candidate: its chunks go to their next candidate, as every
    node sees the same answers.  Without that each of its chunks cost a round trip to it and, where
    this node came next, a cached-only sweep of every other member, though this node's origin works."""
    origin, m, files = published
    liar_port, a_port, b_port = free_port(), free_port(), free_port()
    liar, asked = await origin_down_server(liar_port)
    try:
        keys = [f"127.0.0.1:{p}" for p in (liar_port, a_port, b_port)]
        a = await cluster.start(origin, keys[1], keys)
        b = await cluster.start(origin, keys[2], keys)
        distinct = {c.digest: i for i, c in enumerate(m.chunks)}
        homed = [i for d, i in distinct.items() if rank(keys, d)[0] == keys[0]]
        assert len(homed) > 5
        for i in sorted(distinct.values()):  # one at a time: each answer is known before the next ask
            await a.fetcher.get(i)
        sent = a.tier.statistics().requests_sent
        assert b.tier.server is not None
        b_asked = b.tier.server.counters.requests_served + b.tier.server.counters.not_found
        print(f"liar asked {len(asked)} ({sum(asked)} cached-only) for {len(homed)} chunks homed there; "
              f"a sent {sent} requests for {len(distinct)} chunks; b answered {b_asked}")
        # Asked to fetch once; before that it may have been asked for a copy (the previous home of
        # a chunk homed here), after it nothing at all while held.
        assert asked.count(False) == 1 and asked[-1] is False, asked
        assert a.tier.members.state(keys[0]) == "ok", "not a failure: still asked for cached copies"
        assert origin.statistics().bytes_read == stored_bytes(m)
        assert await a.read_all(m) == files
    finally:
        await liar.close()


async def test_the_token_is_required_and_the_server_serves_only_chunks(
    cluster: Cluster, published: tuple[MemoryOrigin, Manifest, dict[bytes, bytes]]
) -> None:
    origin, m, files = published
    port = free_port()
    node = await cluster.start(origin, f"127.0.0.1:{port}", [f"127.0.0.1:{port}"])
    chunk = m.chunks[m.entry(b"model.bin").chunks[3]]  # type: ignore[union-attr]
    genuine = files[b"model.bin"][3 * CHUNK : 4 * CHUNK]
    url = f"http://127.0.0.1:{port}" + CHUNK_PATH.format(digest=chunk.digest.hex())
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + TOKEN.decode()}):
            async with http.get(url, headers=headers) as resp:
                assert resp.status == 401
                assert genuine[:64] not in await resp.read()
        assert node.tier.statistics().requests_refused == 3
        auth = {"Authorization": "Bearer " + TOKEN.decode()}
        async with http.get(url, headers=auth) as resp:
            assert resp.status == 200 and await resp.read() == genuine
        async with http.get(url, headers={**auth, "Range": "bytes=100-199"}) as resp:
            assert resp.status == 206 and await resp.read() == genuine[100:200]
            assert resp.headers["Content-Range"] == f"bytes 100-199/{CHUNK}"
        async with http.get(url, headers={**auth, "Range": f"bytes={CHUNK + 5}-"}) as resp:
            assert resp.status == 416
        base = f"http://127.0.0.1:{port}"
        async with http.get(base + CHUNK_PATH.format(digest="ab" * 32), headers=auth) as resp:
            assert resp.status == 404  # not in the manifest, not in the cache
        for path in ("/v1/chunks/NOTHEX", "/v1/chunks/" + "a" * 63, "/", "/v1/chunks/", "/metrics"):
            async with http.get(base + path, headers=auth) as resp:
                assert resp.status in (400, 404), path
        async with http.put(url, headers=auth, data=b"x") as resp:
            assert resp.status == 405
        async with http.get(url, headers={**auth, "X-Lazyfs-Priority": "7"}) as resp:
            assert resp.status == 400


async def test_requests_for_a_chunk_outside_the_manifest_share_one_read(
    cluster: Cluster, published: tuple[MemoryOrigin, Manifest, dict[bytes, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk of another manifest is served from the shared cache; concurrent requests for it
    share one read (one buffer) instead of holding a copy each until their reply is sent.  An
    unknown digest is a 404 and leaves nothing behind."""
    origin = published[0]
    port = free_port()
    node = await cluster.start(origin, f"127.0.0.1:{port}", [f"127.0.0.1:{port}"])
    foreign = os.urandom(CHUNK)
    digest = blake3.blake3(foreign).digest()
    node.store.put(digest, foreign)
    reads: list[bytes] = []
    real_read = node.store.read

    def slow_read(d: bytes, offset: int = 0, length: int | None = None) -> bytes | None:
        reads.append(d)
        time.sleep(0.2)  # every request below arrives while the first read is in flight
        return real_read(d, offset, length)

    monkeypatch.setattr(node.store, "read", slow_read)
    auth = {"Authorization": "Bearer " + TOKEN.decode()}
    base = f"http://127.0.0.1:{port}"

    async def ask(http: aiohttp.ClientSession, d: bytes) -> tuple[int, bytes]:
        async with http.get(base + CHUNK_PATH.format(digest=d.hex()), headers=auth) as resp:
            return resp.status, await resp.read()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        answers = await asyncio.gather(*(ask(http, digest) for _ in range(20)))
        assert answers == [(200, foreign)] * 20
        assert len(reads) <= 2, f"{len(reads)} cache reads (and buffers) for 20 requests of one chunk"
        reads.clear()
        assert await ask(http, digest) == (200, foreign)
        assert len(reads) == 1, "once answered, the chunk is not kept"
        assert [s for s, _ in await asyncio.gather(*(ask(http, os.urandom(32)) for _ in range(5)))] == [404] * 5
    assert node.tier.server is not None and node.tier.server._foreign == {}


async def test_members_join_and_leave_by_dns(
    cluster: Cluster, published: tuple[MemoryOrigin, Manifest, dict[bytes, bytes]]
) -> None:
    """The Kubernetes pattern: one name, one address per node, the same port everywhere."""
    origin, m, files = published
    port = free_port()
    ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]  # all loopback on Linux
    keys = [f"{ip}:{port}" for ip in ips]
    records = ips[:2]

    async def resolver(host: str, p: int) -> list[str]:
        assert (host, p) == ("peers.test", port)
        return list(records)

    a = await cluster.start(origin, keys[0], [], peers_dns=f"peers.test:{port}", resolver=resolver)
    b = await cluster.start(origin, keys[1], [], peers_dns=f"peers.test:{port}", resolver=resolver)
    for n in (a, b):
        assert sorted(n.tier.members.members) == keys[:2]
        assert n.tier.members.self_key == n.key
    assert await a.read_all(m) == files
    # c joins: once the others refresh, c is the home of about a third of the chunks.
    records.append(ips[2])
    c = await cluster.start(origin, keys[2], [], peers_dns=f"peers.test:{port}", resolver=resolver)
    for n in (a, b):
        await n.tier.members.refresh()
        assert sorted(n.tier.members.members) == keys
    before = origin.statistics().bytes_read
    assert await c.read_all(m) == files
    assert origin.statistics().bytes_read == before, "c got everything from a and b"
    # b leaves: it stops, and the name no longer lists it.
    await b.close()
    cluster.nodes.remove(b)
    records.remove(ips[1])
    for n in (a, c):
        await n.tier.members.refresh()
        assert sorted(n.tier.members.members) == [keys[0], keys[2]]
    sent = a.tier.statistics().requests_sent
    forget(a, m)
    assert await a.read_all(m) == files
    assert a.tier.statistics().requests_sent > sent
    assert a.tier.statistics().errors == 0, "nobody asked the peer that left"


async def test_a_peer_that_dies_without_leaving_is_skipped(
    cluster: Cluster, published: tuple[MemoryOrigin, Manifest, dict[bytes, bytes]]
) -> None:
    origin, m, files = published
    ports = [free_port() for _ in range(3)]
    keys = [f"127.0.0.1:{p}" for p in ports]
    a, b, c = [await cluster.start(origin, k, keys) for k in keys]
    await b.close()
    cluster.nodes.remove(b)
    ra, rc = await asyncio.gather(a.read_all(m), c.read_all(m))
    assert ra == rc == files
    for n in (a, c):
        assert n.tier.members.state(keys[1]) == "backoff"
    # b's chunks went to their next candidate, which fetched each once for both.
    assert origin.statistics().bytes_read == stored_bytes(m)


@pytest.mark.allow_warnings
async def test_with_the_origin_down_the_cluster_serves_what_any_node_holds(
    cluster: Cluster, published: tuple[MemoryOrigin, Manifest, dict[bytes, bytes]]
) -> None:
    inner, m, files = published
    origin = FaultyOrigin(inner)
    ports = [free_port() for _ in range(3)]
    keys = [f"127.0.0.1:{p}" for p in ports]
    # b alone reads everything (its list names only itself), then the origin goes down.
    b = await cluster.start(origin, keys[1], [keys[1]])
    assert await b.read_all(m) == files
    origin.error_rate = 1.0
    # a and c are fresh; for most chunks neither b nor the chunk's home has it... except b.
    a = await cluster.start(origin, keys[0], keys, read_timeout=10.0)
    await b.tier.members.refresh()
    t0 = time.monotonic()
    assert await a.read_all(m) == files
    assert time.monotonic() - t0 < 8.0
    assert a.fetcher.statistics().bytes_from_peers == sum(c.size for c in {c.digest: c for c in m.chunks}.values())


async def test_peers_over_tls_with_client_certificates(
    cluster: Cluster, published: tuple[MemoryOrigin, Manifest, dict[bytes, bytes]], tmp_path: Path
) -> None:
    origin, m, files = published
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    paths = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    keys = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    a, b = [
        await cluster.start(
            origin, k, keys, tls_cert=str(paths["cert"]), tls_key=str(paths["key"]), tls_ca=str(paths["ca"])
        )
        for k in keys
    ]
    ra, rb = await asyncio.gather(a.read_all(m), b.read_all(m))
    assert ra == rb == files
    assert origin.statistics().bytes_read == stored_bytes(m)
    assert a.tier.statistics().bytes_served > 0 and b.tier.statistics().bytes_served > 0
    url = f"https://{keys[0]}" + CHUNK_PATH.format(digest=m.chunks[0].digest.hex())
    auth = {"Authorization": "Bearer " + TOKEN.decode()}
    # Without a client certificate signed by the cluster CA the handshake fails: no data.
    no_cert = ssl.create_default_context(cafile=str(paths["ca"]))
    other = trustme.CA().issue_cert("127.0.0.1")
    wrong_cert = ssl.create_default_context(cafile=str(paths["ca"]))
    other.configure_cert(wrong_cert)
    async with aiohttp.ClientSession() as http:
        for ctx in (no_cert, wrong_cert):
            with pytest.raises(aiohttp.ClientError):
                async with http.get(url, headers=auth, ssl=ctx) as resp:
                    await resp.read()
        with pytest.raises(aiohttp.ClientError):
            async with http.get(url.replace("https", "http"), headers=auth) as resp:
                await resp.read()
        good = ssl.create_default_context(cafile=str(paths["ca"]))
        cert.configure_cert(good)
        async with http.get(url, headers=auth, ssl=good) as resp:
            assert resp.status == 200


async def test_two_peers_asking_each_other_at_once_never_wait_on_each_other(
    cluster: Cluster, published: tuple[MemoryOrigin, Manifest, dict[bytes, bytes]]
) -> None:
    """A peer's request joins a fetch that is itself waiting on that peer: the fetch must stop
    asking peers and go to the origin, or both wait until the peer timeout (a deadlock that the
    connection limit made certain: here one connection each way)."""
    origin, m, _ = published
    keys = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    a, b = [await cluster.start(origin, k, keys, timeout=3.0, max_connections=1) for k in keys]
    homed_b = [i for i, c in enumerate(m.chunks) if rank(keys, c.digest)[0] == keys[1]][:4]
    homed_a = [i for i, c in enumerate(m.chunks) if rank(keys, c.digest)[0] == keys[0]][:4]
    t0 = time.monotonic()
    await asyncio.gather(
        *(a.fetcher.get(i) for i in homed_b + homed_a), *(b.fetcher.get(i) for i in homed_a + homed_b)
    )
    assert time.monotonic() - t0 < 1.5
    for n in (a, b):
        assert n.tier.statistics().errors == 0
        assert all(p["state"] in ("ok", "self") for p in n.tier.status()["peers"].values())


async def test_an_asker_that_stops_reading_does_not_hold_a_send_slot(tmp_path: Path) -> None:
    """Two askers that stop reading mid-reply without closing (a frozen host) take both send
    slots; at their deadline (plus SEND_GRACE) the replies are abandoned and their connections
    aborted, so a third asker is served well before TCP would give up on them."""
    from p2p.server import SEND_GRACE, SEND_SLOTS

    big = 8 * 1024 * KiB  # larger than loopback's socket buffers: a reply blocks when nobody reads
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights").write_bytes(os.urandom(3 * big))
    origin = MemoryOrigin()
    m = (await seed(src, origin, parse_ref("big:1"), SeedConfig(chunk_size=big, pack_size=4 * big))).manifest
    c = Cluster(tmp_path, m)
    port = free_port()
    key = f"127.0.0.1:{port}"
    stuck: list[socket.socket] = []
    try:
        node = await c.start(origin, key, [key])
        await node.read_all(m)  # cached: replies come from the store at once
        digest = m.chunks[0].digest.hex()
        request = (
            f"GET /v1/chunks/{digest} HTTP/1.1\r\nHost: {key}\r\nAuthorization: Bearer {TOKEN.decode()}\r\n"
            f"X-Lazyfs-Priority: 1\r\nX-Lazyfs-Timeout: 0.5\r\n\r\n"
        ).encode()
        loop = asyncio.get_running_loop()
        for _ in range(SEND_SLOTS):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window, never read
            s.setblocking(False)
            await loop.sock_connect(s, ("127.0.0.1", port))
            await loop.sock_sendall(s, request)
            stuck.append(s)
        await asyncio.sleep(0.2)  # both replies started and blocked
        t0 = loop.time()
        headers = {"Authorization": f"Bearer {TOKEN.decode()}", "X-Lazyfs-Priority": "1", "X-Lazyfs-Timeout": "30"}
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{key}/v1/chunks/{digest}", headers=headers) as resp,
        ):
            assert resp.status == 200
            body = await resp.read()
        waited = loop.time() - t0
        assert blake3.blake3(body).digest() == m.chunks[0].digest
        assert waited < 0.5 + SEND_GRACE + 2.0, f"served after {waited:.1f} s: the stuck replies held the slots"
        assert node.tier.server is not None and node.tier.server.counters.server_errors >= SEND_SLOTS
    finally:
        for sock in stuck:
            sock.close()
        await c.close()
        await origin.aclose()


@pytest.mark.allow_warnings  # the node warns about the misbehaving peer
async def test_a_peer_that_redirects_is_not_followed_and_is_marked_bad(
    cluster: Cluster, published: tuple[MemoryOrigin, Manifest, dict[bytes, bytes]]
) -> None:
    """A peer answering 3xx does not send this node anywhere: no request reaches the target."""
    origin, m, files = published
    target_port, evil_port, a_port = free_port(), free_port(), free_port()
    asked: list[bytes] = []
    writers: list[asyncio.StreamWriter] = []

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            asked.append(await reader.readuntil(b"\r\n\r\n"))

    async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:%d/elsewhere\r\n"
                             b"Content-Length: 0\r\n\r\n" % target_port)
                await writer.drain()

    servers = [await asyncio.start_server(target, "127.0.0.1", target_port),
               await asyncio.start_server(redirect, "127.0.0.1", evil_port)]
    try:
        evil_key, a_key = f"127.0.0.1:{evil_port}", f"127.0.0.1:{a_port}"
        a = await cluster.start(origin, a_key, [evil_key, a_key])
        assert await a.read_all(m) == files
        assert asked == []
        assert a.tier.members.state(evil_key) == "bad" and a.tier.statistics().per_peer_bad[evil_key] >= 1
    finally:
        for s in servers:
            s.close()
        for w in writers:
            w.transport.abort()
        for s in servers:
            await s.wait_closed()
        await asyncio.sleep(0)


async def test_the_peer_server_closes_connections_that_send_no_request(
    cluster: Cluster, published: tuple[MemoryOrigin, Manifest, dict[bytes, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a token anyone can connect; a connection that never completes a request is closed
    after the keep-alive time (aiohttp's default held it for an hour: a descriptor each)."""
    monkeypatch.setattr("p2p.server.KEEPALIVE", 0.5)
    origin = published[0]
    port = free_port()
    await cluster.start(origin, f"127.0.0.1:{port}", [f"127.0.0.1:{port}"])
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    conns[1][1].write(b"GET /v1/chun")  # half a request line, never finished
    conns[2][1].write(b"GET /v1/chunks/" + b"ab" * 32 + b" HTTP/1.1\r\nHost: x\r\n")  # headers never end
    try:
        for reader, _ in conns:
            async with asyncio.timeout(10):
                assert await reader.read() == b""  # closed by the server
    finally:
        for _, writer in conns:
            writer.close()


async def test_the_peer_server_holds_a_bounded_number_of_connections(
    cluster: Cluster, published: tuple[MemoryOrigin, Manifest, dict[bytes, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections over MAX_CLIENTS are closed as they arrive (counted); those held still work."""
    monkeypatch.setattr("p2p.server.MAX_CLIENTS", 3)
    origin, m, _ = published
    port = free_port()
    node = await cluster.start(origin, f"127.0.0.1:{port}", [f"127.0.0.1:{port}"])
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    await asyncio.sleep(0.1)  # the server has accepted them
    extra = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    try:
        for reader, _ in extra:
            async with asyncio.timeout(5):
                assert await reader.read() == b""
        assert node.tier.statistics().connections_refused == 2
        chunk = m.chunks[m.entry(b"model.bin").chunks[0]]  # type: ignore[union-attr]
        reader, writer = held[0]
        writer.write(b"GET " + CHUNK_PATH.format(digest=chunk.digest.hex()).encode() + b" HTTP/1.1\r\n"
                     b"Host: x\r\nAuthorization: Bearer " + TOKEN + b"\r\n\r\n")
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
    finally:
        for _, w in held + extra:
            w.close()
