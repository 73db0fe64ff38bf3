"""ChunkFetcher against an in-memory origin with injected faults and a real on-disk store."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import blake3
import pytest
import zstandard

from lazyfs.config import SeedConfig
from lazyfs.errors import DeadlineError, IntegrityError
from lazyfs.fetch import ChunkFetcher, Data, FetchConfig, Priority, decode_chunk, unpack_zstd, zstd_frame_end
from lazyfs.manifest import Chunk, Codec, Manifest, parse_ref
from lazyfs.seed import seed
from lazyfs.store import ChunkStore
from lazyfs.testing import FaultyOrigin, MemoryOrigin

CHUNK = 64 * 1024


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    rnd = os.urandom(CHUNK * 10 + 123)  # incompressible: codec NONE
    (src / "big.bin").write_bytes(rnd)
    (src / "text.txt").write_bytes(b"lazyfs " * 40000)  # compressible: codec ZSTD
    (src / "small").write_bytes(b"x")
    return src


@pytest.fixture
async def published(tree: Path) -> AsyncIterator[tuple[MemoryOrigin, Manifest]]:
    origin = MemoryOrigin()
    # Small packs so a file spans several packs and coalescing stops at pack ends.
    result = await seed(tree, origin, parse_ref("t:1"), SeedConfig(chunk_size=CHUNK, pack_size=4 * CHUNK))
    origin.reset_statistics()
    yield origin, result.manifest
    await origin.aclose()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChunkStore]:
    s = ChunkStore.open(tmp_path / "cache", 1 << 30)
    yield s
    s.close()


def file_bytes(m: Manifest, name: bytes, fetched: dict[int, Data]) -> bytes:
    e = m.entry(name)
    assert e is not None
    return b"".join(fetched[i] for i in e.chunks)


def digest_ok(c: Chunk, data: Data) -> bool:
    return blake3.blake3(data).digest() == c.digest and len(data) == c.size


async def test_every_chunk_is_verified_and_cached(
    published: tuple[MemoryOrigin, Manifest], store: ChunkStore, tree: Path
) -> None:
    origin, m = published
    f = ChunkFetcher(m, origin, store)
    got = {i: await f.get(i) for i in range(len(m.chunks))}
    await f.wait_idle()
    assert all(digest_ok(m.chunks[i], d) for i, d in got.items())
    assert file_bytes(m, b"big.bin", got) == (tree / "big.bin").read_bytes()
    assert file_bytes(m, b"text.txt", got) == (tree / "text.txt").read_bytes()
    assert all(store.contains(c.digest) for c in m.chunks)
    st = f.statistics()
    assert st.cache_misses == len(m.chunks) and st.verify_failures == 0
    await f.aclose()

    # A fresh fetcher over the same store: zero origin requests.
    origin.reset_statistics()
    f2 = ChunkFetcher(m, origin, store)
    for i in range(len(m.chunks)):
        assert digest_ok(m.chunks[i], await f2.get(i))
    assert origin.statistics().reads == 0
    assert f2.statistics().cache_hits == len(m.chunks)
    await f2.aclose()


async def test_single_flight(published: tuple[MemoryOrigin, Manifest]) -> None:
    origin, m = published
    f = ChunkFetcher(m, origin, None)
    results = await asyncio.gather(*(f.get(3) for _ in range(50)))
    assert len(set(results)) == 1
    assert origin.statistics().reads == 1
    await f.aclose()


async def test_adjacent_chunks_are_coalesced(published: tuple[MemoryOrigin, Manifest]) -> None:
    origin, m = published
    f = ChunkFetcher(m, origin, None)
    big = m.entry(b"big.bin")
    assert big is not None
    f.prefetch_nowait(big.chunks, Priority.READAHEAD)
    await f.wait_idle()
    packs = {m.chunks[i].pack for i in big.chunks}
    # one request per pack the file touches, not one per chunk
    assert origin.statistics().reads == len(packs) < len(big.chunks)
    await f.aclose()


@pytest.mark.allow_warnings
async def test_corruption_is_never_returned(published: tuple[MemoryOrigin, Manifest], store: ChunkStore) -> None:
    origin, m = published
    faulty = FaultyOrigin(origin)
    faulty.corrupt_next(2)
    f = ChunkFetcher(m, faulty, store)
    data = await f.get(0)
    assert digest_ok(m.chunks[0], data)
    assert f.statistics().verify_failures == 2
    await f.aclose()


@pytest.mark.allow_warnings
async def test_persistent_corruption_fails_and_is_not_cached(
    published: tuple[MemoryOrigin, Manifest], store: ChunkStore
) -> None:
    origin, m = published
    faulty = FaultyOrigin(origin)
    faulty.corrupt_rate = 1.0
    f = ChunkFetcher(m, faulty, store, FetchConfig(verify_attempts=3))
    with pytest.raises(IntegrityError):
        await f.get(0)
    assert f.statistics().verify_failures == 3
    await f.wait_idle()
    assert not store.contains(m.chunks[0].digest)
    await f.aclose()


async def test_transient_errors_and_truncation_are_retried(published: tuple[MemoryOrigin, Manifest]) -> None:
    origin, m = published
    faulty = FaultyOrigin(origin)
    faulty.fail_next(3)
    f = ChunkFetcher(m, faulty, None, FetchConfig(retry_initial=0.01))
    assert digest_ok(m.chunks[1], await f.get(1))
    faulty.truncate_next(1)
    assert digest_ok(m.chunks[5], await f.get(5))
    assert f.statistics().origin_errors == 4
    await f.aclose()


async def test_deadline_when_origin_hangs(published: tuple[MemoryOrigin, Manifest]) -> None:
    origin, m = published
    faulty = FaultyOrigin(origin)
    faulty.hang = True
    f = ChunkFetcher(m, faulty, None, FetchConfig(read_timeout=0.3))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(DeadlineError):
        await f.get(0)
    assert loop.time() - t0 < 2.0
    assert f.statistics().deadline_failures == 1
    faulty.heal()
    await f.aclose()


async def test_deadline_when_origin_is_down(published: tuple[MemoryOrigin, Manifest]) -> None:
    origin, m = published
    faulty = FaultyOrigin(origin)
    faulty.error_rate = 1.0
    f = ChunkFetcher(m, faulty, None, FetchConfig(read_timeout=0.5, retry_initial=0.01, retry_max=0.05))
    with pytest.raises((DeadlineError, Exception)) as info:
        await f.get(0)
    assert info.value.errno == 5  # type: ignore[attr-defined]
    assert f.statistics().origin_errors > 2  # retried with backoff before giving up
    await f.aclose()


async def test_demand_beats_readahead(published: tuple[MemoryOrigin, Manifest]) -> None:
    origin, m = published
    faulty = FaultyOrigin(origin)
    faulty.delay = 0.02
    # One request at a time and no coalescing: dispatch order is observable.
    f = ChunkFetcher(m, faulty, None, FetchConfig(max_requests=1, coalesce_bytes=1))
    order: list[int] = []
    real_read = faulty.read

    async def spy(key: str, start: int = 0, length: int | None = None) -> bytes:
        idx = next(i for i, c in enumerate(m.chunks) if m.packs[c.pack].key == key and c.offset == start)
        order.append(idx)
        return await real_read(key, start, length)

    faulty.read = spy  # type: ignore[method-assign]
    f.prefetch_nowait(range(0, 8), Priority.BACKGROUND)
    await asyncio.sleep(0)
    demand = asyncio.create_task(f.get(10, Priority.DEMAND))
    await demand
    # chunk 10 went out right after whatever was already on the wire
    assert order.index(10) <= 2
    await f.wait_idle()
    await f.aclose()


@pytest.mark.allow_warnings
async def test_torn_cache_entry_falls_back_to_origin(
    published: tuple[MemoryOrigin, Manifest], store: ChunkStore
) -> None:
    origin, m = published
    f = ChunkFetcher(m, origin, store)
    await f.get(0)
    await f.wait_idle()
    await f.aclose()
    path = store.path_of(m.chunks[0].digest)
    assert path is not None
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    origin.reset_statistics()
    f2 = ChunkFetcher(m, origin, store)
    assert digest_ok(m.chunks[0], await f2.get(0))
    assert origin.statistics().reads == 1
    await f2.aclose()


class _BrokenSource:
    """An extra source (the peer tier's place) with a bug: every fetch raises."""

    name = "broken"

    def __init__(self) -> None:
        self.calls = 0

    async def fetch(self, chunk: Chunk, priority: Priority, deadline: float, verify: object) -> bytes | None:
        self.calls += 1
        raise UnicodeDecodeError("ascii", b"\xff", 0, 1, "a token that is not ASCII")


@pytest.mark.allow_warnings  # the fetcher warns about the failing source
async def test_a_source_that_raises_costs_a_miss_not_the_read(published: tuple[MemoryOrigin, Manifest]) -> None:
    origin, m = published
    source = _BrokenSource()
    f = ChunkFetcher(m, origin, None, FetchConfig(), sources=[source])
    try:
        data = await f.get(0)
        assert digest_ok(m.chunks[0], data) and source.calls == 1
        st = f.statistics()
        assert st.peer_errors == 1 and st.bytes_from_origin > 0
    finally:
        await f.aclose()


class _StuckPutStore(ChunkStore):
    """A store whose writes hang (a dead disk, a stopped holder of the cache lock) until released."""

    release = threading.Event()

    def put(self, digest: bytes, data: bytes | bytearray | memoryview) -> bool:
        assert self.release.wait(20), "the test never released the stuck writes"
        return super().put(digest, data)


async def test_stuck_cache_writes_neither_hang_the_loader_nor_starve_cache_reads(
    published: tuple[MemoryOrigin, Manifest], tmp_path: Path
) -> None:
    origin, m = published
    hit = m.chunks[0]
    with ChunkStore.open(tmp_path / "c", 1 << 30) as s:
        assert s.put(hit.digest, await ChunkFetcher(m, origin, None).get(0))
    store = _StuckPutStore.open(tmp_path / "c", 1 << 30)
    _StuckPutStore.release.clear()
    f = ChunkFetcher(m, origin, store, FetchConfig(threads=4, read_timeout=0.5))
    try:
        misses = range(1, 9)
        await asyncio.gather(*(f.get(i) for i in misses))  # eight writes now hang
        # The loader's question "where is chunk 1's file?" gets "read it through the mount"
        # after the read deadline, not never.
        assert await asyncio.wait_for(f.cached_path(1), 5) is None
        # A cache hit still finds a thread: writes may hold only half of them.
        assert digest_ok(hit, await asyncio.wait_for(f.get(0), 5))
        assert f.statistics().cache_hits == 1
        _StuckPutStore.release.set()
        await asyncio.wait_for(f.wait_idle(), 20)
        assert all(store.contains(m.chunks[i].digest) for i in misses)
        assert await f.cached_path(1) == str(store.path_of(m.chunks[1].digest))
    finally:
        _StuckPutStore.release.set()
        await f.aclose()
        store.close()


def test_a_zstd_frame_declaring_a_huge_size_is_bad_data_not_an_allocation() -> None:
    """An origin's (or a peer's) frame is untrusted: zstandard allocates whatever size a frame
    declares, ignoring max_output_size.  A frame claiming 2^40 bytes must fail as bad data."""
    raw = b"lazyfs " * 1000
    chunk = Chunk(blake3.blake3(raw).digest(), len(raw), 0, 0, 0, Codec.ZSTD)
    good = zstandard.ZstdCompressor().compress(raw)
    assert decode_chunk(dataclasses.replace(chunk, stored_size=len(good)), good) == raw
    forged = _declare(zstandard.ZstdCompressor().compress(bytes(1 << 17)), 1 << 40)
    assert zstandard.frame_content_size(forged) == 1 << 40
    with pytest.raises(IntegrityError, match="declares 1099511627776 bytes"):
        decode_chunk(dataclasses.replace(chunk, stored_size=len(forged)), forged)



@pytest.mark.parametrize("checksum", [False, True])
def test_bytes_after_the_zstd_frame_are_bad_data(checksum: bool) -> None:
    """The stored bytes are kept and served to peers as the chunk's frame: zstandard decodes the
    first frame and ignores the rest, so a shorter valid frame padded with junk to the manifest's
    stored size would pass the digest and be sent on unchecked."""
    raw = b"lazyfs frames " * 5000
    chunk = Chunk(blake3.blake3(raw).digest(), len(raw), 0, 0, 0, Codec.ZSTD)
    frame = zstandard.ZstdCompressor(level=19, write_checksum=checksum).compress(raw)
    assert zstd_frame_end(frame) == len(frame)
    assert decode_chunk(dataclasses.replace(chunk, stored_size=len(frame)), frame) == raw
    padded = frame + b"\xde\xad" * 100
    assert zstandard.ZstdDecompressor().decompress(padded) == raw  # what zstandard alone accepts
    with pytest.raises(IntegrityError, match="200 bytes after its zstd frame"):
        decode_chunk(dataclasses.replace(chunk, stored_size=len(padded)), padded)
    with pytest.raises(IntegrityError, match="after its zstd frame from a peer"):
        unpack_zstd(chunk, padded, " from a peer")


def test_zstd_frame_end_walks_every_kind_of_block() -> None:
    """Raw, RLE and compressed blocks, one or many, with and without a declared size."""
    rng = random.Random(5)
    samples = [b"", b"x", bytes(300_000), rng.randbytes(200_000), b"ab" * 150_000 + rng.randbytes(70_000)]
    for data in samples:
        for level in (-3, 1, 19):
            for checksum in (False, True):
                cctx = zstandard.ZstdCompressor(level=level, write_checksum=checksum, write_content_size=level != 1)
                frame = cctx.compress(data)
                assert zstd_frame_end(frame) == len(frame)
                assert zstd_frame_end(frame + b"more") == len(frame)
                assert zstd_frame_end(frame[:-1]) == -1  # cut short
    assert zstd_frame_end(b"not zstd at all") == -1


def _declare(frame: bytes, size: int) -> bytes:
    """``frame`` with its header's content size field rewritten to 8 bytes saying ``size``."""
    descriptor = frame[4]
    fcs_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    fcs_len = {0: single_segment, 1: 2, 2: 4, 3: 8}[fcs_flag]
    window = 0 if single_segment else 1
    dict_len = {0: 0, 1: 1, 2: 2, 3: 4}[dict_flag]
    start = 5 + window + dict_len
    new_descriptor = (3 << 6) | (descriptor & 0x3F)
    return frame[:4] + bytes([new_descriptor]) + frame[5:start] + size.to_bytes(8, "little") + frame[start + fcs_len :]
