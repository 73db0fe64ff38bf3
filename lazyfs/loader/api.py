"""Streaming safetensors loader: ``load_file``, ``safe_open``, ``iter_tensors``.

How a file is loaded:

1. The header is read and validated (:mod:`lazyfs.loader.header`) — every
   shard's, and a ``keys`` filter is checked, before any tensor byte is read.
2. The selected tensors, in file order, become read units of 4-16 MiB
   (:mod:`lazyfs.loader.plan`).  On a lazyfs mount the unit ranges go to the
   daemon as the order to fetch chunks in, and chunks are read straight from
   the verified cache (:class:`~lazyfs.loader.readers.CacheReader`).
3. A pool of reader threads takes the units in file order and runs ``preadv``
   on them (the calls release the GIL; never mmap, whose 4 KiB page faults
   crawl through FUSE).

   * CPU: each unit is read straight into the destination tensors' memory, whose
     pages are mapped first in one call per unit (:mod:`lazyfs.loader.prefault`).
   * CUDA: each unit is read into one buffer of a ring of pinned host buffers
     (``pinned_bytes`` in all, allocated once per process and reused: pinning
     costs ~0.6 s/GiB), then copied to the device with one ``non_blocking``
     copy of the whole unit (>= 4 MiB: bandwidth-, not launch-bound) on a
     dedicated stream — straight into the tensor when the unit is one slice
     of one tensor, else into a device staging buffer that is scattered into
     the tensors by device-to-device copies.  The copy's event travels with
     the buffer: the next reader to take that buffer waits on it, so reading
     overlaps copying and the ring recycles itself.
4. A tensor is yielded as soon as all of its bytes are on its device.

Returned tensors are owned (each has its own storage, nothing is reused).  An
I/O error surfaces as :class:`LoaderError` naming the file and tensor; no
partial dict is ever returned.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch

from lazyfs.errors import LazyfsError, UsageError
from lazyfs.loader.errors import HeaderError, LoaderError, LoaderIOError
from lazyfs.loader.header import DTYPE_BITS, DTYPE_SIZES, Header, TensorInfo
from lazyfs.loader.plan import MAX_READ, ReadUnit, plan_reads
from lazyfs.loader.prefault import prefault
from lazyfs.loader.readers import CacheReader, PlainReader, RangeReader, open_reader

__all__ = [
    "DTYPE_SIZES",
    "HeaderError",
    "LoadStatistics",
    "LoaderError",
    "LoaderIOError",
    "free_pinned_memory",
    "iter_tensors",
    "last_statistics",
    "load_file",
    "safe_open",
    "shard_files",
]

log = logging.getLogger("lazyfs.loader")
MiB = 1024 * 1024

# Reader threads: enough parallel preadv calls to keep a disk queue or the daemon busy; one thread
# copies page cache to memory at ~5 GB/s, 16 threads at ~34 GB/s (DESIGN.md).  More threads than
# cores buys nothing for memory copies, but a disk or a mount wants a deep queue: at least 4.
DEFAULT_THREADS = min(16, max(4, os.cpu_count() or 1))
# For a CUDA device the readers fill pinned buffers that the copy engine drains: on the H200 box
# (16 CPUs) 8 threads beat 16 and 32 in every sweep (33 vs 30 GB/s; bench/RESULTS.md, gpu_check).
DEFAULT_CUDA_THREADS = min(8, DEFAULT_THREADS)


def default_threads(device: torch.device) -> int:
    """The reader threads a load uses when the caller does not say."""
    return DEFAULT_CUDA_THREADS if device.type == "cuda" else DEFAULT_THREADS
# Pinned ring for CUDA: 16 buffers of one read unit (16 MiB) each, so 16 reader threads each
# fill one while the copy engine drains another.  Pinning costs ~0.6 s/GiB, so the ring is
# allocated once per process and reused (free_pinned_memory() gives it back).
RING_BUFFER = MAX_READ
DEFAULT_PINNED_BYTES = 16 * RING_BUFFER
# CPU loads map each read unit's destination pages before reading into it (lazyfs.loader.prefault).
# False: one page fault per page inside the read, as before 2026-11-28 (bench/ab_cache_check.py).
PREFAULT = True

_TORCH_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "C64": "complex64",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "F4": "float4_e2m1fn_x2",  # two 4-bit values per element: the last dimension halves
}


def _torch_dtype(info: TensorInfo, path: str) -> torch.dtype:
    dt = getattr(torch, _TORCH_DTYPES.get(info.dtype, "-"), None)
    if not isinstance(dt, torch.dtype):
        raise LoaderError(
            f"{path}: tensor {info.name!r}: dtype {info.dtype} has no torch equivalent in torch {torch.__version__}"
        )
    return dt


def _torch_shape(info: TensorInfo, path: str) -> tuple[int, ...]:
    """The torch shape: safetensors counts F4 in 4-bit elements, torch in pairs of them."""
    if DTYPE_BITS[info.dtype] == 4:
        if not info.shape or info.shape[-1] % 2:
            raise LoaderError(
                f"{path}: tensor {info.name!r}: F4 shape {list(info.shape)} has an odd last dimension, "
                "which torch.float4_e2m1fn_x2 cannot hold"
            )
        return (*info.shape[:-1], info.shape[-1] // 2)
    return info.shape


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's storage."""
    return t.reshape(-1).view(torch.uint8)


@dataclass(frozen=True, slots=True)
class LoadStatistics:
    files: int
    tensors: int
    bytes: int
    seconds: float
    first_tensor_seconds: float  # until the first tensor was yielded (headers included)
    chunks_from_cache: int  # fast path: chunks read straight from the lazyfs cache
    chunks_from_mount: int  # fast path: chunks the daemon could not cache, read through the mount
    chunks_checked: int = 0  # of chunks_from_cache: checked by the loader (the daemon had not read them)
    chunks_mismatched: int = 0  # cache files whose bytes failed that check (read through the mount)
    # Bytes read from disk with O_DIRECT (lazyfs.loader.direct): not in the page cache.  A disk
    # figure, not a share of ``bytes``: a chunk the loader checks is read whole, so loading a
    # few keys can read more than it loads.
    bytes_direct: int = 0

    @property
    def gbps(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


# --- path resolution --------------------------------------------------------------------


def _read_index(p: str) -> dict[str, str]:
    """``tensor name -> shard path`` from a ``*.safetensors.index.json``."""
    try:
        with open(p, "rb") as f:
            index = json.load(f)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map must map tensor names to file names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LoaderError(f"{p}: not a safetensors index: {exc}") from exc
    base = os.path.dirname(p)
    out: dict[str, str] = {}
    for name, shard in weight_map.items():
        if os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
            raise LoaderError(f"{p}: shard {shard!r} is outside the model directory")
        out[name] = os.path.join(base, shard)
    return out


def _resolve(path: str | os.PathLike[str]) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files behind ``path`` and, for a sharded model, its weight map."""
    p = os.fspath(path)
    if os.path.isdir(p):
        indexes = sorted(f for f in os.listdir(p) if f.endswith(".safetensors.index.json"))
        if indexes:
            return _resolve(os.path.join(p, indexes[0]))
        files = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".safetensors"))
        if not files:
            raise LoaderError(f"{p}: no .safetensors files in this directory")
        return files, None
    if p.endswith(".json"):
        weight_map = _read_index(p)
        return sorted(set(weight_map.values())), weight_map
    if not os.path.exists(p):
        raise LoaderError(f"{p}: no such file")
    return [p], None


def shard_files(path: str | os.PathLike[str]) -> list[str]:
    """The safetensors files behind ``path``: a file, a directory, or an ``*.index.json``."""
    return _resolve(path)[0]


# --- the pinned ring ----------------------------------------------------------------------


class _Ring:
    """Host buffers for device copies; each free slot carries the event of its last copy.

    Buffers are allocated (pinned) on demand up to ``limit``, so a small load pins little;
    the ring is kept between loads (see :func:`_release_ring`), so a process pins once.
    """

    def __init__(self, size: int, pin: bool) -> None:
        self.key = (size, pin)
        self.limit = 2
        self.bufs: list[torch.Tensor] = []
        self.views: list[memoryview] = []
        self.reserved = 0  # buffers allocated or being allocated
        self.cond = threading.Condition()
        self.free: deque[tuple[int, Any]] = deque()

    def take(self, cancelled: Callable[[], bool]) -> int:
        """A free buffer (its last copy finished); waits for one; raises when the load is cancelled."""
        with self.cond:
            self.cond.wait_for(lambda: bool(self.free) or self.reserved < self.limit or cancelled())
            if cancelled():
                raise _Cancelled
            if not self.free:
                self.reserved += 1
                grow = True
            else:
                b, ev = self.free.popleft()
                grow = False
        if grow:
            size, pin = self.key
            try:
                buf = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
            except BaseException:
                with self.cond:
                    self.reserved -= 1
                    self.cond.notify()
                raise
            with self.cond:
                self.bufs.append(buf)
                self.views.append(buf.numpy().data)
                return len(self.bufs) - 1
        if ev is not None:
            ev.synchronize()  # the copy out of this buffer must finish before it is overwritten
        return b

    def give(self, b: int, ev: Any) -> None:
        with self.cond:
            self.free.append((b, ev))
            self.cond.notify()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def settle(self) -> bool:
        """Wait for every pending copy; whether every buffer is back (the ring may be reused)."""
        with self.cond:
            pending = [ev for _, ev in self.free if ev is not None]
            self.free = deque((b, None) for b, _ in self.free)
            whole = len(self.free) == len(self.bufs) == self.reserved
        for ev in pending:
            ev.synchronize()
        return whole


_ring_lock = threading.Lock()
_idle_rings: list[_Ring] = []  # at most one: the pinned memory a process keeps between loads


def _acquire_ring(limit: int, size: int, pin: bool) -> _Ring:
    ring = None
    with _ring_lock:
        for r in _idle_rings:
            if r.key == (size, pin):
                _idle_rings.remove(r)
                ring = r
                break
    ring = ring or _Ring(size, pin)
    ring.limit = max(2, limit)
    return ring


def _release_ring(ring: _Ring) -> None:
    if ring.settle():  # never reuse a ring with a buffer still out
        with _ring_lock:
            _idle_rings[:] = [ring]


def free_pinned_memory() -> None:
    """Give back the pinned host ring the loader keeps between CUDA loads (up to ``pinned_bytes``)."""
    with _ring_lock:
        _idle_rings.clear()


# --- the pipeline -------------------------------------------------------------------------


class _Cancelled(Exception):
    """A worker noticed the load is being abandoned."""


class _Source:
    """One open safetensors file: its header and a range reader."""

    def __init__(self, path: str, fast_path: bool = True, direct_io: bool = False) -> None:
        self.path = path
        self.direct_io = direct_io
        self.reader: RangeReader = open_reader(path, fast_path=fast_path, direct_io=direct_io)
        try:
            self.header: Header = self.reader.read_header()
        except BaseException:
            self.reader.close()
            raise
        self._started = False

    def start(self, units: Sequence[ReadUnit]) -> None:
        """Tell a lazyfs daemon the read plan (once); without a daemon, read through the mount."""
        if isinstance(self.reader, CacheReader) and not self._started:
            self._started = True
            try:
                self.reader.start([(u.start, u.end) for u in units])
            except LazyfsError as exc:
                log.info("lazyfs fast path unavailable (%s); reading through the mount", exc)
                self.reader.close()
                self.reader = open_reader(self.path, fast_path=False, direct_io=self.direct_io)

    def close(self) -> None:
        self.reader.close()


class _Pipeline:
    """Loads ``infos`` of one source onto ``device``; yields tensors as they complete.

    ``run()`` is the entry point; ``_run_cpu`` / ``_run_device`` are the two strategies
    (``_run_device`` also runs on the CPU, with synchronous copies, for tests).
    """

    def __init__(
        self,
        source: _Source,
        infos: Sequence[TensorInfo],
        device: torch.device,
        threads: int,
        pinned_bytes: int,
    ) -> None:
        self.source = source
        self.infos = list(infos)
        self.device = device
        self.threads = threads
        self.pinned_bytes = pinned_bytes
        # From the lazyfs cache, units cut at chunk boundaries let one reader check each chunk whole
        # (a chunk bigger than a unit is checked once, by the first unit that needs it, and
        # then only read: cutting at its boundaries would change nothing).
        reader = source.reader
        align = reader.chunk_size if isinstance(reader, CacheReader) and reader.client_checks else 0
        align = align if align <= RING_BUFFER else 0
        self.units = plan_reads(self.infos, max_read=RING_BUFFER, align=align)
        self.remaining = [t.nbytes for t in self.infos]
        self.outs = [
            torch.empty(_torch_shape(t, source.path), dtype=_torch_dtype(t, source.path), device=device)
            for t in self.infos
        ]
        self._cancelled = False

    def _fail(self, unit: ReadUnit, exc: BaseException) -> LoaderError:
        names = ", ".join(repr(self.infos[p.tensor].name) for p in unit.pieces[:3])
        more = "" if len(unit.pieces) <= 3 else f" and {len(unit.pieces) - 3} more"
        return LoaderError(f"{self.source.path}: loading tensor {names}{more} failed: {exc}")

    def _finish(self, unit: ReadUnit) -> list[int]:
        done = []
        for p in unit.pieces:
            self.remaining[p.tensor] -= p.length
            if self.remaining[p.tensor] == 0:
                done.append(p.tensor)
        return done

    def _dst(self, tensor: int, offset: int, length: int) -> torch.Tensor:
        return _bytes_of(self.outs[tensor])[offset : offset + length]

    def run(self) -> Generator[tuple[str, torch.Tensor], None, None]:
        if self.units:
            self.source.start(self.units)
        if self.device.type == "cpu":
            yield from self._run_cpu()
        else:
            yield from self._run_device()

    def _drive(
        self, work: Callable[[ReadUnit], Any], wake: Callable[[], None] = lambda: None
    ) -> Generator[int, None, None]:
        """Run ``work(unit)`` for every unit on the reader pool, in file order; yield finished tensors.

        ``work`` returns ``None`` or an event to wait for before the unit's bytes count as
        landed.  The first failure cancels the rest: queued units never start, waits in the
        reader are woken (``wake``), running reads end (a plain ``preadv``, or a mount read
        bounded by its read timeout) before this returns, so no thread outlives the load.
        """
        yield from (i for i, t in enumerate(self.infos) if t.nbytes == 0)  # nothing to read
        if not self.units:
            return
        results: queue.SimpleQueue[tuple[ReadUnit, Any, BaseException | None]] = queue.SimpleQueue()

        def cancel() -> None:
            self._cancelled = True
            self.source.reader.cancel()
            wake()

        def task(u: ReadUnit) -> None:
            if self._cancelled:
                return
            try:
                results.put((u, work(u), None))
            except BaseException as exc:
                # Report first (so this error, not a "cancelled" it causes elsewhere, is the one
                # raised), then stop the other readers at once.
                results.put((u, None, exc))
                cancel()

        pool = cf.ThreadPoolExecutor(min(self.threads, len(self.units)), thread_name_prefix="lazyfs-load")
        finished = False
        try:
            for u in self.units:
                pool.submit(task, u)
            for _ in range(len(self.units)):
                u, ev, exc = results.get()
                if exc is not None:
                    raise self._fail(u, exc) from exc
                if ev is not None:
                    ev.synchronize()
                yield from self._finish(u)
            finished = True
        finally:
            if not finished:
                cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    # CPU: read straight into the tensors
    def _views(self, unit: ReadUnit) -> list[memoryview]:
        views: list[memoryview] = []
        pos = 0
        for p in unit.pieces:
            if p.unit_offset > pos:  # a gap of unwanted bytes (filtered keys): read and drop
                views.append(memoryview(bytearray(p.unit_offset - pos)))
            views.append(self._dst(p.tensor, p.tensor_offset, p.length).numpy().data)
            pos = p.unit_offset + p.length
        return views

    def _run_cpu(self) -> Iterator[tuple[str, torch.Tensor]]:
        reader = self.source.reader

        def work(u: ReadUnit) -> None:
            views = self._views(u)
            if PREFAULT:
                prefault(views)  # the unit's fresh pages in one call, not one fault each
            reader.readinto(u.start, views)

        with contextlib.closing(self._drive(work)) as done:
            for i in done:
                yield self.infos[i].name, self.outs[i]

    # CUDA (or any non-CPU device): pinned ring + async copies on a side stream
    def _run_device(self) -> Iterator[tuple[str, torch.Tensor]]:
        reader = self.source.reader
        cuda = self.device.type == "cuda"
        ring = _acquire_ring(self.pinned_bytes // RING_BUFFER, RING_BUFFER, pin=cuda)
        stream = torch.cuda.Stream(self.device) if cuda else None  # type: ignore[no-untyped-call]
        cancelled = lambda: self._cancelled  # noqa: E731

        def work(u: ReadUnit) -> Any:
            b = ring.take(cancelled)
            ev = None
            try:
                reader.readinto(u.start, [ring.views[b][: u.length]])
                src = ring.bufs[b][: u.length]
                with contextlib.ExitStack() as on_stream:
                    if stream is not None:  # this thread's current device and stream
                        on_stream.enter_context(torch.cuda.device(self.device))
                        on_stream.enter_context(torch.cuda.stream(stream))
                    p0 = u.pieces[0]
                    if len(u.pieces) == 1 and p0.unit_offset == 0 and p0.length == u.length:
                        self._dst(p0.tensor, p0.tensor_offset, p0.length).copy_(src, non_blocking=cuda)
                    else:
                        # One large host-to-device copy, then cheap device-side scatter; the staging
                        # buffer belongs to the side stream, so its reuse is ordered after these copies.
                        stage = torch.empty(u.length, dtype=torch.uint8, device=self.device)
                        stage.copy_(src, non_blocking=cuda)
                        for p in u.pieces:
                            self._dst(p.tensor, p.tensor_offset, p.length).copy_(
                                stage[p.unit_offset : p.unit_offset + p.length], non_blocking=cuda
                            )
                    if stream is not None:
                        ev = torch.cuda.Event()  # type: ignore[no-untyped-call]
                        ev.record(stream)
            except BaseException:
                if stream is not None:
                    stream.synchronize()  # a copy issued before the failure may still read the buffer
                raise
            finally:
                ring.give(b, ev)
            return ev

        try:
            with contextlib.closing(self._drive(work, ring.wake)) as done:
                for i in done:
                    yield self.infos[i].name, self.outs[i]
        finally:
            if stream is not None:
                stream.synchronize()
            _release_ring(ring)


def _select(header: Header, keys: set[str] | None) -> list[TensorInfo]:
    if keys is None:
        return list(header.tensors)
    return [t for t in header.tensors if t.name in keys]


def iter_tensors(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    keys: Iterable[str] | None = None,
    threads: int | None = None,
    pinned_bytes: int = DEFAULT_PINNED_BYTES,
    fast_path: bool = True,
    direct_io: bool = False,
    progress: bool = False,
) -> Generator[tuple[str, torch.Tensor], None, None]:
    """Yield ``(name, tensor)`` as each tensor lands on ``device`` (in no promised order).

    ``path``: a ``.safetensors`` file, a directory (its ``*.safetensors.index.json``, else
    every ``*.safetensors`` in it), or a ``model.safetensors.index.json``.  ``keys``: only
    these tensors (a missing key is a :class:`LoaderError`, raised before any tensor byte
    is read).  ``threads``: parallel reads (default: 8 for CUDA, else up to 16 by CPU count,
    at least 4).  ``pinned_bytes``: the host ring for device
    copies.  ``fast_path``: on a lazyfs mount, read verified chunks straight from its
    cache.  ``direct_io``: read bytes that are not in the page cache with ``O_DIRECT``
    (:mod:`lazyfs.loader.direct`: less CPU, and the page cache is left alone; on the
    reference VM's disk no faster).  ``progress``: a progress bar on stderr.

    Every failure is a :class:`LoaderError` naming the file (and the tensor, for reads);
    headers are validated as untrusted input (:class:`HeaderError`).
    """
    dev = torch.device(device)
    if threads is None:
        threads = default_threads(dev)
    if threads < 1:
        raise UsageError("threads must be at least 1")
    if isinstance(keys, str):
        raise TypeError("keys must be an iterable of tensor names, not one string")
    wanted = set(keys) if keys is not None else None
    where = os.fspath(path)
    t0 = time.perf_counter()
    sources: list[_Source] = []
    bar = None
    try:
        files, weight_map = _resolve(path)
        if wanted is not None and weight_map is not None:
            missing = wanted - weight_map.keys()
            if missing:
                raise LoaderError(f"{where}: no tensor named {', '.join(map(repr, sorted(missing)[:5]))}")
            needed = {weight_map[k] for k in wanted}
            files = [f for f in files if f in needed]
        for f in files:
            sources.append(_Source(f, fast_path=fast_path, direct_io=direct_io))
        plans = [(s, _select(s.header, wanted)) for s in sources]
        owner: dict[str, str] = {}
        for s, infos in plans:
            for t in infos:
                if t.name in owner:
                    raise LoaderError(f"{where}: tensor {t.name!r} is in both {owner[t.name]} and {s.path}")
                owner[t.name] = s.path
        if wanted is not None:
            missing = wanted - owner.keys()
            if missing:
                raise LoaderError(f"{where}: no tensor named {', '.join(map(repr, sorted(missing)[:5]))}")
        grand_total = sum(t.nbytes for _, infos in plans for t in infos)
        if progress:
            from lazyfs.progress import open_progress

            bar = open_progress(f"load {os.path.basename(where)}")
            bar.start(grand_total)
        count = 0
        first = 0.0
        for source, infos in plans:
            # closing(): if the caller stops early, the readers end before the files close.
            with contextlib.closing(_Pipeline(source, infos, dev, threads, pinned_bytes).run()) as landed:
                for name, tensor in landed:
                    if not count:
                        first = time.perf_counter() - t0
                    count += 1
                    if bar is not None:
                        bar.advance(tensor.numel() * tensor.element_size())
                    yield name, tensor
        readers = [s.reader for s in sources if isinstance(s.reader, CacheReader)]
        plain = [s.reader for s in sources if isinstance(s.reader, PlainReader)]
        stats = LoadStatistics(
            files=len(sources),
            tensors=count,
            bytes=grand_total,
            seconds=time.perf_counter() - t0,
            first_tensor_seconds=first,
            chunks_from_cache=sum(r.chunks_from_cache for r in readers),
            chunks_from_mount=sum(r.chunks_from_mount for r in readers),
            chunks_checked=sum(r.chunks_checked for r in readers),
            chunks_mismatched=sum(r.chunks_mismatched for r in readers),
            bytes_direct=sum(r.bytes_direct for r in readers) + sum(r.bytes_direct for r in plain),
        )
        _last_stats[0] = stats
        log.info(
            "loaded %d tensors, %.2f GB in %.2f s (%.2f GB/s, first tensor after %.3f s) from %s to %s%s",
            count, grand_total / 1e9, stats.seconds, stats.gbps, first, where, dev,
            f" ({stats.chunks_from_cache} chunks straight from the lazyfs cache)" if readers else "",
        )
    finally:
        if bar is not None:
            bar.finish()
        for s in sources:
            s.close()


_last_stats: list[LoadStatistics | None] = [None]


def last_statistics() -> LoadStatistics | None:
    """Figures of the last completed :func:`iter_tensors` / :func:`load_file` in this process."""
    return _last_stats[0]


def load_file(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    keys: Iterable[str] | None = None,
    threads: int | None = None,
    pinned_bytes: int = DEFAULT_PINNED_BYTES,
    fast_path: bool = True,
    direct_io: bool = False,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Like ``safetensors.torch.load_file``: a dict of owned tensors on ``device``.

    Takes a file, a directory or a ``*.safetensors.index.json`` (see :func:`iter_tensors`
    for the options); all or nothing: a failure raises, never returns part of the model.
    """
    return dict(
        iter_tensors(
            path, device, keys=keys, threads=threads, pinned_bytes=pinned_bytes, fast_path=fast_path,
            direct_io=direct_io, progress=progress,
        )
    )


# --- safe_open ------------------------------------------------------------------------------


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` with storage of its own size (a strided or partial view is copied)."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


class _Slice:
    """``f.get_slice(name)``: shape and dtype without reading; indexing reads only the rows it needs."""

    def __init__(self, owner: safe_open, info: TensorInfo) -> None:
        self.owner = owner
        self.info = info

    def get_shape(self) -> list[int]:
        return list(self.info.shape)

    def get_dtype(self) -> str:
        return self.info.dtype

    def __getitem__(self, index: Any) -> torch.Tensor:
        info = self.info
        idx = index if isinstance(index, tuple) else (index,)
        first = idx[0] if idx else None
        # Bits per index of dimension 0 (F4 rows of one element are half a byte: read it all).
        row_bits = info.nbytes * 8 // info.shape[0] if info.shape and info.shape[0] else 0
        if row_bits and row_bits % 8 == 0 and isinstance(first, int | slice) and not isinstance(first, bool):
            n = info.shape[0]
            local: int | slice
            if isinstance(first, int):
                if not -n <= first < n:
                    raise IndexError(f"index {first} is out of bounds for dimension 0 with size {n}")
                lo, hi, local = first % n, first % n + 1, 0
            else:
                rows = range(n)[first]
                if rows.step < 0:
                    return _compact(self.owner.get_tensor(info.name)[index])  # torch refuses: same error
                lo = rows.start if rows else 0
                hi = rows[-1] + 1 if rows else 0
                local = slice(None, None, rows.step)
            rb = row_bits // 8
            shape = (hi - lo, *info.shape[1:])
            sub = TensorInfo(info.name, info.dtype, shape, info.start + lo * rb, info.start + hi * rb)
            t = self.owner._load([sub])[0]
            return _compact(t[(local, *idx[1:])])
        return _compact(self.owner.get_tensor(info.name)[index])


class safe_open:  # the name safetensors users know
    """``with safe_open(path, framework="pt", device="cpu") as f:`` — keys, metadata, get_tensor, get_slice.

    Reads only what is asked for, with the loader's large parallel reads (never mmap).  On a
    lazyfs mount it reads through the mount (the daemon's read-ahead serves it).
    """

    def __init__(
        self, path: str | os.PathLike[str], framework: str = "pt", device: str | torch.device = "cpu"
    ) -> None:
        if framework not in ("pt", "torch", "pytorch"):
            raise UsageError(f"framework {framework!r} is not supported; lazyfs.loader loads torch tensors")
        self.path = os.fspath(path)
        self.device = torch.device(device)
        self._source = _Source(self.path, fast_path=False)

    def __enter__(self) -> safe_open:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._source.close()

    def keys(self) -> list[str]:
        return sorted(self._source.header.names)

    def offset_keys(self) -> list[str]:
        """Tensor names in file order."""
        return self._source.header.names

    def metadata(self) -> dict[str, str] | None:
        return self._source.header.metadata

    def _info(self, name: str) -> TensorInfo:
        try:
            return self._source.header.tensor(name)
        except KeyError:
            raise LoaderError(f"{self.path}: no tensor named {name!r}") from None

    def _load(self, infos: Sequence[TensorInfo]) -> list[torch.Tensor]:
        got = dict(
            _Pipeline(self._source, infos, self.device, default_threads(self.device), DEFAULT_PINNED_BYTES).run()
        )
        return [got[i.name] for i in infos]

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._load([self._info(name)])[0]

    def get_slice(self, name: str) -> _Slice:
        return _Slice(self, self._info(name))
