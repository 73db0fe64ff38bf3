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
   once per 64 MiB and reused, so writing costs disk time only), unless it is already there.
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

Exit status 0 when it ran (goals are reported, not asserted: a figure is a finding).
"""

from __future__ import annotations

import argparse
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
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        left = off
        while left:
            k = min(left, len(block_bytes))
            f.write(block_bytes[:k])
            left -= k
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    p.add_argument("--size", type=parse_size, default=4 * GiB, help="model size (default 4GiB)")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp/lazyfs-gpu-check"), help="where the file goes")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each loader (default 3)")
    p.add_argument("--no-sweep", action="store_true", help="skip the threads / pinned-ring sweep")
    args = p.parse_args(argv)
    device: str = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu for a dry run", file=sys.stderr)
        return 2

    import safetensors
    import safetensors.torch

    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / f"model-{args.size}.safetensors"
    t = time.perf_counter()
    if not path.exists():
        n = write_model(path, args.size)
        print(f"wrote {path} ({n / GB:.2f} GB) in {time.perf_counter() - t:.1f} s", flush=True)
    size = path.stat().st_size
    resident = warm_page_cache(path)
    dev_name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    print(f"device: {dev_name}; torch {torch.__version__}, safetensors {safetensors.__version__}, "
          f"python {platform.python_version()}, {os.cpu_count()} CPUs", flush=True)
    print(f"file: {size / GB:.2f} GB, {resident:.0%} in page cache", flush=True)

    # Warm-up: CUDA context and caching allocator, the loader's pinned ring (kept between loads).
    first_key = ["model.layers.0.self_attn.q_proj.weight"]
    st_load = functools.partial(safetensors.torch.load_file, path, device=device)
    lz_load = functools.partial(loader.load_file, path, device=device)
    timed(st_load, device)
    timed(functools.partial(lz_load, keys=first_key), device)
    timed(lz_load, device)
    release(device)

    st_times: list[float] = []
    lz_times: list[float] = []
    equal = True
    for _ in range(args.repeat):
        dt, ref = timed(st_load, device)
        st_times.append(dt)
        del ref
        dt, got = timed(lz_load, device)
        lz_times.append(dt)
        del got
    # Equality once, outside the timings (needs both in device memory).
    release(device)
    ref = st_load()
    got = lz_load()
    equal = same(ref, got)
    first = loader.last_statistics()
    del ref, got
    release(device)

    st_best, lz_best = min(st_times), min(lz_times)
    st_gbps, lz_gbps = size / st_best / GB, size / lz_best / GB
    ratio = st_best / lz_best
    print()
    print(f"{'loader':<40} {'best s':>8} {'median s':>9} {'GB/s':>7} {'x safetensors':>14}")
    print(f"{'safetensors.torch.load_file':<40} {st_best:8.3f} {statistics.median(st_times):9.3f} "
          f"{st_gbps:7.2f} {1.0:14.2f}")
    print(f"{'lazyfs.loader.load_file':<40} {lz_best:8.3f} {statistics.median(lz_times):9.3f} "
          f"{lz_gbps:7.2f} {ratio:14.2f}")
    if first is not None:
        print(f"lazyfs first tensor after {first.first_tensor_seconds * 1000:.1f} ms")
    print(f"equal: {'yes' if equal else 'NO'}")
    print(f"goals: >= {GOAL_GBPS:g} GB/s {'met' if lz_gbps >= GOAL_GBPS else 'MISSED'}, "
          f">= {GOAL_RATIO:g}x safetensors {'met' if ratio >= GOAL_RATIO else 'MISSED'}")
    print(f"limits: pinned host-to-device {H2D_PINNED_GBPS:g} GB/s; page cache -> pinned, 16 threads, "
          f"~{PAGE_CACHE_16T_GBPS:g} GB/s (DESIGN.md, H100 box)")

    if not args.no_sweep:
        print()
        print(f"{'threads':>7} {'pinned MiB':>10} {'best s':>8} {'GB/s':>7}")
        cpus = os.cpu_count() or 1
        for threads in sorted({max(2, cpus // 2), cpus, 2 * cpus}):
            for pinned in (8 * loader_ring(), 32 * loader_ring()):
                loader.free_pinned_memory()
                load = functools.partial(lz_load, threads=threads, pinned_bytes=pinned)
                timed(functools.partial(load, keys=first_key), device)  # pins the ring
                best = min(timed(load, device)[0] for _ in range(max(1, args.repeat - 1)))
                print(f"{threads:7d} {pinned // MiB:10d} {best:8.3f} {size / best / GB:7.2f}", flush=True)
        loader.free_pinned_memory()
    return 0 if equal else 1


def loader_ring() -> int:
    from lazyfs.loader import api

    return api.RING_BUFFER


if __name__ == "__main__":
    sys.exit(main())
