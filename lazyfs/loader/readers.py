"""Range readers for the loader: plain ``preadv`` and the lazyfs direct-from-cache fast path.  No torch here.

:class:`PlainReader` fills a list of buffers from a file offset with large
``preadv`` calls (several threads call it at once; ``preadv`` needs no shared
file position).  Used off a mount, and on a mount whose cache this user cannot
read — never mmap, whose 4 KiB page faults crawl through FUSE.

:class:`CacheReader` is the fast path on a lazyfs mount.  The loader sends its
read plan (byte ranges in the order it will consume them) to the mount's daemon
over the control socket; the daemon fetches the chunks in that order (tiers,
verification and caching as for any read) and streams back, for each chunk, the
path of its verified raw file in the local cache once it is there.  Reader
threads wait for the chunks a range needs and ``pread`` them straight from the
cache files, bypassing FUSE.  A chunk the daemon could not cache (or a cache
file evicted meanwhile) is read through the mount instead.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import socket
import threading
from collections.abc import Sequence
from typing import Any, Protocol

from lazyfs.errors import LazyfsError

__all__ = ["CONTROL_XATTR", "CacheReader", "LoaderIOError", "PlainReader", "RangeReader", "open_reader"]

CONTROL_XATTR = "user.lazyfs.control"
# preadv takes at most IOV_MAX (1024 on Linux) buffers per call.
IOV_MAX = 1024


class LoaderIOError(LazyfsError):
    """A read the loader needed failed (EIO from a mount, a vanished file)."""


class RangeReader(Protocol):
    path: str

    def readinto(self, offset: int, views: Sequence[memoryview]) -> None:
        """Fill ``views`` in order with the bytes starting at ``offset`` (all of them, or raise)."""
        ...

    def header_fd(self) -> int: ...

    def close(self) -> None: ...


def preadv_full(fd: int, views: Sequence[memoryview], offset: int, path: str) -> None:
    pending = [v for v in views if len(v)]
    while pending:
        batch = pending[:IOV_MAX]
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
            head = pending[0]
            if n >= len(head):
                n -= len(head)
                pending.pop(0)
            else:
                pending[0] = head[n:]
                n = 0


class PlainReader:
    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise LoaderIOError(f"{path}: {exc.strerror}") from exc

    def header_fd(self) -> int:
        return self.fd

    def readinto(self, offset: int, views: Sequence[memoryview]) -> None:
        preadv_full(self.fd, views, offset, self.path)

    def close(self) -> None:
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
    """Reads chunks from the lazyfs cache as the daemon reports them ready (see module docstring)."""

    def __init__(self, path: str, mount_root: str, socket_path: str, timeout: float = 120.0) -> None:
        self.path = path
        self.mount = PlainReader(path)
        self.rel = os.path.relpath(path, mount_root)
        self.socket_path = socket_path
        self.timeout = timeout
        self.chunk_size = 0
        self._ready: dict[int, str | None] = {}  # chunk number -> cache path (None: read via the mount)
        self._errors: dict[int, str] = {}
        self._done = False
        self._cond = threading.Condition()
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._conn: _UnixHTTPConnection | None = None
        self.chunks_from_cache = 0
        self.chunks_from_mount = 0

    def header_fd(self) -> int:
        return self.mount.fd

    def start(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Send the read plan; events are consumed by a background thread."""
        conn = _UnixHTTPConnection(self.socket_path, self.timeout)
        body = json.dumps({"path": self.rel, "ranges": [list(r) for r in ranges]})
        try:
            conn.request("POST", "/plan", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
        except OSError as exc:
            conn.close()
            raise LoaderIOError(f"{self.path}: cannot reach the lazyfs daemon: {exc}") from exc
        if resp.status != 200:
            msg = resp.read(4096).decode(errors="replace")
            conn.close()
            raise LoaderIOError(f"{self.path}: the lazyfs daemon refused the read plan: {msg}")
        first = json.loads(resp.readline())
        self.chunk_size = int(first["chunk_size"])
        self._conn = conn
        self._thread = threading.Thread(target=self._events, args=(resp,), name="lazyfs-plan", daemon=True)
        self._thread.start()

    def _events(self, resp: Any) -> None:
        try:
            for line in resp:
                ev = json.loads(line)
                with self._cond:
                    if "error" in ev:
                        self._errors[int(ev["chunk"])] = str(ev["error"])
                    else:
                        self._ready[int(ev["chunk"])] = ev.get("path")
                    self._cond.notify_all()
        except (OSError, ValueError, http.client.HTTPException):
            pass
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _wait(self, chunk: int) -> str | None:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: chunk in self._ready or chunk in self._errors or self._done, timeout=self.timeout
            )
            if chunk in self._errors:
                raise LoaderIOError(f"{self.path}: {self._errors[chunk]}")
            if not ok or chunk not in self._ready:
                return None  # the daemon stopped reporting: read through the mount (which has its own deadline)
            return self._ready[chunk]

    def _fd(self, cache_path: str) -> int | None:
        with self._fd_lock:
            fd = self._fds.get(cache_path)
            if fd is None:
                try:
                    fd = os.open(cache_path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    return None  # evicted or unreadable: the mount serves it
                self._fds[cache_path] = fd
            return fd

    def readinto(self, offset: int, views: Sequence[memoryview]) -> None:
        cs = self.chunk_size
        pending = [v for v in views if len(v)]
        while pending:
            chunk = offset // cs
            in_chunk = offset - chunk * cs
            room = cs - in_chunk
            # The views (or parts of them) that fall inside this chunk.
            batch: list[memoryview] = []
            take = 0
            while pending and take < room:
                v = pending[0]
                n = min(len(v), room - take)
                batch.append(v[:n])
                take += n
                if n == len(v):
                    pending.pop(0)
                else:
                    pending[0] = v[n:]
            cache_path = self._wait(chunk)
            fd = self._fd(cache_path) if cache_path else None
            if fd is not None:
                try:
                    preadv_full(fd, batch, in_chunk, cache_path or "")
                    self.chunks_from_cache += 1
                except LoaderIOError:
                    fd = None
            if fd is None:
                preadv_full(self.mount.fd, batch, offset, self.path)
                self.chunks_from_mount += 1
            offset += take

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                if self._conn.sock is not None:
                    self._conn.sock.shutdown(socket.SHUT_RDWR)
            self._conn.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self.mount.close()


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


def open_reader(path: str, *, fast_path: bool = True) -> RangeReader:
    """A :class:`CacheReader` on a lazyfs mount we can talk to, else a :class:`PlainReader`."""
    if fast_path:
        found = find_control_socket(path)
        if found is not None:
            return CacheReader(path, found[0], found[1])
    return PlainReader(path)
