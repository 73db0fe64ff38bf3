"""Reading through a real mount from a controllable HTTP origin: concurrency, deadlines,
corruption, the persistent cache and its bound.

The daemon mounts ``http://127.0.0.1:PORT/`` served by ``tools/test_origin.py``, whose
counters show exactly which pack ranges were fetched and whose faults make the origin
hang, fail, or send corrupt bytes.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import blake3
import pytest

from lazyfs.fs import FAILED_HOLD
from tests.fuse.conftest import (
    CHUNK,
    MiB,
    Mounter,
    Origins,
    Published,
    bounded,
    cached_chunks,
    lazyfs,
    read_file,
)

pytestmark = pytest.mark.fuse

# Short deadlines keep failure tests fast; SLACK covers process scheduling on a loaded
# 2-core machine, not a second deadline.
READ_TIMEOUT = 2.0
SLACK = 2.0


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- 3. concurrency ---------------------------------------------------------------------------------


_READER = """
import hashlib, sys
with open(sys.argv[1], "rb") as f:
    h = hashlib.sha256()
    while block := f.read(int(sys.argv[2])):
        h.update(block)
print(h.hexdigest())
"""


def test_concurrent_readers_get_identical_bytes_and_each_chunk_is_fetched_once(
    bulk: Published, origins: Origins, mounter: Mounter
) -> None:
    origin = origins(bulk)
    # Each pack request takes a while, so readers pile up on chunks already in flight.
    origin.set_faults(delay=0.05)
    m = mounter.mount(origin.url + "/", bulk.ref)
    files = bulk.files()
    assert len(files) == 5 and sum(len(c) for c in (bulk.contents[f] for f in files)) > 4 * MiB
    jobs = [b"big.bin"] * 4 + files  # several threads on one file, one on each of the others
    procs = [
        subprocess.Popen([sys.executable, "-c", _READER, m.path(rel), str(size)], stdout=subprocess.PIPE, text=True)
        for rel, size in [(b"big.bin", 65536), (b"big.bin", 100_000), (files[0], 4096), (files[3], 1 << 20)]
    ]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda rel: (rel, read_file(m.path(rel))), jobs))
    for rel, data in results:
        assert data == bulk.contents[rel], rel
    for p, rel in zip(procs, [b"big.bin", b"big.bin", files[0], files[3]], strict=True):
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        assert out.strip() == _sha(bulk.contents[rel]), rel

    stats = origin.stats()
    counts = [stats.times_served(*bulk.pack_range(c)) for c in bulk.manifest.chunks]
    assert counts == [1] * len(bulk.manifest.chunks), "every chunk fetched from the origin exactly once"
    assert stats.bytes_for("packs/") == bulk.manifest.stored_size
    f = m.status()["fetch"]
    assert f["bytes_from_origin"] == bulk.manifest.stored_size
    assert f["verify_failures"] == 0 and f["origin_errors"] == 0


# --- 4. deadlines -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["hang", "fail-503"])
def test_unreachable_origin_gives_eio_within_the_deadline_then_recovers(
    bulk: Published, origins: Origins, mounter: Mounter, fault: str
) -> None:
    origin = origins(bulk)
    m = mounter.mount(origin.url + "/", bulk.ref, read_timeout=READ_TIMEOUT)
    if fault == "hang":
        origin.set_faults(hang=True)
    else:
        origin.set_faults(fail=503)
    rel = b"big.bin"
    out = bounded(lambda: read_file(m.path(rel)), 4 * READ_TIMEOUT + 10, "a cold read from a dead origin")
    assert out.errno == errno.EIO, out
    assert out.seconds <= READ_TIMEOUT + SLACK, f"EIO took {out.seconds:.2f} s with --read-timeout {READ_TIMEOUT}"
    # A pread in the middle of another file: the same.
    other = m.path(b"data/f3.bin")
    fd = os.open(other, os.O_RDONLY)
    try:
        out = bounded(lambda: os.pread(fd, 1000, 300_000), 4 * READ_TIMEOUT + 10, "a cold pread")
    finally:
        os.close(fd)
    assert out.errno == errno.EIO and out.seconds <= READ_TIMEOUT + SLACK, out
    f = m.status()["fetch"]
    if fault == "hang":
        assert f["deadline_failures"] >= 1
    else:
        assert f["origin_errors"] >= 1
    # Metadata never needs the origin.
    assert os.stat(m.path(rel)).st_size == len(bulk.contents[rel])

    origin.heal()
    # Fetches started before the heal (read-ahead retrying the 503s) end on their own deadline;
    # a chunk that just failed is not tried again for FAILED_HOLD.
    m.wait_idle()
    time.sleep(FAILED_HOLD)
    out = bounded(lambda: read_file(m.path(rel)), READ_TIMEOUT + 10, "a read after healing")
    assert out.error is None and out.result == bulk.contents[rel], (out, m.log())
    assert read_file(other) == bulk.contents[b"data/f3.bin"]


def test_a_pack_missing_at_the_origin_is_eio_not_enoent(bulk: Published, mounter: Mounter, tmp_path: Path) -> None:
    broken = tmp_path / "origin"
    shutil.copytree(bulk.origin_dir, broken)
    for pack in (broken / "packs").iterdir():
        pack.unlink()
    m = mounter.mount(f"file://{broken}", bulk.ref, read_timeout=READ_TIMEOUT)
    out = bounded(lambda: read_file(m.path(b"data/f0.bin")), READ_TIMEOUT + 10, "a read of a missing pack")
    assert out.errno == errno.EIO, out
    assert m.status()["fetch"]["origin_errors"] >= 1


# --- 5. corruption ----------------------------------------------------------------------------------


def test_corrupt_bytes_from_the_origin_are_never_served_nor_cached(
    bulk: Published, origins: Origins, mounter: Mounter
) -> None:
    origin = origins(bulk)
    m = mounter.mount(origin.url + "/", bulk.ref, read_timeout=READ_TIMEOUT)

    def read(rel: bytes, flags: int = os.O_RDONLY) -> bytes:
        fd = os.open(m.path(rel), flags)
        try:
            return os.pread(fd, 10 * MiB, 0)
        finally:
            os.close(fd)

    # Always corrupt: every attempt fails verification, the reader gets EIO, never bad bytes;
    # through the page cache and with O_DIRECT (each pread goes to the daemon as is).
    origin.set_faults(corrupt=True)
    bad = b"data/f1.bin"
    out = bounded(lambda: read(bad), READ_TIMEOUT + 10, "a read of corrupt data")
    assert out.errno == errno.EIO, out
    out = bounded(lambda: read(b"data/f0.bin", os.O_RDONLY | os.O_DIRECT), READ_TIMEOUT + 10, "an O_DIRECT read")
    assert out.errno == errno.EIO, out
    st = m.wait_idle()
    assert st["fetch"]["verify_failures"] > 0
    assert st["cache"]["entries"] == 0 and cached_chunks(m.cache_dir) == {}

    # A transient corruption: the fetcher fetches again and the reader never notices.
    origin.set_faults(corrupt_next=1)
    assert read(b"data/f2.bin") == bulk.contents[b"data/f2.bin"]
    assert origin.stats().faulted["corrupt"] > 1
    # Healed: the chunks that failed are fetched again and are right.
    origin.heal()
    m.wait_idle()
    time.sleep(FAILED_HOLD)
    assert read(bad) == bulk.contents[bad]
    st = m.wait_idle()
    failures = st["fetch"]["verify_failures"]
    assert failures >= 2

    # The cache holds exactly verified chunks: every file's name is the BLAKE3 of its bytes.
    chunks = cached_chunks(m.cache_dir)
    assert len(chunks) == len(bulk.chunks_of(bad)) + len(bulk.chunks_of(b"data/f2.bin"))
    for name in chunks:
        path = m.cache_dir / "chunks" / name[:2] / name
        assert blake3.blake3(path.read_bytes()).hexdigest() == name
    res = lazyfs("cache", "verify", "--cache-dir", m.cache_dir)
    assert "torn 0" in res.stdout and "orphans 0" in res.stdout, res.stdout

    # With the origin gone, a remount serves the cached chunks (right) and nothing else.
    mounter.umount(m)
    origin.stop()
    m2 = mounter.mount(m.origin, bulk.ref, mountpoint=m.mountpoint, cache_dir=m.cache_dir, read_timeout=1.0)
    assert read(bad) == bulk.contents[bad]
    assert read(b"data/f2.bin") == bulk.contents[b"data/f2.bin"]
    out = bounded(lambda: read(b"data/f0.bin"), 15, "a read of an uncached file with the origin down")
    assert out.errno == errno.EIO, out
    assert m2.status()["fetch"]["verify_failures"] == 0


# --- 6. the cache survives remounts -------------------------------------------------------------------


def test_remount_serves_everything_from_the_cache_even_with_the_origin_gone(
    tree: Published, origins: Origins, mounter: Mounter
) -> None:
    origin = origins(tree)
    url = origin.url + "/"
    m = mounter.mount(url, tree.ref)
    m.read_all(tree)
    cold = origin.stats()
    assert cold.requests_for("packs/") > 0 and cold.requests_for("manifests/") == 1
    mounter.umount(m)  # waits for the daemon, so its cache writes are done

    origin.reset()
    m2 = mounter.mount(url, tree.ref, mountpoint=m.mountpoint, cache_dir=m.cache_dir)
    m2.read_all(tree)
    warm = origin.stats()
    assert warm.requests_for("packs/") == 0, warm
    assert warm.requests_for("manifests/") == 0, "the verified manifest is kept in the cache"
    assert warm.requests_for("refs/") <= 1, "a tag may be resolved again (tags move)"
    f = m2.status()["fetch"]
    assert f["bytes_from_origin"] == 0 and f["origin_requests"] == 0 and f["cache_hits"] > 0
    mounter.umount(m2)

    # Origin completely gone: the ref's last digest and the manifest come from the cache.
    origin.stop()
    m3 = mounter.mount(url, tree.ref, mountpoint=m.mountpoint, cache_dir=m.cache_dir, read_timeout=1.0)
    m3.read_all(tree)
    st = m3.status()
    assert st["digest"] == tree.digest
    assert st["fetch"]["origin_requests"] == 0 and st["fetch"]["origin_errors"] == 0


# --- 8. a bounded cache -------------------------------------------------------------------------------


def test_a_small_cache_stays_within_its_bound(bulk: Published, origins: Origins, mounter: Mounter) -> None:
    origin = origins(bulk)
    bound = 1 * MiB
    m = mounter.mount(origin.url + "/", bulk.ref, cache_size="1MiB")
    assert bulk.manifest.total_size > 4 * bound
    m.read_all(bulk)
    st = m.wait_idle()
    assert 0 < st["cache"]["bytes"] <= bound, st["cache"]
    assert st["cache"]["capacity"] == bound
    assert st["cache"]["evictions"] > 0
    assert sum(cached_chunks(m.cache_dir).values()) <= bound
    mounter.umount(m)

    # Remounted on the same cache: the chunks still cached (the most recently used: most of
    # the last file) are read from it, no origin request; everything is still right.
    kept = set(cached_chunks(m.cache_dir))
    last = bulk.files()[-1]
    data = bulk.contents[last]
    kept_ranges = [(k * CHUNK, c.size) for k, c in enumerate(bulk.chunks_of(last)) if k > 0 and c.digest.hex() in kept]
    assert len(kept_ranges) >= 8, "LRU keeps what was used last"
    origin.reset()
    m2 = mounter.mount(origin.url + "/", bulk.ref, mountpoint=m.mountpoint, cache_dir=m.cache_dir, cache_size="1MiB")
    for off, size in kept_ranges:
        # O_DIRECT and a fresh handle at a non-zero offset: neither the kernel's nor the
        # daemon's read-ahead asks for neighbouring (possibly evicted) chunks.
        fd = os.open(m2.path(last), os.O_RDONLY | os.O_DIRECT)
        try:
            assert os.pread(fd, size, off) == data[off : off + size]
        finally:
            os.close(fd)
    assert origin.stats().requests_for("packs/") == 0, "cached chunks are read from the cache"
    assert m2.status()["fetch"]["cache_hits"] == len(kept_ranges)
    m2.read_all(bulk)
    st = m2.wait_idle()
    assert origin.stats().requests_for("packs/") > 0, "evicted chunks come back from the origin"
    assert 0 < st["cache"]["bytes"] <= bound
    assert sum(cached_chunks(m2.cache_dir).values()) <= bound
    mounter.umount(m2)
    res = lazyfs("cache", "verify", "--cache-dir", m.cache_dir)
    assert "torn 0" in res.stdout and "orphans 0" in res.stdout, res.stdout
