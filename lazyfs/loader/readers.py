"""Range readers for the loader: plain ``preadv`` and the lazyfs direct-from-cache fast path.  No torch here.

:class:`PlainReader` fills a list of buffers from a file offset with large
``preadv`` calls (several threads call it at once; ``preadv`` needs no shared
file position).  Used off a mount, and on a mount whose cache this user cannot
read — never mmap, whose 4 KiB page faults crawl through FUSE.

:class:`CacheReader` is the fast path on a lazyfs mount.  The loader sends its
read plan (byte ranges in the order it will consume them) to the mount's daemon
over the control socket; the daemon fetches the chunks in that order (tiers,
verification and caching as for any read) and streams back, for each chunk, the
path of its raw file in the local cache once it is there.  Reader threads wait
for the chunks a range needs and ``pread`` them straight from the cache files,
bypassing FUSE.  A chunk the daemon could not cache (or a cache file evicted
meanwhile) is read through the mount instead.

A cache file the daemon has not read since it started comes with the xxh3 its
bytes must have (the cache's local integrity check) rather than being read by
the daemon first: the reader checks the whole chunk as it copies it, and reads a
chunk whose bytes do not match through the mount, where the daemon finds the
torn file, drops it and fetches the chunk again.  One pass over the bytes instead
of two: the daemon's check was a second full copy of every chunk.  A descriptor
whose file passed the check is trusted from then on: later reads of that chunk (a
``keys`` load reading around a gap, the header read before the tensors) read only
the bytes they want.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import logging
import os
import socket
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import xxhash

from lazyfs.loader.direct import DirectRefused, cachestat_supported, open_direct, read_direct, uncached
from lazyfs.loader.errors import LoaderIOError
from lazyfs.loader.header import Header, read_header, read_header_with

__all__ = ["CONTROL_XATTR", "CacheReader", "LoaderIOError", "PlainReader", "RangeReader", "open_reader"]

log = logging.getLogger("lazyfs.loader")

CONTROL_XATTR = "user.lazyfs.control"
# preadv takes at most IOV_MAX (1024 on Linux) buffers per call.
IOV_MAX = 1024
# What a reader thread keeps for the bytes of a checked chunk that nobody asked for: they
# pass through this buffer a piece at a time, whatever the chunk size.
SCRATCH = 1024 * 1024
# The manifest's own limit: a daemon naming a bigger chunk size is not to be believed.
MAX_CHUNK_SIZE = 256 * 1024 * 1024
# Reads at least this long whose bytes are not in the page cache skip it (lazyfs.loader.direct);
# smaller ones (a header) are not worth a cachestat and a second descriptor.
DIRECT_MIN = 256 * 1024
_scratch = threading.local()

# What the daemon says about one chunk: (cache file path or None for "read it through the
# mount", the xxh3 the reader must check or None when the daemon has checked the file).
Located = tuple[str | None, int | None]
_VIA_MOUNT: Located = (None, None)


class _ChecksumMismatch(Exception):
    """A cache file's bytes do not match the xxh3 the daemon gave."""


class RangeReader(Protocol):
    path: str

    def read_header(self) -> Header:
        """The file's validated safetensors header."""
        ...

    def readinto(self, offset: int, views: Sequence[memoryview]) -> None:
        """Fill ``views`` in order with the bytes starting at ``offset`` (all of them, or raise)."""
        ...

    def cancel(self) -> None:
        """Make reads waiting for data (and later ones) fail at once; the load is being abandoned."""
        ...

    def close(self) -> None: ...


def preadv_full(fd: int, views: Sequence[memoryview], offset: int, path: str) -> None:
    """Fill every view from ``offset`` on, with as few ``preadv`` calls as the kernel allows."""
    pending = [v for v in views if len(v)]
    i = 0
    while i < len(pending):
        batch = pending[i : i + IOV_MAX]
        try:
            n = os.preadv(fd, batch, offset)
        except InterruptedError:
            continue
        except OSError as exc:
            raise LoaderIOError(f"{path}: read at offset {offset} failed: {exc.strerror}") from exc
        if n == 0:
            raise LoaderIOError(f"{path}: unexpected end of file at offset {offset}")
        offset += n
        while n:
            head = pending[i]
            if n >= len(head):
                n -= len(head)
                i += 1
            else:
                pending[i] = head[n:]
                n = 0


def _no_readahead(fd: int) -> None:
    """Buffered reads of ``fd`` read what they are asked for and no more.

    For a reader that reads uncached bytes with ``O_DIRECT``: the kernel's read-ahead after
    a small buffered read (the header) would pull the next megabytes into the page cache,
    the next read would find them there and read buffered, and so on to the end of the file.
    """
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)


class PlainReader:
    """``preadv`` on an ordinary file descriptor (a local file, or a file on any mount).

    ``direct``: large reads of bytes that are not in the page cache use ``O_DIRECT``
    (:mod:`lazyfs.loader.direct`).  Not for a file on a lazyfs mount: FUSE would only
    pass the flag on to the daemon.
    """

    def __init__(self, path: str, direct: bool = False) -> None:
        self.path = path
        self.dfd: int | None = None
        self.bytes_direct = 0
        self._count_lock = threading.Lock()
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise LoaderIOError(f"{path}: {exc.strerror}") from exc
        try:
            st = os.fstat(self.fd)
        except OSError as exc:
            os.close(self.fd)
            raise LoaderIOError(f"{path}: {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            raise LoaderIOError(f"{path}: not a regular file")
        self.size = st.st_size
        if direct and cachestat_supported():
            self.dfd = open_direct(self.fd)
            if self.dfd is not None:
                _no_readahead(self.fd)
        self._direct = self.dfd is not None

    def read_header(self) -> Header:
        return read_header(self.path, self.fd)

    def readinto(self, offset: int, views: Sequence[memoryview]) -> None:
        dfd = self.dfd
        total = sum(len(v) for v in views)
        if dfd is not None and self._direct and total >= DIRECT_MIN and uncached(self.fd, offset, total):
            try:
                read_direct(dfd, self.path, offset, offset + total, offset, views)
            except DirectRefused:
                self._direct = False  # this file system (or device) will not: buffered from now on
                log.info("%s: direct reads refused; reading through the page cache", self.path)
            else:
                with self._count_lock:
                    self.bytes_direct += total
                return
        preadv_full(self.fd, views, offset, self.path)

    def cancel(self) -> None:
        """Nothing to wake: a ``preadv`` on a plain file (or a mount, bounded by its read timeout) ends."""

    def close(self) -> None:
        if self.dfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.dfd)
            self.dfd = None
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("lazyfs", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.socket_path)
        self.sock = s


class CacheReader:
    """Reads chunks from the lazyfs cache as the daemon reports them ready (see module docstring).

    The header is read the same way, through a plan of its own (``[0, 8)``, then the
    header's bytes), so it neither goes through FUSE nor starts the daemon's read-ahead of
    the file's first megabytes, which a ``keys`` load may not want.
    """

    # Ask the daemon to leave the xxh3 check of files it has not read to this reader (see the
    # module docstring).  False: the daemon checks every file before reporting it (the old way,
    # kept for bench/ab_cache_check.py).
    client_checks = True
    # Cache files kept open between reads (one per chunk otherwise: a 15 GB file has 3,600, past
    # the usual limit of 1,024 descriptors).  A plan reads each chunk once, in order.
    max_open = 256

    def __init__(
        self, path: str, mount_root: str, socket_path: str, timeout: float = 120.0, direct: bool = False
    ) -> None:
        self.path = path
        # Read cache files that are not in the page cache with O_DIRECT (lazyfs.loader.direct), and
        # ask the daemon not to start the kernel's read-ahead of them, which would read them twice.
        self.direct = direct and cachestat_supported()
        self.mount = PlainReader(path)
        self.rel = os.path.relpath(path, mount_root)
        self.socket_path = socket_path
        self.timeout = timeout
        self.chunk_size = 0
        self._ready: dict[int, Located] = {}  # chunk number -> where to read it
        self._errors: dict[int, str] = {}
        self._done = False
        self._cancelled = False
        self._cond = threading.Condition()
        # Open cache files, least recently used first: at most max_open stay open between reads.
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._users: dict[int, int] = {}  # reads in progress per descriptor: none is closed under one
        self._doomed: set[int] = set()  # given up (torn, stale, evicted) while in use: closed at the last release
        # Descriptors whose bytes are known good: the file passed this reader's check, or was
        # opened after the daemon reported it checked.  A descriptor of a file not yet checked
        # may be of a torn file the daemon has replaced since (under the same name).
        self._trusted: set[int] = set()
        self._checking: dict[int, threading.Lock] = {}  # one check per descriptor at a time
        self._fd_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._conn: _UnixHTTPConnection | None = None
        self.chunks_from_cache = 0
        self.chunks_from_mount = 0
        self.chunks_checked = 0  # read from the cache and checked here against the daemon's xxh3
        self.chunks_mismatched = 0  # of those, bytes that did not match: read through the mount
        self.bytes_direct = 0  # read from cache files with O_DIRECT

    def _open_plan(self, ranges: Sequence[tuple[int, int]]) -> tuple[_UnixHTTPConnection, Any]:
        """POST the plan; returns the connection and the response, its first line consumed."""
        conn = _UnixHTTPConnection(self.socket_path, self.timeout)
        plan: dict[str, Any] = {"path": self.rel, "ranges": [list(r) for r in ranges]}
        if self.client_checks:
            plan["verify"] = "xxh3"
        if self.direct:
            plan["readahead"] = False
        body = json.dumps(plan)
        try:
            conn.request("POST", "/plan", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                msg = resp.read(4096).decode(errors="replace").strip()
                raise LoaderIOError(f"{self.path}: the lazyfs daemon refused the read plan: {msg}")
            first = json.loads(resp.readline())
            chunk_size = first["chunk_size"]
            if type(chunk_size) is not int or not 0 < chunk_size <= MAX_CHUNK_SIZE:
                raise ValueError(f"chunk size {chunk_size!r}")
            self.chunk_size = chunk_size
        except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException) as exc:
            conn.close()
            raise LoaderIOError(f"{self.path}: cannot use the lazyfs daemon: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn, resp

    def read_header(self) -> Header:
        def read(offset: int, n: int) -> bytes:
            buf = bytearray(n)
            try:
                conn, resp = self._open_plan([(offset, offset + n)])
            except LoaderIOError as exc:
                log.info("%s; reading the header through the mount", exc)
                preadv_full(self.mount.fd, [memoryview(buf)], offset, self.path)
                return bytes(buf)
            try:
                ready: dict[int, Located] = {}
                errors: dict[int, str] = {}
                try:
                    for line in resp:
                        _record(json.loads(line), ready, errors)
                except (OSError, ValueError, http.client.HTTPException):
                    pass  # what was not reported is read through the mount
            finally:
                conn.close()

            def lookup(chunk: int) -> Located:
                if chunk in errors:
                    raise LoaderIOError(f"{self.path}: {errors[chunk]}")
                return ready.get(chunk, _VIA_MOUNT)

            self._read_chunks(offset, [memoryview(buf)], lookup)
            return bytes(buf)

        return read_header_with(self.path, self.mount.size, read)

    def start(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Send the read plan; events are consumed by a background thread."""
        conn, resp = self._open_plan(ranges)
        self._conn = conn
        self._thread = threading.Thread(target=self._events, args=(resp,), name="lazyfs-plan", daemon=True)
        self._thread.start()

    def _events(self, resp: Any) -> None:
        try:
            for line in resp:
                ev = json.loads(line)
                with self._cond:
                    _record(ev, self._ready, self._errors)
                    self._cond.notify_all()
        except (OSError, ValueError, TypeError, KeyError, http.client.HTTPException):
            pass
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _wait(self, chunk: int) -> Located:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: chunk in self._ready or chunk in self._errors or self._done or self._cancelled,
                timeout=self.timeout,
            )
            if self._cancelled:
                raise LoaderIOError(f"{self.path}: load cancelled")
            if chunk in self._errors:
                raise LoaderIOError(f"{self.path}: {self._errors[chunk]}")
            if not ok or chunk not in self._ready:
                return _VIA_MOUNT  # the daemon stopped reporting: the mount (which has its own deadline)
            return self._ready[chunk]

    def _acquire(self, cache_path: str, checked: bool) -> int | None:
        """A descriptor of ``cache_path`` to read, until :meth:`_release`; ``checked``: the daemon
        reports the file there checked.  ``None``: it cannot be opened (the mount serves it)."""
        with self._fd_lock:
            fd = self._fds.get(cache_path)
            if fd is not None and checked and fd not in self._trusted:
                # Opened before the daemon checked the file: perhaps on a torn one it has replaced.
                self._retire_locked(cache_path, fd)
                fd = None
            if fd is None:
                try:
                    fd = os.open(cache_path, os.O_RDONLY | os.O_CLOEXEC)
                except (OSError, ValueError):  # ValueError: a path with a NUL byte
                    return None  # evicted, unreadable or nonsense: the mount serves it
                self._fds[cache_path] = fd
                if self.direct:
                    _no_readahead(fd)
                if checked:
                    self._trusted.add(fd)
            else:
                self._fds.move_to_end(cache_path)
            self._users[fd] = self._users.get(fd, 0) + 1
            self._trim_locked()
            return fd

    def _trim_locked(self) -> None:
        """Close the least recently used descriptors over ``max_open`` that no thread reads."""
        if len(self._fds) > self.max_open:
            for path, old in list(self._fds.items())[: len(self._fds) - self.max_open]:
                if old not in self._users:
                    del self._fds[path]
                    self._close_locked(old)

    def _release(self, fd: int) -> None:
        with self._fd_lock:
            left = self._users[fd] - 1
            if left:
                self._users[fd] = left
                return
            del self._users[fd]
            if fd in self._doomed:
                self._close_locked(fd)
            else:
                # Threads reading at once may hold more than max_open; the last one out trims.
                self._trim_locked()

    def _retire(self, cache_path: str, fd: int) -> None:
        """Open ``cache_path`` afresh next time; ``fd`` is closed once no thread reads it."""
        with self._fd_lock:
            self._retire_locked(cache_path, fd)

    def _retire_locked(self, cache_path: str, fd: int) -> None:
        if self._fds.get(cache_path) == fd:
            del self._fds[cache_path]
        if fd in self._users:
            self._doomed.add(fd)
        else:
            self._close_locked(fd)

    def _close_locked(self, fd: int) -> None:
        # Forget everything known about the number first: the next open may reuse it.
        self._trusted.discard(fd)
        self._checking.pop(fd, None)
        self._doomed.discard(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    def _check_lock(self, fd: int) -> threading.Lock:
        with self._fd_lock:
            return self._checking.setdefault(fd, threading.Lock())

    def readinto(self, offset: int, views: Sequence[memoryview]) -> None:
        self._read_chunks(offset, views, self._wait)

    def _read_chunks(self, offset: int, views: Sequence[memoryview], wait: Callable[[int], Located]) -> None:
        """Fill ``views`` chunk by chunk: from each chunk's cache file, or through the mount."""
        cs = self.chunk_size
        pending = [v for v in views if len(v)]
        i = 0
        while i < len(pending):
            chunk = offset // cs
            room = cs - (offset - chunk * cs)
            # The views (or parts of them) that fall inside this chunk.
            batch: list[memoryview] = []
            take = 0
            while i < len(pending) and take < room:
                v = pending[i]
                n = min(len(v), room - take)
                batch.append(v[:n])
                take += n
                if n == len(v):
                    i += 1
                else:
                    pending[i] = v[n:]
            cache_path, checksum = wait(chunk)
            fd = self._acquire(cache_path, checksum is None) if cache_path else None
            if fd is not None:
                used, checked_here = fd, False
                start = offset - chunk * cs
                try:
                    if checksum is None or fd in self._trusted:
                        self._read_trusted(fd, cache_path or "", batch, start, take)
                    else:
                        with self._check_lock(fd):  # another thread may be checking this file
                            if fd in self._trusted:
                                self._read_trusted(fd, cache_path or "", batch, start, take)
                            else:
                                chunk_len = min(cs, self.mount.size - chunk * cs)
                                self._read_checked(fd, cache_path or "", batch, start, chunk_len, checksum)
                                self._trusted.add(fd)
                                checked_here = True
                except LoaderIOError:
                    self._retire(cache_path or "", used)  # truncated meanwhile, say: the mount serves it
                    fd = None
                except _ChecksumMismatch:
                    log.warning("%s: cached chunk %d does not match its checksum; reading it through the mount",
                                self.path, chunk)
                    # The daemon replaces a torn file by a new one under the same name: never reuse this one.
                    self._retire(cache_path or "", used)
                    fd = None
                    with self._cond:
                        self.chunks_mismatched += 1
                else:
                    with self._cond:
                        self.chunks_from_cache += 1
                        self.chunks_checked += checked_here
                finally:
                    self._release(used)
            if fd is None:
                self.mount.readinto(offset, batch)
                with self._cond:
                    self.chunks_from_mount += 1
            offset += take

    def _try_direct(
        self, fd: int, path: str, lo: int, hi: int, start: int, batch: list[memoryview], hasher: Any = None
    ) -> bool:
        """Read ``[lo, hi)`` of a cache file with O_DIRECT if none of it is cached; whether it was."""
        if not self.direct or hi - lo < DIRECT_MIN or not uncached(fd, lo, hi - lo):
            return False
        dfd = open_direct(fd)
        if dfd is None:
            return False
        try:
            read_direct(dfd, path, lo, hi, start, batch, hasher)
        except DirectRefused:
            self.direct = False  # this file system (or device) will not: buffered from now on
            log.info("%s: direct reads of the lazyfs cache refused; reading through the page cache", self.path)
            return False
        finally:
            os.close(dfd)
        with self._cond:
            self.bytes_direct += hi - lo
        return True

    def _read_trusted(self, fd: int, path: str, batch: list[memoryview], start: int, length: int) -> None:
        """Bytes ``[start, start + length)`` of a cache file known good: only those are read."""
        if not self._try_direct(fd, path, start, start + length, start, batch):
            preadv_full(fd, batch, start, path)

    def _read_checked(
        self, fd: int, path: str, batch: list[memoryview], start: int, chunk_len: int, checksum: int
    ) -> None:
        """The whole chunk file is read and its xxh3 checked; ``batch`` gets ``[start, start + len)``.

        Raises :class:`_ChecksumMismatch` when the bytes are not the chunk's (``batch`` then
        holds them; the caller overwrites it).
        """
        hasher = xxhash.xxh3_64()
        if not self._try_direct(fd, path, 0, chunk_len, start, batch, hasher):
            hasher = xxhash.xxh3_64()  # a refused direct read may have fed it part of the chunk
            _read_hashed(fd, path, batch, start, chunk_len, hasher)
        if hasher.intdigest() != checksum:
            raise _ChecksumMismatch

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def close(self) -> None:
        # Shut the socket down first: the event thread's read ends, the thread exits, and only
        # then is the connection closed (closing it under a reading thread breaks http.client).
        if self._conn is not None:
            with contextlib.suppress(OSError):
                if self._conn.sock is not None:
                    self._conn.sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._conn is not None:
            self._conn.close()
        with self._fd_lock:
            for fd in {*self._fds.values(), *self._doomed}:
                self._close_locked(fd)
            self._fds.clear()
            self._users.clear()
        self.mount.close()


def _read_hashed(fd: int, path: str, batch: list[memoryview], start: int, chunk_len: int, hasher: Any) -> None:
    """Read a whole chunk file through the page cache, ``batch`` getting bytes ``[start, start + len)``;
    ``hasher`` sees every byte of the chunk in order.

    The bytes before and after the wanted ones (a header, a tensor the plan skips) pass
    through this thread's scratch buffer, :data:`SCRATCH` bytes at a time.
    """
    end = start + sum(len(v) for v in batch)
    buf: bytearray | None = getattr(_scratch, "buf", None)
    if buf is None:
        buf = _scratch.buf = bytearray(SCRATCH)
    spare = memoryview(buf)

    def skip(at: int, stop: int) -> None:
        while at < stop:
            part = spare[: min(SCRATCH, stop - at)]
            preadv_full(fd, [part], at, path)
            hasher.update(part)
            at += len(part)

    if start + (chunk_len - end) <= SCRATCH:  # the usual case: one preadv for the whole chunk
        parts = ([spare[:start]] if start else []) + batch
        if end < chunk_len:
            parts.append(spare[start : start + chunk_len - end])
        preadv_full(fd, parts, 0, path)
        for part in parts:
            hasher.update(part)
    else:
        skip(0, start)
        preadv_full(fd, batch, start, path)
        for part in batch:
            hasher.update(part)
        skip(end, chunk_len)


def _record(ev: Any, ready: dict[int, Located], errors: dict[int, str]) -> None:
    """One event of the daemon's answer: ``{"chunk": k, "path": P | null[, "xxh3": "<16 hex>"]}``
    or ``{"chunk": k, "error": E}``.  A path with a malformed checksum is read through the mount;
    an event that is not one of these is ignored (its chunk, never reported, is read through the mount)."""
    if not isinstance(ev, dict):
        return
    chunk = ev.get("chunk")
    if type(chunk) is not int or chunk < 0:
        return
    if "error" in ev:
        errors[chunk] = str(ev["error"])[:1000]
        return
    path = ev.get("path")
    checksum = ev.get("xxh3")
    if not isinstance(path, str):
        ready[chunk] = _VIA_MOUNT
    elif checksum is None:
        ready[chunk] = (path, None)
    elif isinstance(checksum, str) and len(checksum) == 16 and all(c in "0123456789abcdef" for c in checksum):
        ready[chunk] = (path, int(checksum, 16))
    else:
        ready[chunk] = _VIA_MOUNT


def find_control_socket(path: str) -> tuple[str, str] | None:
    """``(mount_root, socket_path)`` when ``path`` is on a lazyfs mount whose socket we may use."""
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.ismount(d):
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent
    try:
        sock = os.getxattr(d, CONTROL_XATTR).decode()
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES, errno.EPERM):
            raise
        return None
    if not os.access(sock, os.R_OK | os.W_OK):
        return None
    return d, sock


def open_reader(path: str, *, fast_path: bool = True, direct_io: bool = False) -> RangeReader:
    """A :class:`CacheReader` on a lazyfs mount we can talk to, else a :class:`PlainReader`.

    The fast path follows symlinks first (a Hugging Face snapshot links to ``../../blobs/``):
    the daemon knows the file by its real path inside the mount.  ``direct_io``: read bytes
    that are not in the page cache with ``O_DIRECT`` (:mod:`lazyfs.loader.direct`).
    """
    if fast_path:
        real = os.path.realpath(path)
        found = find_control_socket(real)
        if found is not None:
            reader = CacheReader(real, found[0], found[1], direct=direct_io)
            reader.path = reader.mount.path = path  # errors name the path the caller gave
            return reader
    return PlainReader(path, direct=direct_io)
