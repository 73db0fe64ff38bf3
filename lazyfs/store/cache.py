"""The local chunk cache: an lmdb index plus one raw file per chunk.

Layout of a cache directory::

    <dir>/index/            lmdb environment (data.mdb, lock.mdb)
    <dir>/chunks/ab/<hex>   raw (decompressed, verified) chunk bytes, named by BLAKE3 digest
    <dir>/tmp/              files being written (locked by their writer)
    <dir>/manifests/        small blobs: verified manifests, cached refs
    <dir>/store.lock        the node-wide namespace lock (see below)

The index has three tables: ``chunks`` (digest -> state, size, xxh3-64 of the
bytes, last access time), ``lru`` (access time + digest -> nothing, the
eviction order) and ``meta`` (format version, total bytes and entries, the last
capacity used).  xxh3 is for *local* integrity only — identity is the BLAKE3
digest, checked by the fetcher before it calls :meth:`ChunkStore.put`.

**Presence.**  A chunk is present exactly when its index entry is committed.
Inserting writes a temp file, renames it into ``chunks/`` and then commits
the entry; evicting commits the removal of the entry and then unlinks the file.
A crash at any moment therefore leaves at worst an *orphan* (a file without an
entry, never read, removed by ``verify(repair=True)``) or a stale temp file.
An entry whose file is missing, has the wrong size or the wrong xxh3 is *torn*
(possible after a power loss, since chunk files are not fsynced by default, or
if someone edits the directory): it is never served — reading it is a miss plus
a warning, and the entry is dropped.

**Several processes.**  Any number of daemons on one node may open the same
directory.  lmdb serializes index writers across processes.  On top of that,
every operation that changes which file sits at a chunk path *and* the index
(insert, evict, dropping torn entries, deleting orphans) runs under the
namespace lock, an ``flock`` on ``store.lock``: so "the index has no entry"
and "the file at the path belongs to a committed entry" can never be observed
half-done by another writer.  (A process's other index writes — access-time
flushes — take it too, so its threads never queue inside lmdb's write mutex.)
Readers take no lock: a reader that finds an entry and then fails to open the
file re-checks the index, and an evicted chunk is a plain miss.  A file that is
already open stays readable after its unlink (POSIX), so eviction never breaks
a read in progress.  The lock is held for a transaction and a few syscalls,
never for a chunk write; a wait for it ends after :data:`LOCK_TIMEOUT` as a cache
error, and access-time flushes only take it when it is free.  lmdb allows one environment per path per process, so
a second :meth:`ChunkStore.open` of a directory in one process is refused:
share the store.

**Capacity.**  An insert checks for room and evicts in the same transaction
that commits it, under the namespace lock, so the total never exceeds the
capacity of the inserting process.  Daemons sharing a directory should use the
same capacity; the last one given is recorded (``open(dir)`` reuses it).

**Pins.**  :meth:`ChunkStore.pin` marks a digest "in use" (reference counted,
per process).  Besides the in-memory count, while the chunk is present a pin
holds ``LOCK_SH`` on the chunk file; evictors of *every* process try
``LOCK_EX | LOCK_NB`` on a candidate and skip it when that fails.  So pins
protect across processes, and a crashed process's pins vanish with it (the
kernel drops ``flock`` locks).  Cost: one open file descriptor per pinned,
present digest — pin what you are serving, not whole models.

**Access times** are kept in memory and written in one transaction per
:data:`TOUCH_BATCH` hits or :data:`TOUCH_INTERVAL` seconds (and before every
eviction, on :meth:`ChunkStore.verify` and on close), not one write per read.
Eviction sees other processes' hits only once they flush: LRU is approximate
across processes, exact within one.

**Durability** (``fsync=False``, the default): chunk files are not fsynced —
every chunk can be fetched again and an fsync doubles the cost of an insert
(measured here: 9.5 ms -> 18.4 ms per 4 MiB).  After a power loss an entry may
point at a short or zero-filled file; the xxh3 check catches it (whole-chunk
reads always check, and the first read of a chunk in each process checks the
whole file even for a partial read), so it is a miss, never wrong bytes.  The
index itself is opened ``sync=True, metasync=False``: one fsync per commit
(0.26 ms here) keeps lmdb consistent after a power loss (it may lose the last
commit, which only turns into orphans or torn entries, both handled); with no
sync at all a power loss could corrupt the B-tree.  ``fsync=True`` also
fsyncs each chunk file and its directory before the index commit.

**Writes bypass the page cache.**  A chunk of :data:`DIRECT_WRITE_MIN` bytes or more
is written with ``O_DIRECT`` from a reused aligned buffer (``_files.write_direct``);
a buffered write put every fetched byte into fresh page cache for the kernel to write
back later.  A/B on the reference VM (``bench/ab_cache_write.py``, a cold 1 GiB read
through a mount, 4 pairs): 2.80 -> 2.20 s, daemon 3.76 -> 3.15 CPU-s; loading it with
``lazyfs.loader`` instead, which then reads the files from disk, 3.72 -> 2.50 s.
A file system that refuses ``O_DIRECT`` gets buffered writes from then on.

**Temp files** are created with an exclusive ``flock`` held until the writer
is done; ``verify`` deletes only temp files whose lock it can take, so it is
safe to run next to live daemons (no age heuristics).  Opening a store also
sweeps stale temp files.

All methods block (disk, lmdb, and a node-wide lock held for a few
syscalls); the fetcher calls them from a thread pool.  A store is thread-safe;
open it after ``fork``, never share one across it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import quote

import lmdb
import xxhash

from lazyfs.errors import CacheError, UsageError
from lazyfs.manifest.schema import DIGEST_SIZE
from lazyfs.store._files import (
    create_locked_temp,
    fsync_dir,
    hash_file,
    read_at,
    try_lock,
    write_all,
    write_direct,
)

__all__ = ["CHECKPOINTS", "FORMAT", "ChunkStore", "StoreStatistics", "VerifyReport"]

log = logging.getLogger("lazyfs.store")

#: On-disk format of the cache directory; a different one is refused, not reinterpreted.
FORMAT: Final = 1

# Index entries are small: 32 B key + 32 B value in `chunks`, a 40 B key in `lru`, plus
# B-tree overhead — about 150 B per chunk.  1 GiB of map therefore indexes ~7 M chunks
# (28 TB of 4 MiB chunks, or millions of small-file chunks).  Without MDB_WRITEMAP
# lmdb grows data.mdb only as pages are used, so the map costs address space, not disk.
MAP_SIZE: Final = 1 << 30
# One reader slot per concurrent read transaction across all processes on the node
# (py-lmdb uses MDB_NOTLS: slots follow transactions, not threads).  A slot is 64 B in
# lock.mdb, so generosity is free, while running out fails reads.
MAX_READERS: Final = 1024
# Access times: one write transaction per this many hits or this many seconds, whichever
# comes first.  A transaction costs ~0.3 ms (one fsync); per 4 MiB read that would be
# noticeable, per 512 reads it is not.  Losing up to 2 s of hits on a crash only blurs LRU.
# Chunks at least this big go to disk with O_DIRECT (_files.write_direct); smaller ones, where a
# synchronous device write costs more than the copy it saves, through the page cache.
DIRECT_WRITE_MIN: Final = 256 * 1024
TOUCH_BATCH: Final = 512
TOUCH_INTERVAL: Final = 2.0
# The longest wait for the namespace lock.  Its holders keep it for a transaction and a few
# syscalls (milliseconds); a holder stopped or stuck on a dead disk must not stall every
# process on the node for ever: past this, the operation fails as a cache error (a put is
# not cached, an open says the cache is locked).  Access-time flushes never wait.
LOCK_TIMEOUT = 30.0
# A read that finds a bad entry waits this long at most to drop it (see _drop_if_torn).
DROP_WAIT: Final = 0.1
# Digests whose file this process has checked in full (so partial reads may skip the
# check).  32 B each: 64 Ki digests (256 GiB of 4 MiB chunks) cost ~6 MB.
VERIFIED_MAX: Final = 1 << 16
# The same kind of local error is logged at most once per this many seconds; a full disk
# must not turn into 250 warnings per second.
WARN_INTERVAL: Final = 30.0
# Blob names end up as file names: keep them well under NAME_MAX (255) after quoting.
BLOB_NAME_MAX: Final = 200

_PRESENT: Final = 1
# chunks value: state u8, 7 pad bytes, size u64, xxh3 u64, atime (ns since the epoch) u64.
_ENTRY: Final = struct.Struct("<B7xQQQ")
# lru key: big-endian atime first, so lmdb's byte order is oldest first; digest breaks ties.
_ATIME: Final = struct.Struct(">Q")
_U64: Final = struct.Struct("<Q")
_K_FORMAT: Final = b"format"
_K_BYTES: Final = b"bytes"
_K_ENTRIES: Final = b"entries"
_K_CAPACITY: Final = b"capacity"
_HEX: Final = frozenset("0123456789abcdef")
_COUNTERS: Final = (
    "hits",
    "misses",
    "inserts",
    "inserted_bytes",
    "evictions",
    "evicted_bytes",
    "torn",
    "rejected",
    "errors",
)

#: Moments where a crash matters, in insertion/eviction order: half the temp written, all of
#: it, renamed into chunks/ but not committed, an insert committed with its evictions but
#: the victims' files not unlinked, the same for evict().  :data:`_crash_hook` is called
#: with these names; the crash tests SIGKILL a child process there.
CHECKPOINTS: Final = ("temp-partial", "temp-written", "renamed", "insert-evicted", "evict-committed")
_crash_hook: Callable[[str], None] | None = None


def _checkpoint(name: str) -> None:
    hook = _crash_hook
    if hook is not None:
        hook(name)


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    """``entries``/``bytes`` are node-wide (from the index); the counters are this process's."""

    entries: int
    bytes: int
    capacity: int
    pinned: int  # digests pinned by this process
    hits: int
    misses: int
    inserts: int
    inserted_bytes: int
    evictions: int
    evicted_bytes: int
    torn: int  # torn entries found and dropped
    rejected: int  # puts not cached: larger than the capacity, or no unpinned room
    errors: int  # local I/O or index errors, each turned into a miss or a skipped put


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What :meth:`ChunkStore.verify` found (and, with ``repair``, fixed)."""

    checked: int  # index entries whose file was checked
    ok: int
    torn: int  # entries whose file is missing, of the wrong size or with the wrong xxh3
    orphans: int  # files under chunks/ without an index entry
    temps: int  # stale temp files (their writer is gone)
    index_errors: int  # totals or the LRU table out of step with the entries
    repaired: int  # problems fixed (0 without repair)
    bytes: int  # bytes in ok entries

    @property
    def clean(self) -> bool:
        return not (self.torn or self.orphans or self.temps or self.index_errors)


@dataclass(frozen=True, slots=True)
class _Entry:
    size: int
    xxh3: int
    atime: int

    def encode(self) -> bytes:
        return _ENTRY.pack(_PRESENT, self.size, self.xxh3, self.atime)

    def lru_key(self, digest: bytes) -> bytes:
        return _ATIME.pack(self.atime) + digest


def _decode(raw: bytes) -> _Entry | None:
    """None for a malformed value (treated as a torn entry)."""
    if len(raw) != _ENTRY.size:
        return None
    state, size, checksum, atime = _ENTRY.unpack(raw)
    return _Entry(size, checksum, atime) if state == _PRESENT else None


@dataclass(slots=True)
class _Victim:
    digest: bytes
    entry: _Entry
    fd: int | None  # holds LOCK_EX on the file; None when the file was already missing


def _check_digest(digest: bytes) -> None:
    if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
        raise UsageError(f"a chunk digest is {DIGEST_SIZE} bytes, got {digest!r:.80}")


def _parse_chunk_name(parent: str, name: str) -> bytes | None:
    if len(name) != 2 * DIGEST_SIZE or not name.startswith(parent) or not _HEX.issuperset(name):
        return None
    return bytes.fromhex(name)


# Directories open in this process, by the (device, inode) of their lock file, with the pid
# that opened them (a forked child inherits this dict but not the right to the stores in it).
# lmdb forbids opening one environment twice in a process: closing one copy drops the other's
# fcntl locks on lock.mdb, after which another process may reset the shared reader table.
_OPEN: dict[tuple[int, int], int] = {}
_OPEN_LOCK = threading.Lock()


def _claim(directory: Path, lock_fd: int) -> tuple[int, int]:
    st = os.fstat(lock_fd)
    key = (st.st_dev, st.st_ino)
    with _OPEN_LOCK:
        if _OPEN.get(key) == os.getpid():
            os.close(lock_fd)
            raise CacheError(f"cache directory {directory} is already open in this process; share that ChunkStore")
        _OPEN[key] = os.getpid()
    return key


def _release(key: tuple[int, int] | None) -> None:
    with _OPEN_LOCK:
        if key is not None and _OPEN.get(key) == os.getpid():
            del _OPEN[key]


class _LockBusy(CacheError):
    """The namespace lock was not free within the wait allowed."""


class ChunkStore:
    """A bounded, persistent, multi-process cache of verified raw chunks (see the module docstring).

    Open with :meth:`open`; every method blocks and is meant for a worker thread.
    """

    direct_writes = True

    def __init__(self, directory: Path, capacity: int, fsync: bool, env: Any, lock_fd: int) -> None:
        """Internal: use :meth:`ChunkStore.open`."""
        self._dir = directory
        self._chunks_dir = directory / "chunks"
        self._tmp_dir = directory / "tmp"
        self._blob_dir = directory / "manifests"
        self._capacity = capacity
        self._fsync = fsync
        # Chunk files of at least DIRECT_WRITE_MIN bytes are written with O_DIRECT until the file
        # system refuses once (see _files.write_direct); a class attribute turns it off for A/Bs.
        self._direct_writes = self.direct_writes
        self._env: Any = env
        self._db_chunks: Any = env.open_db(b"chunks")
        self._db_lru: Any = env.open_db(b"lru")
        self._db_meta: Any = env.open_db(b"meta")
        self._lock_fd: int | None = lock_fd
        self._pid = os.getpid()
        self._key: tuple[int, int] | None = None
        self._mutex = threading.Lock()  # the in-process half of the namespace lock
        self._lock = threading.Lock()  # guards the in-memory state below
        self._touches: dict[bytes, int] = {}
        self._last_flush = time.monotonic()
        self._last_atime = 0
        self._pins: dict[bytes, int] = {}
        self._pin_fds: dict[bytes, int] = {}
        self._verified: dict[bytes, None] = {}
        self._warned: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)

    # --- opening and closing ---------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, capacity: int | None = None, *, fsync: bool = False) -> ChunkStore:
        """Open (creating if needed) the cache in ``directory``, bounded by ``capacity`` bytes.

        ``capacity=None`` keeps the capacity recorded by the last opener (unbounded
        if none) — what ``lazyfs cache verify`` wants.  A given capacity is recorded
        and, if the cache holds more, unpinned chunks are evicted now.  Raises
        :class:`CacheError` when the directory cannot be used (not a directory, not
        writable, an index lmdb cannot open, another format).
        """
        if capacity is not None and capacity <= 0:
            raise UsageError(f"cache capacity must be positive, got {capacity}")
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except FileExistsError as exc:
            raise CacheError(f"cache directory {directory} exists and is not a directory") from exc
        except OSError as exc:
            raise CacheError(f"cannot create cache directory {directory}: {exc.strerror}") from exc
        try:
            for sub in ("index", "chunks", "tmp", "manifests"):
                (directory / sub).mkdir(exist_ok=True)
            for i in range(256):
                (directory / "chunks" / f"{i:02x}").mkdir(exist_ok=True)
            if not os.access(directory, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            lock_fd = os.open(directory / "store.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise CacheError(f"cache directory {directory} is not usable: {exc.strerror or exc}") from exc
        key = _claim(directory, lock_fd)
        env: Any = None
        try:
            env = lmdb.open(
                str(directory / "index"),
                subdir=True,
                map_size=MAP_SIZE,
                max_dbs=4,
                max_readers=MAX_READERS,
                lock=True,
                sync=True,
                metasync=False,
                readahead=False,  # random 4 KiB page reads; readahead only pollutes the page cache
                meminit=False,
            )
            env.reader_check()  # free reader slots of processes that died (SIGKILL)
            store = cls(directory, 1, fsync, env, lock_fd)
            store._key = key
            store._capacity = store._init_meta(capacity)
        except BaseException as exc:
            if env is not None:
                env.close()
            os.close(lock_fd)
            _release(key)
            if isinstance(exc, lmdb.Error):
                msg = str(exc).replace("\n", " ")
                raise CacheError(f"cache index {directory / 'index'} cannot be opened: {msg}") from exc
            raise
        try:
            store._sweep_temps()
            if capacity is not None:
                store.evict()
        except BaseException:
            store.close()  # releases the index, the lock file and this process's claim on the directory
            raise
        return store

    def _init_meta(self, capacity: int | None) -> int:
        with self._exclusive(), self._env.begin(write=True, db=self._db_meta) as txn:
            fmt = txn.get(_K_FORMAT)
            if fmt is None:
                if txn.stat(self._db_chunks)["entries"]:
                    raise CacheError(f"cache index in {self._dir} has chunks but no format marker")
                txn.put(_K_FORMAT, str(FORMAT).encode())
            elif fmt != str(FORMAT).encode():
                raise CacheError(
                    f"cache in {self._dir} has format {fmt.decode(errors='replace')}, this lazyfs "
                    f"uses {FORMAT}; remove it or choose another cache directory"
                )
            if capacity is not None:
                txn.put(_K_CAPACITY, _U64.pack(capacity))
                return capacity
            raw = txn.get(_K_CAPACITY)
            return _U64.unpack(raw)[0] if raw is not None else (1 << 63) - 1

    def close(self) -> None:
        """Flush access times, drop this process's pins and close the index.  Idempotent.

        Call it once the threads using the store are done.
        """
        if self._lock_fd is None:
            return
        try:
            self._flush_touches()
        except Exception as exc:  # closing must not fail on a cache problem
            self._warn("close", "cache: could not flush access times on close: %s", exc)
        with self._lock:
            fds = list(self._pin_fds.values())
            self._pin_fds.clear()
            self._pins.clear()
        for fd in fds:
            os.close(fd)
        self._env.close()
        os.close(self._lock_fd)
        self._lock_fd = None
        _release(self._key)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def capacity(self) -> int:
        return self._capacity

    # --- reading ------------------------------------------------------------------------------

    def contains(self, digest: bytes) -> bool:
        """Whether the index has a committed entry (no file check, no hit/miss counted)."""
        self._check_open()
        _check_digest(digest)
        return self._lookup(digest) is not None

    def read(self, digest: bytes, offset: int = 0, length: int | None = None) -> bytes | None:
        """Bytes ``[offset, offset+length)`` of a cached chunk (clipped at its end), or None on a miss.

        A whole-chunk read always checks size and xxh3.  A partial read checks the
        size, and the first access to a chunk in this process checks the whole
        file, so torn bytes are never returned.  Any local error is a miss plus a
        (rate-limited) warning.  Counts a hit and records the access time.
        """
        self._check_open()
        _check_digest(digest)
        if offset < 0 or (length is not None and length < 0):
            raise UsageError(f"bad chunk range: offset {offset}, length {length}")
        entry = self._lookup(digest)
        data = None if entry is None else self._read_entry(digest, entry, offset, length)
        if data is None:
            self._count("misses")
            return None
        self._hit(digest)
        return data

    def path_of(self, digest: bytes) -> Path | None:
        """The path of a present chunk file, checked once per process, or None on a miss.

        For the loader's direct ``pread`` fast path.  The file may be evicted as
        soon as this returns unless the digest is pinned; an ``open`` that fails
        with ENOENT is a miss.  An already-open file stays readable.
        """
        self._check_open()
        _check_digest(digest)
        entry = self._lookup(digest)
        if entry is None or not self._ensure_verified(digest, entry):
            self._count("misses")
            return None
        self._hit(digest)
        return self._chunk_path(digest)

    def locate(self, digest: bytes, readahead: bool = True) -> tuple[Path, int | None] | None:
        """Where a present chunk's file is, without reading it: ``(path, xxh3)`` or None on a miss.

        ``xxh3`` is None when this process has already checked the file; otherwise it is
        the checksum the file must have, and the caller must check the bytes it reads
        (the loader does, as it copies them) and treat a mismatch as a miss.  This spares
        a full read of every chunk whose reader will read it anyway.  An unchecked file is
        opened and handed to the kernel's read-ahead (``POSIX_FADV_WILLNEED``), so the
        disk reads run here, ahead of the reader, as the check used to make them; not with
        ``readahead=False``, for a reader that reads uncached files with ``O_DIRECT``.
        """
        self._check_open()
        _check_digest(digest)
        entry = self._lookup(digest)
        if entry is None:
            self._count("misses")
            return None
        path = self._chunk_path(digest)
        if self._is_verified(digest):
            self._hit(digest)
            return path, None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._drop_if_torn(digest)  # evicted meanwhile (plain miss) or torn
            self._count("misses")
            return None
        except OSError as exc:
            self._error("read", "cache: cannot open chunk %s: %s", digest.hex(), exc)
            self._count("misses")
            return None
        try:
            if readahead:
                os.posix_fadvise(fd, 0, entry.size, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # only a hint
        finally:
            os.close(fd)
        self._hit(digest)
        return path, entry.xxh3

    def _lookup(self, digest: bytes) -> _Entry | None:
        try:
            with self._env.begin(db=self._db_chunks) as txn:
                raw = txn.get(digest)
        except lmdb.Error as exc:
            self._error("index", "cache index read failed: %s", exc)
            return None
        if raw is None:
            return None
        entry = _decode(raw)
        if entry is None:
            self._drop_if_torn(digest)
        return entry

    def _read_entry(self, digest: bytes, entry: _Entry, offset: int, length: int | None) -> bytes | None:
        end = entry.size if length is None else min(entry.size, offset + length)
        whole = offset == 0 and end == entry.size
        try:
            fd = os.open(self._chunk_path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._drop_if_torn(digest)  # evicted meanwhile (plain miss) or torn
            return None
        except OSError as exc:
            self._error("read", "cache: cannot open chunk %s: %s", digest.hex(), exc)
            return None
        try:
            if os.fstat(fd).st_size != entry.size:
                torn = True
            elif whole or not self._is_verified(digest):
                data = read_at(fd, entry.size, 0)
                torn = len(data) != entry.size or xxhash.xxh3_64_intdigest(data) != entry.xxh3
                if not torn:
                    self._mark_verified(digest)
                    return data if whole else data[offset:end]
            else:
                if offset >= end:
                    return b""
                data = read_at(fd, end - offset, offset)
                if len(data) == end - offset:
                    return data
                torn = True
        except OSError as exc:
            self._error("read", "cache: cannot read chunk %s: %s", digest.hex(), exc)
            return None
        finally:
            os.close(fd)
        if torn:
            self._drop_if_torn(digest)
        return None

    def _ensure_verified(self, digest: bytes, entry: _Entry) -> bool:
        if self._is_verified(digest):
            return True
        if self._check_file(digest, entry) is None:
            self._mark_verified(digest)
            return True
        self._drop_if_torn(digest)
        return False

    def _check_file(self, digest: bytes, entry: _Entry) -> str | None:
        """Why the chunk file does not match ``entry``, or None when it does."""
        try:
            fd = os.open(self._chunk_path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return "file is missing"
        except OSError as exc:
            return f"cannot open file: {exc.strerror}"
        try:
            size = os.fstat(fd).st_size
            if size != entry.size:
                return f"file has {size} bytes, index says {entry.size}"
            _, checksum = hash_file(fd)
        except OSError as exc:
            return f"cannot read file: {exc.strerror}"
        finally:
            os.close(fd)
        return None if checksum == entry.xxh3 else "file content does not match its xxh3"

    def _drop_if_torn(self, digest: bytes) -> bool:
        """Re-check ``digest`` under the namespace lock; drop the entry and file if torn.

        Returns True if it was torn (or could not be checked: either way the caller has
        no usable copy).  Under the lock no insert or eviction can interleave, so "entry
        present and file bad" is a fact, not a race.  A read found the bad entry and must
        not wait for the lock: if it is held longer than :data:`DROP_WAIT`, the entry
        stays for the next reader or writer to drop, and this read is a miss.
        """
        try:
            with self._exclusive(DROP_WAIT):
                with self._env.begin(write=True) as txn:
                    raw = txn.get(digest, db=self._db_chunks)
                    if raw is None:
                        return False  # evicted meanwhile: a plain miss
                    entry = _decode(raw)
                    reason = "malformed index entry" if entry is None else self._check_file(digest, entry)
                    if reason is None:
                        return False
                    self._delete_entry(txn, digest, entry)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._chunk_path(digest))
        except _LockBusy as exc:
            self._error("index", "cache: a bad entry stays for later: %s", exc)
            return True
        except (lmdb.Error, OSError) as exc:
            self._error("index", "cache: could not drop a torn entry: %s", exc)
            return True
        self._forget(digest)
        self._count("torn")
        log.warning("cache: dropped torn chunk %s (%s)", digest.hex(), reason)
        return True

    # --- inserting ----------------------------------------------------------------------------

    def put(self, digest: bytes, data: bytes | bytearray | memoryview) -> bool:
        """Cache ``data`` (already verified against ``digest`` by the caller) atomically.

        Idempotent.  Evicts least recently used unpinned chunks (of any process)
        to stay within the capacity.  Returns True when the chunk is cached after
        the call (inserted now or already there), False when it was not cached: it
        is larger than the capacity, everything else is pinned, or a local error
        (logged as a warning) — never raises for those.
        """
        self._check_open()
        _check_digest(digest)
        view = memoryview(data).cast("B")
        size = len(view)
        if size > self._capacity:
            self._count("rejected")
            return False
        if self._lookup(digest) is not None:
            self._touch(digest)
            return True
        checksum = xxhash.xxh3_64_intdigest(view)
        outcome = "error"
        try:
            fd, tmp = create_locked_temp(self._tmp_dir, digest.hex())
        except OSError as exc:
            self._error("put", "cache: cannot create a temp file in %s: %s", self._tmp_dir, exc)
            return False
        try:
            if not (self._direct_writes and size >= DIRECT_WRITE_MIN and self._write_direct(fd, view)):
                half = size // 2
                write_all(fd, view[:half])
                _checkpoint("temp-partial")
                write_all(fd, view[half:])
            if self._fsync:
                os.fsync(fd)
            _checkpoint("temp-written")
            outcome = self._commit_insert(digest, tmp, _Entry(size, checksum, 0))
        except (OSError, lmdb.Error, _LockBusy) as exc:
            self._error("put", "cache: could not insert chunk %s: %s", digest.hex(), exc)
        finally:
            os.close(fd)  # drops the temp lock; after a commit the file is a chunk file
            if outcome != "inserted":
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        if outcome == "inserted":
            self._count("inserts")
            self._count("inserted_bytes", size)
            with self._lock:
                pinned = digest in self._pins
            if pinned:
                self._acquire_pin_lock(digest)
            return True
        if outcome == "full":
            self._count("rejected")
        return outcome == "present"

    def _write_direct(self, fd: int, view: memoryview) -> bool:
        if write_direct(fd, view, lambda: _checkpoint("temp-partial")):
            return True
        self._direct_writes = False
        log.info("cache %s: the file system refuses O_DIRECT; writing chunks through the page cache", self._dir)
        return False

    def _commit_insert(self, digest: bytes, tmp: Path, entry: _Entry) -> str:
        """Make room, rename ``tmp`` into place and commit its entry, in one index transaction.

        Returns "inserted", "present" (another writer was first) or "full" (not
        enough unpinned bytes to evict).  Runs under the namespace lock, so no
        other process can commit or evict this digest between our check and our
        commit, and the renamed file never replaces a committed one.
        """
        path = self._chunk_path(digest)
        with self._exclusive():
            victims: list[_Victim] = []
            renamed = committed = False
            txn = self._env.begin(write=True)
            try:
                self._flush_touches_txn(txn)
                if txn.get(digest, db=self._db_chunks) is not None:
                    txn.commit()
                    return "present"
                need = self._meta_get(txn, _K_BYTES) + entry.size - self._capacity
                if need > 0:
                    victims = self._choose_victims(txn, need, exclude=digest)
                    if sum(v.entry.size for v in victims) < need:
                        txn.commit()  # keeps the flushed access times
                        return "full"
                    for victim in victims:
                        self._delete_entry(txn, victim.digest, victim.entry)
                try:
                    os.rename(tmp, path)
                except FileNotFoundError:
                    if not os.path.exists(tmp):
                        raise
                    path.parent.mkdir(exist_ok=True)  # someone removed chunks/xx
                    os.rename(tmp, path)
                renamed = True
                if self._fsync:
                    fsync_dir(path.parent)
                _checkpoint("renamed")
                entry = _Entry(entry.size, entry.xxh3, self._now())
                txn.put(digest, entry.encode(), db=self._db_chunks)
                txn.put(entry.lru_key(digest), b"", db=self._db_lru)
                self._meta_add(txn, _K_BYTES, entry.size)
                self._meta_add(txn, _K_ENTRIES, 1)
                txn.commit()
                committed = True
            except BaseException:
                with contextlib.suppress(lmdb.Error):
                    txn.abort()
                if renamed:  # still under the lock: nobody else can have committed this digest
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                raise
            finally:
                if not committed:
                    self._release_victims(victims, unlink=False)
            if victims:
                _checkpoint("insert-evicted")  # entries of the victims gone, their files not yet
            self._release_victims(victims, unlink=True)
        self._mark_verified(digest)
        return "inserted"

    # --- eviction -----------------------------------------------------------------------------

    def evict(self, target_bytes: int | None = None) -> int:
        """Evict least recently used unpinned chunks until at most ``target_bytes`` are cached.

        ``None`` means the capacity.  Returns the number of bytes freed (less than
        asked when the rest is pinned).  Errors are warnings; then 0 is returned.
        """
        self._check_open()
        target = self._capacity if target_bytes is None else target_bytes
        if target < 0:
            raise UsageError(f"eviction target must be >= 0, got {target}")
        try:
            with self._exclusive():
                victims: list[_Victim] = []
                committed = False
                try:
                    with self._env.begin(write=True) as txn:
                        self._flush_touches_txn(txn)
                        need = self._meta_get(txn, _K_BYTES) - target
                        if need <= 0:
                            return 0
                        victims = self._choose_victims(txn, need, exclude=None)
                        for victim in victims:
                            self._delete_entry(txn, victim.digest, victim.entry)
                    committed = True
                    _checkpoint("evict-committed")
                finally:
                    self._release_victims(victims, unlink=committed)
        except (lmdb.Error, OSError, _LockBusy) as exc:
            self._error("evict", "cache: eviction failed: %s", exc)
            return 0
        return sum(v.entry.size for v in victims)

    def _choose_victims(self, txn: Any, need: int, exclude: bytes | None) -> list[_Victim]:
        """Oldest unpinned entries worth at least ``need`` bytes (fewer if too much is pinned).

        Each returned file is held with ``LOCK_EX``, which fails while any process
        pins it.  Stale LRU keys met on the way are deleted.
        """
        with self._lock:
            pinned = set(self._pins)
        victims: list[_Victim] = []
        stale: list[bytes] = []
        freed = 0
        try:
            for key in txn.cursor(db=self._db_lru).iternext(keys=True, values=False):
                if freed >= need:
                    break
                digest = bytes(key[_ATIME.size :])
                raw = txn.get(digest, db=self._db_chunks)
                entry = None if raw is None else _decode(raw)
                if entry is None or entry.lru_key(digest) != key:
                    stale.append(bytes(key))
                    continue
                if digest == exclude or digest in pinned:
                    continue
                try:
                    fd: int | None = os.open(self._chunk_path(digest), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    fd = None  # torn: dropping its entry is all eviction has to do
                except OSError:
                    continue
                if fd is not None and not try_lock(fd):
                    os.close(fd)  # pinned by another process
                    continue
                victims.append(_Victim(digest, entry, fd))
                freed += entry.size
            for key in stale:
                txn.delete(key, db=self._db_lru)
        except BaseException:
            self._release_victims(victims, unlink=False)
            raise
        return victims

    def _release_victims(self, victims: list[_Victim], unlink: bool) -> None:
        for victim in victims:
            if unlink:
                try:
                    os.unlink(self._chunk_path(victim.digest))
                except FileNotFoundError:
                    pass
                except OSError as exc:  # an orphan now; verify --repair removes it
                    self._error("evict", "cache: cannot remove evicted chunk %s: %s", victim.digest.hex(), exc)
                self._forget(victim.digest)
            if victim.fd is not None:
                os.close(victim.fd)
                victim.fd = None
        if unlink and victims:
            self._count("evictions", len(victims))
            self._count("evicted_bytes", sum(v.entry.size for v in victims))

    # --- pins ---------------------------------------------------------------------------------

    def pin(self, digest: bytes) -> None:
        """Protect ``digest`` from eviction by any process until the matching :meth:`unpin`.

        Reference counted.  May be called before the chunk is cached; the
        cross-process lock is taken once it is present (at this process's put or
        its next hit).  Until then only this process's evictions honour it.
        """
        self._check_open()
        _check_digest(digest)
        with self._lock:
            count = self._pins.get(digest, 0)
            self._pins[digest] = count + 1
        if count == 0:
            self._acquire_pin_lock(digest)

    def unpin(self, digest: bytes) -> None:
        """Undo one :meth:`pin`; raises UsageError if ``digest`` is not pinned."""
        with self._lock:
            count = self._pins.get(digest, 0)
            if count == 0:
                raise UsageError(f"chunk {digest.hex()} is not pinned")
            if count > 1:
                self._pins[digest] = count - 1
                return
            del self._pins[digest]
            fd = self._pin_fds.pop(digest, None)
        if fd is not None:
            os.close(fd)

    @contextlib.contextmanager
    def pinned(self, digest: bytes) -> Iterator[None]:
        """``with store.pinned(digest):`` — pin for the duration of the block."""
        self.pin(digest)
        try:
            yield
        finally:
            self.unpin(digest)

    def _acquire_pin_lock(self, digest: bytes) -> None:
        fd = self._open_pin_lock(digest)
        if fd is None:
            return
        with self._lock:
            if digest in self._pins and digest not in self._pin_fds:
                self._pin_fds[digest] = fd
                return
        os.close(fd)

    def _open_pin_lock(self, digest: bytes) -> int | None:
        """An fd holding ``LOCK_SH`` on the committed file of ``digest``, or None if absent.

        ``flock`` may wait for an evictor holding ``LOCK_EX`` (it only unlinks and
        closes).  Once we hold the lock while the entry exists and the path is our
        inode, no evictor can take the file, so nothing can replace it.
        """
        path = self._chunk_path(digest)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                if self._lookup(digest) is not None and os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except OSError:
                pass
            os.close(fd)
        return None

    # --- access times ---------------------------------------------------------------------------

    def _hit(self, digest: bytes) -> None:
        self._count("hits")
        self._touch(digest)
        with self._lock:
            needs_lock = digest in self._pins and digest not in self._pin_fds
        if needs_lock:
            self._acquire_pin_lock(digest)

    def _now(self) -> int:
        """Wall-clock ns (shared by processes and restarts), strictly increasing within this process."""
        with self._lock:
            self._last_atime = max(time.time_ns(), self._last_atime + 1)
            return self._last_atime

    def _touch(self, digest: bytes) -> None:
        now = self._now()
        with self._lock:
            self._touches[digest] = now
            due = len(self._touches) >= TOUCH_BATCH or time.monotonic() - self._last_flush >= TOUCH_INTERVAL
        if due:
            self._flush_touches(wait=0.0)

    def _flush_touches(self, wait: float | None = None) -> None:
        """Write the recorded access times.  ``wait=0``: only if the namespace lock is free now
        (a read must not wait for bookkeeping); otherwise they stay for the next flush."""
        with self._lock:
            if not self._touches:
                return
        try:
            with self._exclusive(wait), self._env.begin(write=True) as txn:
                self._flush_touches_txn(txn)
        except _LockBusy:
            if wait is None or wait > 0:
                raise
        except lmdb.Error as exc:
            self._error("index", "cache: could not record access times: %s", exc)

    def _flush_touches_txn(self, txn: Any) -> None:
        with self._lock:
            touches, self._touches = self._touches, {}
            self._last_flush = time.monotonic()
        for digest, atime in touches.items():
            raw = txn.get(digest, db=self._db_chunks)
            entry = None if raw is None else _decode(raw)
            if entry is None or entry.atime >= atime:
                continue
            txn.delete(entry.lru_key(digest), db=self._db_lru)
            entry = _Entry(entry.size, entry.xxh3, atime)
            txn.put(entry.lru_key(digest), b"", db=self._db_lru)
            txn.put(digest, entry.encode(), db=self._db_chunks)

    # --- verify ---------------------------------------------------------------------------------

    def verify(self, repair: bool = False) -> VerifyReport:
        """Check every entry's file (size and xxh3), find orphans, stale temps and index drift.

        Without ``repair`` it only reports (problems are logged at INFO).  With
        ``repair`` it drops torn entries (and their files), deletes orphans and
        stale temps, and rebuilds the totals and the LRU table.  Safe while other
        processes use the cache: every finding is re-checked under the namespace
        lock before it is counted or fixed, and a temp file is stale only when its
        writer's lock is gone.  Reads every cached byte once.
        """
        self._check_open()
        self._flush_touches()
        with self._env.begin() as txn:
            entries = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self._db_chunks)]
            index_errors = self._index_errors(txn, entries)
        ok = torn = repaired = good_bytes = 0
        for digest, raw in entries:
            entry = _decode(raw)
            if entry is not None and self._check_file(digest, entry) is None:
                ok += 1
                good_bytes += entry.size
                self._mark_verified(digest)
                continue
            with self._exclusive():
                with self._env.begin(write=repair) as txn:
                    raw_now = txn.get(digest, db=self._db_chunks)
                    if raw_now is None:
                        continue  # evicted meanwhile
                    entry = _decode(raw_now)
                    reason = "malformed index entry" if entry is None else self._check_file(digest, entry)
                    if reason is None:
                        ok += 1
                        good_bytes += entry.size if entry is not None else 0
                        continue
                    torn += 1
                    log.info("cache verify: torn chunk %s: %s", digest.hex(), reason)
                    if repair:
                        self._delete_entry(txn, digest, entry)
                if repair:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._chunk_path(digest))
                    self._forget(digest)
                    repaired += 1
        orphans, fixed = self._verify_orphans({d for d, _ in entries}, repair)
        repaired += fixed
        temps = self._sweep_temps(repair, report=True)
        repaired += temps if repair else 0
        if index_errors and repair:
            self._rebuild_index_tables()
            repaired += index_errors
        return VerifyReport(
            checked=ok + torn,
            ok=ok,
            torn=torn,
            orphans=orphans,
            temps=temps,
            index_errors=index_errors,
            repaired=repaired,
            bytes=good_bytes,
        )

    def _index_errors(self, txn: Any, entries: list[tuple[bytes, bytes]]) -> int:
        """Totals and LRU keys that disagree with the entries, in one snapshot."""
        decoded = [(d, _decode(raw)) for d, raw in entries]
        errors = 0
        if self._meta_get(txn, _K_BYTES) != sum(e.size for _, e in decoded if e is not None):
            errors += 1
        if self._meta_get(txn, _K_ENTRIES) != len(entries):
            errors += 1
        expected = {e.lru_key(d) for d, e in decoded if e is not None}
        actual = {bytes(k) for k in txn.cursor(db=self._db_lru).iternext(keys=True, values=False)}
        errors += len(expected ^ actual)
        if errors:
            log.info("cache verify: %d index inconsistencies (totals or LRU table)", errors)
        return errors

    def _rebuild_index_tables(self) -> None:
        with self._exclusive(), self._env.begin(write=True) as txn:
            txn.drop(self._db_lru, delete=False)
            total = count = 0
            for key, raw in txn.cursor(db=self._db_chunks):
                entry = _decode(raw)
                if entry is None:
                    continue
                txn.put(entry.lru_key(bytes(key)), b"", db=self._db_lru)
                total += entry.size
                count += 1
            txn.put(_K_BYTES, _U64.pack(total), db=self._db_meta)
            txn.put(_K_ENTRIES, _U64.pack(count), db=self._db_meta)

    def _verify_orphans(self, known: set[bytes], repair: bool) -> tuple[int, int]:
        candidates: list[tuple[Path, bytes | None]] = []
        with os.scandir(self._chunks_dir) as top:
            for sub in top:
                if not sub.is_dir(follow_symlinks=False):
                    candidates.append((Path(sub.path), None))  # stray file at the top
                    continue
                with os.scandir(sub.path) as files:
                    for f in files:
                        if f.is_dir(follow_symlinks=False):
                            continue
                        digest = _parse_chunk_name(sub.name, f.name)
                        if digest is None or digest not in known:
                            candidates.append((Path(f.path), digest))
        if not candidates:
            return 0, 0
        orphans = fixed = 0
        with self._exclusive(), self._env.begin(db=self._db_chunks) as txn:
            for path, digest in candidates:
                if digest is not None and txn.get(digest) is not None:
                    continue  # inserted after our snapshot
                if not os.path.lexists(path):
                    continue
                orphans += 1
                log.info("cache verify: orphan file %s", path)
                if repair:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    fixed += 1
        return orphans, fixed

    def _sweep_temps(self, repair: bool = True, report: bool = False) -> int:
        """Count (and with ``repair`` delete) temp files whose writer is gone."""
        stale = 0
        try:
            with os.scandir(self._tmp_dir) as it:
                names = [e.path for e in it if e.is_file(follow_symlinks=False)]
        except OSError as exc:
            self._error("verify", "cache: cannot list %s: %s", self._tmp_dir, exc)
            return 0
        for name in names:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue  # renamed into place or removed meanwhile
            try:
                if not try_lock(fd):
                    continue  # its writer is alive
                stale += 1
                if report:
                    log.info("cache verify: stale temp file %s", name)
                if repair:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name)
            finally:
                os.close(fd)
        return stale

    # --- blobs --------------------------------------------------------------------------------

    def put_blob(self, name: str, data: bytes) -> bool:
        """Store a small blob (a verified manifest, a ref) under ``manifests/``, atomically and durably.

        Blobs are fsynced (they are what a remount needs with the origin down)
        and are not counted against the capacity.  Returns False (and warns) on
        a local error.
        """
        self._check_open()
        path = self._blob_path(name)
        try:
            fd, tmp = create_locked_temp(self._tmp_dir, "blob")
        except OSError as exc:
            self._error("put", "cache: cannot create a temp file in %s: %s", self._tmp_dir, exc)
            return False
        done = False
        try:
            write_all(fd, memoryview(data).cast("B"))
            os.fsync(fd)
            os.rename(tmp, path)
            done = True
            fsync_dir(self._blob_dir)
        except OSError as exc:
            self._error("put", "cache: cannot store blob %r: %s", name, exc)
        finally:
            os.close(fd)
            if not done:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return done

    def get_blob(self, name: str) -> bytes | None:
        """A blob stored by :meth:`put_blob`, or None (missing, or a local error: warned)."""
        self._check_open()
        path = self._blob_path(name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._error("read", "cache: cannot read blob %r: %s", name, exc)
            return None

    def delete_blob(self, name: str) -> None:
        """Remove a blob if present."""
        with contextlib.suppress(FileNotFoundError):
            self._blob_path(name).unlink()

    def _blob_path(self, name: str) -> Path:
        quoted = quote(name, safe=":@+=,")
        if not name or quoted in (".", "..") or len(quoted) > BLOB_NAME_MAX:
            raise UsageError(f"bad cache blob name {name!r:.80}")
        return self._blob_dir / quoted

    # --- statistics -----------------------------------------------------------------------------

    def statistics(self) -> StoreStatistics:
        self._check_open()
        entries = size = 0
        try:
            with self._env.begin(db=self._db_meta) as txn:
                size = self._meta_get(txn, _K_BYTES)
                entries = self._meta_get(txn, _K_ENTRIES)
        except lmdb.Error as exc:
            self._error("index", "cache index read failed: %s", exc)
        with self._lock:
            c = dict(self._counters)
            pinned = len(self._pins)
        return StoreStatistics(entries=entries, bytes=size, capacity=self._capacity, pinned=pinned, **c)

    # --- helpers --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self, wait: float | None = None) -> Iterator[None]:
        """The namespace lock: one holder per node (threads: a mutex; processes: flock).

        Waits at most ``wait`` seconds (default :data:`LOCK_TIMEOUT`), then raises
        :class:`_LockBusy` (a :class:`CacheError`).  Never nested.  Order: this lock, then
        an lmdb write transaction.
        """
        limit = LOCK_TIMEOUT if wait is None else wait
        deadline = time.monotonic() + limit
        got = self._mutex.acquire(timeout=limit) if limit > 0 else self._mutex.acquire(blocking=False)
        if not got:
            raise _LockBusy(f"cache {self._dir}: a thread of this process holds its lock for over {limit:g} s")
        try:
            fd = self._lock_fd
            if fd is None:
                raise CacheError(f"cache {self._dir} is closed")
            pause = 0.001
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise _LockBusy(
                            f"cache {self._dir}: another process has held {self._dir / 'store.lock'} "
                            f"for over {limit:g} s; not waiting longer"
                        ) from None
                    time.sleep(min(pause, left))
                    pause = min(pause * 2, 0.05)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._mutex.release()

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise CacheError(f"cache {self._dir} is closed")
        if os.getpid() != self._pid:
            raise CacheError(f"cache {self._dir} was opened before a fork; open it again in this process")

    def _chunk_path(self, digest: bytes) -> Path:
        name = digest.hex()
        return self._chunks_dir / name[:2] / name

    def _delete_entry(self, txn: Any, digest: bytes, entry: _Entry | None) -> None:
        txn.delete(digest, db=self._db_chunks)
        if entry is not None:  # a malformed entry's size is unknown: verify fixes the totals
            txn.delete(entry.lru_key(digest), db=self._db_lru)
            self._meta_add(txn, _K_BYTES, -entry.size)
            self._meta_add(txn, _K_ENTRIES, -1)

    def _meta_get(self, txn: Any, key: bytes) -> int:
        raw = txn.get(key, db=self._db_meta)
        return 0 if raw is None else int(_U64.unpack(raw)[0])

    def _meta_add(self, txn: Any, key: bytes, delta: int) -> None:
        txn.put(key, _U64.pack(max(0, self._meta_get(txn, key) + delta)), db=self._db_meta)

    def _is_verified(self, digest: bytes) -> bool:
        with self._lock:
            return digest in self._verified

    def _mark_verified(self, digest: bytes) -> None:
        with self._lock:
            self._verified[digest] = None
            if len(self._verified) > VERIFIED_MAX:
                del self._verified[next(iter(self._verified))]

    def _forget(self, digest: bytes) -> None:
        with self._lock:
            self._verified.pop(digest, None)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] += n

    def _error(self, kind: str, msg: str, *args: object) -> None:
        self._count("errors")
        self._warn(kind, msg, *args)

    def _warn(self, kind: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._warned.get(kind)
            if last is not None and now - last < WARN_INTERVAL:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._warned[kind] = now
            suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            log.warning(msg + " (%d similar warnings suppressed)", *args, suppressed)
        else:
            log.warning(msg, *args)
