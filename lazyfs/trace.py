"""Startup traces: the chunks a start needed, in the order it needed them, replayed on the next start.

A container (or model server) start reads the same few percent of its image every time, one
small file after another; on a cold node each of those reads waits for a round trip to the
origin.  A trace turns that chain of waits into one parallel prefetch:

* **Recording** (``lazyfs mount --record-trace``, ``lazyfs run --record-trace``):
  :class:`TraceRecorder` notes the chunk index of every read that reaches the filesystem
  (FUSE reads and the loader's read plans), each chunk once, in first-access order, with the
  milliseconds since the recording began.  Cache hits count too: the trace says what a start
  *needs*, not what this node happened to miss.
* **Publishing**: on unmount (or ``lazyfs trace publish MOUNTPOINT``) the trace is written to
  the origin at ``traces/<manifest digest>``, next to ``manifests/<digest>``.  Only writable
  origins (``file://``, ``s3://``) take it; recording with a read-only ``http(s)://`` origin is
  refused when the mount starts.
* **Replay**: every mount of the manifest fetches ``traces/<digest>`` in the background (one
  small read; a missing trace costs nothing, a corrupt one is a warning and is ignored) and
  fetches its chunks in the recorded order at :attr:`~lazyfs.fetch.Priority.READAHEAD` —
  below every demand read, which also promotes a queued chunk it joins — with at most
  :data:`REPLAY_WINDOW` chunks / :data:`REPLAY_WINDOW_BYTES` bytes in flight, so a replay
  never floods memory or the link.  Chunks already in the local cache are skipped without
  being read.  ``lazyfs prefetch MOUNTPOINT --trace`` replays on demand, with progress.

Format (version 1), one canonical msgpack array::

    [b"lazyfs-trace", 1, manifest digest (32 bytes), [chunk index, ...], [ms, ...]]

Decoding treats the bytes as hostile (like the manifest codec): a size limit, types and
ranges checked, chunk indices unique and inside the manifest, times non-decreasing, and
only the canonical encoding is accepted.  A trace can at worst make a node prefetch chunks
it does not need: every chunk is still verified against the manifest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from lazyfs.errors import LazyfsError, NotFoundError, OriginError, TraceError, UsageError
from lazyfs.fetch import ChunkFetcher, Data, Priority
from lazyfs.manifest import Manifest
from lazyfs.origin.base import Origin

__all__ = [
    "LIMITS",
    "REPLAY_WINDOW",
    "REPLAY_WINDOW_BYTES",
    "ReplayStoppedError",
    "StartupTraces",
    "Trace",
    "TraceLimits",
    "TraceRecorder",
    "decode",
    "encode",
    "load_trace",
    "trace_key",
]

log = logging.getLogger(__name__)

MAGIC = b"lazyfs-trace"
FORMAT_VERSION = 1
DIGEST_SIZE = 32
MiB = 1024 * 1024
# Chunks of a replay in flight at once: enough to keep 16 origin connections busy with
# small files (one round trip each) and to let adjacent chunks coalesce into one range GET.
REPLAY_WINDOW = 64
# ... and bytes: 64 MiB stays far below the fetcher's memory and in-flight budgets (256 MiB),
# so demand reads and read-ahead always find room.
REPLAY_WINDOW_BYTES = 64 * MiB
# A replay that fails this many chunks in a row stops: the origin is down, and every
# further attempt would only wait out another read deadline.
REPLAY_MAX_FAILURES = 8
# How long unmount waits for the trace upload before giving up (logged).
PUBLISH_TIMEOUT = 60.0
# Cache lookups are batched into one thread hop each this many chunks.
_LOOKUP_BATCH = 4096


class TraceLimits:
    """Upper bounds the decoder enforces: generous for any real start, fatal for bombs."""

    # ~10 bytes a chunk: a million chunks (4 TB at 4 MiB) fit in 16 MiB.
    max_bytes = 16 * MiB
    max_chunks = 1_000_000
    # 2^32 ms is 49 days: far longer than any start.
    max_ms = (1 << 32) - 1
    # The largest chunk index when the manifest is not known (the manifest codec's limit).
    max_index = 16_000_000


LIMITS = TraceLimits()


@dataclass(frozen=True, slots=True)
class Trace:
    """What one start read: chunk indices of ``manifest`` in first-access order."""

    manifest: str  # hex digest of the manifest the indices refer to
    chunks: tuple[int, ...]  # each index once, in the order the chunks were first needed
    times_ms: tuple[int, ...]  # when each was first needed, ms after the recording began

    def __post_init__(self) -> None:
        if len(self.chunks) != len(self.times_ms):
            raise ValueError("a trace needs one time per chunk")


def trace_key(digest: str) -> str:
    """Where the trace of manifest ``digest`` lives at an origin."""
    return f"traces/{digest}"


def _pack(trace: Trace) -> bytes:
    obj = [MAGIC, FORMAT_VERSION, bytes.fromhex(trace.manifest), list(trace.chunks), list(trace.times_ms)]
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def encode(trace: Trace, limits: TraceLimits = LIMITS) -> bytes:
    """Canonical bytes of ``trace``; validated, so an invalid trace is never published."""
    try:
        data = _pack(trace)
    except ValueError as exc:  # a digest that is not hex
        raise TraceError(f"cannot encode the trace: {exc}") from exc
    decode(data, limits=limits)
    return data


def decode(
    data: bytes,
    manifest: str | None = None,
    n_chunks: int | None = None,
    limits: TraceLimits = LIMITS,
) -> Trace:
    """Parse and validate trace bytes; raises :class:`TraceError` naming the first problem.

    ``manifest`` (hex digest) and ``n_chunks`` (the manifest's chunk count), when given,
    must match: a trace is only ever applied to the manifest it was recorded on.
    """
    if len(data) > limits.max_bytes:
        raise TraceError(f"trace is {len(data)} bytes, over the {limits.max_bytes} byte limit")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=64,
            max_str_len=64,
            # msgpack reserves memory for a declared array length before reading it: no
            # array can hold more elements than there are bytes left.
            max_array_len=min(len(data), limits.max_chunks),
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # ValueError, ExtraData, StackError, UnicodeDecodeError, ...
        raise TraceError(f"trace is not valid msgpack: {exc.__class__.__name__}: {exc}") from exc
    if not isinstance(obj, list) or len(obj) < 2 or obj[0] != MAGIC:
        raise TraceError("not a lazyfs trace (bad magic)")
    if type(obj[1]) is not int or obj[1] != FORMAT_VERSION:
        raise TraceError(f"unsupported trace format {obj[1]!r} (this lazyfs reads format {FORMAT_VERSION})")
    if len(obj) != 5:
        raise TraceError(f"trace: expected 5 fields, found {len(obj)}")
    _, _, digest, chunks, times = obj
    if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
        raise TraceError("trace: the manifest digest must be 32 bytes")
    hexdigest = digest.hex()
    if manifest is not None and hexdigest != manifest:
        raise TraceError(f"trace is for manifest {hexdigest[:16]}…, not {manifest[:16]}…")
    if not isinstance(chunks, list) or not isinstance(times, list):
        raise TraceError("trace: chunks and times must be arrays")
    if len(chunks) != len(times):
        raise TraceError(f"trace: {len(chunks)} chunks but {len(times)} times")
    if len(chunks) > limits.max_chunks:
        raise TraceError(f"trace: {len(chunks)} chunks, over the limit of {limits.max_chunks}")
    top = (n_chunks if n_chunks is not None else limits.max_index) - 1
    seen: set[int] = set()
    for n, c in enumerate(chunks):
        if type(c) is not int or not 0 <= c <= top:
            raise TraceError(f"trace: chunk[{n}] = {c!r} is not a chunk index in [0, {top}]")
        if c in seen:
            raise TraceError(f"trace: chunk {c} appears twice")
        seen.add(c)
    prev = 0
    for n, t in enumerate(times):
        if type(t) is not int or not 0 <= t <= limits.max_ms:
            raise TraceError(f"trace: time[{n}] = {t!r} is not in [0, {limits.max_ms}] ms")
        if t < prev:
            raise TraceError(f"trace: time[{n}] goes backwards ({t} < {prev} ms)")
        prev = t
    trace = Trace(hexdigest, tuple(chunks), tuple(times))
    # Like the manifest: one trace, one encoding (no int in a wider form than needed).
    if _pack(trace) != data:
        raise TraceError("trace is not in canonical form")
    return trace


async def load_trace(origin: Origin, digest: str, n_chunks: int, limits: TraceLimits = LIMITS) -> Trace | None:
    """The published trace of manifest ``digest``, or None when there is none.

    Raises :class:`TraceError` for a trace that fails validation and :class:`OriginError`
    when the origin cannot be read.
    """
    try:
        data = await origin.read(trace_key(digest), 0, limits.max_bytes + 1)
    except NotFoundError:
        return None
    if len(data) > limits.max_bytes:
        raise TraceError(f"trace is over the {limits.max_bytes} byte limit")
    return await asyncio.to_thread(decode, data, digest, n_chunks, limits)


class TraceRecorder:
    """First accesses of chunks, in order; bounded by the manifest's chunk count and the format's limit."""

    def __init__(
        self,
        manifest: str,
        n_chunks: int,
        clock: Callable[[], float] = time.monotonic,
        limits: TraceLimits = LIMITS,
    ) -> None:
        self.manifest = manifest
        self.n_chunks = n_chunks
        self.active = True
        self.dropped = 0  # first accesses past the format's limit (not recorded)
        self._clock = clock
        self._t0 = clock()
        self._max = min(n_chunks, limits.max_chunks)
        self._max_ms = limits.max_ms
        self._seen = bytearray(n_chunks)  # one flag per chunk: bounded, whatever is read
        self._chunks: list[int] = []
        self._times: list[int] = []

    def record(self, indices: Iterable[int]) -> None:
        if not self.active:
            return
        now: int | None = None
        for i in indices:
            if not 0 <= i < self.n_chunks or self._seen[i]:
                continue
            self._seen[i] = 1
            if len(self._chunks) >= self._max:
                self.dropped += 1
                continue
            if now is None:
                now = min(int((self._clock() - self._t0) * 1000), self._max_ms)
            self._chunks.append(i)
            self._times.append(now)

    def stop(self) -> None:
        self.active = False

    def __len__(self) -> int:
        return len(self._chunks)

    def trace(self) -> Trace:
        # Times from a clock that went backwards (never with monotonic) are clamped.
        times: list[int] = []
        prev = 0
        for t in self._times:
            prev = max(prev, t)
            times.append(prev)
        return Trace(self.manifest, tuple(self._chunks), tuple(times))


class ReplayStoppedError(LazyfsError):
    """A replay gave up: too many of its chunks failed in a row (the origin is down)."""


class StartupTraces:
    """A mount's startup traces: record first accesses, replay the published trace, report both.

    The filesystem calls :meth:`on_read` with the chunk indices of every read before
    fetching them; the daemon starts the replay with :meth:`start_replay_nowait`, exposes
    :meth:`publish` and :meth:`replay` on its control socket, reports :meth:`status`, and
    calls :meth:`aclose` at unmount (which publishes a recording not yet published).

    ``status()["first_reads"]`` counts chunks read for the first time, split by what the
    replay had done for them by then: ``prefetched`` (fetched, or already cached), ``in
    flight`` (the read joined the replay's fetch), or ``other`` (not in the trace, or not
    reached yet: the read fetched it itself).
    """

    def __init__(
        self,
        digest: str,
        manifest: Manifest,
        origin: Origin,
        fetcher: ChunkFetcher,
        contains: Callable[[bytes], bool] | None = None,
        *,
        record: bool = False,
        window: int = REPLAY_WINDOW,
        window_bytes: int = REPLAY_WINDOW_BYTES,
        limits: TraceLimits = LIMITS,
    ) -> None:
        self.digest = digest
        self.manifest = manifest
        self.origin = origin
        self.fetcher = fetcher
        self.contains = contains
        self.window = max(1, window)
        self.window_bytes = window_bytes
        self.limits = limits
        self.recorder = TraceRecorder(digest, len(manifest.chunks), limits=limits) if record else None
        self.published: str | None = None
        self.publish_error: str | None = None
        # off, loading, none (no trace published), invalid, unavailable, running, done, failed, stopped
        self.replay_state = "off"
        self.replay_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._replays = 0  # replays running (the mount's own, `lazyfs prefetch --trace`)
        self._seen = bytearray(len(manifest.chunks))  # chunks read already: one flag each
        self._started: set[int] = set()  # chunks a replay asked the fetcher for
        self._ready: set[int] = set()  # chunks a replay found cached or fetched
        self._target: set[int] = set()  # every chunk of the replayed trace(s)
        self._c = dict.fromkeys(
            ("cached", "fetched", "failed", "bytes", "first_reads", "prefetched", "in_flight", "other"), 0
        )

    @property
    def key(self) -> str:
        return trace_key(self.digest)

    # -- reads -----------------------------------------------------------------

    def on_read(self, indices: Sequence[int]) -> None:
        """Chunks a reader is about to need (called by the filesystem on every read)."""
        seen = self._seen
        for i in indices:
            if seen[i]:
                continue
            seen[i] = 1
            c = self._c
            c["first_reads"] += 1
            if i in self._ready:
                c["prefetched"] += 1
            elif i in self._started:
                c["in_flight"] += 1
            else:
                c["other"] += 1
            if self.recorder is not None:
                self.recorder.record((i,))

    # -- replay ----------------------------------------------------------------

    def start_replay_nowait(self) -> None:
        """Fetch the published trace and replay it, in the background."""
        if self._task is None:
            self.replay_state = "loading"
            self._task = asyncio.create_task(self._load_and_replay())

    async def load(self) -> Trace | None:
        return await load_trace(self.origin, self.digest, len(self.manifest.chunks), self.limits)

    async def _load_and_replay(self) -> None:
        try:
            trace = await self.load()
        except TraceError as exc:
            self.replay_state, self.replay_error = "invalid", str(exc)
            log.warning("ignoring the startup trace %s at %s: %s", self.key, self.origin.url, exc)
            return
        except OriginError as exc:
            self.replay_state, self.replay_error = "unavailable", str(exc)
            log.info("could not fetch the startup trace %s: %s", self.key, exc)
            return
        if trace is None:
            self.replay_state = "none"
            log.debug("no startup trace published for %s", self.digest[:16])
            return
        try:
            await self.replay(trace)
        except ReplayStoppedError as exc:
            log.warning("startup trace replay stopped: %s", exc)

    async def _lookup_cached(self, indices: list[int]) -> list[bool]:
        contains = self.contains
        if contains is None:
            return [False] * len(indices)
        chunks = self.manifest.chunks

        def batch(part: list[int]) -> list[bool]:
            out = []
            for i in part:
                try:
                    out.append(contains(chunks[i].digest))
                except Exception as exc:  # a broken cache is a miss, never a crash
                    log.info("cache lookup of chunk %d failed: %s", i, exc)
                    out.append(False)
            return out

        found: list[bool] = []
        for n in range(0, len(indices), _LOOKUP_BATCH):
            found += await asyncio.to_thread(batch, indices[n : n + _LOOKUP_BATCH])
        return found

    async def replay(self, trace: Trace, on_chunk: Callable[[int], None] | None = None) -> int:
        """Fetch ``trace``'s chunks in order (cached ones skipped) within the window; returns bytes covered.

        ``on_chunk`` is called with each chunk's size as it is found cached or fetched.
        Raises :class:`ReplayStoppedError` after :data:`REPLAY_MAX_FAILURES` failures in a row.
        """
        self._replays += 1
        self.replay_state, self.replay_error = "running", None
        try:
            covered = await self._replay(trace, on_chunk)
        except ReplayStoppedError as exc:
            self.replay_state, self.replay_error = "failed", str(exc)
            raise
        finally:
            self._replays -= 1
        if not self._replays and self.replay_state == "running":
            self.replay_state = "done"
        return covered

    async def _replay(self, trace: Trace, on_chunk: Callable[[int], None] | None) -> int:
        chunks = self.manifest.chunks
        order = [i for i in trace.chunks if i < len(chunks)]
        self._target.update(order)
        covered = 0

        def done(i: int) -> None:
            nonlocal covered
            covered += chunks[i].size
            if on_chunk is not None:
                on_chunk(chunks[i].size)

        todo: list[int] = []
        for i, cached in zip(order, await self._lookup_cached(order), strict=True):
            if cached:
                if i not in self._ready:
                    self._c["cached"] += 1
                self._ready.add(i)
                done(i)
            else:
                todo.append(i)
        inflight: dict[asyncio.Task[Data], int] = {}
        inflight_bytes = 0
        failures = 0

        async def reap() -> None:
            nonlocal inflight_bytes, failures
            finished, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
            for t in finished:
                i = inflight.pop(t)
                inflight_bytes -= chunks[i].size
                exc = t.exception()
                if exc is None:
                    failures = 0
                    if i not in self._ready:
                        self._c["fetched"] += 1
                        self._c["bytes"] += chunks[i].size
                    self._ready.add(i)
                    done(i)
                    continue
                if not isinstance(exc, LazyfsError):
                    raise exc
                failures += 1
                self._c["failed"] += 1
                log.info("startup trace replay: chunk %d failed: %s", i, exc)
                if failures >= REPLAY_MAX_FAILURES:
                    raise ReplayStoppedError(f"{failures} chunks in a row failed; last: {exc}")

        try:
            for i in todo:
                size = chunks[i].size
                while inflight and (len(inflight) >= self.window or inflight_bytes + size > self.window_bytes):
                    await reap()
                self._started.add(i)
                inflight[asyncio.create_task(self.fetcher.get(i, Priority.READAHEAD))] = i
                inflight_bytes += size
            while inflight:
                await reap()
        finally:
            for t in inflight:
                t.cancel()
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)
        return covered

    # -- publishing ------------------------------------------------------------

    async def publish(self) -> tuple[str, int]:
        """Stop recording and write the trace to the origin; returns (key, chunks)."""
        rec = self.recorder
        if rec is None:
            raise UsageError("this mount does not record a trace (mount it with --record-trace)")
        if self.published is not None:
            raise UsageError(f"the trace was already published to {self.published}")
        trace = rec.trace()
        if not trace.chunks:
            raise UsageError("nothing recorded yet: no file was read through this mount")
        data = await asyncio.to_thread(encode, trace, self.limits)
        try:
            await self.origin.write(self.key, data)
        except OriginError as exc:
            self.publish_error = str(exc)
            raise
        rec.stop()
        self.published = self.key
        self.publish_error = None
        if rec.dropped:
            log.warning("the trace holds its first %d chunks; %d later ones were left out", len(rec), rec.dropped)
        return self.key, len(trace.chunks)

    async def aclose(self) -> None:
        """Stop the replay; publish a recording that was not published yet (errors are logged)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            if self.replay_state in ("loading", "running"):
                self.replay_state = "stopped"
        rec = self.recorder
        if rec is None or not rec.active or self.published is not None:
            return
        if not len(rec):
            log.info("no file was read: no startup trace to publish")
            return
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                key, n = await self.publish()
        except (LazyfsError, TimeoutError) as exc:
            self.publish_error = str(exc) or "timed out"
            log.warning("could not publish the startup trace to %s: %s", self.origin.url, self.publish_error)
            return
        log.info("published a startup trace of %d chunks to %s/%s", n, self.origin.url.rstrip("/"), key)

    # -- reporting -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        rec = self.recorder
        c = self._c
        return {
            "key": self.key,
            "recording": rec is not None and rec.active,
            "recorded_chunks": 0 if rec is None else len(rec),
            "published": self.published,
            "publish_error": self.publish_error,
            "replay": self.replay_state,
            "replay_error": self.replay_error,
            "replay_chunks": len(self._target),
            "replay_done": len(self._ready & self._target),
            "replay_cached": c["cached"],
            "replay_fetched": c["fetched"],
            "replay_failed": c["failed"],
            "replay_bytes": c["bytes"],
            "first_reads": c["first_reads"],
            "first_reads_prefetched": c["prefetched"],
            "first_reads_in_flight": c["in_flight"],
            "first_reads_other": c["other"],
        }
