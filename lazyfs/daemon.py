"""The mount daemon: the composition root.

``config -> origin -> store -> manifest -> fetcher -> fs -> FUSE mount``, plus
the control socket (status, prefetch) and the optional Prometheus exporter.

Manifest resolution works offline when it can: the ref's last known digest and
every verified manifest are kept in the cache directory, so a remount with
the origin down succeeds and serves whatever is cached.

Shutdown: SIGTERM/SIGINT or an external ``umount`` end the FUSE loop; the
daemon then unmounts (if still mounted), lets pending cache writes finish and
closes the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from lazyfs import fuse
from lazyfs.catalog import resolve_ref, verify_manifest
from lazyfs.config import MountConfig
from lazyfs.errors import LazyfsError, ManifestError, NotFoundError, OriginError, UsageError
from lazyfs.fetch import ChunkFetcher, ChunkSource, FetchConfig
from lazyfs.fs import CONTROL_XATTR_PREFIX, LazyFilesystem
from lazyfs.manifest import Manifest, Ref, parse_ref
from lazyfs.metrics import StatisticsCollector, serve_metrics
from lazyfs.origin import open_origin
from lazyfs.origin.base import Origin
from lazyfs.store import ChunkStore

__all__ = ["CONTROL_XATTR", "STATUS_XATTR", "MountedFs", "open_manifest", "run_mount"]

log = logging.getLogger(__name__)

CONTROL_XATTR = CONTROL_XATTR_PREFIX + b"control"  # -> path of the control socket
STATUS_XATTR = CONTROL_XATTR_PREFIX + b"status"  # -> status JSON


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
    started: float = dataclasses.field(default_factory=time.time)
    notes: list[str] = dataclasses.field(default_factory=list)

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
        except (ValueError, json.JSONDecodeError) as exc:
            return web.json_response({"error": f"bad request: {exc}"}, status=400)
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

    app = web.Application()
    app.router.add_get("/status", status)
    app.router.add_post("/prefetch", prefetch)
    return app


def _warm_total(m: MountedFs, paths: list[bytes] | None) -> int:
    idx: set[int] = set()
    for e in m.manifest.entries:
        if e.type.name != "REG":
            continue
        if paths is None or any(not p or e.path == p or e.path.startswith(p + b"/") for p in paths):
            idx.update(e.chunks)
    if paths is not None:
        for p in paths:
            link = m.manifest.entry(p)
            if link is not None and link.type.name == "HARDLINK":
                idx.update(m.manifest.resolve(link).chunks)
    return sum(m.manifest.chunks[i].size for i in idx)


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
    sources: Sequence[ChunkSource] = (),
) -> None:
    """Mount ``config.ref`` and serve until unmounted or signalled."""
    ref = parse_ref(config.ref)
    mountpoint = Path(config.mountpoint)
    await asyncio.to_thread(_check_mountpoint, mountpoint)
    store = await asyncio.to_thread(ChunkStore.open, Path(config.cache_dir), config.cache_size)
    origin = open_origin(config.origin, config.origin_config)
    fetcher: ChunkFetcher | None = None
    try:
        digest, manifest = await open_manifest(origin, ref, store)
        fetcher = ChunkFetcher(
            manifest, origin, store, FetchConfig(read_timeout=config.read_timeout), sources=sources
        )
        await asyncio.to_thread(Path(config.runtime_dir).mkdir, parents=True, exist_ok=True, mode=0o700)
        socket_path = os.path.join(config.runtime_dir, f"lazyfs-{os.getpid()}.sock")
        holder: dict[str, MountedFs] = {}
        fs = LazyFilesystem(
            manifest,
            fetcher,
            control_xattrs={
                CONTROL_XATTR: lambda: socket_path.encode(),
                STATUS_XATTR: lambda: json.dumps(holder["m"].status()).encode(),
            },
        )
        m = MountedFs(config, ref, digest, manifest, origin, store, fetcher, fs, socket_path)
        holder["m"] = m
        if config.metrics_addr:
            collector = StatisticsCollector(
                {"fetch": fetcher.statistics, "cache": store.statistics},
                {"mountpoint": config.mountpoint, "ref": str(ref)},
            )
            try:
                serve_metrics(config.metrics_addr, collector)
            except (OSError, ValueError) as exc:
                raise UsageError(f"cannot serve metrics on {config.metrics_addr}: {exc}") from exc
        fuse.mount(fs, mountpoint, allow_other=config.allow_other, fsname=f"lazyfs:{ref}")
        try:
            async with _control_server(m):
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, fuse.terminate)
                serving = asyncio.create_task(fuse.run())
                note = await asyncio.to_thread(fuse.tune_read_ahead, mountpoint)
                if note:
                    m.notes.append(note)
                    log.warning("%s", note)
                on_ready(m)
                await serving
        finally:
            fuse.close(unmount=True)
    finally:
        if fetcher is not None:
            await fetcher.aclose()
        await origin.aclose()
        await asyncio.to_thread(store.close)
