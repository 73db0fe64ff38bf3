"""The mount daemon: the composition root.

``config -> origin -> store -> manifest -> fetcher -> fs -> FUSE mount``, plus
the control socket (status, prefetch, read plans, startup traces) and the
optional Prometheus exporter.

Startup traces (:mod:`lazyfs.trace`): every mount fetches the manifest's
published trace in the background and prefetches its chunks in order; with
``record_trace`` the daemon records which chunks reads need and publishes the
trace to the origin at unmount (or when asked on the control socket).

Manifest resolution works offline when it can: the ref's last known digest and
every verified manifest are kept in the cache directory, so a remount with
the origin down succeeds and serves whatever is cached.

The peer tier (package ``p2p``) plugs in here without lazyfs importing it:
``run_mount`` takes a :data:`PeerTierFactory`, and when none is passed but the
config asks for peers, it loads the one registered under the entry point group
``lazyfs.peer_tier`` (``p2p`` registers itself in pyproject.toml).

Shutdown: SIGTERM/SIGINT or an external ``umount`` end the FUSE loop; the
daemon then unmounts (if still mounted), lets pending cache writes finish and
closes the store.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from lazyfs import fuse
from lazyfs.catalog import resolve_ref, verify_manifest
from lazyfs.config import MountConfig, PeerConfig
from lazyfs.control import CONTROL_XATTR, STATUS_XATTR
from lazyfs.errors import LazyfsError, ManifestError, NotFoundError, OriginError, UsageError
from lazyfs.fetch import ChunkFetcher, ChunkSource, FetchConfig
from lazyfs.fs import LazyFilesystem
from lazyfs.manifest import Manifest, Ref, parse_ref
from lazyfs.origin import open_origin
from lazyfs.origin.base import Origin
from lazyfs.store import ChunkStore
from lazyfs.trace import StartupTraces

__all__ = [
    "CONTROL_XATTR",
    "STATUS_XATTR",
    "MountedFs",
    "PeerTier",
    "PeerTierFactory",
    "load_peer_tier",
    "open_manifest",
    "run_mount",
]

log = logging.getLogger(__name__)

# Chunks of a loader's plan fetched ahead of the one it waits for: 32 x 4 MiB keeps a
# 10 Gbit/s link busy through 100 ms of latency and stays inside the fetcher's budgets.
PLAN_WINDOW = 32
PEER_TIER_GROUP = "lazyfs.peer_tier"


def plan_chunks(ranges: Sequence[tuple[int, int]], size: int, chunk_size: int) -> list[int]:
    """The chunks a plan's byte ranges touch, each once, in the order the ranges first touch them.

    Ranges are the client's: clipped to the file, empty ones skipped.  Each chunk is visited
    once however the ranges overlap (a "next chunk not yet taken" table with path halving), so
    a hostile plan of 100k ranges over a 4,000-chunk file costs O(ranges + chunks), not their
    product on the event loop.
    """
    n = -(-size // chunk_size)
    nxt = list(range(n + 1))  # nxt[k]: k itself if not taken yet, else a step towards the next one

    def find(k: int) -> int:
        while nxt[k] != k:
            nxt[k] = nxt[nxt[k]]
            k = nxt[k]
        return k

    order: list[int] = []
    for a, b in ranges:
        a, b = max(a, 0), min(b, size)
        if b <= a:
            continue
        k, last = find(a // chunk_size), (b - 1) // chunk_size
        while k <= last:
            order.append(k)
            nxt[k] = k + 1
            k = find(k + 1)
    return order


class PeerTier(Protocol):
    """What the daemon needs from a peer tier: a fetcher source plus a server to start and stop."""

    @property
    def source(self) -> ChunkSource:
        """The fetcher tier (asked after the cache, before the origin)."""

    async def start(self, fetcher: ChunkFetcher) -> None:
        """Start serving peers (chunks come from ``fetcher``) and tracking members."""

    async def aclose(self) -> None: ...

    def statistics(self) -> Any:
        """A statistics dataclass for the metrics exporter."""

    def status(self) -> dict[str, Any]:
        """JSON-able state for ``lazyfs status``."""


PeerTierFactory = Callable[[PeerConfig, ChunkStore], PeerTier]


def load_peer_tier() -> PeerTierFactory:
    """The peer tier registered by an installed package (entry point group ``lazyfs.peer_tier``)."""
    found = list(entry_points(group=PEER_TIER_GROUP))
    if not found:
        raise UsageError("peer options need the p2p package, which is not installed")
    factory: PeerTierFactory = found[0].load()
    return factory


def _ref_blob(origin: Origin, ref: Ref) -> str:
    h = hashlib.sha256(f"{origin.url}\0{ref}".encode()).hexdigest()[:32]
    return f"ref-{h}"


async def open_manifest(origin: Origin, ref: Ref, store: ChunkStore | None) -> tuple[str, Manifest]:
    """Resolve ``ref`` and load its manifest, preferring verified copies in ``store``.

    A tag is resolved at the origin when it answers (tags move), else from the
    last digest seen for it; the manifest itself is immutable and read from
    the store when present.
    """
    try:
        digest = await resolve_ref(origin, ref)
        if store is not None and ref.digest is None:
            await asyncio.to_thread(store.put_blob, _ref_blob(origin, ref), digest.encode())
    except OriginError as exc:
        if isinstance(exc, NotFoundError) or store is None:
            raise
        cached = await asyncio.to_thread(store.get_blob, _ref_blob(origin, ref))
        if cached is None:
            raise
        digest = cached.decode()
        log.warning("origin unavailable (%s); using the cached digest %s for %s", exc, digest[:16], ref)
    if store is not None:
        data = await asyncio.to_thread(store.get_blob, f"manifest-{digest}")
        if data is not None:
            try:
                return digest, await asyncio.to_thread(verify_manifest, data, digest)
            except ManifestError as exc:
                log.warning("cached manifest %s is damaged (%s); fetching it again", digest[:16], exc)
    try:
        data = await origin.read(f"manifests/{digest}")
    except NotFoundError:
        raise NotFoundError(f"manifest {digest} is missing at {origin.url}") from None
    manifest = await asyncio.to_thread(verify_manifest, data, digest)
    if store is not None:
        await asyncio.to_thread(store.put_blob, f"manifest-{digest}", data)
    return digest, manifest


@contextlib.contextmanager
def _startup_gc() -> Iterator[None]:
    """No cyclic garbage collection while the manifest's tables are built.

    Decoding a manifest and building the inode table create ~100k objects (34k entries, 30k
    chunks, their tuples) and no garbage cycles; with the collector on, every 700 allocations
    start a collection, and the full ones walk everything built so far (measured: ~20 % of a
    30k-entry decode).  (The ``lazyfs mount`` process then freezes what start-up built: see
    ``lazyfs.cli``.)
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclasses.dataclass
class MountedFs:
    """Everything a running mount holds; what status and the control socket report on."""

    config: MountConfig
    ref: Ref
    digest: str
    manifest: Manifest
    origin: Origin
    store: ChunkStore
    fetcher: ChunkFetcher
    fs: LazyFilesystem
    socket_path: str
    peers: PeerTier | None = None
    started: float = dataclasses.field(default_factory=time.time)
    notes: list[str] = dataclasses.field(default_factory=list)
    traces: StartupTraces | None = None
    metadata: Callable[[], fuse.MetadataStatistics] | None = None  # the FUSE adapter's, once mounted

    def status(self) -> dict[str, Any]:
        return {
            "ref": str(self.ref),
            "digest": self.digest,
            "origin": self.origin.url,
            "mountpoint": self.config.mountpoint,
            "cache_dir": self.config.cache_dir,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "files": sum(1 for e in self.manifest.entries if e.type.name == "REG"),
            "bytes": self.manifest.total_size,
            "fetch": dataclasses.asdict(self.fetcher.statistics()),
            "cache": dataclasses.asdict(self.store.statistics()),
            "metadata": None if self.metadata is None else dataclasses.asdict(self.metadata()),
            "peers": None if self.peers is None else self.peers.status(),
            "trace": None if self.traces is None else self.traces.status(),
            "notes": self.notes,
        }


def _control_app(m: MountedFs) -> web.Application:
    async def status(request: web.Request) -> web.Response:
        return web.json_response(m.status())

    async def prefetch(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            paths = body.get("paths")
            if paths is not None and not (isinstance(paths, list) and all(isinstance(p, str) for p in paths)):
                raise ValueError("paths must be a list of strings")
            use_trace = body.get("trace", False) is True
            if use_trace and paths:
                raise ValueError("give paths or trace, not both")
        except (ValueError, AttributeError, json.JSONDecodeError) as exc:
            return web.json_response({"error": f"bad request: {exc}"}, status=400)
        if use_trace:
            return await _prefetch_trace(m, request)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        done = 0

        def on_chunk(n: int) -> None:
            nonlocal done
            done += n

        try:
            bpaths = [os.fsencode(p).strip(b"/") for p in paths] if paths is not None else None
            if bpaths is not None:
                for p in bpaths:
                    m.fs.ino_of(p)  # ENOENT before any work
            total = _warm_total(m, bpaths)
            await resp.write(json.dumps({"total": total, "done": 0}).encode() + b"\n")
            task = asyncio.create_task(m.fs.warm(bpaths, on_chunk))
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                await resp.write(json.dumps({"total": total, "done": done}).encode() + b"\n")
            task.result()
            await m.fetcher.wait_idle()
            await resp.write(json.dumps({"total": total, "done": done, "ok": True}).encode() + b"\n")
        except LazyfsError as exc:
            await resp.write(json.dumps({"error": str(exc)}).encode() + b"\n")
        return resp

    async def plan(request: web.Request) -> web.StreamResponse:
        """The loader's read plan: fetch a file's chunks in the given order, report cache paths.

        Body: ``{"path": "rel/path", "ranges": [[start, end], ...], "verify": "xxh3"}``.  Answer
        (NDJSON): ``{"chunk_size": N}``, then per chunk, as each is ready (fetches start in plan
        order, answers may come in any order), ``{"chunk": k, "path": P}``
        (``P`` null: read it through the mount) or ``{"chunk": k, "error": "..."}``.

        With ``"verify": "xxh3"`` the loader checks what it reads: a chunk file this process
        has not checked yet is reported at once with ``"xxh3": "<16 hex digits>"``, the
        checksum its bytes must have, instead of being read here first.  Without it (or for
        a chunk fetched or checked by this process) the reported file is already checked.
        Such a file is handed to the kernel's read-ahead, unless the body says
        ``"readahead": false`` (the loader reads files that are not in the page cache with
        ``O_DIRECT``: read-ahead would read them a second time, into memory nobody uses).
        """
        try:
            body = await request.json()
            rel = os.fsencode(str(body["path"])).strip(b"/")
            ranges = [(int(a), int(b)) for a, b in body["ranges"]]
            client_checks = body.get("verify") == "xxh3"
            readahead = body.get("readahead", True) is not False
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError, json.JSONDecodeError) as exc:
            return web.json_response({"error": f"bad request: {exc}"}, status=400)
        entry = m.manifest.entry(rel)
        if entry is None or m.manifest.resolve(entry).type.name != "REG":
            return web.json_response({"error": f"{rel!r} is not a regular file of this mount"}, status=404)
        entry = m.manifest.resolve(entry)
        cs = m.manifest.chunk_size
        order = plan_chunks(ranges, entry.size, cs)
        if m.fs.on_read is not None:
            m.fs.on_read([entry.chunks[k] for k in order])
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        await resp.write(json.dumps({"chunk_size": cs}).encode() + b"\n")

        def cached(index: int) -> dict[str, str | None] | None:
            digest = m.manifest.chunks[index].digest
            try:
                if client_checks:
                    located = m.store.locate(digest, readahead=readahead)
                    if located is None:
                        return None
                    path, checksum = located
                    if checksum is not None:
                        return {"path": str(path), "xxh3": f"{checksum:016x}"}
                    return {"path": str(path)}
                found = m.store.path_of(digest)
            except Exception as exc:  # a broken cache is a miss, never a crash
                log.warning("cache lookup of chunk %d failed: %s", index, exc)
                return None
            return None if found is None else {"path": str(found)}

        async def one(k: int) -> bytes:
            try:
                # A chunk already in the cache is reported at once: the loader reads the file, so
                # pulling it through the fetcher (a 4 MiB copy into fresh memory) would be waste.
                answer = await asyncio.to_thread(cached, entry.chunks[k])
                if answer is None:
                    answer = {"path": await m.fetcher.cached_path(entry.chunks[k])}
                return json.dumps({"chunk": k, **answer}).encode() + b"\n"
            except LazyfsError as exc:
                return json.dumps({"chunk": k, "error": str(exc)}).encode() + b"\n"

        # A window of chunks in flight keeps the link busy.  Fetches start in plan order, answers
        # go out as chunks are ready: in plan order, one late chunk (at the end of a coalesced
        # request, say) held the whole window, and the fetches behind it did not start.
        # Measured on a 1 Gbit/s link: 66-95 MB/s in plan order, against 102 MB/s for a plain
        # sequential read of the same file through the mount.
        window: set[asyncio.Task[bytes]] = set()
        todo = collections.deque(order)
        try:
            while todo or window:
                while len(window) < PLAN_WINDOW and todo:
                    window.add(asyncio.create_task(one(todo.popleft())))
                done, window = await asyncio.wait(window, return_when=asyncio.FIRST_COMPLETED)
                await resp.write(b"".join(t.result() for t in done))
        finally:
            for t in window:
                t.cancel()
        return resp

    async def manifest(request: web.Request) -> web.Response:
        """What is mounted: the ref, the manifest digest and its annotations (an image's config)."""
        return web.json_response(
            {"ref": str(m.ref), "digest": m.digest, "origin": m.origin.url, "annotations": dict(m.manifest.annotations)}
        )

    async def trace_publish(request: web.Request) -> web.Response:
        """Stop recording and publish the startup trace to the origin now."""
        if m.traces is None:
            return web.json_response({"error": "this mount has no trace"}, status=409)
        try:
            key, n = await m.traces.publish()
        except UsageError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        except LazyfsError as exc:
            return web.json_response({"error": f"could not publish to {m.origin.url}: {exc}"}, status=502)
        return web.json_response({"key": key, "chunks": n, "origin": m.origin.url})

    app = web.Application()
    app.router.add_get("/status", status)
    app.router.add_get("/manifest", manifest)
    app.router.add_post("/prefetch", prefetch)
    app.router.add_post("/plan", plan)
    app.router.add_post("/trace/publish", trace_publish)
    return app


async def _prefetch_trace(m: MountedFs, request: web.Request) -> web.StreamResponse:
    """``/prefetch`` with ``{"trace": true}``: fetch the published trace again and replay it, with progress."""
    traces = m.traces
    assert traces is not None
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    done = 0

    def on_chunk(n: int) -> None:
        nonlocal done
        done += n

    try:
        trace = await traces.load()
        if trace is None:
            raise UsageError(
                f"no startup trace is published for this manifest at {m.origin.url} "
                "(record one with `lazyfs mount --record-trace` or `lazyfs run --record-trace`)"
            )
        total = sum(m.manifest.chunks[i].size for i in trace.chunks)
        await resp.write(json.dumps({"total": total, "done": 0, "chunks": len(trace.chunks)}).encode() + b"\n")
        task = asyncio.create_task(traces.replay(trace, on_chunk))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                await resp.write(json.dumps({"total": total, "done": done}).encode() + b"\n")
        finally:
            task.cancel()  # the client went away: stop replaying
        task.result()
        await resp.write(json.dumps({"total": total, "done": done, "ok": True}).encode() + b"\n")
    except LazyfsError as exc:
        await resp.write(json.dumps({"error": str(exc)}).encode() + b"\n")
    return resp


def _warm_total(m: MountedFs, paths: list[bytes] | None) -> int:
    return sum(m.manifest.chunks[i].size for i in m.fs.chunks_of(paths))


def _remove_stale_sockets(runtime_dir: str) -> None:
    """Control sockets of daemons that died without cleaning up (SIGKILL, OOM) are removed."""
    with contextlib.suppress(OSError):
        for name in os.listdir(runtime_dir):
            pid = name.removeprefix("lazyfs-").removesuffix(".sock")
            if not (name.startswith("lazyfs-") and name.endswith(".sock") and pid.isdigit()):
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(runtime_dir, name))
            except PermissionError:
                pass  # alive, someone else's


@contextlib.asynccontextmanager
async def _control_server(m: MountedFs) -> AsyncIterator[None]:
    runner = web.AppRunner(_control_app(m), access_log=None)
    await runner.setup()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(m.socket_path)
    site = web.UnixSite(runner, m.socket_path)
    await site.start()
    os.chmod(m.socket_path, 0o600)  # status and prefetch are for the daemon's owner
    try:
        yield
    finally:
        await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(m.socket_path)


def _check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.is_dir():
        raise UsageError(f"{mountpoint}: mountpoint is not a directory")
    if os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint}: something is already mounted there")


async def run_mount(
    config: MountConfig,
    on_ready: Callable[[MountedFs], None] = lambda m: None,
    peer_tier: PeerTierFactory | None = None,
) -> None:
    """Mount ``config.ref`` and serve until unmounted or signalled."""
    ref = parse_ref(config.ref)
    mountpoint = Path(config.mountpoint)
    await asyncio.to_thread(_check_mountpoint, mountpoint)
    if config.peers is not None and peer_tier is None:
        peer_tier = load_peer_tier()
    store = await asyncio.to_thread(ChunkStore.open, Path(config.cache_dir), config.cache_size)
    origin = open_origin(config.origin, config.origin_config)
    fetcher: ChunkFetcher | None = None
    peers: PeerTier | None = None
    traces: StartupTraces | None = None
    try:
        if config.record_trace and not origin.writable:
            raise UsageError(
                f"--record-trace publishes the trace to the origin, but {origin.url} is read-only; "
                "record from a writable origin (file:// or s3://) holding the same published tree"
            )
        with _startup_gc():
            digest, manifest = await open_manifest(origin, ref, store)
            if config.peers is not None and peer_tier is not None:
                peers = peer_tier(config.peers, store)
            fetcher = ChunkFetcher(
                manifest,
                origin,
                store,
                FetchConfig(read_timeout=config.read_timeout),
                sources=[] if peers is None else [peers.source],
            )
            if peers is not None:
                await peers.start(fetcher)
            await asyncio.to_thread(Path(config.runtime_dir).mkdir, parents=True, exist_ok=True, mode=0o700)
            await asyncio.to_thread(_remove_stale_sockets, config.runtime_dir)
            socket_path = os.path.join(config.runtime_dir, f"lazyfs-{os.getpid()}.sock")
            holder: dict[str, MountedFs] = {}
            traces = StartupTraces(digest, manifest, origin, fetcher, store.contains, record=config.record_trace)
            fs = LazyFilesystem(
                manifest,
                fetcher,
                control_xattrs={
                    CONTROL_XATTR: lambda: socket_path.encode(),
                    STATUS_XATTR: lambda: json.dumps(holder["m"].status()).encode(),
                },
                on_read=traces.on_read,
            )
        m = MountedFs(config, ref, digest, manifest, origin, store, fetcher, fs, socket_path, peers, traces=traces)
        holder["m"] = m
        if config.metrics_addr:
            from lazyfs.metrics import StatisticsCollector, serve_metrics  # prometheus_client: only when asked

            groups: dict[str, Callable[[], Any]] = {"fetch": fetcher.statistics, "cache": store.statistics}
            groups["metadata"] = lambda: m.metadata() if m.metadata is not None else None
            if peers is not None:
                groups["peers"] = peers.statistics
            collector = StatisticsCollector(groups, {"mountpoint": config.mountpoint, "ref": str(ref)})
            try:
                serve_metrics(config.metrics_addr, collector)
            except (OSError, ValueError) as exc:
                raise UsageError(f"cannot serve metrics on {config.metrics_addr}: {exc}") from exc
        if config.replay_trace:
            # Started before the mount so the trace's one small read overlaps the mount itself.
            traces.start_replay_nowait()
        adapter = fuse.mount(fs, mountpoint, allow_other=config.allow_other, fsname=f"lazyfs:{ref}")
        m.metadata = adapter.statistics
        try:
            async with _control_server(m):
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, fuse.terminate)
                serving = asyncio.create_task(fuse.run())
                dev = await asyncio.to_thread(fuse.mount_device, mountpoint)
                adapter.list_ahead.device = fuse.device_number(dev)
                note = await asyncio.to_thread(fuse.tune_read_ahead, mountpoint, dev)
                if note:
                    m.notes.append(note)
                    log.warning("%s", note)
                on_ready(m)
                await serving
        finally:
            adapter.list_ahead.close()
            fuse.close(unmount=True)
    finally:
        if traces is not None:
            await traces.aclose()  # publishes a recording not published yet
        if peers is not None:
            await peers.aclose()
        if fetcher is not None:
            await fetcher.aclose()
        await origin.aclose()
        await asyncio.to_thread(store.close)
