"""LazyFilesystem: a read-only POSIX view of one manifest.  No pyfuse3 here.

All metadata (lookup, getattr, readdir, readlink, xattrs, statfs) is answered
from an inode table built once from the manifest, so none of it touches the
network.  ``read`` maps a byte range to chunks and asks the
:class:`~lazyfs.fetch.ChunkFetcher` for them; a per-handle
:class:`~lazyfs.prefetch.ReadAhead` widens sequential reads.

Inodes: the root is 1; every non-hardlink entry gets the next number in
manifest (tree) order, so inode numbers are stable for a given manifest.  A
HARDLINK entry is another name of its target's inode (``st_nlink`` counts the
names).  Errors are :class:`~lazyfs.errors.FilesystemError` with an errno.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from lazyfs.errors import FilesystemError, LazyfsError
from lazyfs.fetch import ChunkFetcher, Data, Priority
from lazyfs.manifest import Entry, EntryType, Manifest
from lazyfs.prefetch import ReadAhead, ReadAheadConfig

__all__ = ["ROOT_INODE", "Attr", "DirEntry", "LazyFilesystem", "StatFs"]

ROOT_INODE = 1
_FMT = {
    EntryType.DIR: stat.S_IFDIR,
    EntryType.REG: stat.S_IFREG,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.CHR: stat.S_IFCHR,
    EntryType.BLK: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
    EntryType.SOCK: stat.S_IFSOCK,
}
# Reported block size: one chunk would be honest but makes `du` odd; 4 KiB matches local filesystems.
BLOCK_SIZE = 4096
# A chunk whose read just failed fails again at once for this long instead of being fetched
# again.  Why: when a read fails, the kernel retries the same page right away with a second,
# synchronous request; without this hold a reader of an unreachable origin would wait two
# full read deadlines (2 x --read-timeout) for its EIO, not one.
FAILED_HOLD = 1.0
# Failures remembered at most (expired ones are dropped first): bounded memory whatever fails.
FAILED_MAX = 4096


class Attr(NamedTuple):
    """An inode's attributes.  A named tuple, not a frozen dataclass: the FUSE adapter builds one
    per inode on its first lookup, and a frozen dataclass's ``__init__`` (one ``object.__setattr__``
    per field) made ``getattr`` 1.73 us instead of 0.96 us, and the adapter's first reply for an
    inode 2.7 us instead of 1.9 us (10,000-file tree)."""

    ino: int
    mode: int  # including the file-type bits
    nlink: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev: int
    blocks: int  # 512-byte units


@dataclass(frozen=True, slots=True)
class DirEntry:
    name: bytes
    attr: Attr
    next_id: int  # readdir offset that resumes after this entry


@dataclass(frozen=True, slots=True)
class StatFs:
    block_size: int
    blocks: int
    files: int
    name_max: int


@dataclass(slots=True)
class _Handle:
    ino: int
    entry: Entry
    readahead: ReadAhead


class LazyFilesystem:
    def __init__(
        self,
        manifest: Manifest,
        fetcher: ChunkFetcher,
        readahead: ReadAheadConfig = ReadAheadConfig(),
        control_xattrs: dict[bytes, Callable[[], bytes]] | None = None,
        on_read: Callable[[Sequence[int]], None] | None = None,
    ) -> None:
        self.manifest = manifest
        self.fetcher = fetcher
        self.readahead_config = readahead
        self.control_xattrs = control_xattrs or {}
        # Told the chunk indices of every read before they are fetched (startup traces).
        self.on_read = on_read
        self._entries: list[Entry] = []  # ino - 1 -> the entry holding the inode's data
        self._ino_of_path: dict[bytes, int] = {}  # every name, hardlinks included -> its inode
        self._nlink: list[int] = []
        self._children: dict[int, list[tuple[bytes, int]]] = {}
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        # chunk -> (hold until, the error's text): text, not the exception, whose traceback would
        # keep the frames of the failed read (and the chunk buffers they hold) alive.
        self._failed: dict[int, tuple[float, str]] = {}
        self._build()

    def _build(self) -> None:
        """One pass over the entries (tree order: a directory comes before its contents).

        Part of every mount's start-up (34k entries: ~0.45 s with two passes and a
        (parent, name) table; ~0.06 s like this): lookups go through the path table.
        """
        entries = self._entries
        ino_of_path = self._ino_of_path
        nlink = self._nlink
        children = self._children
        DIR, HARDLINK = EntryType.DIR, EntryType.HARDLINK
        hardlinks: list[tuple[Entry, list[tuple[bytes, int]], int]] = []
        for e in self.manifest.entries:
            path = e.path
            t = e.type
            if t is HARDLINK:
                ino = 0  # the target may come later in tree order: filled in below
            else:
                entries.append(e)
                ino = ino_of_path[path] = len(entries)
                nlink.append(2 if t is DIR else 1)
            if not path:
                continue
            parent_path, _, name = path.rpartition(b"/")
            parent = ino_of_path[parent_path]
            names = children.get(parent)
            if names is None:
                names = children[parent] = []
            if t is HARDLINK:
                hardlinks.append((e, names, len(names)))
            elif t is DIR:
                nlink[parent - 1] += 1
            names.append((name, ino))
        for e, names, i in hardlinks:
            ino = ino_of_path[e.path] = ino_of_path[e.target]
            nlink[ino - 1] += 1
            names[i] = (names[i][0], ino)

    # -- metadata --------------------------------------------------------------

    def _entry(self, ino: int) -> Entry:
        if not 1 <= ino <= len(self._entries):
            raise FilesystemError(errno.ENOENT, f"no inode {ino}")
        return self._entries[ino - 1]

    def getattr(self, ino: int) -> Attr:
        e = self._entry(ino)
        size = e.size
        return Attr(
            ino=ino,
            mode=_FMT[e.type] | e.mode,
            nlink=self._nlink[ino - 1],
            uid=e.uid,
            gid=e.gid,
            size=size,
            mtime_ns=e.mtime_ns,
            rdev=e.rdev,
            blocks=(size + 511) // 512 if e.type is EntryType.REG else 0,
        )

    def lookup(self, parent: int, name: bytes) -> Attr:
        return self.getattr(self.lookup_ino(parent, name))

    def lookup_ino(self, parent: int, name: bytes) -> int:
        """The inode ``name`` in directory ``parent`` names (what the FUSE adapter asks: it
        keeps each inode's reply attributes and needs no fresh :class:`Attr`)."""
        if self._entry(parent).type is not EntryType.DIR:
            raise FilesystemError(errno.ENOTDIR)
        if name == b".":
            return parent
        if name == b"..":
            return self._ino_of_path[self._entry(parent).parent]
        if not name or b"/" in name:
            raise FilesystemError(errno.ENOENT)
        ppath = self._entries[parent - 1].path
        ino = self._ino_of_path.get(ppath + b"/" + name if ppath else name)
        if ino is None:
            raise FilesystemError(errno.ENOENT)
        return ino

    def children(self, ino: int) -> Sequence[tuple[bytes, int]]:
        """The (name, inode) pairs of directory ``ino`` in name order; readdir offset i + 1
        resumes after the i-th.  The list is the filesystem's own: callers only read it."""
        if self._entry(ino).type is not EntryType.DIR:
            raise FilesystemError(errno.ENOTDIR)
        return self._children.get(ino, ())

    def readdir(self, ino: int, start: int) -> Iterator[DirEntry]:
        """Children of ``ino`` from offset ``start`` (0 = beginning), in name order.

        Checks ``ino`` at once; the entries come lazily.  The kernel asks in pieces of a
        page or so and stops taking entries when its buffer is full: a directory of n names
        costs O(n) attributes in all, not O(n) per piece (O(n^2) for a large directory).
        """
        children = self.children(ino)
        return (DirEntry(children[i][0], self.getattr(children[i][1]), i + 1) for i in range(start, len(children)))

    def readlink(self, ino: int) -> bytes:
        e = self._entry(ino)
        if e.type is not EntryType.SYMLINK:
            raise FilesystemError(errno.EINVAL)
        return e.target

    def listxattr(self, ino: int) -> list[bytes]:
        return [k for k, _ in self._entry(ino).xattrs]

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if ino == ROOT_INODE and name in self.control_xattrs:
            return self.control_xattrs[name]()
        for k, v in self._entry(ino).xattrs:
            if k == name:
                return v
        raise FilesystemError(errno.ENODATA)

    def statfs(self) -> StatFs:
        total = sum(e.size for e in self._entries if e.type is EntryType.REG)
        return StatFs(
            block_size=BLOCK_SIZE,
            blocks=(total + BLOCK_SIZE - 1) // BLOCK_SIZE,
            files=len(self._entries),
            name_max=255,
        )

    def path_of(self, ino: int) -> bytes:
        return self._entry(ino).path

    def ino_of(self, path: bytes) -> int:
        ino = self._ino_of_path.get(path)
        if ino is None:
            raise FilesystemError(errno.ENOENT, f"{path!r} is not in the manifest")
        return ino

    # -- data ------------------------------------------------------------------

    def open(self, ino: int, flags: int) -> int:
        e = self._entry(ino)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise FilesystemError(errno.EROFS)
        if e.type is EntryType.DIR:
            raise FilesystemError(errno.EISDIR)
        if e.type is not EntryType.REG:
            raise FilesystemError(errno.EACCES)
        fh = self._next_fh
        self._next_fh += 1
        ra = ReadAhead(self.fetcher, e.chunks, self.manifest.chunk_size, e.size, self.readahead_config)
        self._handles[fh] = _Handle(ino, e, ra)
        return fh

    def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    async def read(self, fh: int, offset: int, length: int) -> bytes | memoryview:
        h = self._handles.get(fh)
        if h is None:
            raise FilesystemError(errno.EBADF)
        e = h.entry
        if offset >= e.size or length <= 0:
            return b""
        end = min(offset + length, e.size)
        cs = self.manifest.chunk_size
        if self.on_read is not None:
            self.on_read(e.chunks[offset // cs : (end - 1) // cs + 1])
        h.readahead.on_read(offset, end - offset)
        data = await self.read_range(e, offset, end, Priority.DEMAND)
        # Chunks whose last byte this read returned: every one it touched but a last one it
        # ends inside.
        for k in range(offset // cs, (end - 1) // cs + (end % cs == 0 or end == e.size)):
            self.fetcher.consumed(e.chunks[k])
        return data

    async def read_range(self, e: Entry, offset: int, end: int, priority: Priority) -> bytes | memoryview:
        """The bytes ``[offset, end)`` of ``e``: within one chunk a view of the chunk (no copy: the
        kernel's 1 MiB reads would otherwise each copy a slice into fresh memory), else one joined copy."""
        cs = self.manifest.chunk_size
        first, last = offset // cs, (end - 1) // cs
        idx = e.chunks[first : last + 1]
        if len(idx) == 1:
            data = await self._get(idx[0], priority)
            return memoryview(data)[offset - first * cs : end - first * cs]
        parts = [memoryview(p) for p in await asyncio.gather(*(self._get(i, priority) for i in idx))]
        # Trim the first and last chunk before joining: one copy of exactly the bytes asked for.
        parts[-1] = parts[-1][: end - (first + len(idx) - 1) * cs]
        parts[0] = parts[0][offset - first * cs :]
        return b"".join(parts)

    async def _get(self, index: int, priority: Priority) -> Data:
        """``fetcher.get``, except that a chunk which failed less than FAILED_HOLD ago fails at once."""
        held = self._failed.get(index)
        if held is not None:
            until, why = held
            if time.monotonic() < until:
                raise FilesystemError(errno.EIO, f"{why} (failed moments ago; not retried yet)")
            del self._failed[index]
        try:
            return await self.fetcher.get(index, priority)
        except LazyfsError as exc:
            now = time.monotonic()
            if len(self._failed) >= FAILED_MAX:
                self._failed = {i: h for i, h in self._failed.items() if h[0] > now}
            if len(self._failed) < FAILED_MAX:
                self._failed[index] = (now + FAILED_HOLD, str(exc))
            if exc.errno != errno.EIO:
                # The file exists; its bytes could not be had (a pack missing at the origin is
                # NotFoundError, ENOENT): read(2) must say EIO, not "no such file".
                raise FilesystemError(errno.EIO, str(exc)) from exc
            raise

    def chunks_of(self, paths: list[bytes] | None = None) -> list[int]:
        """Chunk indices of every file under ``paths`` (all files when None), each once, in tree order."""
        files: list[Entry] = []
        if paths is None:
            files = [x for x in self._entries if x.type is EntryType.REG]
        for path in paths or []:
            e = self._entries[self.ino_of(path) - 1]
            if e.type is EntryType.DIR:
                # Every file named under the directory, hardlink names included (their data
                # lives with the inode's first name, which may be elsewhere in the tree).
                prefix = e.path + b"/" if e.path else b""
                for x in self.manifest.entries:
                    if x.path.startswith(prefix) and (t := self.manifest.resolve(x)).type is EntryType.REG:
                        files.append(t)
            elif e.type is EntryType.REG:
                files.append(e)
        return list(dict.fromkeys(i for f in files for i in f.chunks))

    async def warm(self, paths: list[bytes] | None = None, on_chunk: Callable[[int], None] | None = None) -> int:
        """Fetch every chunk of ``paths`` (all files when None) at BACKGROUND priority.

        Returns the number of bytes covered; ``on_chunk`` is called with each chunk's size.
        """
        todo = self.chunks_of(paths)
        total = 0
        # A bounded window keeps warming from crowding out demand reads and memory.
        sem = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            nonlocal total
            async with sem:
                await self.fetcher.get(i, Priority.BACKGROUND)
            size = self.manifest.chunks[i].size
            total += size
            if on_chunk is not None:
                on_chunk(size)

        await asyncio.gather(*(one(i) for i in todo))
        return total
