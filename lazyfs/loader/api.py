"""Streaming safetensors loader: ``load_file``, ``safe_open``, ``iter_tensors``.

How a file is loaded:

1. The header is read and validated (:mod:`lazyfs.loader.header`).
2. The selected tensors, in file order, become read units of 4-16 MiB
   (:mod:`lazyfs.loader.plan`).  On a lazyfs mount the unit ranges go to the
   daemon as the order to fetch chunks in, and chunks are read straight from
   the verified cache (:class:`~lazyfs.loader.readers.CacheReader`).
3. Several reader threads run ``preadv`` on the units at once (the calls
   release the GIL).
   * CPU: each unit is read straight into the destination tensors' memory.
   * CUDA: each unit is read into one buffer of a small ring of pinned host
     buffers allocated once (``pinned_bytes``), then copied to the device with
     ``non_blocking`` copies on a dedicated stream; an event per unit recycles
     its buffer once the copy is done, so reading overlaps copying.
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
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch

from lazyfs.errors import LazyfsError, UsageError
from lazyfs.loader.header import DTYPE_SIZES, Header, TensorInfo, read_header
from lazyfs.loader.plan import MAX_READ, ReadUnit, plan_reads
from lazyfs.loader.readers import CacheReader, RangeReader, open_reader

__all__ = ["LoadStatistics", "LoaderError", "iter_tensors", "load_file", "safe_open", "shard_files"]

log = logging.getLogger("lazyfs.loader")
MiB = 1024 * 1024

# Reader threads: enough parallel preadv calls to keep a disk queue or the daemon busy; one thread
# copies page cache to memory at ~5 GB/s, 16 threads at ~34 GB/s (DESIGN.md).
DEFAULT_THREADS = min(16, max(4, (os.cpu_count() or 1) * 2))
# Pinned ring for CUDA: 8 x 16 MiB.  Pinning costs ~0.6 s/GiB, so a small ring allocated once.
DEFAULT_PINNED_BYTES = 128 * MiB


class LoaderError(LazyfsError):
    """A tensor could not be loaded (bad file, failed read, missing key)."""


def _torch_dtype(name: str) -> torch.dtype:
    names = {
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
    }
    dt = getattr(torch, names[name], None)
    if not isinstance(dt, torch.dtype):
        raise LoaderError(f"dtype {name} is not supported by this torch ({torch.__version__})")
    return dt


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's storage."""
    return t.reshape(-1).view(torch.uint8)


@dataclass(frozen=True, slots=True)
class LoadStatistics:
    files: int
    tensors: int
    bytes: int
    seconds: float
    chunks_from_cache: int  # fast path: chunks read straight from the lazyfs cache
    chunks_from_mount: int

    @property
    def gbps(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


# --- path resolution --------------------------------------------------------------------


def shard_files(path: str | os.PathLike[str]) -> list[str]:
    """The safetensors files behind ``path``: a file, a directory, or an ``*.index.json``."""
    p = os.fspath(path)
    if os.path.isdir(p):
        indexes = sorted(f for f in os.listdir(p) if f.endswith(".safetensors.index.json"))
        if indexes:
            return shard_files(os.path.join(p, indexes[0]))
        files = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".safetensors"))
        if not files:
            raise LoaderError(f"{p}: no .safetensors files in this directory")
        return files
    if p.endswith(".json"):
        try:
            with open(p, "rb") as f:
                index = json.load(f)
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("weight_map must map tensor names to file names")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LoaderError(f"{p}: not a safetensors index: {exc}") from exc
        base = os.path.dirname(p)
        out: list[str] = []
        for shard in weight_map.values():
            if os.path.isabs(shard) or ".." in shard.split("/"):
                raise LoaderError(f"{p}: shard {shard!r} is outside the model directory")
            full = os.path.join(base, shard)
            if full not in out:
                out.append(full)
        return sorted(out)
    if not os.path.exists(p):
        raise LoaderError(f"{p}: no such file")
    return [p]


# --- the pipeline -------------------------------------------------------------------------


class _Source:
    """One open safetensors file: its header and a range reader."""

    def __init__(self, path: str, fast_path: bool = True) -> None:
        self.path = path
        self.reader: RangeReader = open_reader(path, fast_path=fast_path)
        try:
            self.header: Header = read_header(path, self.reader.header_fd())
        except BaseException:
            self.reader.close()
            raise
        self._started = False

    def start(self, units: Sequence[ReadUnit]) -> None:
        if isinstance(self.reader, CacheReader) and not self._started:
            self._started = True
            try:
                self.reader.start([(u.start, u.end) for u in units])
            except LazyfsError as exc:
                log.info("lazyfs fast path unavailable (%s); reading through the mount", exc)
                self.reader.close()
                self.reader = open_reader(self.path, fast_path=False)

    def close(self) -> None:
        self.reader.close()


class _Pipeline:
    """Loads ``infos`` of one source onto ``device``; yields tensors as they complete."""

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
        self.units = plan_reads(self.infos)
        self.remaining = [t.nbytes for t in self.infos]
        self.outs = [torch.empty(t.shape, dtype=_torch_dtype(t.dtype), device=device) for t in self.infos]

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

    def run(self) -> Iterator[tuple[str, torch.Tensor]]:
        for i, t in enumerate(self.infos):
            if t.nbytes == 0:
                yield t.name, self.outs[i]
        if not self.units:
            return
        self.source.start(self.units)
        if self.device.type == "cpu":
            yield from self._run_cpu()
        else:
            yield from self._run_device()

    # CPU: read straight into the tensors
    def _views(self, unit: ReadUnit) -> list[memoryview]:
        views: list[memoryview] = []
        pos = 0
        for p in unit.pieces:
            if p.unit_offset > pos:  # a gap of unwanted bytes (filtered keys): read and drop
                views.append(memoryview(bytearray(p.unit_offset - pos)))
            dst = _bytes_of(self.outs[p.tensor])[p.tensor_offset : p.tensor_offset + p.length]
            views.append(dst.numpy().data)
            pos = p.unit_offset + p.length
        return views

    def _run_cpu(self) -> Iterator[tuple[str, torch.Tensor]]:
        reader = self.source.reader
        window = 2 * self.threads  # bounded look-ahead: unit order is the fetch order on a mount
        with cf.ThreadPoolExecutor(self.threads, thread_name_prefix="lazyfs-load") as pool:
            todo = deque(self.units)
            inflight: dict[cf.Future[None], ReadUnit] = {}
            try:
                while todo or inflight:
                    while todo and len(inflight) < window:
                        u = todo.popleft()
                        inflight[pool.submit(reader.readinto, u.start, self._views(u))] = u
                    done, _ = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
                    for fut in done:
                        u = inflight.pop(fut)
                        exc = fut.exception()
                        if exc is not None:
                            raise self._fail(u, exc) from exc
                        for i in self._finish(u):
                            yield self.infos[i].name, self.outs[i]
            finally:
                for fut in inflight:
                    fut.cancel()

    # CUDA (or any non-CPU device): pinned ring + async copies on a side stream
    def _run_device(self) -> Iterator[tuple[str, torch.Tensor]]:
        reader = self.source.reader
        cuda = self.device.type == "cuda"
        nbuf = max(2, self.pinned_bytes // MAX_READ)
        bufs = [torch.empty(MAX_READ, dtype=torch.uint8, pin_memory=cuda) for _ in range(nbuf)]
        free = deque(range(nbuf))
        stream = torch.cuda.Stream(self.device) if cuda else None  # type: ignore[no-untyped-call]
        copying: deque[tuple[Any, int, ReadUnit]] = deque()  # (event, buffer, unit) in issue order
        todo = deque(self.units)
        inflight: dict[cf.Future[None], tuple[int, ReadUnit]] = {}

        def read(b: int, u: ReadUnit) -> None:
            reader.readinto(u.start, [bufs[b].numpy().data[: u.length]])

        def retire(block: bool) -> Iterator[tuple[str, torch.Tensor]]:
            """Recycle buffers whose copy finished (waiting for the oldest when ``block``)."""
            while copying:
                ev, b, u = copying[0]
                if ev is not None and not ev.query():
                    if not block:
                        return
                    ev.synchronize()
                copying.popleft()
                free.append(b)
                block = False
                for i in self._finish(u):
                    yield self.infos[i].name, self.outs[i]

        with cf.ThreadPoolExecutor(self.threads, thread_name_prefix="lazyfs-load") as pool:
            try:
                while todo or inflight or copying:
                    while todo and free:
                        u = todo.popleft()
                        b = free.popleft()
                        inflight[pool.submit(read, b, u)] = (b, u)
                    if inflight:
                        # With copies pending, poll reads briefly so finished copies are retired promptly.
                        done, _ = cf.wait(inflight, timeout=0.002 if copying else None, return_when=cf.FIRST_COMPLETED)
                        for fut in done:
                            b, u = inflight.pop(fut)
                            exc = fut.exception()
                            if exc is not None:
                                raise self._fail(u, exc) from exc
                            ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
                            with ctx:
                                for p in u.pieces:
                                    dst = _bytes_of(self.outs[p.tensor])[p.tensor_offset : p.tensor_offset + p.length]
                                    dst.copy_(bufs[b][p.unit_offset : p.unit_offset + p.length], non_blocking=cuda)
                            ev = None
                            if stream is not None:
                                ev = torch.cuda.Event()  # type: ignore[no-untyped-call]
                                ev.record(stream)
                            copying.append((ev, b, u))
                    # Block on the oldest copy only when no read is running to wait for instead.
                    yield from retire(block=not inflight)
            finally:
                for fut in inflight:
                    fut.cancel()
                if stream is not None:
                    stream.synchronize()


def _select(header: Header, keys: set[str] | None) -> list[TensorInfo]:
    if keys is None:
        return list(header.tensors)
    return [t for t in header.tensors if t.name in keys]


def iter_tensors(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    keys: Iterable[str] | None = None,
    threads: int = DEFAULT_THREADS,
    pinned_bytes: int = DEFAULT_PINNED_BYTES,
    fast_path: bool = True,
    progress: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` as each tensor lands on ``device``.

    ``path``: a ``.safetensors`` file, a directory, or a ``model.safetensors.index.json``.
    ``keys``: only these tensors (a missing key is an error, raised before anything is
    read).  ``pinned_bytes``: the host ring for device copies.  ``fast_path``: on a lazyfs
    mount, read verified chunks straight from its cache.
    """
    dev = torch.device(device)
    if threads < 1:
        raise UsageError("threads must be at least 1")
    wanted = set(keys) if keys is not None else None
    t0 = time.perf_counter()
    sources: list[_Source] = []
    try:
        for f in shard_files(path):
            sources.append(_Source(f, fast_path=fast_path))
        plans = [(s, _select(s.header, wanted)) for s in sources]
        if wanted is not None:
            missing = wanted - {t.name for _, infos in plans for t in infos}
            if missing:
                names = ", ".join(map(repr, sorted(missing)[:5]))
                raise LoaderError(f"{os.fspath(path)}: no tensor named {names}")
        grand_total = sum(t.nbytes for _, infos in plans for t in infos)
        bar = None
        if progress:
            from lazyfs.progress import open_progress

            bar = open_progress(f"load {os.path.basename(os.fspath(path))}")
            bar.start(grand_total)
        count = 0
        for source, infos in plans:
            for name, tensor in _Pipeline(source, infos, dev, threads, pinned_bytes).run():
                count += 1
                if bar is not None:
                    bar.advance(tensor.numel() * tensor.element_size())
                yield name, tensor
        if bar is not None:
            bar.finish()
        readers = [s.reader for s in sources if isinstance(s.reader, CacheReader)]
        stats = LoadStatistics(
            files=len(sources),
            tensors=count,
            bytes=grand_total,
            seconds=time.perf_counter() - t0,
            chunks_from_cache=sum(r.chunks_from_cache for r in readers),
            chunks_from_mount=sum(r.chunks_from_mount for r in readers),
        )
        _last_stats[0] = stats
        log.info(
            "loaded %d tensors, %.2f GB in %.2f s (%.2f GB/s) from %s to %s",
            count, grand_total / 1e9, stats.seconds, stats.gbps, os.fspath(path), dev,
        )
    finally:
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
    threads: int = DEFAULT_THREADS,
    pinned_bytes: int = DEFAULT_PINNED_BYTES,
    fast_path: bool = True,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Like ``safetensors.torch.load_file``: a dict of owned tensors on ``device``."""
    return dict(
        iter_tensors(
            path, device, keys=keys, threads=threads, pinned_bytes=pinned_bytes, fast_path=fast_path, progress=progress
        )
    )


class _Slice:
    def __init__(self, owner: safe_open, info: TensorInfo) -> None:
        self.owner = owner
        self.info = info

    def get_shape(self) -> list[int]:
        return list(self.info.shape)

    def get_dtype(self) -> str:
        return self.info.dtype

    def __getitem__(self, index: Any) -> torch.Tensor:
        info = self.info
        first = index[0] if isinstance(index, tuple) and index else index
        rest = index[1:] if isinstance(index, tuple) else ()
        if info.shape and isinstance(first, slice | int) and not isinstance(first, bool):
            rows = range(info.shape[0])[first] if isinstance(first, slice) else None
            if rows is not None and rows.step == 1:
                row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
                sub = TensorInfo(
                    info.name,
                    info.dtype,
                    (len(rows), *info.shape[1:]),
                    info.start + rows.start * row_bytes,
                    info.start + rows.stop * row_bytes if len(rows) else info.start + rows.start * row_bytes,
                )
                t = self.owner._load([sub])[0]
                return t[(slice(None), *rest)] if rest else t
        return self.owner.get_tensor(info.name)[index]


class safe_open:
    """``with safe_open(path, framework="pt", device="cpu") as f:`` — keys, metadata, get_tensor, get_slice."""

    def __init__(
        self, path: str | os.PathLike[str], framework: str = "pt", device: str | torch.device = "cpu"
    ) -> None:
        if framework not in ("pt", "torch"):
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
        return self._source.header.names

    def metadata(self) -> dict[str, str] | None:
        return self._source.header.metadata

    def _info(self, name: str) -> TensorInfo:
        try:
            return self._source.header.tensor(name)
        except KeyError:
            raise LoaderError(f"{self.path}: no tensor named {name!r}") from None

    def _load(self, infos: Sequence[TensorInfo]) -> list[torch.Tensor]:
        got = dict(_Pipeline(self._source, infos, self.device, DEFAULT_THREADS, 2 * MAX_READ).run())
        return [got[i.name] for i in infos]

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._load([self._info(name)])[0]

    def get_slice(self, name: str) -> _Slice:
        return _Slice(self, self._info(name))


__all__ += ["DTYPE_SIZES", "last_statistics"]
