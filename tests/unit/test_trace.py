"""Startup traces without a mount: the format (hostile input), the recorder, replay, publishing."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazyfs.config import SeedConfig
from lazyfs.errors import ReadOnlyError, TraceError, UnavailableError, UsageError
from lazyfs.fetch import ChunkFetcher, FetchConfig
from lazyfs.fs import LazyFilesystem
from lazyfs.manifest import Manifest, parse_ref
from lazyfs.seed import seed
from lazyfs.testing import FaultyOrigin, MemoryOrigin
from lazyfs.trace import (
    LIMITS,
    ReplayStoppedError,
    StartupTraces,
    Trace,
    TraceLimits,
    TraceRecorder,
    decode,
    encode,
    load_trace,
    trace_key,
)

DIGEST = "ab" * 32
CHUNK = 64 * 1024


def good(chunks: tuple[int, ...] = (3, 0, 7), times: tuple[int, ...] = (0, 5, 5)) -> bytes:
    return encode(Trace(DIGEST, chunks, times))


# --- the format ------------------------------------------------------------------------------------


def test_roundtrip_and_key() -> None:
    t = Trace(DIGEST, (3, 0, 7, 1000), (0, 1, 1, 70000))
    data = encode(t)
    assert decode(data) == t
    assert decode(data, DIGEST, 1001) == t
    assert encode(decode(data)) == data
    assert trace_key(DIGEST) == f"traces/{DIGEST}"
    empty = Trace(DIGEST, (), ())
    assert decode(encode(empty)) == empty
    with pytest.raises(ValueError):
        Trace(DIGEST, (1, 2), (0,))


def _raw(*fields: object) -> bytes:
    data: bytes = msgpack.packb(list(fields), use_bin_type=True)
    return data


DIG = bytes.fromhex(DIGEST)
# 3 encoded as uint32 instead of a positive fixint: the same value, other bytes (another digest) -> refused.
NON_CANONICAL = good((3, 0, 7), (0, 5, 5)).replace(b"\x93\x03\x00\x07", b"\x93\xce\x00\x00\x00\x03\x00\x07")

HOSTILE: list[tuple[str, bytes, str]] = [
    ("empty", b"", "not valid msgpack"),
    ("truncated", good()[:-3], "not valid msgpack"),
    ("trailing bytes", good() + b"\x00", "not valid msgpack"),
    ("a map", msgpack.packb({"a": 1}), "not valid msgpack"),  # maps are refused outright
    ("not an array", msgpack.packb(b"lazyfs-trace"), "bad magic"),
    ("bad magic", _raw(b"lazyfs-trace!", 1, DIG, [], []), "bad magic"),
    ("magic as str", _raw("lazyfs-trace", 1, DIG, [], []), "bad magic"),
    ("version 2", _raw(b"lazyfs-trace", 2, DIG, [], []), "unsupported trace format"),
    ("version True", _raw(b"lazyfs-trace", True, DIG, [], []), "unsupported trace format"),
    ("version 1.0", _raw(b"lazyfs-trace", 1.0, DIG, [], []), "unsupported trace format"),
    ("missing field", _raw(b"lazyfs-trace", 1, DIG, []), "expected 5 fields"),
    ("extra field", _raw(b"lazyfs-trace", 1, DIG, [], [], []), "expected 5 fields"),
    ("short digest", _raw(b"lazyfs-trace", 1, DIG[:31], [], []), "32 bytes"),
    ("digest as str", _raw(b"lazyfs-trace", 1, DIGEST[:32], [], []), "32 bytes"),
    ("chunks not an array", _raw(b"lazyfs-trace", 1, DIG, 5, []), "must be arrays"),
    ("lengths differ", _raw(b"lazyfs-trace", 1, DIG, [1, 2], [0]), "2 chunks but 1 times"),
    ("negative index", _raw(b"lazyfs-trace", 1, DIG, [-1], [0]), "not a chunk index"),
    ("bool index", _raw(b"lazyfs-trace", 1, DIG, [True], [0]), "not a chunk index"),
    ("float index", _raw(b"lazyfs-trace", 1, DIG, [1.5], [0]), "not a chunk index"),
    ("huge index", _raw(b"lazyfs-trace", 1, DIG, [1 << 40], [0]), "not a chunk index"),
    ("duplicate", _raw(b"lazyfs-trace", 1, DIG, [4, 4], [0, 0]), "appears twice"),
    ("time backwards", _raw(b"lazyfs-trace", 1, DIG, [1, 2], [5, 4]), "goes backwards"),
    ("negative time", _raw(b"lazyfs-trace", 1, DIG, [1], [-1]), "is not in"),
    ("time too large", _raw(b"lazyfs-trace", 1, DIG, [1], [1 << 33]), "is not in"),
    ("time as str", _raw(b"lazyfs-trace", 1, DIG, [1], ["0"]), "is not in"),
    ("not canonical", NON_CANONICAL, "not in canonical form"),
    # An array header claiming 2^32-1 elements must not make msgpack reserve memory for them.
    ("array bomb", b"\x95\xaclazyfs-trace\x01\xc4\x20" + DIG + b"\xdd\xff\xff\xff\xff", "not valid msgpack"),
    ("nesting bomb", b"\x91" * 100_000, "not valid msgpack"),
]


@pytest.mark.parametrize(("data", "message"), [(d, m) for _, d, m in HOSTILE], ids=[n for n, _, _ in HOSTILE])
def test_decoder_rejects_hostile_input(data: bytes, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        decode(data)


def test_decoder_checks_the_manifest() -> None:
    data = good()
    with pytest.raises(TraceError, match="is for manifest"):
        decode(data, "cd" * 32)
    with pytest.raises(TraceError, match="not a chunk index"):
        decode(data, DIGEST, n_chunks=7)  # index 7 of a 7-chunk manifest
    assert decode(data, DIGEST, n_chunks=8).chunks == (3, 0, 7)


def test_size_limits() -> None:
    small = TraceLimits()
    small.max_bytes = 100
    small.max_chunks = 10
    with pytest.raises(TraceError, match="over the 100 byte limit"):
        decode(b"\x00" * 101, limits=small)
    with pytest.raises(TraceError):  # 11 chunks: over max_chunks (msgpack refuses the array)
        decode(encode(Trace(DIGEST, tuple(range(11)), (0,) * 11)), limits=small)
    with pytest.raises(TraceError):
        encode(Trace(DIGEST, (1, 1), (0, 0)))  # never publish an invalid trace
    with pytest.raises(TraceError):
        encode(Trace("not hex", (), ()))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        t = decode(data)
    except TraceError:
        return
    assert encode(t) == data


@settings(max_examples=300)
@given(st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=255))
def test_fuzz_mutations(pos: int, value: int) -> None:
    base = bytearray(good((9, 2, 5, 300, 70000), (0, 1, 2, 3, 40000)))
    base[pos % len(base)] = value
    try:
        t = decode(bytes(base))
    except TraceError:
        return
    assert encode(t) == bytes(base)
    assert len(set(t.chunks)) == len(t.chunks)


# --- the recorder ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_recorder_keeps_first_accesses_in_order() -> None:
    clock = Clock()
    r = TraceRecorder(DIGEST, 10, clock=clock)
    r.record([4, 5])
    clock.now += 0.25
    r.record([5, 6, 4, 0])
    r.record([10, -1])  # not chunks of this manifest: ignored
    clock.now += 1
    r.record([9])
    t = r.trace()
    assert t.chunks == (4, 5, 6, 0, 9)
    assert t.times_ms == (0, 0, 250, 250, 1250)
    assert decode(encode(t), DIGEST, 10) == t
    r.stop()
    r.record([1])
    assert len(r) == 5 and not r.active


def test_recorder_is_bounded() -> None:
    small = TraceLimits()
    small.max_chunks = 3
    r = TraceRecorder(DIGEST, 100, limits=small)
    r.record(range(10))
    assert r.trace().chunks == (0, 1, 2) and r.dropped == 7
    r.record(range(10))  # seen already: not dropped twice
    assert r.dropped == 7


# --- replay, classification and publishing with a real fetcher --------------------------------------


@dataclass
class Setup:
    origin: MemoryOrigin
    digest: str
    manifest: Manifest
    fetcher: ChunkFetcher
    fs: LazyFilesystem


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}").write_bytes(os.urandom(2 * CHUNK + i))
    origin = MemoryOrigin()
    res = await seed(src, origin, parse_ref("t:1"), SeedConfig(chunk_size=CHUNK, pack_size=4 * CHUNK))
    fetcher = ChunkFetcher(res.manifest, origin, None, FetchConfig(read_timeout=5))
    fs = LazyFilesystem(res.manifest, fetcher)
    yield Setup(origin, res.digest, res.manifest, fetcher, fs)
    await fetcher.aclose()


def chunks_of(s: Setup, name: str) -> tuple[int, ...]:
    e = s.manifest.entry(name.encode())
    assert e is not None
    return e.chunks


async def read_file(s: Setup, name: str) -> bytes:
    fh = s.fs.open(s.fs.ino_of(name.encode()), os.O_RDONLY)
    try:
        return bytes(await s.fs.read(fh, 0, 1 << 30))
    finally:
        s.fs.release(fh)


async def test_recording_through_the_filesystem_and_publishing(setup: Setup) -> None:
    s = setup
    traces = StartupTraces(s.digest, s.manifest, s.origin, s.fetcher, record=True)
    s.fs.on_read = traces.on_read
    await read_file(s, "f3")
    await read_file(s, "f1")
    await read_file(s, "f3")
    assert traces.status()["recording"] and traces.status()["recorded_chunks"] == 6
    key, n = await traces.publish()
    assert key == trace_key(s.digest) and n == 6
    t = decode(s.origin.objects[key], s.digest, len(s.manifest.chunks))
    assert t.chunks == chunks_of(s, "f3") + chunks_of(s, "f1")
    with pytest.raises(UsageError, match="already published"):
        await traces.publish()
    await read_file(s, "f0")  # no longer recorded
    assert traces.status()["recorded_chunks"] == 6 and traces.status()["published"] == key
    await traces.aclose()  # nothing more to publish
    assert decode(s.origin.objects[key]) == t


async def test_publish_errors(setup: Setup) -> None:
    s = setup
    plain = StartupTraces(s.digest, s.manifest, s.origin, s.fetcher)
    with pytest.raises(UsageError, match="--record-trace"):
        await plain.publish()
    traces = StartupTraces(s.digest, s.manifest, s.origin, s.fetcher, record=True)
    with pytest.raises(UsageError, match="nothing recorded"):
        await traces.publish()
    await traces.aclose()  # nothing read: nothing published, no warning
    assert trace_key(s.digest) not in s.origin.objects


@pytest.mark.allow_warnings
async def test_publishing_at_close_to_a_read_only_origin_warns(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    s = setup
    ro = MemoryOrigin(dict(s.origin.objects), writable=False)
    traces = StartupTraces(s.digest, s.manifest, ro, s.fetcher, record=True)
    traces.on_read([0, 1])
    with pytest.raises(ReadOnlyError):
        await traces.publish()
    assert traces.status()["publish_error"]
    await traces.aclose()
    assert any("could not publish the startup trace" in r.getMessage() for r in caplog.records)
    assert trace_key(s.digest) not in ro.objects


async def test_aclose_publishes_a_recording(setup: Setup) -> None:
    s = setup
    traces = StartupTraces(s.digest, s.manifest, s.origin, s.fetcher, record=True)
    traces.on_read([5, 2, 5])
    await traces.aclose()
    assert decode(s.origin.objects[trace_key(s.digest)]).chunks == (5, 2)


class CountingOrigin(MemoryOrigin):
    """Records pack reads in order and the most reads in progress at once."""

    def __init__(self, inner: MemoryOrigin, delay: float = 0.01) -> None:
        super().__init__(dict(inner.objects))
        self.delay = delay
        self.reads: list[tuple[str, int]] = []
        self.active = 0
        self.max_active = 0

    async def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        if key.startswith("packs/"):
            self.reads.append((key, start))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            try:
                await asyncio.sleep(self.delay)
                return await super().read(key, start, length)
            finally:
                self.active -= 1
        return await super().read(key, start, length)


async def test_replay_follows_the_order_within_the_window(setup: Setup) -> None:
    s = setup
    origin = CountingOrigin(s.origin)
    # No coalescing, so each chunk is one request and the order is visible.
    fetcher = ChunkFetcher(s.manifest, origin, None, FetchConfig(coalesce_bytes=1))
    try:
        order = (9, 2, 7, 0, 11, 4)
        trace = Trace(s.digest, order, (0,) * len(order))
        traces = StartupTraces(s.digest, s.manifest, origin, fetcher, window=1)
        seen: list[int] = []
        assert await traces.replay(trace, seen.append) == sum(s.manifest.chunks[i].size for i in order)
        assert [start for _, start in origin.reads] == [s.manifest.chunks[i].offset for i in order]
        assert origin.max_active == 1 and len(seen) == len(order)
        st = traces.status()
        assert st["replay"] == "done" and st["replay_done"] == 6 and st["replay_fetched"] == 6

        origin.reads.clear()
        wide = StartupTraces(s.digest, s.manifest, origin, ChunkFetcher(s.manifest, origin, None), window=3)
        await wide.replay(Trace(s.digest, tuple(range(12)), (0,) * 12))
        assert origin.max_active <= 3
        await wide.fetcher.aclose()
        # A window in bytes: at most two chunks (2 x 64 KiB) at once.
        origin.max_active = 0
        tight = StartupTraces(
            s.digest, s.manifest, origin, f := ChunkFetcher(s.manifest, origin, None, FetchConfig(coalesce_bytes=1)),
            window_bytes=2 * CHUNK,
        )  # fmt: skip
        await tight.replay(Trace(s.digest, tuple(range(12)), (0,) * 12))
        assert origin.max_active <= 2
        await f.aclose()
    finally:
        await fetcher.aclose()


async def test_replay_skips_cached_chunks(setup: Setup) -> None:
    s = setup
    cached = {s.manifest.chunks[i].digest for i in (0, 1, 2)}
    traces = StartupTraces(s.digest, s.manifest, s.origin, s.fetcher, contains=cached.__contains__)
    s.origin.reset_statistics()
    await traces.replay(Trace(s.digest, (0, 1, 2, 3), (0, 0, 0, 0)))
    st = traces.status()
    assert st["replay_cached"] == 3 and st["replay_fetched"] == 1
    assert s.origin.statistics().reads == 1


async def until(predicate: Callable[[], bool]) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("timed out")


async def test_first_reads_are_classified(setup: Setup) -> None:
    s = setup
    origin = CountingOrigin(s.origin, delay=0.2)
    fetcher = ChunkFetcher(s.manifest, origin, None, FetchConfig(coalesce_bytes=1))
    traces = StartupTraces(s.digest, s.manifest, origin, fetcher, window=1)
    fs = LazyFilesystem(s.manifest, fetcher, on_read=traces.on_read)
    s2 = Setup(origin, s.digest, s.manifest, fetcher, fs)
    try:
        first, second = chunks_of(s, "f0"), chunks_of(s, "f5")
        order = first + second
        task = asyncio.create_task(traces.replay(Trace(s.digest, order, (0,) * len(order))))
        await until(lambda: first[0] in traces._ready)
        traces.on_read([first[0]])  # fetched already: prefetched
        await until(lambda: first[1] in traces._started)
        traces.on_read([first[1]])  # being fetched by the replay: in flight
        assert await read_file(s2, "f2")  # not in the trace: other
        await task
        st = traces.status()
        assert (st["first_reads_prefetched"], st["first_reads_in_flight"], st["first_reads_other"]) == (1, 1, 3)
        assert st["first_reads"] == 5
    finally:
        await fetcher.aclose()


@pytest.mark.allow_warnings
async def test_replay_stops_after_repeated_failures(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    s = setup
    faulty = FaultyOrigin(s.origin, error_rate=1.0)
    fetcher = ChunkFetcher(s.manifest, faulty, None, FetchConfig(read_timeout=0.5, retry_initial=0.01))
    try:
        traces = StartupTraces(s.digest, s.manifest, faulty, fetcher, window=2)
        with pytest.raises(ReplayStoppedError, match="in a row failed"):
            await traces.replay(Trace(s.digest, tuple(range(12)), (0,) * 12))
        st = traces.status()
        assert st["replay"] == "failed" and st["replay_failed"] >= 8 and "UnavailableError" not in str(st)
    finally:
        await fetcher.aclose()


async def test_load_trace(setup: Setup) -> None:
    s = setup
    n = len(s.manifest.chunks)
    assert await load_trace(s.origin, s.digest, n) is None
    s.origin.put_nowait(trace_key(s.digest), encode(Trace(s.digest, (1, 0), (0, 3))))
    t = await load_trace(s.origin, s.digest, n)
    assert t is not None and t.chunks == (1, 0)
    s.origin.put_nowait(trace_key(s.digest), encode(Trace(s.digest, (n,), (0,))))
    with pytest.raises(TraceError, match="not a chunk index"):
        await load_trace(s.origin, s.digest, n)
    s.origin.put_nowait(trace_key(s.digest), b"\x00" * (LIMITS.max_bytes + 1))
    with pytest.raises(TraceError, match="byte limit"):
        await load_trace(s.origin, s.digest, n)


async def wait_state(traces: StartupTraces, *states: str) -> None:
    for _ in range(500):
        if traces.replay_state in states:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"replay state stayed {traces.replay_state}")


async def test_mount_time_replay(setup: Setup) -> None:
    s = setup
    traces = StartupTraces(s.digest, s.manifest, s.origin, s.fetcher)
    traces.start_replay_nowait()
    await wait_state(traces, "none")  # no trace published: no harm
    await traces.aclose()

    s.origin.put_nowait(trace_key(s.digest), encode(Trace(s.digest, chunks_of(s, "f4"), (0, 1, 2))))
    traces = StartupTraces(s.digest, s.manifest, s.origin, s.fetcher)
    traces.start_replay_nowait()
    await wait_state(traces, "done")
    assert traces.status()["replay_done"] == 3
    for i in chunks_of(s, "f4"):
        assert await s.fetcher.cached(i) is not None  # in memory now
    await traces.aclose()


@pytest.mark.allow_warnings
async def test_a_corrupt_trace_is_ignored_with_a_warning(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    s = setup
    s.origin.put_nowait(trace_key(s.digest), b"garbage")
    traces = StartupTraces(s.digest, s.manifest, s.origin, s.fetcher)
    with caplog.at_level(logging.WARNING, logger="lazyfs"):
        traces.start_replay_nowait()
        await wait_state(traces, "invalid")
    assert "not valid msgpack" in str(traces.status()["replay_error"])
    assert any("ignoring the startup trace" in r.getMessage() for r in caplog.records)
    await traces.aclose()


async def test_an_unreachable_origin_is_no_harm(setup: Setup) -> None:
    s = setup
    faulty = FaultyOrigin(s.origin)
    faulty.fail_next(1, UnavailableError)
    traces = StartupTraces(s.digest, s.manifest, faulty, s.fetcher)
    traces.start_replay_nowait()
    await wait_state(traces, "unavailable")
    await traces.aclose()
