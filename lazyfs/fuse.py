"""Thin pyfuse3 adapter: the only module that imports pyfuse3.

Translates kernel requests to :class:`~lazyfs.fs.LazyFilesystem` calls and
errors to ``FUSEError(errno)``.  Content is immutable, so entries and
attributes are cached by the kernel for a long time and open files keep their
page cache (``keep_cache``).  After mounting, the mount's ``read_ahead_kb`` is
raised so the kernel sends 1 MiB reads (measured: pyfuse3 serves ~2.0 GB/s
with 128 KiB requests and ~3.5 GB/s with 1 MiB requests).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import sys
import types
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _import_pyfuse3_without_trio() -> None:
    """Import pyfuse3 with a placeholder for trio, which it imports but never uses in asyncio mode.

    pyfuse3 runs ``import trio`` when it loads and looks ``trio`` up only when it serves, as its
    module global ``trio``, which ``pyfuse3.asyncio.enable()`` (below) replaces.  Importing
    the real trio costs the daemon ~0.12 s (40-odd modules) of every mount's start-up, for
    nothing.  The placeholder is in ``sys.modules`` only while pyfuse3 loads; a process that
    already has trio, or imports it later, gets the real one.  Should a pyfuse3 release touch
    trio while loading, this import fails at once, loudly (every mount test catches it).
    """
    if "pyfuse3" in sys.modules or "trio" in sys.modules:
        return
    placeholder = types.ModuleType("trio", "lazyfs: pyfuse3 runs in asyncio mode; this trio is never used")
    sys.modules["trio"] = placeholder
    try:
        import pyfuse3  # noqa: F401
    finally:
        if sys.modules.get("trio") is placeholder:
            del sys.modules["trio"]


_import_pyfuse3_without_trio()

import pyfuse3  # noqa: E402
import pyfuse3.asyncio  # noqa: E402

from lazyfs.errors import FilesystemError, LazyfsError  # noqa: E402
from lazyfs.fs import Attr, LazyFilesystem  # noqa: E402

__all__ = [
    "FuseAdapter", "MetadataStatistics", "close", "device_number", "mount", "mount_device", "run", "tune_read_ahead",
]

log = logging.getLogger(__name__)

pyfuse3.asyncio.enable()


# pyfuse3's asyncio layer races on shutdown: its wait_readable registers `future.set_result`
# as the fd's reader callback, and terminate() (our SIGTERM handler) completes the same
# future through notify_closing().  When the kernel makes /dev/fuse readable in the same
# loop iteration (it does as the mount goes away), the reader callback then calls
# set_result on a done future and the loop logs an InvalidStateError traceback; the
# reverse order raises inside terminate().  These replacements complete the future only if
# it is still pending; the FUSE loop behaves the same.
async def _wait_readable(fd: Any) -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()
    waiting = pyfuse3.asyncio._read_futures[fd]
    waiting.add(future)

    def readable() -> None:
        if not future.done():
            future.set_result(None)

    try:
        loop.add_reader(fd, readable)
        try:
            await future
        finally:
            loop.remove_reader(fd)
    finally:
        waiting.discard(future)
        if not waiting:
            pyfuse3.asyncio._read_futures.pop(fd, None)


def _notify_closing(fd: Any) -> None:
    for future in pyfuse3.asyncio._read_futures.get(fd, ()):
        if not future.done():
            future.set_exception(pyfuse3.asyncio.ClosedResourceError())


pyfuse3.asyncio.wait_readable = _wait_readable
pyfuse3.asyncio.notify_closing = _notify_closing

# The manifest never changes under a mount: let the kernel keep lookups and attributes a day.
CACHE_TIMEOUT = 86400.0
# 1 MiB read requests: the kernel's read-ahead size bounds the size of the reads it sends.
READ_AHEAD_KB = 1024
# Directories of at most this many names are listed ahead after a first lookup in them.
LIST_AHEAD_MAX_ENTRIES = 4096
# Directories waiting to be listed ahead; older ones are dropped when more pile up.
LIST_AHEAD_QUEUE = 64


@dataclass(frozen=True, slots=True)
class MetadataStatistics:
    lookups: int  # LOOKUP requests answered
    lookups_missing: int  # of those, names that do not exist (the kernel keeps the answer)
    readdirs: int  # READDIRPLUS requests answered
    dirs_listed_ahead: int  # directories listed through the mount after a first lookup in them
    list_ahead_dropped: int  # directories not listed: more piled up than the queue holds
    list_ahead_errors: int  # listings that failed (permissions, an unmount under way)


def _list_directory(path: bytes, device: int) -> None:
    """Read the directory at ``path`` through the mount, discarding the names (a worker thread's job).

    ``path`` is resolved by name under the mountpoint, whose parents somebody else may own: a
    directory that turns out not to be on the mount (``device``) is left unread.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_dev != device:
            raise OSError(errno.EXDEV, "not on this mount")
        os.listdir(fd)
    finally:
        os.close(fd)


class _ListAhead:
    """Metadata read-ahead: after the first lookup of a name in a directory, list that directory.

    A process that looks up one name in a directory usually looks up more (an import
    probing a package, a loader opening a model's files, ``stat`` over a list of paths);
    each first lookup is a round trip through the daemon (~50-90 us here).  Listing the
    directory once through the mount makes the kernel ask READDIRPLUS, whose answer gives
    it every name's entry and attributes: later lookups of siblings are answered from the
    kernel's dentry cache.

    The listings run on one worker thread of this process (the event loop answers its
    requests like anyone's), one directory at a time, each directory at most once per
    mount, and only directories of at most ``limit`` names: listing a huge directory for
    one name would cost more than it saves.  At most ``LIST_AHEAD_QUEUE`` directories wait;
    the oldest give way to newer ones.  Also listing the subdirectories of a listed
    directory was tried (``stat`` of 10,000 files in 100 directories by path, fresh mounts,
    alternated runs): slower in one set (212-246 against 139-168 ms), a little faster in
    another (158-268 against 205-278 ms), no better in random order; it lists directories
    nobody asked for, so only directories a lookup touched are listed.
    """

    def __init__(self, fs: LazyFilesystem, mountpoint: bytes, limit: int = LIST_AHEAD_MAX_ENTRIES) -> None:
        self.fs = fs
        self.mountpoint = mountpoint
        self.limit = limit
        self._seen: set[int] = set()  # listed, queued, or not worth listing
        self._queue: deque[int] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.listed = self.dropped = self.errors = 0
        # The mount's device number, set once it is mounted: nothing is listed before.
        self.device: int | None = None

    def touched(self, parent: int) -> None:
        """A name in directory ``parent`` was looked up (called on the event loop)."""
        if self.limit <= 0 or self.device is None or parent in self._seen:
            return
        self._seen.add(parent)
        if not 2 <= len(self.fs.children(parent)) <= self.limit:
            return
        self._queue.append(parent)
        if len(self._queue) > LIST_AHEAD_QUEUE:
            self._seen.discard(self._queue.popleft())  # a later lookup there may queue it again
            self.dropped += 1
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="lazyfs-list-ahead")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lazyfs-list-ahead")
        try:
            while self._queue and (device := self.device) is not None:
                rel = self.fs.path_of(self._queue.popleft())
                path = self.mountpoint + b"/" + rel if rel else self.mountpoint
                try:
                    await loop.run_in_executor(self._pool, _list_directory, path, device)
                    self.listed += 1
                except OSError as exc:
                    self.errors += 1
                    log.debug("listing %r ahead failed: %s", path, exc)
        finally:
            self._worker = None

    def close(self) -> None:
        """Stop listing (a listing under way ends when the mount goes away)."""
        self._queue.clear()
        self.limit = 0
        if self._worker is not None:
            self._worker.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class FuseAdapter(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: LazyFilesystem, mountpoint: str | os.PathLike[str] | None = None,
                 list_ahead: int = LIST_AHEAD_MAX_ENTRIES) -> None:
        """``mountpoint``: where the kernel shows this filesystem, as this process resolves it
        (resolved *before* mounting: resolving it afterwards would wait on this very daemon);
        without it, or with ``list_ahead`` 0, no directory is listed ahead."""
        super().__init__()
        self.fs = fs
        where = os.fsencode(mountpoint) if mountpoint else b""
        self.list_ahead = _ListAhead(fs, where, list_ahead if where else 0)
        # A name that does not exist is answered with inode 0 and a timeout: the kernel keeps
        # the negative entry (an ENOENT error would be asked again every time; the tree never
        # changes, so the answer stays true).
        self._missing = pyfuse3.EntryAttributes()
        self._missing.st_ino = 0
        self._missing.entry_timeout = CACHE_TIMEOUT
        self.lookups = self.lookups_missing = self.readdirs = 0
        # ino -> its reply attributes, built once: a mount's manifest never changes, so neither
        # do they.  Why: building one costs ~15 attribute stores in Python, and a tree walk asks
        # for every inode again on each readdirplus (measured: a second `stat` pass over 10,000
        # files through a mount went from 183-206 ms to 147 ms).  At most one per inode, like
        # the filesystem's own inode table.
        self._attrs: dict[int, pyfuse3.EntryAttributes] = {}

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        out = self._attrs.get(ino)
        if out is None:
            out = self._attrs[ino] = self._build_attr(self.fs.getattr(ino))
        return out

    @staticmethod
    def _build_attr(a: Attr) -> pyfuse3.EntryAttributes:
        out = pyfuse3.EntryAttributes()
        out.st_ino = a.ino
        out.generation = 0
        out.entry_timeout = CACHE_TIMEOUT
        out.attr_timeout = CACHE_TIMEOUT
        out.st_mode = a.mode
        out.st_nlink = a.nlink
        out.st_uid = a.uid
        out.st_gid = a.gid
        out.st_rdev = a.rdev
        out.st_size = a.size
        out.st_blksize = 4096
        out.st_blocks = a.blocks
        out.st_atime_ns = a.mtime_ns
        out.st_mtime_ns = a.mtime_ns
        out.st_ctime_ns = a.mtime_ns
        return out

    @staticmethod
    def _fail(exc: Exception, what: str) -> pyfuse3.FUSEError:
        if isinstance(exc, LazyfsError):
            if exc.errno == errno.EIO:
                log.warning("%s failed: %s", what, exc)
            return pyfuse3.FUSEError(exc.errno)
        log.exception("%s failed unexpectedly", what)
        return pyfuse3.FUSEError(errno.EIO)

    def statistics(self) -> MetadataStatistics:
        la = self.list_ahead
        return MetadataStatistics(self.lookups, self.lookups_missing, self.readdirs, la.listed, la.dropped, la.errors)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        self.lookups += 1
        try:
            ino = self.fs.lookup_ino(parent_inode, name)
        except FilesystemError as exc:
            if exc.errno != errno.ENOENT:
                raise self._fail(exc, "lookup") from None
            ino = 0
        except Exception as exc:
            raise self._fail(exc, "lookup") from None
        try:
            self.list_ahead.touched(parent_inode)
        except Exception:  # never fail a lookup for the read-ahead's sake
            log.exception("listing a directory ahead failed unexpectedly")
        if ino:
            return self._attr(ino)
        self.lookups_missing += 1
        return self._missing

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        try:
            return self._attr(inode)
        except Exception as exc:
            raise self._fail(exc, "getattr") from None

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        try:
            return self.fs.readlink(inode)
        except Exception as exc:
            raise self._fail(exc, "readlink") from None

    async def opendir(self, inode: int, ctx: Any) -> int:
        try:
            self.fs.children(inode)  # validates that it is a directory
        except Exception as exc:
            raise self._fail(exc, "opendir") from None
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        # Straight from the inode table and the reply-attribute cache: a walk lists every
        # directory again (pyfuse3 cannot let the kernel cache listings), and building a
        # DirEntry and an Attr per name was most of the daemon's work in a repeated walk.
        # Measured, 10,000 files in 100 directories, old and new daemon alternated (3 pairs):
        # 85-91 -> 59-64 ms per walk, the daemon's CPU 45-49 -> 18-19 ms per walk.
        self.readdirs += 1
        try:
            children = self.fs.children(fh)
            attrs = self._attrs
            reply = pyfuse3.readdir_reply
            for i in range(start_id, len(children)):
                name, ino = children[i]
                attr = attrs.get(ino) or self._attr(ino)
                if not reply(token, name, attr, i + 1):
                    break  # the buffer is full; the kernel asks again from the last offset it took
        except Exception as exc:
            raise self._fail(exc, "readdir") from None

    async def releasedir(self, fh: int) -> None:
        pass

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        try:
            fh = self.fs.open(inode, flags)
        except Exception as exc:
            raise self._fail(exc, "open") from None
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    # pyfuse3's stub says bytes; its handler replies from any contiguous buffer (PyObject_GetBuffer).
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        try:
            return await self.fs.read(fh, off, size)
        except Exception as exc:
            raise self._fail(exc, "read") from None

    async def release(self, fh: int) -> None:
        self.fs.release(fh)

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        try:
            return self.fs.getxattr(inode, name)
        except LazyfsError as exc:
            if exc.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise self._fail(exc, "getxattr") from None
        except Exception as exc:
            raise self._fail(exc, "getxattr") from None

    async def listxattr(self, inode: int, ctx: Any) -> Sequence[bytes]:
        try:
            return self.fs.listxattr(inode)
        except Exception as exc:
            raise self._fail(exc, "listxattr") from None

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = self.fs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = s.block_size
        out.f_frsize = s.block_size
        out.f_blocks = s.blocks
        out.f_bfree = 0
        out.f_bavail = 0
        out.f_files = s.files
        out.f_ffree = 0
        out.f_favail = 0
        out.f_namemax = s.name_max
        return out

    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        # default_permissions makes the kernel check modes; only refuse writes here.
        return not (mode & os.W_OK)


def mount(fs: LazyFilesystem, mountpoint: Path, *, allow_other: bool, fsname: str) -> FuseAdapter:
    """Mount ``fs`` at ``mountpoint`` (read-only); returns the adapter serving it.  Call :func:`run` next."""
    options = set(pyfuse3.default_options)  # default_permissions: the kernel enforces modes
    options |= {"ro", f"fsname={fsname}", "subtype=lazyfs"}
    if allow_other:
        options.add("allow_other")
    adapter = FuseAdapter(fs, os.path.realpath(mountpoint))
    try:
        pyfuse3.init(adapter, str(mountpoint), options)
    except RuntimeError as exc:  # pyfuse3 says only "fuse_session_mount failed"; libfuse logged why
        raise LazyfsError(
            f"cannot mount {mountpoint}: {exc} (libfuse's reason is in the daemon log; a mount by a "
            "non-root user needs read-write access to /dev/fuse and fusermount3)"
        ) from exc
    return adapter


async def run() -> None:
    """Serve requests until the filesystem is unmounted or :func:`terminate` is called."""
    # Up to 256 concurrent request handlers: readers blocked on the network must not
    # starve metadata requests or reads that would hit the cache.
    await pyfuse3.main(min_tasks=4, max_tasks=256)


def terminate() -> None:
    pyfuse3.terminate()


def close(unmount: bool = True) -> None:
    pyfuse3.close(unmount=unmount)


def mount_device(mountpoint: Path) -> str | None:
    """``major:minor`` of the filesystem mounted at ``mountpoint``, from /proc/self/mountinfo.

    Read from mountinfo rather than ``stat(mountpoint)``: a stat from the daemon's own
    thread would wait for a FUSE reply that only this process can give.
    """
    want = os.path.realpath(mountpoint)
    found = None
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 5:
                    continue
                mp = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
                if os.fsdecode(mp) == want:
                    found = fields[2].decode()  # the last (topmost) mount wins
    except OSError:
        return None
    return found


def device_number(dev: str | None) -> int | None:
    """``st_dev`` from :func:`mount_device`'s ``major:minor`` (None stays None)."""
    major, _, minor = (dev or "").partition(":")
    try:
        return os.makedev(int(major), int(minor))
    except ValueError:
        return None


def tune_read_ahead(mountpoint: Path, dev: str | None, kb: int = READ_AHEAD_KB) -> str | None:
    """Raise the read-ahead of the mount at ``mountpoint``, whose ``major:minor`` is ``dev``
    (:func:`mount_device`); returns why it could not, or None on success."""
    if dev is None:
        return f"could not find {mountpoint} in /proc/self/mountinfo; read-ahead not tuned"
    try:
        Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(f"{kb}\n")
        return None
    except OSError as exc:
        return f"could not raise read_ahead_kb to {kb} ({exc.strerror}); the kernel will send 128 KiB reads"
