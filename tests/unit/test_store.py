"""The local chunk cache (lazyfs.store): behaviour within one process, plus cross-process pins.

Multi-process churn and SIGKILL crash tests live in test_store_crash.py.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import xxhash
from blake3 import blake3

import lazyfs
from lazyfs.errors import CacheError, UsageError
from lazyfs.loader.direct import uncached
from lazyfs.store import ChunkStore, StoreStatistics, cache
from tests.helpers import evict_from_page_cache

REPO = Path(lazyfs.__file__).resolve().parent.parent


def make_chunk(i: int, size: int = 1000) -> tuple[bytes, bytes]:
    data = random.Random(i).randbytes(size)
    return blake3(data).digest(), data


@pytest.fixture(autouse=True)
def no_unexpected_warnings(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail on any WARNING the test did not consume with ``caplog.clear()`` (pyfuse3's checklogs)."""
    caplog.set_level(logging.INFO, logger="lazyfs.store")
    yield
    bad = [r.getMessage() for r in caplog.get_records("call") if r.levelno >= logging.WARNING]
    assert not bad, f"unexpected warnings: {bad}"


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warning messages logged so far; consumes them."""
    found = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    return found


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChunkStore]:
    with ChunkStore.open(tmp_path / "cache", 1 << 20) as s:
        yield s


# --- basics ------------------------------------------------------------------------------------


def test_put_read_and_layout(store: ChunkStore) -> None:
    digest, data = make_chunk(1)
    assert not store.contains(digest)
    assert store.put(digest, data) is True
    assert store.contains(digest)
    assert store.read(digest) == data
    path = store.path_of(digest)
    assert path == store.directory / "chunks" / digest.hex()[:2] / digest.hex()
    assert path.read_bytes() == data  # raw bytes: a loader can pread the file directly
    assert os.listdir(store.directory / "tmp") == []


def test_partial_reads(store: ChunkStore) -> None:
    digest, data = make_chunk(2, 5000)
    store.put(digest, data)
    assert store.read(digest, 0, 10) == data[:10]
    assert store.read(digest, 100, 1000) == data[100:1100]
    assert store.read(digest, 4990, 100) == data[4990:]  # clipped at the end
    assert store.read(digest, 4000) == data[4000:]
    assert store.read(digest, 5000, 10) == b""
    assert store.read(digest, 9000) == b""
    assert store.read(digest, 0, 0) == b""
    with pytest.raises(UsageError):
        store.read(digest, -1)
    with pytest.raises(UsageError):
        store.read(digest, 0, -5)


def test_miss_and_bad_digest(store: ChunkStore) -> None:
    digest, _ = make_chunk(3)
    assert store.read(digest) is None
    assert store.read(digest, 10, 10) is None
    assert store.path_of(digest) is None
    assert store.statistics().misses == 3
    with pytest.raises(UsageError):
        store.read(b"short")
    with pytest.raises(UsageError):
        store.put(b"x" * 31, b"data")


def test_put_is_idempotent_and_accepts_buffers(store: ChunkStore) -> None:
    digest, data = make_chunk(4)
    assert store.put(digest, bytearray(data))
    assert store.put(digest, memoryview(data))
    stats = store.statistics()
    assert (stats.inserts, stats.entries, stats.bytes) == (1, 1, len(data))
    assert store.read(digest) == data


def test_empty_chunk(store: ChunkStore) -> None:
    digest = blake3(b"").digest()
    assert store.put(digest, b"")
    assert store.read(digest) == b""
    assert store.verify().clean


def test_persistent_across_reopen(tmp_path: Path) -> None:
    chunks = [make_chunk(i) for i in range(5)]
    with ChunkStore.open(tmp_path, 10_000) as s:
        for digest, data in chunks:
            s.put(digest, data)
        s.put_blob("manifest-abc", b"manifest bytes")
    with ChunkStore.open(tmp_path) as s:  # capacity None: the recorded one
        assert s.capacity == 10_000
        stats = s.statistics()
        assert (stats.entries, stats.bytes) == (5, 5000)
        for digest, data in chunks:
            assert s.read(digest) == data
        assert s.get_blob("manifest-abc") == b"manifest bytes"


def test_locate_leaves_the_check_of_unread_files_to_the_caller(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``locate`` never reads a file: a file this process has not checked comes with its xxh3."""
    digest, data = make_chunk(7, 3000)
    gone, _ = make_chunk(8)
    with ChunkStore.open(tmp_path / "c") as s:
        s.put(digest, data)
        s.put(gone, b"x" * 1000)
        assert s.locate(digest) == (s.directory / "chunks" / digest.hex()[:2] / digest.hex(), None)  # put here
    with ChunkStore.open(tmp_path / "c") as s:
        located = s.locate(digest)
        assert located is not None
        path, checksum = located
        assert checksum == xxhash.xxh3_64_intdigest(data) and path.read_bytes() == data
        assert s.read(digest) == data  # checked now
        assert s.locate(digest) == (path, None)
        path_of_gone = s.path_of(gone)
        assert path_of_gone is not None
    with ChunkStore.open(tmp_path / "c") as s:
        path_of_gone.unlink()  # a file missing under its entry: a miss, and the entry is dropped
        assert s.locate(gone) is None
        assert not s.contains(gone)
        assert ["file is missing" in w for w in warnings_in(caplog)] == [True]
        assert s.locate(make_chunk(9)[0]) is None
        st = s.statistics()
        assert (st.hits, st.misses) == (0, 2)


def test_locate_starts_read_ahead_unless_told_not_to(tmp_path: Path) -> None:
    """An unchecked file goes to the kernel's read-ahead; not for a caller that reads it with O_DIRECT."""
    digest, data = make_chunk(11, 2 * 1024 * 1024)
    with ChunkStore.open(tmp_path / "c") as s:
        s.put(digest, data)
        path = s.directory / "chunks" / digest.hex()[:2] / digest.hex()

    def cached() -> bool:
        fd = os.open(path, os.O_RDONLY)
        try:
            return not uncached(fd, 0, len(data))
        finally:
            os.close(fd)

    with ChunkStore.open(tmp_path / "c") as s:
        evict_from_page_cache(path)
        assert not cached()
        assert s.locate(digest, readahead=False) == (path, xxhash.xxh3_64_intdigest(data))
        time.sleep(0.2)
        assert not cached()
        assert s.locate(digest) == (path, xxhash.xxh3_64_intdigest(data))
        deadline = time.monotonic() + 10
        while not cached() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cached()


def _in_page_cache(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return not uncached(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "slice"])
def test_big_chunks_go_to_disk_direct_and_read_back_exactly(tmp_path: Path, kind: str) -> None:
    """Chunks of 256 KiB and more skip the page cache (O_DIRECT through an aligned buffer): sizes
    that are not whole blocks, more than one buffer, and every kind of buffer a caller may pass."""
    calls: list[str] = []
    with ChunkStore.open(tmp_path / "c", 1 << 30) as s:
        for size in (256 * 1024, 5 * 1024 * 1024 + 123, 4 * 1024 * 1024 - 1):
            digest, data = make_chunk(size, size)
            raw = bytes(data) + b"tail"
            choices: dict[str, bytes | bytearray | memoryview] = {
                "bytes": data, "bytearray": bytearray(data), "slice": memoryview(raw)[:size]
            }
            arg = choices[kind]
            cache._crash_hook = calls.append
            try:
                assert s.put(digest, arg) is True
            finally:
                cache._crash_hook = None
            path = s.path_of(digest)
            assert path is not None and path.stat().st_size == size
            assert not _in_page_cache(path)  # written around the page cache
            assert s.read(digest) == data
        assert s._direct_writes is True and os.listdir(s.directory / "tmp") == []
    assert calls[:2] == ["temp-partial", "temp-written"]  # the crash tests' checkpoints still happen


def test_a_file_system_without_direct_io_gets_buffered_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = os.pwrite

    def refuse(fd: int, data: object, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwrite", refuse)
    with ChunkStore.open(tmp_path / "c", 1 << 30) as s:
        for i in range(2):
            digest, data = make_chunk(40 + i, 1024 * 1024 + 5)
            assert s.put(digest, data) is True and s.read(digest) == data
            assert s.path_of(digest).stat().st_size == len(data)  # type: ignore[union-attr]
        assert s._direct_writes is False
    assert any("refuses O_DIRECT" in r.getMessage() for r in caplog.records)


def test_closed_store_raises(tmp_path: Path) -> None:
    s = ChunkStore.open(tmp_path, 1000)
    s.close()
    s.close()  # idempotent
    with pytest.raises(CacheError):
        s.read(make_chunk(1)[0])


def test_one_open_per_directory_per_process(store: ChunkStore) -> None:
    # lmdb forbids two environments on one path in a process; share the store instead.
    with pytest.raises(CacheError, match="already open in this process"):
        ChunkStore.open(store.directory, 1000)
    assert store.put(*make_chunk(1))  # the first one is unaffected


def test_threads(store: ChunkStore) -> None:
    chunks = [make_chunk(i, 3000) for i in range(40)]

    def work(i: int) -> bool:
        digest, data = chunks[i % len(chunks)]
        store.put(digest, data)
        got = store.read(digest)
        part = store.read(digest, 100, 50)
        return got in (None, data) and part in (None, data[100:150])

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(400)))
    assert store.verify().clean


# --- capacity, LRU, pins ------------------------------------------------------------------------


def test_lru_eviction_order(tmp_path: Path) -> None:
    a, b, c, d, e, f = (make_chunk(i) for i in range(6))
    with ChunkStore.open(tmp_path, 4000) as s:
        for digest, data in (a, b, c, d):
            assert s.put(digest, data)
        assert s.read(a[0]) == a[1]  # a is now the most recently used
        assert s.put(*e)
        assert [s.contains(x[0]) for x in (a, b, c, d, e)] == [True, False, True, True, True]
        assert s.put(*f)
        assert [s.contains(x[0]) for x in (a, c, d, e, f)] == [True, False, True, True, True]
        stats = s.statistics()
        assert (stats.evictions, stats.evicted_bytes, stats.bytes) == (2, 2000, 4000)
        assert s.path_of(b[0]) is None
        assert not (tmp_path / "chunks" / b[0].hex()[:2] / b[0].hex()).exists()


def test_lru_survives_restart(tmp_path: Path) -> None:
    a, b, c, d = (make_chunk(i) for i in range(4))
    with ChunkStore.open(tmp_path, 3000) as s:
        for digest, data in (a, b, c):
            s.put(digest, data)
        s.read(a[0])  # recorded in memory, flushed at close
    with ChunkStore.open(tmp_path, 3000) as s:
        s.put(*d)
        assert [s.contains(x[0]) for x in (a, b, c, d)] == [True, False, True, True]


def test_access_times_are_batched(store: ChunkStore) -> None:
    digest, data = make_chunk(5)
    store.put(digest, data)
    before = store._env.info()["last_txnid"]
    for _ in range(100):
        assert store.read(digest, 0, 10) == data[:10]
    assert store._env.info()["last_txnid"] == before  # no write transaction per read


def test_a_stuck_lock_holder_costs_a_bounded_wait_and_reads_never_wait(
    store: ChunkStore, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holding store.lock (stopped, or stuck on a dead disk) must not hang this one:
    a put gives up after LOCK_TIMEOUT (not cached, counted, no temp file left), a read's access-time
    flush does not wait at all, and once the lock is free everything works again."""
    monkeypatch.setattr("lazyfs.store.cache.LOCK_TIMEOUT", 0.3)
    monkeypatch.setattr("lazyfs.store.cache.TOUCH_BATCH", 1)  # every read would flush
    old, old_data = make_chunk(20)
    assert store.put(old, old_data)
    new, new_data = make_chunk(21)
    holder = os.open(store.directory / "store.lock", os.O_RDWR)  # its own open file: flock conflicts
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        t = time.monotonic()
        for _ in range(50):
            assert store.read(old) == old_data
        assert time.monotonic() - t < 0.3 * 5  # fifty reads that had waited would take 15 s
        t = time.monotonic()
        assert store.put(new, new_data) is False
        assert 0.25 <= time.monotonic() - t < 5
        assert not store.contains(new) and os.listdir(store.directory / "tmp") == []
        assert store.statistics().errors == 1
        assert any("store.lock" in w and "not waiting longer" in w for w in warnings_in(caplog))
    finally:
        os.close(holder)
    assert store.put(new, new_data) is True and store.read(new) == new_data



def _hold_lock(directory: Path) -> int:
    """store.lock taken through another open file description: it conflicts like another process."""
    fd = os.open(directory / "store.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_a_read_that_finds_a_bad_entry_does_not_wait_for_a_stuck_lock(
    store: ChunkStore, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that finds an entry whose file is gone (evicted by another process, or lost) drops it
    under the lock.  With the lock stuck it must not wait LOCK_TIMEOUT (as long as a read's deadline)
    nor raise: it is a miss, and the entry is dropped by a later read once the lock is free."""
    monkeypatch.setattr("lazyfs.store.cache.LOCK_TIMEOUT", 5.0)
    digest, data = make_chunk(30, 5000)
    assert store.put(digest, data)
    os.unlink(store._chunk_path(digest))
    holder = _hold_lock(store.directory)
    try:
        t = time.monotonic()
        assert store.read(digest) is None
        assert time.monotonic() - t < 1.0
        assert store.statistics().torn == 0
        assert any("stays for later" in w for w in warnings_in(caplog))
    finally:
        os.close(holder)
    assert store.read(digest) is None
    assert store.statistics().torn == 1 and not store.contains(digest)
    assert any("dropped torn chunk" in w for w in warnings_in(caplog))


def test_evict_under_a_stuck_lock_warns_and_frees_nothing(
    store: ChunkStore, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lazyfs.store.cache.LOCK_TIMEOUT", 0.2)
    digest, data = make_chunk(31, 5000)
    assert store.put(digest, data)
    holder = _hold_lock(store.directory)
    try:
        assert store.evict(0) == 0
        assert any("eviction failed" in w for w in warnings_in(caplog))
    finally:
        os.close(holder)
    assert store.contains(digest) and store.evict(0) == 5000


def test_an_open_that_fails_late_releases_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after the index is open (the temp sweep, the first eviction) closes what the open
    took: the index, store.lock and this process's claim, so a retry can open the cache."""
    ChunkStore.open(tmp_path, 1 << 20).close()

    def broken_sweep(self: ChunkStore, *args: object, **kwargs: object) -> int:
        raise CacheError("the sweep broke")

    with monkeypatch.context() as m:
        m.setattr(ChunkStore, "_sweep_temps", broken_sweep)
        with pytest.raises(CacheError, match="the sweep broke"):
            ChunkStore.open(tmp_path, 1 << 20)
    with ChunkStore.open(tmp_path, 1 << 20) as s:
        digest, data = make_chunk(32)
        assert s.put(digest, data) and s.read(digest) == data


def test_capacity_respected(tmp_path: Path) -> None:
    rng = random.Random(7)
    capacity = 50_000
    with ChunkStore.open(tmp_path, capacity) as s:
        for i in range(200):
            digest, data = make_chunk(i, rng.randrange(1, 12_000))
            assert s.put(digest, data)
            if rng.random() < 0.3:
                s.read(make_chunk(rng.randrange(i + 1))[0])
            stats = s.statistics()
            assert stats.bytes <= capacity
        on_disk = sum(p.stat().st_size for p in (tmp_path / "chunks").rglob("*") if p.is_file())
        assert on_disk == s.statistics().bytes
        report = s.verify()
        assert report.clean and report.bytes == on_disk


def test_too_large_chunk_is_rejected(store: ChunkStore, tmp_path: Path) -> None:
    with ChunkStore.open(tmp_path / "small", 100) as s:
        digest, data = make_chunk(1, 101)
        assert s.put(digest, data) is False
        assert s.statistics().rejected == 1
        assert not s.contains(digest)


def test_reopen_with_smaller_capacity_evicts(tmp_path: Path) -> None:
    chunks = [make_chunk(i) for i in range(5)]
    with ChunkStore.open(tmp_path, 10_000) as s:
        for digest, data in chunks:
            s.put(digest, data)
    with ChunkStore.open(tmp_path, 2000) as s:
        assert [s.contains(d) for d, _ in chunks] == [False, False, False, True, True]
    with pytest.raises(UsageError):
        ChunkStore.open(tmp_path, 0)


def test_pinned_chunks_are_not_evicted(tmp_path: Path) -> None:
    a, b, c, d = (make_chunk(i) for i in range(4))
    with ChunkStore.open(tmp_path, 3000) as s:
        for digest, data in (a, b, c):
            s.put(digest, data)
        s.pin(a[0])
        s.pin(a[0])  # reference counted
        assert s.put(*d)  # evicts b, the oldest unpinned
        assert [s.contains(x[0]) for x in (a, b, c, d)] == [True, False, True, True]
        s.unpin(a[0])
        assert s.evict(0) == 2000  # c and d; a is still pinned once
        assert s.contains(a[0]) and s.statistics().pinned == 1
        s.unpin(a[0])
        assert s.evict(0) == 1000
        with pytest.raises(UsageError):
            s.unpin(a[0])


def test_put_fails_cleanly_when_everything_is_pinned(tmp_path: Path) -> None:
    chunks = [make_chunk(i) for i in range(3)]
    with ChunkStore.open(tmp_path, 3000) as s:
        for digest, data in chunks:
            s.put(digest, data)
            s.pin(digest)
        digest, data = make_chunk(9)
        assert s.put(digest, data) is False
        assert s.statistics().rejected == 1
        assert all(s.contains(d) for d, _ in chunks)
        assert os.listdir(tmp_path / "tmp") == []
        for d, _ in chunks:
            s.unpin(d)
        assert s.put(digest, data)


def test_pin_before_put(tmp_path: Path) -> None:
    a, b = make_chunk(1), make_chunk(2)
    with ChunkStore.open(tmp_path, 1000) as s:
        with s.pinned(a[0]):
            assert s.put(*a)
            assert s.put(*b) is False  # a is pinned, no room
            assert s.read(a[0]) == a[1]
        assert s.put(*b)
        assert not s.contains(a[0])


CHILD_PIN = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from lazyfs.store import ChunkStore
    with ChunkStore.open(Path(sys.argv[1]), 10_000) as s:
        s.pin(bytes.fromhex(sys.argv[2]))
        print("pinned", flush=True)
        sys.stdin.readline()
    """
)


def test_pins_hold_across_processes(tmp_path: Path) -> None:
    a, b = make_chunk(1), make_chunk(2)
    with ChunkStore.open(tmp_path, 10_000) as s:
        s.put(*a)
        s.put(*b)
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD_PIN, str(tmp_path), a[0].hex()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            assert child.stdout is not None and child.stdout.readline() == "pinned\n"
            assert s.evict(0) == 1000  # only b: a is pinned by the other process
            assert s.read(a[0]) == a[1]
        finally:
            child.communicate("done\n", timeout=30)
        assert child.returncode == 0
        assert s.evict(0) == 1000
        assert not s.contains(a[0])


# --- integrity and verify ---------------------------------------------------------------------------


def chunk_path(store: ChunkStore, digest: bytes) -> Path:
    path = store.path_of(digest)
    assert path is not None
    return path


def _flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_torn_chunk_is_never_served(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (a, da), (b, db), (c, dc), (d, dd) = (make_chunk(i, 4000) for i in range(4))
    with ChunkStore.open(tmp_path, 100_000) as s:
        for digest, data in ((a, da), (b, db), (c, dc), (d, dd)):
            s.put(digest, data)
        paths = {x: chunk_path(s, x) for x in (a, b, c, d)}
    _flip_byte(paths[a], 3000)  # same size, wrong content: what a power loss can leave
    _flip_byte(paths[b], 10)
    os.truncate(paths[c], 100)
    os.unlink(paths[d])
    with ChunkStore.open(tmp_path) as s:  # a fresh process view: nothing verified yet
        assert s.read(a, 0, 10) is None  # partial read: the first access checks the whole file
        assert s.read(b) is None
        assert s.path_of(c) is None
        assert s.read(d) is None
        assert len(warnings_in(caplog)) == 4
        assert [s.contains(x) for x in (a, b, c, d)] == [False] * 4  # dropped
        stats = s.statistics()
        assert (stats.torn, stats.entries, stats.bytes, stats.misses) == (4, 0, 0, 4)
        assert s.verify().clean
        assert s.put(a, da) and s.read(a) == da  # re-insertable


def test_whole_reads_always_check(store: ChunkStore, caplog: pytest.LogCaptureFixture) -> None:
    digest, data = make_chunk(1, 4000)
    store.put(digest, data)
    assert store.read(digest) == data
    _flip_byte(chunk_path(store, digest), 0)
    assert store.read(digest) is None
    assert len(warnings_in(caplog)) == 1


def test_verify_finds_and_repairs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    chunks = [make_chunk(i, 2000) for i in range(7)]
    with ChunkStore.open(tmp_path, 100_000) as s:
        for digest, data in chunks:
            s.put(digest, data)
        paths = [chunk_path(s, d) for d, _ in chunks]
        assert s.verify() == s.verify(repair=True)
        assert s.verify().clean
    os.truncate(paths[0], 1000)
    _flip_byte(paths[1], 1999)
    os.unlink(paths[2])
    orphan_digest, orphan_data = make_chunk(99)
    orphan = tmp_path / "chunks" / orphan_digest.hex()[:2] / orphan_digest.hex()
    orphan.write_bytes(orphan_data)
    (tmp_path / "chunks" / "ab" / "junk").write_bytes(b"junk")
    stale = tmp_path / "tmp" / "dead.123.abc.tmp"
    stale.write_bytes(b"half a chunk")
    live = tmp_path / "tmp" / "live.456.def.tmp"
    live.write_bytes(b"being written")
    live_fd = os.open(live, os.O_RDONLY)
    fcntl.flock(live_fd, fcntl.LOCK_EX)  # a writer in another process holds its temp's lock
    try:
        with ChunkStore.open(tmp_path) as s:
            stale.write_bytes(b"half a chunk")  # (opening swept it; put it back to test verify)
            report = s.verify()
            assert (report.checked, report.ok, report.torn, report.orphans, report.temps) == (7, 4, 3, 2, 1)
            assert (report.repaired, report.bytes, report.clean) == (0, 8000, False)
            assert orphan.exists() and stale.exists() and paths[0].stat().st_size == 1000
            report = s.verify(repair=True)
            assert (report.torn, report.orphans, report.temps, report.repaired) == (3, 2, 1, 6)
            after = s.verify()
            assert after.clean and (after.checked, after.bytes) == (4, 8000)
            assert not orphan.exists() and not stale.exists() and live.exists()
            assert s.statistics().entries == 4
            for i, (digest, data) in enumerate(chunks):
                assert s.read(digest) == (None if i < 3 else data)
    finally:
        os.close(live_fd)
    assert warnings_in(caplog) == []  # verify reports; it does not warn


def test_verify_repairs_index_totals(store: ChunkStore) -> None:
    for i in range(3):
        store.put(*make_chunk(i))
    with store._env.begin(write=True) as txn:  # simulate drift
        txn.put(b"bytes", (12345).to_bytes(8, "little"), db=store._db_meta)
        txn.delete(next(iter(txn.cursor(db=store._db_lru).iternext(values=False))), db=store._db_lru)
    report = store.verify()
    assert report.index_errors == 2 and not report.clean
    assert store.verify(repair=True).repaired == 2
    assert store.verify().clean
    assert store.statistics().bytes == 3000
    assert store.evict(0) == 3000


def test_statistics(store: ChunkStore) -> None:
    a, b = make_chunk(1), make_chunk(2)
    store.put(*a)
    store.read(a[0])
    store.read(a[0], 5, 5)
    store.read(b[0])
    stats = store.statistics()
    assert stats == StoreStatistics(
        entries=1,
        bytes=1000,
        capacity=1 << 20,
        pinned=0,
        hits=2,
        misses=1,
        inserts=1,
        inserted_bytes=1000,
        evictions=0,
        evicted_bytes=0,
        torn=0,
        rejected=0,
        errors=0,
    )


# --- opening ----------------------------------------------------------------------------------------


def test_open_a_file_is_a_clear_cache_error(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(CacheError, match="not a directory") as info:
        ChunkStore.open(target, 1000)
    assert "\n" not in str(info.value)


def _open_error_as(uid: int, directory: Path) -> str:
    """Open ``directory`` in a forked child running as ``uid``; the CacheError message it got."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.close(read_end)
            os.setgid(uid)
            os.setuid(uid)
            try:
                ChunkStore.open(directory, 1000).close()
            except CacheError as exc:
                os.write(write_end, str(exc).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        message = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return message


def test_open_unwritable_dir_is_a_clear_cache_error(tmp_path: Path) -> None:
    base = tmp_path / "ro"
    base.mkdir(mode=0o555)
    for target in (base, base / "cache"):
        if os.geteuid() == 0:  # root ignores permission bits: try as nobody
            message = _open_error_as(65534, target)
        else:
            with pytest.raises(CacheError) as info:
                ChunkStore.open(target, 1000)
            message = str(info.value)
        assert str(target) in message and "Permission denied" in message
        assert "\n" not in message


def test_open_other_format_is_refused(tmp_path: Path) -> None:
    with ChunkStore.open(tmp_path, 1000) as s, s._env.begin(write=True) as txn:
        txn.put(b"format", b"99", db=s._db_meta)
    with pytest.raises(CacheError, match="format 99"):
        ChunkStore.open(tmp_path, 1000)


# --- blobs --------------------------------------------------------------------------------------------


def test_blobs(store: ChunkStore) -> None:
    assert store.get_blob("ref-llama3:8b") is None
    assert store.put_blob("ref-llama3:8b", b"digest-1")
    assert store.put_blob("ref-llama3:8b", b"digest-2")  # replaced atomically
    assert store.get_blob("ref-llama3:8b") == b"digest-2"
    assert store.put_blob("org/model:tag", b"x")  # "/" is quoted, it does not make a directory
    assert store.get_blob("org/model:tag") == b"x"
    assert sorted(os.listdir(store.directory / "manifests")) == ["org%2Fmodel:tag", "ref-llama3:8b"]
    store.delete_blob("org/model:tag")
    store.delete_blob("org/model:tag")
    assert store.get_blob("org/model:tag") is None
    for bad in ("", ".", "..", "x" * 300):
        with pytest.raises(UsageError):
            store.put_blob(bad, b"")
    assert os.listdir(store.directory / "tmp") == []
    assert store.statistics().bytes == 0  # blobs do not count against the capacity
