"""Map a read unit's destination memory in one call before reading into it.  No torch here.

A CPU load reads every byte into fresh tensor memory.  Without help, each 4 KiB page of
it is first touched by the kernel's copy inside ``preadv``: a page fault per page, taken
one at a time in the middle of the copy (~2.5 us a page on the reference VM, whose
balloon hands freed memory back to the host).  ``madvise(MADV_POPULATE_WRITE)`` (Linux
5.14) maps all the pages of a unit in one call, before the read: the same pages, without
a trap each.  On the reference VM, a 2 GiB load off a plain file with the page cache
dropped took 1.94 s instead of 2.13 s and 2.09 CPU-s instead of 2.33 (medians of 5
alternated pairs; an earlier run of 4 pairs: 2.02 against 2.47 s).  Through a lazyfs
mount's cache, where the disk and the daemon set the pace, it made no difference to the
time (2.87 against 2.84 s, ``bench/ab_cache_check.py --what prefault``) and took ~10 %
off the loader's CPU.  A kernel without it (EINVAL) turns it off; any other failure
only means the copy takes its faults as before.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
from collections.abc import Sequence

__all__ = ["prefault"]

MADV_POPULATE_WRITE = 23  # <linux/mman.h>, the same on every architecture
# Smaller destinations are not worth a system call (a scalar, a bias vector).
PREFAULT_MIN = 64 * 1024
PAGE = mmap.PAGESIZE

_madvise = None
try:
    _madvise = ctypes.CDLL(None, use_errno=True).madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _madvise.restype = ctypes.c_int
except (OSError, AttributeError):  # not a glibc-like libc
    pass
_enabled = _madvise is not None


def prefault(views: Sequence[memoryview]) -> None:
    """Map (for writing) every whole page inside each of ``views`` that is big enough to matter.

    Only whole pages: a view's first and last page may belong to memory next to it.  The
    contents are untouched (populating maps the pages a write would fault in).
    """
    global _enabled
    if not _enabled or _madvise is None:
        return
    for v in views:
        if len(v) < PREFAULT_MIN or v.readonly:
            continue
        addr = ctypes.addressof(ctypes.c_char.from_buffer(v))
        lo = -(-addr // PAGE) * PAGE
        hi = (addr + len(v)) // PAGE * PAGE
        if hi > lo and _madvise(lo, hi - lo, MADV_POPULATE_WRITE) != 0:
            if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
                _enabled = False  # before Linux 5.14, or a seccomp filter: never again
            return
