"""LazyFilesystem without a mount: inode table, metadata and reads over a seeded tree."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lazyfs.config import SeedConfig
from lazyfs.errors import FilesystemError
from lazyfs.fetch import ChunkFetcher, FetchConfig
from lazyfs.fs import ROOT_INODE, Attr, LazyFilesystem
from lazyfs.manifest import parse_ref
from lazyfs.prefetch import ReadAheadConfig
from lazyfs.seed import seed
from lazyfs.testing import MemoryOrigin

CHUNK = 64 * 1024


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    (src / "big").write_bytes(os.urandom(3 * CHUNK + 17))
    (src / "empty").write_bytes(b"")
    (src / "d" / "one").write_bytes(b"1")
    os.link(src / "d" / "one", src / "d" / "e" / "link")
    os.symlink(b"../big\xff", src / "d" / "sym")
    os.mkfifo(src / "fifo")
    os.chmod(src / "big", 0o4751)
    os.setxattr(src / "big", "user.k", b"v")
    return src


@pytest.fixture
async def lfs(tree: Path) -> AsyncIterator[LazyFilesystem]:
    origin = MemoryOrigin()
    result = await seed(tree, origin, parse_ref("t:1"), SeedConfig(chunk_size=CHUNK, pack_size=2 * CHUNK))
    fetcher = ChunkFetcher(result.manifest, origin, None)
    yield LazyFilesystem(result.manifest, fetcher, control_xattrs={b"user.lazyfs.status": lambda: b"{}"})
    await fetcher.aclose()


def lookup_path(fs: LazyFilesystem, path: str) -> int:
    ino = ROOT_INODE
    for part in path.split("/"):
        ino = fs.lookup(ino, os.fsencode(part)).ino
    return ino


async def test_metadata(lfs: LazyFilesystem, tree: Path) -> None:
    for rel in ("big", "empty", "d", "d/one", "d/sym", "fifo", "d/e"):
        st = os.lstat(tree / rel)
        a = lfs.getattr(lookup_path(lfs, rel))
        assert (a.mode, a.uid, a.gid, a.mtime_ns) == (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns), rel
        if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
            assert a.size == st.st_size
        assert a.nlink == st.st_nlink, rel
    assert lfs.readlink(lookup_path(lfs, "d/sym")) == b"../big\xff"
    assert lookup_path(lfs, "d/one") == lookup_path(lfs, "d/e/link")
    assert lfs.getxattr(lookup_path(lfs, "big"), b"user.k") == b"v"
    assert lfs.listxattr(ROOT_INODE) == []  # control names are never listed
    assert lfs.getxattr(ROOT_INODE, b"user.lazyfs.status") == b"{}"


async def test_readdir_and_errors(lfs: LazyFilesystem) -> None:
    names = [d.name for d in lfs.readdir(ROOT_INODE, 0)]
    assert names == sorted(names) == [b"big", b"d", b"empty", b"fifo"]
    rest = lfs.readdir(ROOT_INODE, 2)
    assert [(d.name, d.next_id) for d in rest] == [(b"empty", 3), (b"fifo", 4)]
    assert list(lfs.readdir(ROOT_INODE, 4)) == list(lfs.readdir(ROOT_INODE, 1 << 62)) == []
    with pytest.raises(FilesystemError) as e:
        lfs.lookup(ROOT_INODE, b"nope")
    assert e.value.errno == errno.ENOENT
    with pytest.raises(FilesystemError) as e:
        lfs.open(lookup_path(lfs, "big"), os.O_RDWR)
    assert e.value.errno == errno.EROFS
    with pytest.raises(FilesystemError) as e:
        lfs.readdir(lookup_path(lfs, "big"), 0)
    assert e.value.errno == errno.ENOTDIR
    with pytest.raises(FilesystemError) as e:
        lfs.getxattr(ROOT_INODE, b"user.none")
    assert e.value.errno == errno.ENODATA


async def test_reads_across_chunk_boundaries(lfs: LazyFilesystem, tree: Path) -> None:
    data = (tree / "big").read_bytes()
    fh = lfs.open(lookup_path(lfs, "big"), os.O_RDONLY)
    for off, n in [(0, 1), (CHUNK - 1, 2), (CHUNK - 5, 2 * CHUNK + 10), (len(data) - 1, 100), (0, len(data) + 5)]:
        assert await lfs.read(fh, off, n) == data[off : off + n]
    assert await lfs.read(fh, len(data), 10) == b""
    lfs.release(fh)
    fh = lfs.open(lookup_path(lfs, "empty"), os.O_RDONLY)
    assert await lfs.read(fh, 0, 10) == b""


async def test_a_chunk_read_to_its_end_is_evicted_before_the_chunks_read_ahead(tree: Path) -> None:
    """Room for three chunks: chunk 0 is being read, 1 and 2 were fetched ahead.  Reading chunk 0
    to its end makes it the first to go, so fetching chunk 3 keeps 1 and 2.  (Plain LRU, where
    each read refreshed chunk 0, evicted chunk 1 and fetched it again from the origin.)"""
    origin = MemoryOrigin()
    m = (await seed(tree, origin, parse_ref("t:1"), SeedConfig(chunk_size=CHUNK, pack_size=2 * CHUNK))).manifest
    fetcher = ChunkFetcher(m, origin, None, FetchConfig(memory_bytes=3 * CHUNK, coalesce_bytes=CHUNK))
    fs = LazyFilesystem(m, fetcher, ReadAheadConfig(initial_window=0, max_window=0))
    try:
        data = (tree / "big").read_bytes()
        ino = lookup_path(fs, "big")
        chunks = next(e for e in m.entries if e.path == b"big").chunks
        fh = fs.open(ino, os.O_RDONLY)
        assert await fs.read(fh, 0, CHUNK // 2) == data[: CHUNK // 2]
        for i in (1, 2):
            await fetcher.get(chunks[i])
        assert await fs.read(fh, CHUNK // 2, CHUNK // 2) == data[CHUNK // 2 : CHUNK]  # chunk 0 read to its end
        await fetcher.get(chunks[3])  # no room: one chunk must go
        before = fetcher.statistics().origin_requests
        assert await fs.read(fh, CHUNK, 2 * CHUNK) == data[CHUNK : 3 * CHUNK]
        assert fetcher.statistics().origin_requests == before, "chunks 1 and 2 were still in memory"
        assert await fs.read(fh, 0, 10) == data[:10]
        assert fetcher.statistics().origin_requests == before + 1, "chunk 0 was the one evicted"
    finally:
        await fetcher.aclose()


async def test_warm_fetches_everything_once(lfs: LazyFilesystem, tree: Path) -> None:
    n = await lfs.warm([b"d"])
    assert n == 1
    total = await lfs.warm()
    assert total == (tree / "big").stat().st_size + 1
    assert lfs.fetcher.statistics().cache_misses == 0  # no cache configured: nothing counted as a miss


async def test_readdir_makes_attributes_only_for_the_entries_taken(
    lfs: LazyFilesystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel takes a page of entries per request: building every remaining entry's attributes
    each time made listing a directory of n names O(n^2)."""
    calls: list[int] = []
    real = lfs.getattr

    def counting(ino: int) -> Attr:
        calls.append(ino)
        return real(ino)

    monkeypatch.setattr(lfs, "getattr", counting)
    it = lfs.readdir(ROOT_INODE, 1)
    assert calls == []
    assert next(it).name == b"d"
    assert len(calls) == 1
