"""Low-level file helpers for the chunk store: locked temp files, whole writes and reads.

Everything here is plain blocking ``os`` calls; :mod:`lazyfs.store.cache` decides
what they mean.  Locks are ``flock(2)`` locks: they belong to an open file
description, so two opens in one process conflict like two processes do, and
the kernel drops them when the process dies (SIGKILL included) — which is what
makes them usable as crash-safe "in use" markers.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
from pathlib import Path

import xxhash

__all__ = [
    "create_locked_temp",
    "fsync_dir",
    "hash_file",
    "read_at",
    "try_lock",
    "write_all",
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
