"""ChunkFetcher: every byte a mount serves comes through here.

For one manifest, :meth:`ChunkFetcher.get` returns the verified raw bytes of a
chunk, trying tiers in order:

1. a small in-memory LRU (a 4 MiB chunk is read by the kernel as several
   1 MiB requests; they must not each touch the disk);
2. the local cache (:mod:`lazyfs.store`): raw chunks already verified once,
   checked again with xxh3 by the store;
3. extra sources injected by the daemon (the peer tier), each answer verified;
4. the origin: range GETs of packs, adjacent chunks coalesced into one
   request, decompressed and verified (BLAKE3) in a thread pool.

Guarantees:

* **single-flight** — concurrent ``get`` calls for one chunk share one fetch;
* **integrity** — bytes that fail verification are counted, logged, never
  returned, never cached; the chunk is fetched again (bounded attempts);
* **priorities** — queued origin work is dispatched best-first:
  ``DEMAND`` (a blocked reader) before ``READAHEAD`` before ``BACKGROUND``; a
  demand read joining a queued read-ahead promotes it;
* **bounded** — at most ``max_requests`` origin requests and
  ``max_inflight_bytes`` stored bytes in flight, a bounded write-back queue;
* **deadlines** — ``get`` raises :class:`DeadlineError` when its deadline
  passes (the FUSE adapter answers EIO), whatever the origin does;
* **write-back** — verified chunks are written to the cache in the background;
  a reader never waits for the disk write.  A cache failure is a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import blake3
import zstandard

from lazyfs.errors import (
    DeadlineError,
    IntegrityError,
    LazyfsError,
    OriginError,
    UnavailableError,
)
from lazyfs.manifest import Chunk, Codec, Manifest
from lazyfs.origin.base import Origin

__all__ = [
    "ChunkCache",
    "ChunkFetcher",
    "ChunkSource",
    "Data",
    "FetchConfig",
    "FetchStatistics",
    "Priority",
    "Verifier",
    "decode_chunk",
    "unpack_zstd",
    "zstd_frame_end",
]

log = logging.getLogger(__name__)
MiB = 1024 * 1024


class Priority(enum.IntEnum):
    DEMAND = 0  # a reader is blocked on it
    READAHEAD = 1  # a sequential reader will want it soon
    BACKGROUND = 2  # warming (prefetch command, startup traces)


# A chunk's bytes: ``bytes``, or the ``bytearray`` a peer's answer was received into (p2p.client
# reads bodies straight into their final buffer; nothing writes to it once it is returned).
Data = bytes | bytearray


class ChunkCache(Protocol):
    """What the fetcher needs from the local cache (blocking; called in a thread)."""

    def read(self, digest: bytes, offset: int = 0, length: int | None = None) -> bytes | None: ...

    def put(self, digest: bytes, data: Data) -> bool: ...

    def path_of(self, digest: bytes) -> Path | None: ...


# Checks candidate bytes for a chunk off the event loop: returns them, or raises IntegrityError.
Verifier = Callable[[Chunk, Data], Awaitable[Data]]


class ChunkSource(Protocol):
    """An extra tier between the cache and the origin (the peer tier).

    ``fetch`` returns the verified raw bytes of ``chunk`` or ``None`` when it
    cannot serve it before ``deadline`` (a ``loop.time()`` value); ``priority``
    is the reader's (a peer schedules its own origin fetches by it).  Every answer
    it gets from elsewhere goes through ``verify`` (supplied by the fetcher,
    which counts failures) before it is returned, so a source that asks several
    untrusted peers can move on to the next one after bad bytes.
    """

    name: str

    async def fetch(self, chunk: Chunk, priority: Priority, deadline: float, verify: Verifier) -> Data | None: ...


@dataclass(frozen=True, slots=True)
class FetchConfig:
    # The deadline of a blocked read; past it the reader gets EIO instead of hanging.
    read_timeout: float = 30.0
    # Parallel origin requests: enough to fill a 10-25 Gbit/s link with 4-16 MiB ranges.
    max_requests: int = 16
    # Stored bytes in flight from the origin; bounds memory whatever the read-ahead asks for.
    max_inflight_bytes: int = 256 * MiB
    # Largest coalesced range GET: 4 chunks of 4 MiB amortise request latency, yet a
    # demand read never waits behind a huge transfer.
    coalesce_bytes: int = 16 * MiB
    # Recently used chunks kept in RAM (the kernel reads a 4 MiB chunk in 1 MiB slices).
    # At least twice the read-ahead window (128 MiB): read-ahead puts up to a window of chunks
    # here before the reader gets to them, and with room for only one window the LRU evicted
    # the chunk needed next, so it was read again (measured: a warm 256 MiB read did 112 cache
    # reads for 65 chunks and ran at 218-307 MB/s; with 256 MiB, 65 reads and ~600 MB/s).
    memory_bytes: int = 256 * MiB
    # Verified chunks waiting to be written to the cache before fetching slows down.
    writeback_bytes: int = 256 * MiB
    # Attempts per chunk for bad bytes from the origin (corruption is rare; persistent
    # corruption means the origin is broken and retrying forever helps nobody).
    verify_attempts: int = 3
    # Backoff between retries of a failed origin request.
    retry_initial: float = 0.05
    retry_max: float = 2.0
    # Threads for hashing, decompression and cache I/O (they release the GIL).
    threads: int = 8


@dataclass(frozen=True, slots=True)
class FetchStatistics:
    requests: int  # get() calls
    memory_hits: int
    cache_hits: int
    cache_misses: int
    bytes_from_memory: int
    bytes_from_cache: int
    bytes_from_peers: int
    bytes_from_origin: int  # stored (wire) bytes
    origin_requests: int
    origin_errors: int
    peer_errors: int
    verify_failures: int
    deadline_failures: int
    inflight_chunks: int
    queued_chunks: int
    writeback_pending: int
    cache_write_errors: int


def decode_chunk(chunk: Chunk, stored: bytes | memoryview) -> bytes:
    """Decompress (if needed) and verify stored bytes; raises IntegrityError on any mismatch.

    ``stored`` may be a view into a larger (coalesced) response: a compressed chunk is
    decompressed straight from it, an uncompressed one is copied out so the result does not
    keep the whole response alive.
    """
    if len(stored) != chunk.stored_size:
        raise IntegrityError(
            f"chunk {chunk.digest.hex()[:16]}: {len(stored)} stored bytes, expected {chunk.stored_size}"
        )
    if chunk.codec is Codec.ZSTD:
        raw = unpack_zstd(chunk, stored, "")
    else:
        raw = stored if isinstance(stored, bytes) else bytes(stored)
    check_chunk(chunk, raw)
    return raw


def unpack_zstd(chunk: Chunk, packed: bytes | memoryview, source: str) -> bytes:
    """Decompress one untrusted zstd frame of ``chunk`` (still to be verified); IntegrityError if bad.

    zstandard honours ``max_output_size`` only for frames that do not declare their size, and
    allocates whatever size a frame declares: a 17-byte frame can declare 2^50 bytes.  So a
    declared size must be the chunk's own before anything is decompressed.  ``source`` names
    where the frame came from in the message (" from a peer").
    """
    name = chunk.digest.hex()[:16]
    try:
        declared = zstandard.frame_content_size(packed)
        if declared not in (-1, chunk.size):
            raise IntegrityError(f"chunk {name}: a zstd frame{source} declares {declared} bytes, not {chunk.size}")
        raw: bytes = zstandard.ZstdDecompressor().decompress(packed, max_output_size=chunk.size)
    except (zstandard.ZstdError, MemoryError) as exc:
        raise IntegrityError(f"chunk {name}: bad zstd data{source}: {exc}") from exc
    if len(raw) != chunk.size:
        raise IntegrityError(f"chunk {name}: {len(raw)} bytes decompressed{source}, not {chunk.size}")
    # zstandard stops at the end of the first frame and ignores what follows.  The stored bytes
    # are kept and sent on to peers as the chunk's frame (Fetcher.keep_stored): nothing in them
    # may be left unchecked by the decoding and the digest.
    end = zstd_frame_end(packed)
    if end < 0:
        raise IntegrityError(f"chunk {name}: malformed zstd frame{source}")
    if end != len(packed):
        raise IntegrityError(f"chunk {name}: {len(packed) - end} bytes after its zstd frame{source}")
    return raw


def zstd_frame_end(data: bytes | memoryview) -> int:
    """Where the zstd frame at the start of ``data`` ends (its blocks walked, RFC 8878 3.1.1).

    For a frame the decoder has just accepted; anything malformed gives ``-1``.
    """
    view = memoryview(data)
    try:
        pos = zstandard.frame_header_size(data)
        has_checksum = bool(view[4] & 0x04)  # Frame_Header_Descriptor, Content_Checksum_flag
    except (zstandard.ZstdError, IndexError):
        return -1
    while pos + 3 <= len(view):
        header = int.from_bytes(view[pos : pos + 3], "little")
        kind, size = (header >> 1) & 3, header >> 3
        if kind == 3:
            return -1  # reserved block type
        pos += 3 + (1 if kind == 1 else size)  # an RLE block stores its one byte
        if header & 1:  # Last_Block
            end = pos + (4 if has_checksum else 0)
            return end if end <= len(view) else -1
    return -1


def check_chunk(chunk: Chunk, raw: Data) -> None:
    """IntegrityError unless ``raw`` is exactly the chunk (its size and BLAKE3 digest)."""
    if len(raw) != chunk.size or blake3.blake3(raw, max_threads=1).digest() != chunk.digest:
        raise IntegrityError(f"chunk {chunk.digest.hex()[:16]}: content does not match its digest")


@dataclass(eq=False)
class _Flight:
    index: int
    future: asyncio.Future[Data]
    priority: Priority
    seq: int
    attempts: int = 0
    queued: bool = False
    task: asyncio.Task[None] | None = None
    # False once a caller that must not cause peer traffic joined (the peer server):
    # a chunk asked for by a peer is fetched from the cache or the origin, never
    # forwarded to another peer, so two nodes can never wait on each other.
    use_sources: bool = True
    source_task: asyncio.Task[Data | None] | None = None
    # Failed origin requests for this chunk (with sources, each failure goes back
    # through the sources: another node may hold the chunk while the origin is down).
    origin_failures: int = 0
    started: float = 0.0


@dataclass
class _Counters:
    requests: int = 0
    memory_hits: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    bytes_from_memory: int = 0
    bytes_from_cache: int = 0
    bytes_from_peers: int = 0
    bytes_from_origin: int = 0
    origin_requests: int = 0
    origin_errors: int = 0
    peer_errors: int = 0
    verify_failures: int = 0
    deadline_failures: int = 0
    cache_write_errors: int = 0


class ChunkFetcher:
    def __init__(
        self,
        manifest: Manifest,
        origin: Origin,
        cache: ChunkCache | None = None,
        config: FetchConfig = FetchConfig(),
        sources: Sequence[ChunkSource] = (),
        executor: Executor | None = None,
    ) -> None:
        self.manifest = manifest
        self.origin = origin
        self.cache = cache
        self.config = config
        self.sources = list(sources)
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(config.threads, thread_name_prefix="lazyfs-fetch")
        self._flights: dict[int, _Flight] = {}
        self._queue: dict[int, _Flight] = {}  # waiting for an origin request
        self._seq = itertools.count()
        self._memory: OrderedDict[int, Data] = OrderedDict()
        self._memory_bytes = 0
        # Compressed chunks as the origin sent them, for a peer server that would otherwise
        # compress them again (take_stored); none kept unless one asks (keep_stored).
        self._stored: OrderedDict[bytes, bytes] = OrderedDict()  # digest -> frame
        self._stored_bytes = 0
        self._stored_budget = 0
        self._active_requests = 0
        self._inflight_bytes = 0
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writeback_bytes = 0
        self._writebacks: dict[int, asyncio.Task[None]] = {}
        self._writeback_room = asyncio.Condition()
        # Cache writes take at most half the threads: the other half always serves cache
        # reads, even while writes wait on a slow disk or the cache's node-wide lock.
        self._put_slots = asyncio.Semaphore(max(1, config.threads // 2))
        self._c = _Counters()
        self._closed = False
        self._origin_ok = True
        self._index_of = {c.digest: i for i, c in enumerate(manifest.chunks)}
        # (pack, offset) -> chunk index: finds the neighbours of a chunk inside its pack.
        self._at: dict[tuple[int, int], int] = {(c.pack, c.offset): i for i, c in enumerate(manifest.chunks)}
        self._end: dict[tuple[int, int], int] = {
            (c.pack, c.offset + c.stored_size): i for i, c in enumerate(manifest.chunks)
        }

    # -- public API ------------------------------------------------------------

    async def get(
        self,
        index: int,
        priority: Priority = Priority.DEMAND,
        deadline: float | None = None,
        *,
        use_sources: bool = True,
    ) -> Data:
        """Verified raw bytes of chunk ``index``; ``deadline`` is a ``loop.time()`` value.

        ``use_sources=False`` skips the extra sources (the peer tier) for this chunk:
        the peer server asks this way, so a request from a peer never becomes a
        request to another peer.
        """
        self._c.requests += 1
        data = self._memory_get(index)
        if data is not None:
            return data
        flight = self._start(index, priority, use_sources)
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.config.read_timeout
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(flight.future)
        except TimeoutError:
            self._c.deadline_failures += 1
            chunk = self.manifest.chunks[index]
            raise DeadlineError(
                f"chunk {chunk.digest.hex()[:16]} could not be fetched within the read deadline"
            ) from None

    async def cached_path(self, index: int, priority: Priority = Priority.DEMAND) -> str | None:
        """Fetch chunk ``index`` and return the path of its raw file in the cache once written.

        ``None`` when the chunk could not be cached (no cache, write-back skipped or failed):
        the caller reads it through the mount instead.  This is how the loader's fast path
        reads verified chunks straight from the cache.
        """
        await self.get(index, priority)
        task = self._writebacks.get(index)
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), self.config.read_timeout)
            except TimeoutError:
                # The write is stuck (a dead disk, a stopped holder of the cache lock): the
                # bytes are in memory, so the caller reads them through the mount.
                return None
        if self.cache is None:
            return None
        loop = asyncio.get_running_loop()
        try:
            path = await loop.run_in_executor(self._executor, self.cache.path_of, self.manifest.chunks[index].digest)
        except Exception as exc:  # a broken cache is a miss, never a crash
            log.warning("cache lookup of chunk %d failed: %s", index, exc)
            return None
        return None if path is None else str(path)

    def keep_stored(self, budget: int) -> None:
        """From now on keep up to ``budget`` bytes of compressed chunks as the origin sent them,
        the most recent, for :meth:`take_stored` (a peer server sends chunks compressed)."""
        self._stored_budget = budget

    def take_stored(self, index: int) -> bytes | None:
        """The zstd frame the origin sent for chunk ``index`` (verified: it decoded to the chunk),
        if still kept; handed over once."""
        data = self._stored.pop(self.manifest.chunks[index].digest, None)
        if data is not None:
            self._stored_bytes -= len(data)
        return data

    def _keep_stored_copy(self, digest: bytes, piece: bytes | memoryview) -> None:
        data = piece if isinstance(piece, bytes) else bytes(piece)  # a view would keep the whole response
        old = self._stored.pop(digest, None)
        if old is not None:
            self._stored_bytes -= len(old)
        self._stored[digest] = data
        self._stored_bytes += len(data)
        while self._stored_bytes > self._stored_budget:
            _, dropped = self._stored.popitem(last=False)
            self._stored_bytes -= len(dropped)

    def prefetch_nowait(self, indices: Iterable[int], priority: Priority = Priority.READAHEAD) -> int:
        """Start fetching ``indices`` (those not in memory or in flight); returns how many started."""
        started = 0
        for i in indices:
            if i in self._memory or i in self._flights:
                continue
            self._start(i, priority)
            started += 1
        return started

    async def wait_idle(self) -> None:
        """Wait until no fetch and no cache write is in progress (tests, shutdown)."""
        while self._flights or self._tasks:
            await asyncio.gather(*[f.future for f in self._flights.values()], *self._tasks, return_exceptions=True)
            await asyncio.sleep(0)

    async def aclose(self) -> None:
        self._closed = True
        for f in list(self._flights.values()):
            if f.task is not None:
                f.task.cancel()
            if not f.future.done():
                f.future.set_exception(UnavailableError("the filesystem is shutting down"))
                f.future.exception()  # mark retrieved
        self._flights.clear()
        self._queue.clear()
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        # Let pending cache writes finish: they are what the next start hits.
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._own_executor:
            self._executor.shutdown(wait=True)

    def statistics(self) -> FetchStatistics:
        c = self._c
        return FetchStatistics(
            requests=c.requests,
            memory_hits=c.memory_hits,
            cache_hits=c.cache_hits,
            cache_misses=c.cache_misses,
            bytes_from_memory=c.bytes_from_memory,
            bytes_from_cache=c.bytes_from_cache,
            bytes_from_peers=c.bytes_from_peers,
            bytes_from_origin=c.bytes_from_origin,
            origin_requests=c.origin_requests,
            origin_errors=c.origin_errors,
            peer_errors=c.peer_errors,
            verify_failures=c.verify_failures,
            deadline_failures=c.deadline_failures,
            inflight_chunks=len(self._flights),
            queued_chunks=len(self._queue),
            writeback_pending=self._writeback_bytes,
            cache_write_errors=c.cache_write_errors,
        )

    # -- memory tier -----------------------------------------------------------

    def _memory_get(self, index: int) -> Data | None:
        data = self._memory.get(index)
        if data is not None:
            self._memory.move_to_end(index)
            self._c.memory_hits += 1
            self._c.bytes_from_memory += len(data)
        return data

    def consumed(self, index: int) -> None:
        """A reader has read chunk ``index`` to its end: keep it in memory only while nothing else
        needs the room (it goes to the cold end of the LRU; a later use warms it again).

        The kernel's page cache now holds those bytes.  Plain LRU had it backwards for a
        sequential reader: each 1 MiB read refreshed the chunk just finished, and the chunks
        read ahead of it, older, were evicted first.  On a node that also serves peers, which
        fills memory with chunks for others, up to a quarter of a 1 GiB read came back from the disk.
        """
        if index in self._memory:
            self._memory.move_to_end(index, last=False)

    def _memory_put(self, index: int, data: Data) -> None:
        if index in self._memory or len(data) > self.config.memory_bytes:
            return
        self._memory[index] = data
        self._memory_bytes += len(data)
        while self._memory_bytes > self.config.memory_bytes:
            _, old = self._memory.popitem(last=False)
            self._memory_bytes -= len(old)

    # -- flights ---------------------------------------------------------------

    @property
    def origin_available(self) -> bool:
        """False from a failed origin request until the next one succeeds (the peer tier asks)."""
        return self._origin_ok

    async def cached(self, index: int) -> Data | None:
        """Chunk ``index`` if it is in memory or in the cache, without fetching it."""
        data = self._memory_get(index)
        if data is not None or self.cache is None:
            return data
        loop = asyncio.get_running_loop()
        digest = self.manifest.chunks[index].digest
        try:
            data = await loop.run_in_executor(self._executor, self.cache.read, digest, 0, None)
        except Exception as exc:  # a broken cache is a miss, never a crash
            log.warning("cache read of %s failed: %s", digest.hex()[:16], exc)
            return None
        return data if data is not None and len(data) == self.manifest.chunks[index].size else None

    def index_of(self, digest: bytes) -> int | None:
        """The index of the chunk with this digest in the manifest, if it has one."""
        return self._index_of.get(digest)

    def _start(self, index: int, priority: Priority, use_sources: bool = True) -> _Flight:
        if self._closed:
            raise UnavailableError("the filesystem is shutting down")
        flight = self._flights.get(index)
        if flight is not None:
            if not use_sources and flight.use_sources:
                # A peer asks because it takes this node for the chunk's home.  If this flight is
                # waiting on a peer itself, stop that: two nodes must never wait on each other.
                flight.use_sources = False
                if flight.source_task is not None:
                    flight.source_task.cancel()
            if priority < flight.priority:
                flight.priority = priority  # a demand read promotes a queued read-ahead
                if flight.queued:
                    self._wakeup.set()
            return flight
        loop = asyncio.get_running_loop()
        flight = _Flight(
            index, loop.create_future(), priority, next(self._seq), use_sources=use_sources, started=loop.time()
        )
        self._flights[index] = flight
        flight.task = asyncio.create_task(self._resolve(flight))
        return flight

    def _finish(self, flight: _Flight, data: Data | None = None, exc: BaseException | None = None) -> None:
        if self._flights.get(flight.index) is flight:
            del self._flights[flight.index]
        self._queue.pop(flight.index, None)
        if flight.future.done():
            return
        if exc is not None:
            flight.future.set_exception(exc)
            flight.future.exception()  # nobody may be waiting (read-ahead): don't warn
        else:
            assert data is not None
            self._memory_put(flight.index, data)
            flight.future.set_result(data)

    async def _resolve(self, flight: _Flight) -> None:
        chunk = self.manifest.chunks[flight.index]
        loop = asyncio.get_running_loop()
        data: Data | None
        try:
            if self.cache is not None:
                try:
                    data = await loop.run_in_executor(self._executor, self.cache.read, chunk.digest, 0, None)
                except Exception as exc:  # a broken cache is a miss, never a crash
                    log.warning("cache read of %s failed: %s", chunk.digest.hex()[:16], exc)
                    data = None
                if data is not None and len(data) == chunk.size:
                    self._c.cache_hits += 1
                    self._c.bytes_from_cache += len(data)
                    self._finish(flight, data)
                    return
                self._c.cache_misses += 1
            for source in self.sources:
                if not flight.use_sources:
                    break
                ask = asyncio.create_task(self._from_source(source, chunk, flight.priority))
                flight.source_task = ask
                try:
                    data = await ask
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise  # the flight itself is cancelled (shutdown)
                    break  # a peer asked for this chunk: stop asking peers, fetch it from the origin
                finally:
                    flight.source_task = None
                if data is not None:
                    self._finish(flight, data)
                    self._write_back(chunk, data)
                    return
            self._enqueue(flight)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("fetching chunk %d failed unexpectedly", flight.index)
            self._finish(flight, exc=exc)

    async def _from_source(self, source: ChunkSource, chunk: Chunk, priority: Priority) -> Data | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.read_timeout
        try:
            data = await source.fetch(chunk, priority, deadline, self._verify)
        except LazyfsError as exc:
            self._c.peer_errors += 1
            log.info("%s could not serve %s: %s", source.name, chunk.digest.hex()[:16], exc)
            return None
        except Exception as exc:  # a bug in a source must cost a miss, not the read: the origin is next
            self._c.peer_errors += 1
            log.warning("%s failed on %s: %s: %s", source.name, chunk.digest.hex()[:16], type(exc).__name__, exc)
            return None
        if data is None:
            return None
        if len(data) != chunk.size:  # a source that skipped verify: never trust it
            self._c.peer_errors += 1
            log.warning("%s returned %d bytes for a %d-byte chunk", source.name, len(data), chunk.size)
            return None
        self._c.bytes_from_peers += len(data)
        return data

    async def _verify(self, chunk: Chunk, raw: Data) -> Data:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, check_chunk, chunk, raw)
        except IntegrityError:
            self._c.verify_failures += 1
            raise
        return raw

    # -- origin scheduling -----------------------------------------------------

    def _enqueue(self, flight: _Flight) -> None:
        flight.queued = True
        self._queue[flight.index] = flight
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch())
        self._wakeup.set()

    async def _dispatch(self) -> None:
        while not self._closed:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue and self._active_requests < self.config.max_requests:
                best = min(self._queue.values(), key=lambda f: (f.priority, f.seq))
                run = self._coalesce(best)
                size = sum(self.manifest.chunks[f.index].stored_size for f in run)
                # Always let one request through, however large, so progress is guaranteed.
                if self._active_requests and self._inflight_bytes + size > self.config.max_inflight_bytes:
                    break
                for f in run:
                    del self._queue[f.index]
                    f.queued = False
                self._active_requests += 1
                self._inflight_bytes += size
                task = asyncio.create_task(self._origin_request(run, size))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _coalesce(self, first: _Flight) -> list[_Flight]:
        """``first`` plus queued chunks stored right before/after it in the same pack."""
        chunks = self.manifest.chunks
        c = chunks[first.index]
        run = [first]
        total = c.stored_size
        # forward
        nxt = self._at.get((c.pack, c.offset + c.stored_size))
        while nxt is not None and nxt in self._queue:
            n = chunks[nxt]
            if total + n.stored_size > self.config.coalesce_bytes:
                break
            run.append(self._queue[nxt])
            total += n.stored_size
            nxt = self._at.get((n.pack, n.offset + n.stored_size))
        # backward
        prv = self._end.get((c.pack, c.offset))
        while prv is not None and prv in self._queue:
            p = chunks[prv]
            if total + p.stored_size > self.config.coalesce_bytes:
                break
            run.insert(0, self._queue[prv])
            total += p.stored_size
            prv = self._end.get((p.pack, p.offset))
        return run

    async def _origin_request(self, run: list[_Flight], size: int) -> None:
        chunks = self.manifest.chunks
        first = chunks[run[0].index]
        pack = self.manifest.packs[first.pack]
        loop = asyncio.get_running_loop()
        # With sources (peers) a failed request is not retried here: each chunk goes back
        # through the sources first, since another node may hold it while the origin is down.
        retry = not self.sources
        try:
            data = await self._read_with_retry(pack.key, first.offset, size, retry=retry)
        except BaseException as exc:
            self._release(size)
            self._origin_ok = self._origin_ok and not isinstance(exc, UnavailableError)
            if isinstance(exc, UnavailableError) and not retry:
                for f in run:
                    self._retry_later(f, exc)
                return
            for f in run:
                self._finish(f, exc=exc if isinstance(exc, Exception) else UnavailableError("cancelled"))
            if not isinstance(exc, Exception):
                raise
            return
        self._release(size)
        self._origin_ok = True
        self._c.bytes_from_origin += len(data)
        # Slices of a coalesced response are views, not copies: most chunks are compressed and
        # are decompressed straight from the view (one copy less of every byte from the origin).
        view = memoryview(data) if len(run) > 1 else None
        pos = 0
        for f in run:
            c = chunks[f.index]
            piece = data if view is None else view[pos : pos + c.stored_size]
            pos += c.stored_size
            try:
                raw = await loop.run_in_executor(self._executor, decode_chunk, c, piece)
            except IntegrityError as exc:
                self._c.verify_failures += 1
                f.attempts += 1
                log.warning("origin sent bad bytes for chunk %d (attempt %d): %s", f.index, f.attempts, exc)
                if f.attempts >= self.config.verify_attempts:
                    self._finish(f, exc=exc)
                else:
                    self._enqueue(f)
                continue
            self._finish(f, raw)
            self._write_back(c, raw)
            if self._stored_budget and c.codec is Codec.ZSTD:
                self._keep_stored_copy(c.digest, piece)

    def _retry_later(self, flight: _Flight, exc: UnavailableError) -> None:
        """After a failed origin request: back off, then resolve ``flight`` again (sources first)."""
        flight.queued = False
        if self._queue.get(flight.index) is flight:
            del self._queue[flight.index]
        loop = asyncio.get_running_loop()
        delay = min(self.config.retry_initial * 2**flight.origin_failures, self.config.retry_max)
        flight.origin_failures += 1
        if loop.time() + delay >= flight.started + self.config.read_timeout:
            self._finish(flight, exc=exc)
            return
        log.info("origin read of chunk %d failed (%s); retrying in %.2f s", flight.index, exc, delay)

        async def again() -> None:
            await asyncio.sleep(delay)
            if not flight.future.done():
                await self._resolve(flight)

        flight.task = asyncio.create_task(again())

    def _release(self, size: int) -> None:
        self._active_requests -= 1
        self._inflight_bytes -= size
        self._wakeup.set()

    async def _read_with_retry(self, key: str, start: int, length: int, retry: bool = True) -> bytes:
        """One range read, retried with exponential backoff until ``read_timeout`` has passed."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.config.read_timeout
        delay = self.config.retry_initial
        while True:
            self._c.origin_requests += 1
            try:
                async with asyncio.timeout_at(give_up):
                    data = await self.origin.read(key, start, length)
                if len(data) == length:
                    return data
                raise UnavailableError(f"{key}: short read ({len(data)} of {length} bytes)")
            except TimeoutError:
                self._c.origin_errors += 1
                raise UnavailableError(f"{key}: the origin did not answer in time") from None
            except UnavailableError as exc:
                self._c.origin_errors += 1
                if not retry or loop.time() + delay >= give_up:
                    raise
                log.info("origin read of %s failed (%s); retrying in %.2f s", key, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.retry_max)
            except OriginError:
                self._c.origin_errors += 1  # not found, access denied: retrying cannot help
                raise

    # -- write-back ------------------------------------------------------------

    def _write_back(self, chunk: Chunk, data: Data) -> None:
        if self.cache is None:
            return
        if self._writeback_bytes + len(data) > self.config.writeback_bytes:
            # The disk is far behind; skipping a cache write costs a refetch later, not correctness.
            log.info("cache write-back queue full; not caching %s", chunk.digest.hex()[:16])
            return
        self._writeback_bytes += len(data)
        task = asyncio.create_task(self._put(chunk, data))
        self._tasks.add(task)
        index = self._index_of.get(chunk.digest)
        if index is not None:
            self._writebacks[index] = task

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if index is not None and self._writebacks.get(index) is t:
                del self._writebacks[index]

        task.add_done_callback(done)

    async def _put(self, chunk: Chunk, data: Data) -> None:
        cache = self.cache
        assert cache is not None
        loop = asyncio.get_running_loop()
        try:
            async with self._put_slots:
                await loop.run_in_executor(self._executor, cache.put, chunk.digest, data)
        except Exception as exc:
            self._c.cache_write_errors += 1
            log.warning("could not write chunk %s to the cache: %s", chunk.digest.hex()[:16], exc)
        finally:
            self._writeback_bytes -= len(data)
