"""Direct reads for the loader (``direct_io=True``): bytes not in the page cache skip it.  No torch here.

A buffered read of a file that is not cached makes the kernel allocate page-cache
memory, read the disk into it and copy it out into the destination, whose pages
are faulted in as well: fresh memory twice, and on the reference VM (whose balloon
hands freed memory back to the host) fresh memory costs ~2.5 us per 4 KiB page.
A load whose destination is a tensor wants the bytes once.  So when ``cachestat``
says no whole page of a range is cached, a direct read reads it with ``O_DIRECT``:
the disk writes into a page-aligned buffer of this thread (or straight into the
destination where its address lines up with the file offset, as a pinned ring
buffer's does), and one copy moves the bytes to the destination with the GIL
released.  What is cached (a chunk the daemon just wrote, a file read moments ago,
pages being written back) is read through the page cache: a direct read of it
would go to the disk for bytes that are in memory.  A kernel without ``cachestat``
(before 6.5), a file system that refuses ``O_DIRECT`` (and FUSE, where the flag
only changes what the server is asked) all read buffered.

Why it is an option and not the default: on the reference VM it costs less CPU
(a 2 GiB load off a plain file, page cache dropped: 2.1-2.3 CPU-s direct against
2.4-4.1 buffered) and leaves the page cache alone (a model loaded onto a GPU does
not also fill host memory with a copy of itself), but its virtio disk streams
faster under the kernel's read-ahead than under 4-16 direct reads in flight: the
same load took 2.5-3.1 s direct against 2.6-2.75 s buffered (medians of 3-4
alternated pairs), and the GPU box's NVMe gave a buffered cold load 2.14 GB/s
against 1.95 GB/s for the best direct read pattern.  ``bench/ab_cache_check.py
--what direct`` compares the two on a lazyfs cache.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Sequence
from typing import Protocol

from lazyfs.loader.errors import LoaderIOError

__all__ = ["ALIGN", "BOUNCE", "DirectRefused", "open_direct", "read_direct", "uncached"]

# O_DIRECT wants buffer address, file offset and length aligned to the device's logical block;
# 4 KiB satisfies every disk of 512 B or 4 KiB sectors.
ALIGN = 4096
# Each thread's bounce buffer: one read unit (16 MiB) per direct read.  The queue depth comes
# from the reader threads, one read in flight each; on the reference VM 4 threads reading 4 MiB
# at a time streamed 0.6-0.7 GB/s, 16 MiB at a time 0.7-1.0 GB/s (2 GiB, page cache dropped).
BOUNCE = 16 * 1024 * 1024
# A read straight into the destination is at most this long, so a reader does not sit on one
# huge read while the others have nothing in flight.
DIRECT_MAX = 16 * 1024 * 1024

_SYS_CACHESTAT = 451  # the same number on every architecture (the unified syscall table, Linux 6.5)
_FUSE_SUPER_MAGIC = 0x65735546  # statfs f_type of a FUSE file system
_bounce = threading.local()


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    ]


_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _syscall = _libc.syscall
    _syscall.restype = ctypes.c_long
except (OSError, AttributeError):  # not glibc-like: no cachestat, never direct
    _libc = None
# None: not asked yet (see cachestat_supported).
_have_cachestat: bool | None = None if _libc is not None else False


class Hasher(Protocol):
    def update(self, data: memoryview, /) -> None: ...


class DirectRefused(Exception):
    """The kernel will not read this file with ``O_DIRECT`` (alignment, file system): read it buffered."""


def cachestat_supported() -> bool:
    """Whether this kernel answers ``cachestat`` (Linux 6.5+, and not refused by a seccomp filter).

    Without it no range is ever known to be uncached, so direct reading never happens, and a
    reader must not turn off read-ahead for it.  Asked once, on fd -1: a kernel that has the
    call says EBADF; one without it says ENOSYS; a container's filter typically EPERM.
    """
    global _have_cachestat
    if _have_cachestat is None:
        rng, st = _Range(0, ALIGN), _CacheStat()
        rc = _syscall(ctypes.c_long(_SYS_CACHESTAT), -1, ctypes.byref(rng), ctypes.byref(st), 0)
        _have_cachestat = rc != 0 and ctypes.get_errno() == errno.EBADF
    return _have_cachestat


def uncached(fd: int, offset: int, length: int) -> bool:
    """Whether no whole page of ``[offset, offset + length)`` is in the page cache (False when unknown).

    The partial pages at either end do not count: a neighbouring read (the header, the unit
    before) may have cached them, and if they made a range "cached", one buffered read would
    make the next range cached too, to the end of the file.
    """
    global _have_cachestat
    lo = -(-offset // ALIGN) * ALIGN
    hi = (offset + length) // ALIGN * ALIGN
    if hi <= lo or not cachestat_supported():
        return False
    rng = _Range(lo, hi - lo)
    st = _CacheStat()
    if _syscall(ctypes.c_long(_SYS_CACHESTAT), fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
        if ctypes.get_errno() == errno.ENOSYS:  # a kernel before 6.5: never again
            _have_cachestat = False
        # EPERM (Linux 6.14+: a file this user neither owns nor may write) is about this file only.
        return False
    cached: int = st.nr_cache
    return cached == 0


def _on_fuse(fd: int) -> bool:
    if _libc is None:
        return True  # cannot tell: assume the worst
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _libc.fstatfs(fd, buf) != 0:
        return True
    f_type: int = ctypes.c_long.from_buffer(buf).value
    return f_type & 0xFFFFFFFF == _FUSE_SUPER_MAGIC


def open_direct(fd: int) -> int | None:
    """A second descriptor of the very file ``fd`` is open on, reading with ``O_DIRECT``.

    Reopened through ``/proc/self/fd``, not by name: a name may meanwhile point at another
    file (the lazyfs cache replaces a torn chunk file under the same name).  None when the
    file system refuses direct I/O, and for a FUSE file (a lazyfs mount read with
    ``fast_path=False``), where the flag would only change what the FUSE server is asked.
    """
    if _on_fuse(fd):
        return None
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return None


def _bounce_buffer() -> memoryview:
    view: memoryview | None = getattr(_bounce, "view", None)
    if view is None or len(view) < BOUNCE:
        buf = mmap.mmap(-1, BOUNCE)  # page-aligned; kept for the life of the thread
        view = _bounce.view = memoryview(buf)
    return view


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _copy(dst: memoryview, src: memoryview) -> None:
    """``dst[:] = src`` without the GIL (ctypes releases it around the call): the readers copy in parallel."""
    if len(dst) >= 65536:
        ctypes.memmove(_address(dst), _address(src), len(dst))
    else:
        dst[:] = src


def _pread(dfd: int, view: memoryview, offset: int, path: str) -> int:
    try:
        return os.preadv(dfd, [view], offset)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise DirectRefused from exc
        raise LoaderIOError(f"{path}: read at offset {offset} failed: {exc.strerror}") from exc


class _Destination:
    """The views being filled, addressed by file offset."""

    def __init__(self, offset: int, views: Sequence[memoryview]) -> None:
        self.spans: list[tuple[int, int, memoryview]] = []
        for v in views:
            if len(v):
                self.spans.append((offset, offset + len(v), v))
                offset += len(v)

    def put(self, at: int, data: memoryview) -> None:
        """Copy ``data``, the file's bytes from ``at`` on, into the views that want them."""
        end = at + len(data)
        for s, e, v in self.spans:
            lo, hi = max(s, at), min(e, end)
            if lo < hi:
                _copy(v[lo - s : hi - s], data[lo - at : hi - at])

    def aligned(self, at: int, stop: int) -> memoryview | None:
        """A piece of one view that can take the file's bytes from ``at`` (aligned) by DMA.

        Its address must line up with the file offset, and it is whole blocks that end
        before ``stop`` and inside the view: a direct read may write a whole block.
        """
        for s, e, v in self.spans:
            if s <= at < e:
                n = (min(e, stop, at + DIRECT_MAX) - at) // ALIGN * ALIGN
                if n == 0:
                    return None
                piece = v[at - s : at - s + n]
                return piece if _address(piece) % ALIGN == 0 else None
        return None


def read_direct(
    dfd: int, path: str, lo: int, hi: int, offset: int, views: Sequence[memoryview], hasher: Hasher | None = None
) -> None:
    """Read the file's bytes ``[lo, hi)`` with ``O_DIRECT``; ``views`` get ``[offset, offset + len)``.

    The wanted bytes must lie inside ``[lo, hi)`` and ``hi`` must not pass the end of the
    file.  ``hasher`` sees every byte of ``[lo, hi)`` in order (a chunk's check needs all
    of it).  Raises :class:`DirectRefused` when the kernel refuses the read (then read the
    whole range buffered: the views may hold part of it and ``hasher`` has seen part of it),
    :class:`LoaderIOError` on an I/O error or a file shorter than ``hi``.
    """
    dest = _Destination(offset, views)
    bounce = _bounce_buffer()
    pos = lo
    while pos < hi:
        base = pos - pos % ALIGN
        piece = dest.aligned(pos, hi) if pos == base else None
        if piece is not None:  # straight into the destination
            if _pread(dfd, piece, pos, path) != len(piece):
                raise LoaderIOError(f"{path}: unexpected end of file at offset {pos}")
            if hasher is not None:
                hasher.update(piece)
            pos += len(piece)
            continue
        want = min(hi - base, BOUNCE)
        length = -(-want // ALIGN) * ALIGN
        if _pread(dfd, bounce[:length], base, path) < want:
            raise LoaderIOError(f"{path}: unexpected end of file before offset {base + want}")
        data = bounce[pos - base : want]
        if hasher is not None:
            hasher.update(data)
        dest.put(pos, data)
        pos = base + want
