"""Publishing: chunk a tree, pack and upload the chunks, publish the manifest, then the ref.

Pipeline (memory stays bounded; no whole-file buffers)::

    scan (lstat, readlink, xattrs; hardlinks detected by (dev, ino))
      -> chunk jobs in tree order, a bounded window in a thread pool:
         pread 4 MiB -> BLAKE3 -> (new digests only) zstd, kept if it saves >= 10 %
      -> packer, in order: stored chunks appended to a ~64 MiB pack; a full pack is
         sealed (digest = BLAKE3 of its bytes) and uploaded by a bounded set of tasks
      -> manifest (canonical) -> ``manifests/<digest>`` -> finally ``refs/<name>/<tag>``

Deduplication: chunks already stored at the origin (found in any manifest there)
or earlier in this run are referenced, not uploaded again.

Resumability: packing is deterministic (tree order, the same dedup set, the
same zstd level), so a re-run after an interruption rebuilds identical packs
and skips every pack whose object already exists.  The ref is written last,
so it never points at a manifest whose packs are incomplete.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import mmap
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import zstandard

from lazyfs.config import SeedConfig
from lazyfs.errors import LazyfsError, ManifestError, NotFoundError, SeedError, UsageError
from lazyfs.manifest import (
    ChunkLocation,
    Codec,
    Entry,
    EntryType,
    Manifest,
    ManifestBuilder,
    Pack,
    Ref,
    decode,
    digest_of,
    encode,
    tree_key,
)
from lazyfs.origin.base import Origin
from lazyfs.progress import NullProgress, ProgressReporter

__all__ = ["ENTRY_TYPES", "SeedResult", "SourceFile", "known_chunks", "publish", "scan_tree", "seed"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SourceFile:
    """A regular file to chunk: where its bytes are and the manifest path they belong to."""

    path: bytes  # manifest path
    source: str  # filesystem path to read
    size: int
    offset: int = 0  # where the bytes start in ``source`` (image layers spool small files into shared segments)


@dataclass(frozen=True)
class SeedResult:
    digest: str
    ref: Ref
    manifest: Manifest
    files: int
    bytes_total: int  # file bytes in the tree (each inode once)
    bytes_new: int  # raw bytes of chunks new to the origin
    bytes_uploaded: int  # pack bytes actually written (0 for an unchanged tree)
    packs_uploaded: int
    packs_skipped: int  # already present (a resumed seed)
    chunks_new: int
    chunks_reused: int
    seconds: float


# --- scanning -----------------------------------------------------------------


def _show(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """A path for an error message: one line whatever the name holds (newlines, non-UTF-8 bytes).

    The CLI prints an error as exactly one line; a file name may contain ``\\n``.
    """
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


# File type (stat.S_IFMT) -> manifest entry type: what a directory scan and the tests agree on.
ENTRY_TYPES = {
    stat.S_IFDIR: EntryType.DIR,
    stat.S_IFREG: EntryType.REG,
    stat.S_IFLNK: EntryType.SYMLINK,
    stat.S_IFCHR: EntryType.CHR,
    stat.S_IFBLK: EntryType.BLK,
    stat.S_IFIFO: EntryType.FIFO,
    stat.S_IFSOCK: EntryType.SOCK,
}


def _xattrs(path: bytes) -> tuple[tuple[bytes, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return ()
        raise
    out = []
    for name in names:
        try:
            out.append((name.encode(), os.getxattr(path, name, follow_symlinks=False)))
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                continue
            raise
    return tuple(sorted(out))


def _entry(rel: bytes, fs_path: bytes, st: os.stat_result) -> Entry:
    et = ENTRY_TYPES.get(stat.S_IFMT(st.st_mode))
    if et is None:
        raise SeedError(f"cannot publish {_show(fs_path)}: unsupported file type")
    target = os.readlink(fs_path) if et is EntryType.SYMLINK else b""
    return Entry(
        path=rel,
        type=et,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
        size=st.st_size if et is EntryType.REG else len(target),
        target=target,
        rdev=st.st_rdev if et in (EntryType.CHR, EntryType.BLK) else 0,
        xattrs=_xattrs(fs_path),
    )


def _walk(root: bytes) -> Iterator[tuple[bytes, bytes, os.stat_result]]:
    stack = [b""]
    while stack:
        rel = stack.pop()
        fs_dir = os.path.join(root, rel) if rel else root
        try:
            names = sorted(os.listdir(fs_dir))
        except OSError as exc:
            raise SeedError(f"cannot read directory {_show(fs_dir)}: {exc.strerror}") from exc
        for name in names:
            child = rel + b"/" + name if rel else name
            fs_child = os.path.join(root, child)
            st = os.lstat(fs_child)
            yield child, fs_child, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(child)


def scan_tree(src: Path, builder: ManifestBuilder) -> list[SourceFile]:
    """Add every entry of ``src`` (a directory, or a single file) to ``builder``.

    Returns the regular files whose bytes must be chunked, in tree order; the
    caller adds their chunk digests.  Hardlinks (same ``st_dev``/``st_ino``)
    become one REG entry (the first name in tree order) plus HARDLINK entries.
    """
    root = os.fsencode(src)
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        raise SeedError(f"{_show(src)}: no such file or directory") from None
    except OSError as exc:
        raise SeedError(f"{_show(src)}: {exc.strerror}") from exc
    items: list[tuple[bytes, bytes, os.stat_result]] = []
    try:
        if stat.S_ISDIR(st.st_mode):
            builder.add(_entry(b"", root, st))
            items = list(_walk(root))
        elif stat.S_ISREG(st.st_mode):
            builder.add(
                Entry(b"", EntryType.DIR, 0o755, st.st_uid, st.st_gid, st.st_mtime_ns),
            )
            items = [(os.path.basename(root), root, st)]
        else:
            raise SeedError(f"{_show(src)}: not a directory or a regular file")
    except OSError as exc:
        raise SeedError(f"cannot read {_show(exc.filename or root)}: {exc.strerror}") from exc

    items.sort(key=lambda it: tree_key(it[0]))
    first_name: dict[tuple[int, int], bytes] = {}
    files: list[SourceFile] = []
    for rel, fs_path, est in items:
        try:
            entry = _entry(rel, fs_path, est)
        except OSError as exc:
            raise SeedError(f"cannot read {_show(fs_path)}: {exc.strerror}") from exc
        if est.st_nlink > 1 and entry.type is not EntryType.DIR:
            key = (est.st_dev, est.st_ino)
            primary = first_name.get(key)
            if primary is not None:
                builder.add(Entry(rel, EntryType.HARDLINK, entry.mode, entry.uid, entry.gid,
                                  entry.mtime_ns, target=primary))
                continue
            first_name[key] = rel
        builder.add(entry)
        if entry.type is EntryType.REG:
            if not os.access(fs_path, os.R_OK):
                raise SeedError(f"cannot read {_show(fs_path)}: permission denied")
            files.append(SourceFile(rel, os.fsdecode(fs_path), est.st_size))
    return files


# --- dedup index from the origin ------------------------------------------------


async def known_chunks(origin: Origin) -> dict[bytes, ChunkLocation]:
    """Where every chunk already published to ``origin`` is stored (from all its manifests).

    Undecodable manifests are skipped with a warning: they cannot be trusted
    to describe packs correctly.  When a chunk is stored more than once, the
    smallest (pack digest, offset) wins so the choice does not depend on
    listing order.
    """
    try:
        keys = await origin.list("manifests/")
    except NotFoundError:
        return {}
    out: dict[bytes, ChunkLocation] = {}
    for key in keys:
        try:
            data = await origin.read(key)
            if digest_of(data) != key.rsplit("/", 1)[-1]:
                raise ManifestError("digest does not match its name")
            m = await asyncio.to_thread(decode, data)
        except (ManifestError, NotFoundError) as exc:
            log.warning("ignoring %s at the origin for deduplication: %s", key, exc)
            continue
        for c in m.chunks:
            loc = ChunkLocation(m.packs[c.pack], c.offset, c.stored_size, c.codec, c.size)
            old = out.get(c.digest)
            if old is None or (loc.pack.digest, loc.offset) < (old.pack.digest, old.offset):
                out[c.digest] = loc
    return out


# --- chunking and packing -------------------------------------------------------


@dataclass(slots=True)
class _Job:
    file: SourceFile
    offset: int
    length: int


@dataclass(slots=True)
class _Result:
    digest: bytes
    size: int
    stored: bytes | None  # None: already known, nothing to store
    codec: Codec


class _Chunker:
    """Thread-side work: read, hash and (for new chunks) compress one chunk.

    Each thread reads into its own reusable buffer: a fresh 4 MiB ``bytes`` per
    chunk costs a page fault per 4 KiB page (and an unmap with TLB shootdowns
    when freed).  Measured here, a read-hash-compress loop over 512 MiB took
    118k faults and 0.46 s of system time with fresh buffers, 2 faults and
    0.06 s with a reused one (wall -28 %).  Only what is kept (the compressed
    bytes, or a copy of an incompressible chunk) is allocated.
    """

    def __init__(self, config: SeedConfig, known: set[bytes]) -> None:
        self.config = config
        self.known = known  # read-only from threads; extended on the loop thread
        self._local = threading.local()  # a ZstdCompressor is not thread-safe: one per thread

    def _compressor(self) -> zstandard.ZstdCompressor:
        c: zstandard.ZstdCompressor | None = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.config.zstd_level)
        return c

    def _buffer(self, n: int) -> memoryview:
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < n:
            buf = self._local.buf = bytearray(max(n, self.config.chunk_size))
        return memoryview(buf)[:n]

    def run(self, job: _Job) -> _Result:
        view = self._buffer(job.length)
        try:
            with open(job.file.source, "rb", buffering=0) as f:
                n = os.preadv(f.fileno(), [view], job.file.offset + job.offset)
        except OSError as exc:
            raise SeedError(f"cannot read {_show(job.file.source)}: {exc.strerror}") from exc
        if n != job.length:
            raise SeedError(f"{_show(job.file.source)} changed while being published (it shrank)")
        digest = blake3.blake3(view, max_threads=1).digest()
        if digest in self.known:
            return _Result(digest, n, None, Codec.NONE)
        packed = self._compressor().compress(view)
        if len(packed) <= n * (1.0 - self.config.min_saving):
            return _Result(digest, n, packed, Codec.ZSTD)
        return _Result(digest, n, bytes(view), Codec.NONE)


def keep_freed_memory() -> None:
    """Have glibc's malloc keep and reuse the memory of freed buffers (process-wide: the CLI calls it).

    Every compressed chunk is a fresh ~3 MiB ``bytes``, kept until its pack is sealed.
    glibc's default serves such sizes with ``mmap`` and gives the memory back at free
    (``munmap``, TLB shootdowns, new zeroed pages next time) until its adaptive
    threshold catches up.  Serving them from the heap, and not trimming it, reuses the
    pages: a 1 GiB seed took 5.6 instead of 6.2 CPU-s on the reference machine (median
    of 4 alternated runs).  A no-op where the C library has no ``mallopt``.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt(m_mmap_threshold, 32 * 1024 * 1024)  # the largest glibc accepts
    mallopt(m_trim_threshold, 1024 * 1024 * 1024)


def _jobs(files: list[SourceFile], chunk_size: int) -> Iterator[_Job]:
    for f in files:
        for off in range(0, f.size, chunk_size):
            yield _Job(f, off, min(chunk_size, f.size - off))


class _PackBuffers:
    """Page-aligned buffers that sealed packs are joined into, reused pack after pack.

    A fresh 64 MiB ``bytes`` per pack costs a page fault per 4 KiB page (as for the
    chunk buffers, see :class:`_Chunker`), and an aligned buffer lets the ``file://``
    origin write the pack with ``O_DIRECT`` instead of copying it into the page cache.
    At most ``upload_concurrency`` exist.  Used on the event loop thread only.
    """

    def __init__(self, size: int = 0) -> None:
        self.size = size  # the usual pack size: a buffer holds any pack up to it
        self._free: list[mmap.mmap] = []

    def take(self, n: int) -> mmap.mmap:
        while self._free:
            buf = self._free.pop()
            if len(buf) >= n:
                return buf
        # Private, not the default shared (shmem-backed) anonymous mapping.
        return mmap.mmap(-1, max(n, self.size, 1), flags=mmap.MAP_PRIVATE)

    def give(self, buf: mmap.mmap) -> None:
        self._free.append(buf)


def _join_and_hash(pieces: list[bytes], buf: mmap.mmap) -> bytes:
    """Copy ``pieces`` one after another into ``buf``; the BLAKE3 of what they fill.

    The copies go through ``ctypes.memmove``, which lets go of the GIL (a slice
    assignment holds it for the whole 64 MiB, and the chunk workers, each needing it
    back after every read, hash and compression, wait).
    """
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    at = 0
    for p in pieces:
        ctypes.memmove(base + at, p, len(p))
        at += len(p)
    return blake3.blake3(memoryview(buf)[:at], max_threads=1).digest()


@dataclass
class _Uploads:
    """Seals packs (join, digest) and uploads them in the background, at most ``limit`` at a time.

    Sealing runs off the event loop and off the publish loop's path: the loop goes on
    handing chunks to the workers while a pack is joined and hashed.
    """

    origin: Origin
    limit: asyncio.Semaphore
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    buffers: _PackBuffers = field(default_factory=_PackBuffers)
    uploaded: int = 0
    skipped: int = 0
    bytes_written: int = 0

    async def submit(self, pieces: list[bytes], size: int, sealed: Callable[[Pack], None]) -> None:
        """Seal ``pieces`` (``size`` bytes) into a pack, tell ``sealed`` which, and upload it."""
        # Acquire before creating the task: at most `limit` packs are in memory besides the open one.
        await self.limit.acquire()
        try:
            for t in [t for t in self.tasks if t.done()]:
                self.tasks.discard(t)
                t.result()  # surface a failed upload now
        except BaseException:
            self.limit.release()
            raise
        buf = self.buffers.take(size)
        self.tasks.add(asyncio.create_task(self._seal_and_upload(pieces, size, buf, sealed)))

    async def _seal_and_upload(
        self, pieces: list[bytes], size: int, buf: mmap.mmap, sealed: Callable[[Pack], None]
    ) -> None:
        reuse = True
        try:
            digest = await asyncio.to_thread(_join_and_hash, pieces, buf)
            pieces.clear()  # the pack's bytes are in buf now: free the chunks' own copies
            pack = Pack(digest, size)
            sealed(pack)
            if await self.origin.exists(pack.key):
                self.skipped += 1
                return
            await self.origin.write(pack.key, memoryview(buf)[:size])
            self.uploaded += 1
            self.bytes_written += size
        except asyncio.CancelledError:
            reuse = False  # a worker thread may still be copying into buf or writing from it
            raise
        finally:
            if reuse:
                self.buffers.give(buf)  # the origin has written or copied the bytes: reuse it
            self.limit.release()

    async def drain(self) -> None:
        if self.tasks:
            await asyncio.gather(*self.tasks)
            self.tasks.clear()

    def cancel(self) -> None:
        for t in self.tasks:
            t.cancel()


class _Packer:
    """Appends stored chunks to the open pack; a full pack is handed to the uploads to seal.

    The open pack is a list of the chunks' own ``bytes`` objects: they are copied
    once, into the sealed pack's reused buffer, in a worker thread (not on the event loop).
    A chunk's location is known once its pack is sealed; every one is before the manifest
    is built (after :meth:`_Uploads.drain`).
    """

    def __init__(self, builder: ManifestBuilder, uploads: _Uploads, pack_size: int) -> None:
        self.builder = builder
        self.uploads = uploads
        self.pack_size = pack_size
        self.pieces: list[bytes] = []
        self.size = 0
        self.pending: list[tuple[bytes, int, int, Codec, int]] = []  # digest, offset, stored, codec, size
        self.packed: set[bytes] = set()  # every chunk put in a pack by this run, sealed or not

    def has(self, digest: bytes) -> bool:
        return digest in self.packed or self.builder.location(digest) is not None

    async def add(self, r: _Result) -> None:
        assert r.stored is not None
        if self.size and self.size + len(r.stored) > self.pack_size:
            await self.seal()
        self.pending.append((r.digest, self.size, len(r.stored), r.codec, r.size))
        self.packed.add(r.digest)
        self.pieces.append(r.stored)
        self.size += len(r.stored)

    async def seal(self) -> None:
        if not self.size:
            return
        pieces, size, pending = self.pieces, self.size, self.pending
        self.pieces, self.size, self.pending = [], 0, []

        def sealed(pack: Pack) -> None:
            for d, off, stored, codec, n in pending:
                self.builder.locate(d, ChunkLocation(pack, off, stored, codec, n))

        await self.uploads.submit(pieces, size, sealed)


async def publish(
    origin: Origin,
    builder: ManifestBuilder,
    files: list[SourceFile],
    ref: Ref,
    config: SeedConfig = SeedConfig(),
    progress: ProgressReporter | None = None,
    annotations: dict[str, str] | None = None,
) -> SeedResult:
    """Chunk ``files`` into ``builder``, upload new packs, then the manifest, then the ref."""
    if ref.tag is None:
        raise UsageError(f"cannot publish to {ref}: give NAME[:TAG]")
    if not origin.writable:
        raise UsageError(f"{origin.url} is read-only: publish to a file:// or s3:// origin")
    progress = progress or NullProgress()
    t0 = time.monotonic()
    known = await known_chunks(origin)
    for d, loc in known.items():
        builder.locate(d, loc)
    chunker = _Chunker(config, set(known))
    workers = config.workers or (os.cpu_count() or 1)
    uploads = _Uploads(origin, asyncio.Semaphore(config.upload_concurrency), buffers=_PackBuffers(config.pack_size))
    packer = _Packer(builder, uploads, config.pack_size)
    digests: dict[bytes, list[bytes]] = {f.path: [] for f in files}
    total = sum(f.size for f in files)
    chunks_new = chunks_reused = bytes_new = 0
    progress.start(total)
    loop = asyncio.get_running_loop()
    # A window of 2 jobs per worker keeps every thread busy while the packer
    # drains results in order; memory is window x (chunk + compressed chunk).
    window = 2 * workers + 2
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lazyfs-seed")
    inflight: deque[tuple[asyncio.Future[_Result], bytes]] = deque()
    jobs = _jobs(files, config.chunk_size)
    try:
        while True:
            while len(inflight) < window:
                job = next(jobs, None)
                if job is None:
                    break
                inflight.append((loop.run_in_executor(pool, chunker.run, job), job.file.path))
            if not inflight:
                break
            fut, path = inflight.popleft()
            r = await fut
            digests[path].append(r.digest)  # results are consumed in submission (= file) order
            if r.stored is None or packer.has(r.digest):
                chunks_reused += 1
            else:
                chunks_new += 1
                bytes_new += r.size
                chunker.known.add(r.digest)
                await packer.add(r)
            progress.advance(r.size)
        await packer.seal()
        await uploads.drain()
    except BaseException:
        for f, _ in inflight:
            f.cancel()
        uploads.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        progress.finish()

    for sf in files:
        entry = builder.get(sf.path)
        assert entry is not None
        builder.add(entry, digests[sf.path])
    manifest = builder.build(annotations)
    data = await asyncio.to_thread(encode, manifest)
    digest = digest_of(data)
    key = f"manifests/{digest}"
    if not await origin.exists(key):
        await origin.write(key, data)
    await origin.write(ref.key, (digest + "\n").encode())
    return SeedResult(
        digest=digest,
        ref=ref,
        manifest=manifest,
        files=sum(1 for e in manifest.entries if e.type is EntryType.REG),
        bytes_total=total,
        bytes_new=bytes_new,
        bytes_uploaded=uploads.bytes_written,
        packs_uploaded=uploads.uploaded,
        packs_skipped=uploads.skipped,
        chunks_new=chunks_new,
        chunks_reused=chunks_reused,
        seconds=time.monotonic() - t0,
    )


async def seed(
    src: Path,
    origin: Origin,
    ref: Ref,
    config: SeedConfig = SeedConfig(),
    progress: ProgressReporter | None = None,
) -> SeedResult:
    """Publish the directory or file ``src`` to ``origin`` under ``ref`` (``name:tag``)."""
    builder = ManifestBuilder(config.chunk_size)
    try:
        files = await asyncio.to_thread(scan_tree, src, builder)
    except LazyfsError:
        raise
    except OSError as exc:
        raise SeedError(f"cannot read {_show(exc.filename or src)}: {exc.strerror}") from exc
    return await publish(origin, builder, files, ref, config, progress)
