"""The FUSE adapter without a mount: negative entries and the directory read-ahead's queue."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest

from lazyfs import fuse
from lazyfs.config import SeedConfig
from lazyfs.fetch import ChunkFetcher
from lazyfs.fs import ROOT_INODE, LazyFilesystem
from lazyfs.manifest import parse_ref
from lazyfs.seed import seed
from lazyfs.testing import MemoryOrigin

MP = b"/mnt/where"
DEV = os.makedev(0, 99)
Make = Callable[..., fuse.FuseAdapter]


@pytest.fixture
async def lfs(tmp_path: Path) -> AsyncIterator[LazyFilesystem]:
    src = tmp_path / "src"
    for d in ("a", "b", "c"):
        (src / d).mkdir(parents=True)
        for f in ("1", "2"):
            (src / d / f).write_bytes(d.encode() + f.encode())
    (src / "lone").mkdir()
    (src / "lone" / "only").write_bytes(b"x")
    (src / "file").write_bytes(b"f")
    origin = MemoryOrigin()
    result = await seed(src, origin, parse_ref("t:1"), SeedConfig(chunk_size=4096))
    fetcher = ChunkFetcher(result.manifest, origin, None)
    yield LazyFilesystem(result.manifest, fetcher)
    await fetcher.aclose()


class FakeLister:
    """Stands in for listing through a mount: records paths; can block, or fail."""

    def __init__(self) -> None:
        self.paths: list[bytes] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.fail: type[OSError] | None = None

    def __call__(self, path: bytes, device: int) -> None:
        assert device == DEV
        self.entered.set()
        assert self.release.wait(10)
        if self.fail is not None:
            raise self.fail(errno.EACCES, "refused")
        self.paths.append(path)


@pytest.fixture
def lister(monkeypatch: pytest.MonkeyPatch) -> FakeLister:
    fake = FakeLister()
    monkeypatch.setattr(fuse, "_list_directory", fake)
    return fake


@pytest.fixture
def adapter(lfs: LazyFilesystem) -> Iterator[Make]:
    """Makes adapters over ``lfs``; their read-ahead threads are stopped afterwards."""
    made: list[fuse.FuseAdapter] = []

    def make(*args: Any, **kwargs: Any) -> fuse.FuseAdapter:
        made.append(fuse.FuseAdapter(lfs, *args, **kwargs))
        made[-1].list_ahead.device = DEV  # as the daemon sets it once the mount is up
        return made[-1]

    yield make
    for a in made:
        a.list_ahead.close()


async def until(pred: Callable[[], bool]) -> None:
    for _ in range(500):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def ino(fs: LazyFilesystem, name: str) -> int:
    return fs.lookup_ino(ROOT_INODE, name.encode())


async def test_a_missing_name_is_a_negative_entry_the_kernel_may_keep(
    lfs: LazyFilesystem, lister: FakeLister, adapter: Make
) -> None:
    a = adapter()
    missing = await a.lookup(ROOT_INODE, b"nope")
    assert missing.st_ino == 0 and missing.entry_timeout == fuse.CACHE_TIMEOUT
    found = await a.lookup(ino(lfs, "a"), b"1")
    assert found.st_ino == lfs.lookup_ino(ino(lfs, "a"), b"1") and found.st_size == 2
    assert (await a.lookup(ino(lfs, "a"), b"1")) is found  # built once per inode
    with pytest.raises(pyfuse3.FUSEError) as err:
        await a.lookup(ino(lfs, "file"), b"x")  # not a directory: an error, not a negative entry
    assert err.value.errno == errno.ENOTDIR
    s = a.statistics()
    assert (s.lookups, s.lookups_missing) == (4, 1)
    assert lister.paths == []  # no mountpoint: nothing is listed ahead


async def test_each_touched_directory_is_listed_once(lfs: LazyFilesystem, lister: FakeLister, adapter: Make) -> None:
    a = adapter(MP.decode())
    await a.lookup(ROOT_INODE, b"a")  # touches the root
    await a.lookup(ino(lfs, "a"), b"1")
    await a.lookup(ino(lfs, "a"), b"2")
    await a.lookup(ino(lfs, "a"), b"missing")
    await a.lookup(ino(lfs, "lone"), b"only")  # one name: nothing to gain
    await until(lambda: a.list_ahead._worker is None)
    assert lister.paths == [MP, MP + b"/a"]
    s = a.statistics()
    assert (s.dirs_listed_ahead, s.list_ahead_errors, s.list_ahead_dropped) == (2, 0, 0)


async def test_directories_over_the_limit_are_not_listed(
    lfs: LazyFilesystem, lister: FakeLister, adapter: Make
) -> None:
    a = adapter(MP.decode(), list_ahead=2)
    await a.lookup(ROOT_INODE, b"a")  # the root has 5 names
    await a.lookup(ino(lfs, "a"), b"1")  # 2 names
    await until(lambda: a.list_ahead._worker is None)
    assert lister.paths == [MP + b"/a"]


async def test_a_failed_listing_is_counted_and_the_lookup_still_answers(
    lfs: LazyFilesystem, lister: FakeLister, adapter: Make
) -> None:
    lister.fail = PermissionError
    a = adapter(MP.decode())
    assert (await a.lookup(ino(lfs, "b"), b"2")).st_size == 2
    await until(lambda: a.list_ahead._worker is None)
    s = a.statistics()
    assert (s.dirs_listed_ahead, s.list_ahead_errors) == (0, 1)


async def test_the_oldest_waiting_directory_gives_way_and_may_come_back(
    lfs: LazyFilesystem, lister: FakeLister, adapter: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fuse, "LIST_AHEAD_QUEUE", 1)
    a = adapter(MP.decode())
    lister.release.clear()
    await a.lookup(ino(lfs, "a"), b"1")
    await until(lister.entered.is_set)  # a's listing is under way, held
    await a.lookup(ino(lfs, "b"), b"1")
    await a.lookup(ino(lfs, "c"), b"1")  # b gives way
    lister.release.set()
    await until(lambda: a.list_ahead._worker is None)
    assert lister.paths == [MP + b"/a", MP + b"/c"]
    assert a.statistics().list_ahead_dropped == 1
    await a.lookup(ino(lfs, "b"), b"2")  # a later lookup in b queues it again
    await until(lambda: a.list_ahead._worker is None)
    assert lister.paths == [MP + b"/a", MP + b"/c", MP + b"/b"]


async def test_nothing_is_listed_after_close(lfs: LazyFilesystem, lister: FakeLister, adapter: Make) -> None:
    a = adapter(MP.decode())
    a.list_ahead.close()
    await a.lookup(ino(lfs, "a"), b"1")
    await asyncio.sleep(0.05)
    assert lister.paths == [] and a.list_ahead._worker is None


async def test_nothing_is_listed_before_the_mount_is_known(lfs: LazyFilesystem, lister: FakeLister) -> None:
    a = fuse.FuseAdapter(lfs, MP.decode())  # device not set yet
    await a.lookup(ino(lfs, "a"), b"1")
    await asyncio.sleep(0.05)
    assert lister.paths == []
    a.list_ahead.device = DEV
    await a.lookup(ino(lfs, "a"), b"2")  # the directory was not given up: listed now
    await until(lambda: a.list_ahead._worker is None)
    assert lister.paths == [MP + b"/a"]
    a.list_ahead.close()


def test_a_directory_off_the_mount_or_behind_a_symlink_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to("d")
    here = os.stat(tmp_path).st_dev
    fuse._list_directory(os.fsencode(tmp_path / "d"), here)
    with pytest.raises(OSError) as err:
        fuse._list_directory(os.fsencode(tmp_path / "d"), here + 1)
    assert err.value.errno == errno.EXDEV
    with pytest.raises(OSError) as err:
        fuse._list_directory(os.fsencode(tmp_path / "link"), here)
    assert err.value.errno in (errno.ELOOP, errno.ENOTDIR)


def test_device_number_from_mountinfo_text() -> None:
    assert fuse.device_number("0:99") == DEV
    assert fuse.device_number(None) is None
    assert fuse.device_number("not:a-number") is None
