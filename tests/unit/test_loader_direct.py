"""The loader's direct reads (``lazyfs.loader.direct``, ``direct_io=True``) and its prefaulting of
destination memory (``lazyfs.loader.prefault``).

Every direct-read test drops its file from the page cache first (``fsync`` then
``POSIX_FADV_DONTNEED``, checked with ``cachestat``), so the reads really are ``O_DIRECT``; the
file system under pytest's temporary directory must take direct I/O, as every disk file system
does.  Covered: exact bytes at unaligned offsets, into split and into aligned destinations; the
hasher sees every byte in order; end of file; the decision (whole pages only, a cached range
reads buffered, a buffered read does not pull the rest of the file in); loads through
``PlainReader`` and ``CacheReader`` (checked chunks, a torn chunk, a truncated one, a refused
direct read); buffered by default.  That a FUSE file is never read direct is in
tests/fuse/test_loader_mount.py.  Prefaulting maps exactly the whole pages of each view, keeps
their bytes, and turns itself off on a kernel without ``MADV_POPULATE_WRITE``.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from pathlib import Path

import pytest
import torch
import xxhash

from lazyfs.loader import LoaderIOError, last_statistics, load_file, prefault, readers
from lazyfs.loader import direct as D
from lazyfs.loader.readers import DIRECT_MIN, CacheReader, PlainReader
from tests.helpers import evict_from_page_cache

MiB = 1024 * 1024


def drop(path: Path) -> None:
    """Evict ``path`` from the page cache, and check that it went."""
    evict_from_page_cache(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        pages = -(-os.fstat(fd).st_size // D.ALIGN) * D.ALIGN
        assert D.uncached(fd, 0, pages), f"{path} stayed in the page cache"
    finally:
        os.close(fd)


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(9 * MiB + 1234)
    path = tmp_path / "blob"
    path.write_bytes(data)
    drop(path)
    return path, data


def _direct_fd(path: Path) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY)
    dfd = D.open_direct(fd)
    assert dfd is not None, "the temporary directory's file system refuses O_DIRECT"
    return fd, dfd


@pytest.mark.parametrize(
    ("lo", "hi", "offset", "end", "cuts"),
    [
        (0, 9 * MiB + 1234, 0, 9 * MiB + 1234, [1, 4095, 3 * MiB]),  # the whole file, split views, partial last block
        (12345, 6 * MiB + 7, 12345, 6 * MiB + 7, []),  # unaligned both ends, one view across the bounce size
        (0, 5 * MiB, 4096 + 3, 5 * MiB - 999, [100]),  # a hashed chunk whose wanted bytes are in the middle
        (4 * MiB, 9 * MiB + 1234, 9 * MiB, 9 * MiB + 1234, []),  # wanted bytes at the very end
    ],
)
def test_read_direct_gives_the_exact_bytes_and_hashes_the_whole_range(
    blob: tuple[Path, bytes], lo: int, hi: int, offset: int, end: int, cuts: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(D, "BOUNCE", 4 * MiB)  # the ranges cross it
    path, data = blob
    fd, dfd = _direct_fd(path)
    try:
        buf = bytearray(end - offset)
        views, at = [], 0
        for c in [*cuts, len(buf)]:
            views.append(memoryview(buf)[at:c])
            at = c
        hasher = xxhash.xxh3_64()
        D.read_direct(dfd, str(path), lo, hi, offset, views, hasher)
        assert bytes(buf) == data[offset:end]
        assert hasher.intdigest() == xxhash.xxh3_64_intdigest(data[lo:hi])
        assert D.uncached(fd, 0, len(data)), "a direct read left the file in the page cache"
    finally:
        os.close(dfd)
        os.close(fd)


def test_read_direct_straight_into_an_aligned_destination(
    blob: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page-aligned buffer (a pinned ring slot) at an aligned offset is read into without a bounce."""
    path, data = blob
    fd, dfd = _direct_fd(path)
    dest = mmap.mmap(-1, 8 * MiB)
    view = memoryview(dest)
    try:
        base = D._address(view)
        into_dest: list[bool] = []
        real = D._pread

        def spy(dfd_: int, v: memoryview, offset: int, p: str) -> int:
            into_dest.append(base <= D._address(v) < base + len(view))
            return real(dfd_, v, offset, p)

        monkeypatch.setattr(D, "_pread", spy)
        D.read_direct(dfd, str(path), MiB, 9 * MiB - 100, MiB, [view[: 8 * MiB - 100]])
        assert bytes(view[: 8 * MiB - 100]) == data[MiB : 9 * MiB - 100]
        # The whole blocks went straight in, the last partial block through the bounce buffer.
        assert into_dest == [True, False]
    finally:
        view.release()
        dest.close()
        os.close(dfd)
        os.close(fd)


def test_read_direct_past_the_end_of_the_file_is_an_error(blob: tuple[Path, bytes]) -> None:
    path, data = blob
    fd, dfd = _direct_fd(path)
    try:
        with pytest.raises(LoaderIOError, match="unexpected end of file"):
            short = memoryview(bytearray(len(data) + 10 - 8 * MiB))
            D.read_direct(dfd, str(path), 8 * MiB, len(data) + 10, 8 * MiB, [short])
    finally:
        os.close(dfd)
        os.close(fd)


def test_uncached_counts_whole_pages_only(blob: tuple[Path, bytes]) -> None:
    path, _ = blob
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead: a read caches what it reads
        assert D.uncached(fd, 0, MiB)
        os.pread(fd, 10, 2 * MiB + 5)  # one page cached
        assert not D.uncached(fd, 2 * MiB, MiB) and not D.uncached(fd, MiB, 2 * MiB)
        # Ranges that share only part of that page, as a neighbouring read unit would: still uncached.
        assert D.uncached(fd, 2 * MiB + 100, MiB) and D.uncached(fd, MiB, MiB + 1)
        assert not D.uncached(fd, 0, 100)  # no whole page: never worth a direct read
    finally:
        os.close(fd)


def _model(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    import safetensors.torch

    g = torch.Generator().manual_seed(5)
    ref = {f"w{i}": torch.randn(3000 + 7 * i, 257, generator=g).to(torch.bfloat16) for i in range(12)}
    ref["small"] = torch.arange(77, dtype=torch.int32)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(ref, path)
    return path, ref


@pytest.mark.parametrize("threads", [1, 4])
def test_a_load_off_a_mount_reads_an_uncached_file_direct(tmp_path: Path, threads: int) -> None:
    path, ref = _model(tmp_path)
    drop(path)
    got = load_file(path, threads=threads, direct_io=True)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    st = last_statistics()
    assert st is not None
    # All but the units that share a page with the header (read buffered, 8 bytes first): one
    # buffered read must not make the rest of the file "cached" (the read-ahead is off).
    assert st.bytes_direct >= st.bytes - 16 * MiB and st.bytes_direct > 0
    fd = os.open(path, os.O_RDONLY)
    try:
        assert sum(not D.uncached(fd, o, MiB) for o in range(0, st.bytes, MiB)) <= 1
        os.pread(fd, st.bytes + 4096, 0)  # now the file is in the page cache: the load copies it from there
    finally:
        os.close(fd)
    got = load_file(path, threads=threads, direct_io=True)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    st = last_statistics()
    assert st is not None and st.bytes_direct == 0


def test_direct_reads_are_an_option(tmp_path: Path) -> None:
    """The default reads through the page cache (faster on the reference VM's disk)."""
    path, ref = _model(tmp_path)
    drop(path)
    got = load_file(path)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    st = last_statistics()
    assert st is not None and st.bytes_direct == 0
    r = PlainReader(str(path))
    try:
        assert r.dfd is None
    finally:
        r.close()


def test_a_refused_direct_read_falls_back_to_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, ref = _model(tmp_path)
    drop(path)

    def refuse(*args: object, **kwargs: object) -> None:
        raise D.DirectRefused

    monkeypatch.setattr(readers, "read_direct", refuse)
    got = load_file(path, direct_io=True)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    st = last_statistics()
    assert st is not None and st.bytes_direct == 0


class _Chunks:
    """A file and its 1 MiB chunks, one cache file each, dropped from the page cache."""

    size = MiB

    def __init__(self, tmp_path: Path, data: bytes) -> None:
        self.path = tmp_path / "model.bin"
        self.path.write_bytes(data)
        (tmp_path / "c").mkdir()
        self.files: list[Path] = []
        self.sums: list[int] = []
        for k, at in enumerate(range(0, len(data), self.size)):
            f = tmp_path / "c" / str(k)
            f.write_bytes(data[at : at + self.size])
            drop(f)
            self.files.append(f)
            self.sums.append(xxhash.xxh3_64_intdigest(data[at : at + self.size]))

    def reader(self) -> CacheReader:
        r = CacheReader(str(self.path), str(self.path.parent), "/nonexistent.sock", direct=True)
        r.chunk_size = self.size
        return r

    def checked(self, k: int) -> tuple[str | None, int | None]:
        return str(self.files[k]), self.sums[k]


def _read(r: CacheReader, offset: int, n: int, lookup: object) -> bytes:
    buf = bytearray(n)
    r._read_chunks(offset, [memoryview(buf)], lookup)  # type: ignore[arg-type]
    return bytes(buf)


def test_the_cache_reader_checks_uncached_chunks_with_direct_reads(tmp_path: Path) -> None:
    data = os.urandom(5 * MiB + 999)
    chunks = _Chunks(tmp_path, data)
    r = chunks.reader()
    assert chunks.size >= DIRECT_MIN
    try:
        assert _read(r, 0, 8, chunks.checked) == data[:8]  # a header read: chunk 0 checked whole, direct
        assert (r.chunks_checked, r.bytes_direct) == (1, MiB)
        assert _read(r, 300, len(data) - 300, chunks.checked) == data[300:]
        assert (r.chunks_checked, r.chunks_mismatched, r.chunks_from_mount) == (6, 0, 0)
        # Chunk 0 again (trusted now) as a direct read of just the wanted bytes; the last chunk
        # (999 bytes: no whole page) read buffered.
        assert r.bytes_direct == MiB + 4 * MiB + (MiB - 300)
        for f in chunks.files[:5]:  # the 999-byte last one was read buffered
            fd = os.open(f, os.O_RDONLY)
            try:
                assert D.uncached(fd, 0, MiB), f"{f} is in the page cache"
            finally:
                os.close(fd)
    finally:
        r.close()


@pytest.mark.allow_warnings  # the reader warns about the torn file
def test_a_torn_chunk_read_direct_goes_through_the_mount(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)
    chunks = _Chunks(tmp_path, data)
    with open(chunks.files[1], "r+b") as fh:
        fh.seek(MiB // 2)
        fh.write(b"\xff" if data[MiB + MiB // 2] != 0xFF else b"\x00")
    drop(chunks.files[1])
    r = chunks.reader()
    try:
        assert _read(r, 0, len(data), chunks.checked) == data
        assert (r.chunks_checked, r.chunks_mismatched, r.chunks_from_mount) == (2, 1, 1)
        assert r.bytes_direct == 3 * MiB
    finally:
        r.close()


def test_a_truncated_chunk_read_direct_goes_through_the_mount(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)
    chunks = _Chunks(tmp_path, data)
    os.truncate(chunks.files[2], MiB // 2)
    r = chunks.reader()
    try:
        assert _read(r, 0, len(data), lambda k: (str(chunks.files[k]), None)) == data
        assert (r.chunks_from_cache, r.chunks_from_mount) == (2, 1)
    finally:
        r.close()


def test_the_plain_reader_of_a_small_read_stays_buffered(blob: tuple[Path, bytes]) -> None:
    path, data = blob
    r = PlainReader(str(path), direct=True)
    try:
        buf = bytearray(DIRECT_MIN - 1)
        r.readinto(100, [memoryview(buf)])
        assert bytes(buf) == data[100 : 100 + len(buf)] and r.bytes_direct == 0
        buf = bytearray(DIRECT_MIN + 1)
        r.readinto(3 * MiB + 1, [memoryview(buf)])
        assert bytes(buf) == data[3 * MiB + 1 : 3 * MiB + 1 + len(buf)] and r.bytes_direct == len(buf)
    finally:
        r.close()


# --- prefaulting destinations (lazyfs.loader.prefault) ---------------------------------------------


def _resident(addr: int, length: int) -> list[bool]:
    """mincore: which pages of ``[addr, addr + length)`` (page-aligned) are mapped in."""
    libc = ctypes.CDLL(None, use_errno=True)
    vec = (ctypes.c_ubyte * (length // mmap.PAGESIZE))()
    assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(length), vec) == 0, ctypes.get_errno()
    return [bool(b & 1) for b in vec]


def test_prefault_maps_the_whole_pages_of_each_view_and_keeps_their_bytes() -> None:
    page = mmap.PAGESIZE
    region = mmap.mmap(-1, 64 * page)  # fresh anonymous memory: nothing mapped yet
    view = memoryview(region)
    try:
        base = D._address(view)
        assert not any(_resident(base, 64 * page))
        view[5 * page : 5 * page + 3] = b"abc"  # one page already written: its bytes must stay
        prefault.prefault([view[2 * page + 100 : 40 * page + 7], view[50 * page : 50 * page + 10]])
        got = _resident(base, 64 * page)
        # Pages 3..39 are whole inside the first view; page 2 and page 40 only in part; the
        # second view is under PREFAULT_MIN.
        assert got[3:40] == [True] * 37
        assert not any(got[:2]) and not got[2] and not got[40] and not any(got[41:])
        assert bytes(view[5 * page : 5 * page + 3]) == b"abc" and not any(view[3 * page : 5 * page])
    finally:
        view.release()
        region.close()


def test_prefault_turns_itself_off_on_a_kernel_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def old_kernel(addr: int, length: int, advice: int) -> int:
        calls.append(advice)
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(prefault, "_madvise", old_kernel)
    monkeypatch.setattr(prefault, "_enabled", True)
    buf = bytearray(4 * MiB)
    prefault.prefault([memoryview(buf)])
    prefault.prefault([memoryview(buf)])
    assert calls == [prefault.MADV_POPULATE_WRITE] and prefault._enabled is False
    prefault.prefault([memoryview(b"x" * MiB)])  # read-only views are never touched


def test_a_refused_cachestat_is_about_that_file_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux 6.14+ answers EPERM for a file the caller neither owns nor may write: that file reads
    buffered, later files still get asked; only ENOSYS (no cachestat at all) stops asking."""

    def refuse(err: int) -> object:
        def call(*args: object) -> int:
            ctypes.set_errno(err)
            return -1

        return call

    monkeypatch.setattr(D, "_have_cachestat", True)
    monkeypatch.setattr(D, "_syscall", refuse(errno.EPERM))
    assert D.uncached(0, 0, MiB) is False and D._have_cachestat is True
    monkeypatch.setattr(D, "_syscall", refuse(errno.ENOSYS))
    assert D.uncached(0, 0, MiB) is False and D._have_cachestat is False


def test_cachestat_support_is_asked_once_on_fd_minus_one(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []

    def answer(err: int) -> object:
        def call(nr: object, fd: int, *args: object) -> int:
            calls.append(fd)
            ctypes.set_errno(err)
            return -1

        return call

    for err, supported in ((errno.EBADF, True), (errno.ENOSYS, False), (errno.EPERM, False)):
        monkeypatch.setattr(D, "_have_cachestat", None)
        monkeypatch.setattr(D, "_syscall", answer(err))
        calls.clear()
        assert D.cachestat_supported() is supported and D.cachestat_supported() is supported
        assert calls == [-1]


def test_without_cachestat_direct_readers_keep_read_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a kernel before 6.5 (or behind a seccomp filter) no range is known to be uncached, so
    nothing would be read direct: a reader asked for direct_io reads plainly, read-ahead on."""
    monkeypatch.setattr(D, "_have_cachestat", False)
    path = tmp_path / "f"
    path.write_bytes(os.urandom(4 * MiB))
    advised: list[int] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: advised.append(advice))
    r = PlainReader(str(path), direct=True)
    try:
        assert r.dfd is None and advised == []
        buf = bytearray(2 * MiB)
        r.readinto(MiB, [memoryview(buf)])
        assert bytes(buf) == path.read_bytes()[MiB : 3 * MiB] and r.bytes_direct == 0
    finally:
        r.close()
    c = CacheReader(str(path), str(tmp_path), str(tmp_path / "no.sock"), direct=True)
    try:
        assert c.direct is False
    finally:
        c.close()
