"""GPU check: lazyfs.loader vs safetensors, page cache -> GPU memory, on the device machine.

ONE prepared script for the borrowed H100/H200 (DESIGN.md, "GPU checks").  That machine has
torch, safetensors and numpy but none of the daemon's packages (pyfuse3, lmdb, zstandard,
blake3): this script imports only ``lazyfs.loader`` (which needs none of them) and the
standard library, and is run from the repository root::

    python bench/gpu_check.py                       # 4 GiB bf16, device cuda
    python bench/gpu_check.py --device cpu --size 64MiB   # dry run anywhere (tests/unit/test_loader.py)

What it does:

1. Writes ``--size`` bytes (default 4 GiB) of bf16 weights as a safetensors file in ``--dir``
   (Llama-7B-like 4096x4096 and 11008x4096 matrices plus norms; normal(0, 0.02) values drawn
   once, 64 MiB of them, and written rotated by a different offset each time, so writing costs
   disk time only and no two 4 MiB chunks are alike: the mount stage's seed deduplicates
   nothing and its first load fetches every byte), unless it is already there.
2. Warms it into the page cache (reads it twice) and checks how much of it is resident, so both
   loaders read page cache, not disk: this compares the host-to-device paths.
3. Warm-up: one small load with each loader (CUDA context, the loader's pinned ring).
4. ``--repeat`` times, interleaved: ``safetensors.torch.load_file(device=D)`` and
   ``lazyfs.loader.load_file(device=D)`` (each followed by ``torch.cuda.synchronize()``; the
   result is dropped and the allocator cache emptied between runs).  Then a small sweep of the
   loader's knobs (threads, pinned ring size) — so one borrowed run answers "what should the
   defaults be" too.
5. Checks the two results are bit-identical, prints a table: GB/s (decimal), seconds, the ratio
   to safetensors, and the limits (pinned host-to-device 55 GB/s on an H100; 16 threads copy page
   cache to pinned memory at ~34 GB/s).  Goals: lazyfs >= 25 GB/s and >= 5x safetensors.

6. ``cold`` stage: the disk's O_DIRECT read rate of the file (best of 4-32 threads, 16 MiB reads), then the
   file's pages are dropped (``drop_caches``, else ``posix_fadvise(DONTNEED)``; the resident
   fraction is checked and printed) before one cold load with each loader — against that rate.
7. ``mount`` stage (needs the daemon's packages, carried as wheels, and /dev/fuse): the file is
   seeded to a ``file://`` origin in ``--dir``, mounted with ``lazyfs mount``, and loaded through
   the mount: first load (chunks fetched from the origin, verified, cached), hot loads with the
   same daemon (the loader's cache fast path), one load with a fresh daemon (which re-verifies
   each cache file once), each against ``safetensors.torch.load_file`` of the original file in
   the same run; last, ``safetensors.torch.load_file`` of the file on the mount (mmap through FUSE).

Stages: ``--stages hot,cold,mount`` (default all three).  ``--json FILE`` also writes every figure
as JSON.  Exit status 0 when it ran (goals are reported, not asserted: a figure is a finding); a
stage that cannot run here (no daemon packages, no FUSE, no eviction) says so and why.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

import lazyfs.loader as loader

MiB = 1024 * 1024
GiB = 1024 * MiB
GB = 1e9
# DESIGN.md, "Measured limits" (H100 box): pinned host-to-device 55 GB/s; 16 threads copy page
# cache to pinned memory at ~34 GB/s; safetensors load_file(device="cuda") 3.3-4.8 GB/s hot.
H2D_PINNED_GBPS = 55.0
PAGE_CACHE_16T_GBPS = 34.0
GOAL_GBPS = 25.0
GOAL_RATIO = 5.0


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 4GiB, 64MiB")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


# --- the file ------------------------------------------------------------------------------------------


def layer_shapes(size: int) -> list[tuple[str, tuple[int, ...]]]:
    """Llama-7B-like tensors (hidden 4096, MLP 11008) adding up to about ``size`` bytes of bf16."""
    hidden, inter = 4096, 11008
    if size < 64 * MiB:  # dry runs: the same mix, smaller
        hidden, inter = 512, 1376
    layer = [
        ("input_layernorm.weight", (hidden,)),
        ("self_attn.q_proj.weight", (hidden, hidden)),
        ("self_attn.k_proj.weight", (hidden, hidden)),
        ("self_attn.v_proj.weight", (hidden, hidden)),
        ("self_attn.o_proj.weight", (hidden, hidden)),
        ("post_attention_layernorm.weight", (hidden,)),
        ("mlp.gate_proj.weight", (inter, hidden)),
        ("mlp.up_proj.weight", (inter, hidden)),
        ("mlp.down_proj.weight", (hidden, inter)),
    ]
    out: list[tuple[str, tuple[int, ...]]] = []
    total = 0
    i = 0
    while True:
        for name, shape in layer:
            n = 2 * _numel(shape)
            if total + n > size:
                return out
            out.append((f"model.layers.{i}.{name}", shape))
            total += n
        i += 1


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_model(path: Path, size: int) -> int:
    """A safetensors file of ~``size`` bytes of bf16 ~ N(0, 0.02); returns its size."""
    shapes = layer_shapes(size)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in shapes:
        n = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    values = min(32 * MiB, max(1, off // 2))  # 64 MiB of bf16 at most, reused
    block = (torch.randn(values, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    block_bytes = block.view(torch.uint8).numpy().tobytes()
    tmp = path.with_suffix(".tmp")
    view = memoryview(block_bytes)
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        left = off
        turn = 0
        while left:
            # The block rotated by an odd number of bf16 values per pass: no chunk repeats.
            shift = (turn * 2 * 4099) % len(view)
            for part in (view[shift:], view[:shift]):
                k = min(left, len(part))
                f.write(part[:k])
                left -= k
            turn += 1
    tmp.rename(path)
    return path.stat().st_size


def warm_page_cache(path: Path) -> float:
    """Read the file twice (1 MiB reads); returns the fraction resident afterwards (mincore)."""
    for _ in range(2):
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(16 * MiB)
            while f.readinto(buf):
                pass
    return resident_fraction(path)


def resident_fraction(path: Path) -> float:
    """The fraction of ``path``'s pages in the page cache (``mincore`` on a read-only map)."""
    import ctypes
    import mmap

    import numpy as np

    size = path.stat().st_size
    if not size:
        return 1.0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    vec = np.zeros((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE, dtype=np.uint8)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        view = np.frombuffer(m, dtype=np.uint8)
        rc = libc.mincore(view.ctypes.data, size, vec.ctypes.data)
        del view  # release the buffer before the map closes
    return float((vec & 1).mean()) if rc == 0 else float("nan")


# --- timing --------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def timed(fn: Callable[[], dict[str, torch.Tensor]], device: str) -> tuple[float, dict[str, torch.Tensor]]:
    release(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and a[k].device == b[k].device
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
        for k in a
    )


STAGES = ("hot", "cold", "mount")


def gbps(size: int, seconds: float) -> float:
    return size / seconds / GB


def row(label: str, times: list[float], size: int, ref: float | None = None) -> str:
    best = min(times)
    ratio = f"{ref / best:14.2f}" if ref is not None else f"{'':>14}"
    return f"{label:<52} {best:8.3f} {statistics.median(times):9.3f} {gbps(size, best):7.2f} {ratio}"


def header_row() -> str:
    return f"{'load':<52} {'best s':>8} {'median s':>9} {'GB/s':>7} {'x safetensors':>14}"


def hot_stage(ctx: Context) -> None:
    """Page cache -> device: both loaders, interleaved, then the knob sweep."""
    first_key = ["model.layers.0.self_attn.q_proj.weight"]
    device, size = ctx.device, ctx.size
    # Warm-up: CUDA context and caching allocator, the loader's pinned ring (kept between loads).
    timed(ctx.st_load, device)
    timed(functools.partial(ctx.lz_load, keys=first_key), device)
    timed(ctx.lz_load, device)
    release(device)

    st_times: list[float] = []
    lz_times: list[float] = []
    for _ in range(ctx.repeat):
        dt, ref = timed(ctx.st_load, device)
        st_times.append(dt)
        del ref
        dt, got = timed(ctx.lz_load, device)
        lz_times.append(dt)
        del got
    # Equality once, outside the timings (needs both in device memory).
    release(device)
    ref = ctx.st_load()
    got = ctx.lz_load()
    equal = same(ref, got)
    ctx.equal = ctx.equal and equal
    first = loader.last_statistics()
    del ref, got
    release(device)

    st_best, lz_best = min(st_times), min(lz_times)
    ratio = st_best / lz_best
    lz_gbps = gbps(size, lz_best)
    print("\n== hot: file in the page cache -> device ==")
    print(header_row())
    print(row("safetensors.torch.load_file", st_times, size, st_best))
    print(row("lazyfs.loader.load_file", lz_times, size, st_best))
    if first is not None:
        print(f"lazyfs first tensor after {first.first_tensor_seconds * 1000:.1f} ms")
    print(f"equal: {'yes' if equal else 'NO'}")
    print(f"goals: >= {GOAL_GBPS:g} GB/s {'met' if lz_gbps >= GOAL_GBPS else 'MISSED'}, "
          f">= {GOAL_RATIO:g}x safetensors {'met' if ratio >= GOAL_RATIO else 'MISSED'}")
    print(f"limits: pinned host-to-device {H2D_PINNED_GBPS:g} GB/s; page cache -> pinned, 16 threads, "
          f"~{PAGE_CACHE_16T_GBPS:g} GB/s (DESIGN.md, H100 box)")
    ctx.figures["hot"] = {"safetensors_s": st_times, "lazyfs_s": lz_times, "lazyfs_gbps": lz_gbps,
                          "ratio": ratio, "equal": equal}

    if ctx.sweep:
        print()
        print(f"{'threads':>7} {'pinned MiB':>10} {'best s':>8} {'GB/s':>7}")
        cpus = os.cpu_count() or 1
        sweep: list[dict[str, float]] = []
        for threads in sorted({max(2, cpus // 2), cpus, 2 * cpus}):
            for pinned in (8 * loader_ring(), 32 * loader_ring()):
                loader.free_pinned_memory()
                load = functools.partial(ctx.lz_load, threads=threads, pinned_bytes=pinned)
                timed(functools.partial(load, keys=first_key), device)  # pins the ring
                best = min(timed(load, device)[0] for _ in range(max(1, ctx.repeat - 1)))
                print(f"{threads:7d} {pinned // MiB:10d} {best:8.3f} {gbps(size, best):7.2f}", flush=True)
                sweep.append({"threads": threads, "pinned_mib": pinned // MiB, "best_s": best})
        loader.free_pinned_memory()
        ctx.figures["sweep"] = sweep


# --- cold disk -----------------------------------------------------------------------------------------


def o_direct_rate(path: Path, threads: int = 8, block: int = 16 * MiB) -> float:
    """Seconds to read ``path`` once with O_DIRECT (``threads`` parallel ``block``-sized reads)."""
    import concurrent.futures as cf
    import mmap
    import threading

    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    nxt = iter(range(0, size, block))
    lock = threading.Lock()

    def worker() -> None:
        buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT wants
        try:
            while True:
                with lock:
                    off = next(nxt, None)
                if off is None:
                    return
                os.preadv(fd, [buf], off)
        finally:
            buf.close()

    try:
        t = time.perf_counter()
        with cf.ThreadPoolExecutor(threads) as pool:
            for f in [pool.submit(worker) for _ in range(threads)]:
                f.result()
        return time.perf_counter() - t
    finally:
        os.close(fd)


def evict(path: Path) -> tuple[float, str]:
    """Drop ``path``'s pages from the page cache; returns (resident fraction after, how)."""
    how = []
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        how.append("drop_caches")
    except OSError as exc:
        how.append(f"drop_caches refused ({exc.strerror})")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        how.append("fadvise DONTNEED")
    except OSError as exc:
        how.append(f"fadvise refused ({exc.strerror})")
    finally:
        os.close(fd)
    return resident_fraction(path), ", ".join(how)


def cold_stage(ctx: Context) -> None:
    """Disk -> device with the page cache dropped, against the disk's O_DIRECT rate."""
    device, size, path = ctx.device, ctx.size, ctx.path
    print("\n== cold: page cache dropped, disk -> device ==")
    od: list[float] = []
    try:  # the disk's rate: the best of a few queue depths
        for threads in (4, 8, 16, 32):
            dt = min(o_direct_rate(path, threads) for _ in range(2))
            od.append(dt)
            print(f"disk O_DIRECT read, {threads} threads x 16 MiB: {dt:.3f} s = {gbps(size, dt):.2f} GB/s")
    except OSError as exc:
        print(f"O_DIRECT read failed: {exc.strerror}; no disk rate")
    runs: dict[str, list[float]] = {"safetensors": [], "lazyfs": []}
    residents: list[float] = []
    for _ in range(2):
        for name, fn in (("safetensors", ctx.st_load), ("lazyfs", ctx.lz_load)):
            resident, how = evict(path)
            residents.append(resident)
            dt, out = timed(fn, device)
            del out
            runs[name].append(dt)
    print(f"eviction: {how}; resident before each load: {', '.join(f'{r:.0%}' for r in residents)}")
    if max(residents) > 0.05:
        print("NOTE: the page cache could not be dropped here: these loads are not cold")
    print(header_row())
    st_best = min(runs["safetensors"])
    print(row("safetensors.torch.load_file (cold)", runs["safetensors"], size, st_best))
    print(row("lazyfs.loader.load_file (cold)", runs["lazyfs"], size, st_best))
    if od:
        print(f"lazyfs cold / disk O_DIRECT rate: {min(od) / min(runs['lazyfs']):.2f}")
    ctx.figures["cold"] = {"o_direct_s": od, "resident": residents, "eviction": how, **runs}
    release(device)
    warm_page_cache(path)


# --- through a lazyfs mount ----------------------------------------------------------------------------


def daemon_missing() -> list[str]:
    import importlib.util

    return [m for m in ("pyfuse3", "lmdb", "zstandard", "blake3", "msgpack") if importlib.util.find_spec(m) is None]


def mount_stage(ctx: Context) -> None:
    """Seed, mount, and load through the mount: first (from the origin), hot, fresh daemon."""
    import shutil

    print("\n== mount: through a lazyfs mount (file:// origin in --dir) ==")
    missing = daemon_missing()
    if missing:
        print(f"mount stage cannot run: the daemon's packages are missing ({', '.join(missing)}); "
              "carry them as wheels (DESIGN.md, GPU checks)")
        ctx.figures["mount"] = {"error": f"missing {missing}"}
        return
    from bench.common import Mount, seed_once

    device, size, path = ctx.device, ctx.size, ctx.path
    origin = ctx.dir / "origin"
    t = time.perf_counter()
    ref = seed_once(path, origin, f"gpu-check:r2-s{size}")
    print(f"seeded {ref} to file://{origin} in {time.perf_counter() - t:.1f} s", flush=True)
    cache = ctx.dir / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    mnt = ctx.dir / "mnt"
    mpath = mnt / path.name
    mount_load = functools.partial(loader.load_file, mpath, device=device)
    figures: dict[str, Any] = {}
    try:
        with Mount(f"file://{origin}", ref, mnt, cache) as m:
            dt, got = timed(mount_load, device)
            stats = loader.last_statistics()
            origin_bytes = int(m.status().get("fetch", {}).get("bytes_from_origin", 0))
            figures.update(first_s=dt, origin_bytes=origin_bytes)
            print(f"first load through the mount (chunks from the origin, verified, cached): {dt:.3f} s "
                  f"= {gbps(size, dt):.2f} GB/s of file; {origin_bytes / GB:.2f} GB read from the origin",
                  flush=True)
            ref_tensors = ctx.st_load()
            equal = same(ref_tensors, got)
            ctx.equal = ctx.equal and equal
            print(f"equal to safetensors of the original: {'yes' if equal else 'NO'}")
            if stats is not None:
                print(f"first tensor after {stats.first_tensor_seconds * 1000:.1f} ms; chunks read from the "
                      f"cache {stats.chunks_from_cache}, through the mount {stats.chunks_from_mount}")
                figures["chunks"] = [stats.chunks_from_cache, stats.chunks_from_mount]
            del got, ref_tensors
            st_times: list[float] = []
            hot: list[float] = []
            for _ in range(ctx.repeat):
                st_times.append(timed(ctx.st_load, device)[0])
                hot.append(timed(mount_load, device)[0])
            figures.update(safetensors_s=st_times, hot_s=hot, daemon=m.status().get("fetch"))
        with Mount(f"file://{origin}", ref, mnt, cache):
            fresh = timed(mount_load, device)[0]
            fresh_hot = [timed(mount_load, device)[0] for _ in range(max(1, ctx.repeat - 1))]
            figures.update(fresh_s=[fresh], fresh_hot_s=fresh_hot)
            st_best = min(st_times)
            print(header_row())
            print(row("safetensors.torch.load_file, original file", st_times, size, st_best))
            print(row("lazyfs loader via mount, same daemon (hot)", hot, size, st_best))
            print(row("lazyfs loader via mount, fresh daemon, 1st", [fresh], size, st_best))
            print(row("lazyfs loader via mount, fresh daemon, again", fresh_hot, size, st_best), flush=True)
            if ctx.st_mount:
                st_mnt = timed(functools.partial(ctx.st_module.load_file, mpath, device=device), device)[0]
                figures["safetensors_on_mount_s"] = [st_mnt]
                print(row("safetensors.torch.load_file of the mounted file", [st_mnt], size, st_best))
    except Exception as exc:  # a finding, not a crash: say what failed and keep the other figures
        print(f"mount stage failed: {type(exc).__name__}: {exc}")
        figures["error"] = f"{type(exc).__name__}: {exc}"
    ctx.figures["mount"] = figures
    release(device)


# --- main ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    device: str
    path: Path
    size: int
    dir: Path
    repeat: int
    sweep: bool
    st_mount: bool
    st_module: Any
    st_load: Callable[[], dict[str, torch.Tensor]]
    lz_load: Callable[..., dict[str, torch.Tensor]]
    equal: bool = True
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)


def parse_stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise argparse.ArgumentTypeError(f"bad stages {text!r}: a comma-separated list of {', '.join(STAGES)}")
    return stages


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    p.add_argument("--size", type=parse_size, default=4 * GiB, help="model size (default 4GiB)")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp/lazyfs-gpu-check"), help="where the file goes")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each loader (default 3)")
    p.add_argument("--stages", type=parse_stages, default=list(STAGES), help="hot,cold,mount (default all)")
    p.add_argument("--no-sweep", action="store_true", help="skip the threads / pinned-ring sweep")
    p.add_argument("--no-safetensors-on-mount", action="store_true",
                   help="skip safetensors.torch.load_file of the mounted file (mmap through FUSE: slow)")
    p.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = p.parse_args(argv)
    device: str = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu for a dry run", file=sys.stderr)
        return 2

    import safetensors
    import safetensors.torch

    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / f"model-{args.size}-r2.safetensors"  # r2: chunks unique
    t = time.perf_counter()
    if not path.exists():
        n = write_model(path, args.size)
        print(f"wrote {path} ({n / GB:.2f} GB) in {time.perf_counter() - t:.1f} s", flush=True)
    size = path.stat().st_size
    resident = warm_page_cache(path)
    dev_name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    print(f"device: {dev_name}; torch {torch.__version__}, safetensors {safetensors.__version__}, "
          f"python {platform.python_version()}, {os.cpu_count()} CPUs, kernel {platform.release()}", flush=True)
    print(f"file: {size / GB:.2f} GB, {resident:.0%} in page cache", flush=True)

    ctx = Context(
        device=device, path=path, size=size, dir=args.dir, repeat=args.repeat, sweep=not args.no_sweep,
        st_mount=not args.no_safetensors_on_mount, st_module=safetensors.torch,
        st_load=functools.partial(safetensors.torch.load_file, path, device=device),
        lz_load=functools.partial(loader.load_file, path, device=device),
    )
    ctx.figures["machine"] = {"device": dev_name, "torch": torch.__version__, "cpus": os.cpu_count(),
                              "size": size, "kernel": platform.release()}
    stage_fns = {"hot": hot_stage, "cold": cold_stage, "mount": mount_stage}
    for stage in args.stages:
        stage_fns[stage](ctx)
        sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(ctx.figures, indent=1, default=str))
    return 0 if ctx.equal else 1


def loader_ring() -> int:
    from lazyfs.loader import api

    return api.RING_BUFFER


if __name__ == "__main__":
    sys.exit(main())
