"""Low-level file helpers for the chunk store: locked temp files, whole writes and reads.

Everything here is plain blocking ``os`` calls; :mod:`lazyfs.store.cache` decides
what they mean.  Locks are ``flock(2)`` locks: they belong to an open file
description, so two opens in one process conflict like two processes do, and
the kernel drops them when the process dies (SIGKILL included) — which is what
makes them usable as crash-safe "in use" markers.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

import xxhash

__all__ = [
    "create_locked_temp",
    "fsync_dir",
    "hash_file",
    "read_at",
    "try_lock",
    "write_all",
    "write_direct",
]

# Verification reads files in 1 MiB blocks: large enough that syscall overhead is noise,
# small enough that checking a big chunk does not allocate a big buffer.
_HASH_BLOCK = 1 << 20


def create_locked_temp(tmp_dir: Path, stem: str) -> tuple[int, Path]:
    """Create a new, uniquely named file in ``tmp_dir`` and hold ``LOCK_EX`` on it.

    The lock says "being written": ``verify`` removes only temp files whose lock
    it can take, i.e. whose writer is gone.  Between ``open`` and ``flock`` a
    verifier could take the lock and unlink the name; we therefore check after
    locking that the name still refers to our inode, and start over if not.
    Returns ``(fd, path)``; the caller closes ``fd`` (which drops the lock).
    """
    for _ in range(8):
        path = tmp_dir / f"{stem}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd, path
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise OSError(errno.EAGAIN, "could not create a temp file", str(tmp_dir))


def try_lock(fd: int, exclusive: bool = True) -> bool:
    """Take a ``flock`` without waiting; False when another open file description holds a conflicting one."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def write_all(fd: int, data: memoryview) -> None:
    """Write all of ``data`` (a byte-format memoryview) at the current position."""
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])


# O_DIRECT wants buffer address, file offset and length aligned to the device's logical block;
# 4 KiB satisfies every disk of 512 B or 4 KiB sectors.
DIRECT_ALIGN = 4096
# Chunk bytes go to disk through page-aligned buffers of this size, kept for reuse (at most
# _POOL_MAX of them: as many as the fetcher writes at once).
_BOUNCE = 4 << 20
_POOL_MAX = 4
_pool: list[mmap.mmap] = []
_pool_lock = threading.Lock()


def write_direct(fd: int, data: memoryview, halfway: Callable[[], None] = lambda: None) -> bool:
    """Write ``data`` into the new, empty file ``fd`` with ``O_DIRECT``; False if the kernel refuses.

    Python's bytes are not page-aligned, so each piece is copied into a reused aligned buffer
    (GIL released), the last one padded with zeros to a whole block and the file truncated
    to its size after.  Why not buffered: a buffered write copies every byte into freshly
    allocated page cache and the kernel writes it back later; on the reference VM that costs
    0.3-2.8 CPU-s per GiB (fresh guest pages are expensive), this 0.2.  On a refusal (EINVAL:
    a file system without direct I/O) the file is left empty for a buffered write.
    ``halfway`` is called once half of ``data`` is written (the store's crash checkpoint).
    """
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        return False
    with _pool_lock:
        buf = _pool.pop() if _pool else None
    if buf is None:
        buf = mmap.mmap(-1, _BOUNCE)
    view = memoryview(buf)
    size, done, half_told = len(data), 0, False
    src = _address_of(data)
    try:
        dst = ctypes.addressof(ctypes.c_char.from_buffer(view))
        while done < size:
            n = min(_BOUNCE, size - done)
            padded = -(-n // DIRECT_ALIGN) * DIRECT_ALIGN
            if src is not None:
                ctypes.memmove(dst, src + done, n)
            else:
                view[:n] = data[done : done + n]
            view[n:padded] = bytes(padded - n)
            off = 0
            while off < padded:
                off += os.pwrite(fd, view[off:padded], done + off)
            done += n
            if not half_told and done >= size // 2:
                half_told = True
                halfway()
        os.ftruncate(fd, size)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        os.ftruncate(fd, 0)
        return False
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        view.release()
        with _pool_lock:
            if len(_pool) < _POOL_MAX:
                _pool.append(buf)
    return True


def _address_of(data: memoryview) -> int | None:
    """The address of ``data``'s first byte, for ``ctypes.memmove`` (which releases the GIL);
    None where it cannot be had without a copy (a read-only slice of something)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(data))
    except TypeError:  # read-only: a whole ``bytes`` (what the fetcher hands over) has a known address
        pass
    obj = data.obj
    if isinstance(obj, bytes) and data.nbytes == len(obj):
        address: int | None = ctypes.cast(ctypes.c_char_p(obj), ctypes.c_void_p).value
        return address
    return None


def read_at(fd: int, size: int, offset: int) -> bytes:
    """Read ``size`` bytes at ``offset``; shorter only at end of file."""
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def hash_file(fd: int) -> tuple[int, int]:
    """Return ``(bytes read, xxh3-64)`` of the whole file, read in blocks."""
    hasher = xxhash.xxh3_64()
    offset = 0
    while True:
        block = os.pread(fd, _HASH_BLOCK, offset)
        if not block:
            return offset, hasher.intdigest()
        hasher.update(block)
        offset += len(block)


def fsync_dir(path: Path) -> None:
    """Make a rename into ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
