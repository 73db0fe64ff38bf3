"""A/B of how the mount daemon writes fetched chunks to its cache: O_DIRECT or through the page cache.

    python bench/ab_cache_write.py [--size 1GiB] [--pairs 4] [--loader]

A: buffered writes (``ChunkStore.direct_writes = False``, the behaviour before 2026-11-29).
B: ``O_DIRECT`` from a reused aligned buffer (lazyfs/store/_files.py ``write_direct``, now).

Each run: a fresh daemon over an empty cache reads the whole file through the mount from a
``file://`` origin on the same disk (its packs in the page cache, so the daemon's own work sets
the pace), then ``sync`` (a buffered write's cost is partly paid at write-back, by kernel threads).
``--loader``: the file is loaded with ``lazyfs.loader.load_file`` instead of read through
the mount: the loader reads each chunk's cache file right after the daemon wrote it (from the
page cache when the write was buffered, from disk when it was direct).
Prints each run's wall time (read + sync), the daemon's CPU seconds and the whole machine's busy
CPU seconds over the run, then the medians.  Runs alternate A B / B A.  Run as root (mounts).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ab_cache_check import _cpu_seconds
from bench.common import Mount, ensure_weights, read_file, seed_once, wait_quiet, warm_memory
from lazyfs.cli import parse_size

REPO = Path(__file__).resolve().parents[1]
# Loaded by every Python the A side starts (PYTHONPATH): the daemon is a process of its own.
SITECUSTOMIZE = """\
import os
if os.environ.get("LAZYFS_AB_BUFFERED_WRITES") == "1":
    from lazyfs.store.cache import ChunkStore
    ChunkStore.direct_writes = False
"""


def _machine_busy_seconds() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def one_run(
    origin: str, ref: str, work: Path, buffered: bool, hook_dir: Path, loader: bool = False
) -> tuple[float, float, float]:
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    os.sync()
    env = [f"PYTHONPATH={hook_dir}:{REPO}", f"LAZYFS_AB_BUFFERED_WRITES={int(buffered)}"]
    wait_quiet()
    with Mount(origin, ref, work / "mnt", cache, wrap=lambda argv: ["env", *env, *argv]) as m:
        assert m.pid is not None
        cpu0, busy0, t = _cpu_seconds(m.pid), _machine_busy_seconds(), time.perf_counter()
        if loader:
            import lazyfs.loader

            tensors = lazyfs.loader.load_file(work / "mnt" / "model.safetensors")
            del tensors
        else:
            read_file(work / "mnt" / "model.safetensors")
        os.sync()
        wall = time.perf_counter() - t
        return wall, _cpu_seconds(m.pid) - cpu0, _machine_busy_seconds() - busy0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/var/tmp/lazyfs-bench", help="test data and origin")
    p.add_argument("--size", default="1GiB")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--loader", action="store_true", help="load with lazyfs.loader instead of reading")
    args = p.parse_args(argv)
    root = Path(args.dir)
    weights = ensure_weights(root, parse_size(args.size))
    origin_dir = root / f"ab-write-origin-{weights.stat().st_size}"
    ref = seed_once(weights.parent, origin_dir, "abwrite:v1")
    results: dict[str, list[tuple[float, float, float]]] = {"A buffered": [], "B direct": []}
    with tempfile.TemporaryDirectory(prefix="lazyfs-abw-") as tmp:
        work = Path(tmp)
        hook_dir = work / "hook"
        hook_dir.mkdir()
        (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
        warm_memory(2)
        one_run(f"file://{origin_dir}", ref, work, False, hook_dir)  # warms the origin's packs
        for i in range(args.pairs):
            order = [True, False] if i % 2 == 0 else [False, True]
            for buffered in order:
                r = one_run(f"file://{origin_dir}", ref, work, buffered, hook_dir, args.loader)
                name = "A buffered" if buffered else "B direct"
                results[name].append(r)
                print(f"{name}: {r[0]:.2f} s, daemon {r[1]:.2f} CPU-s, machine {r[2]:.2f} CPU-s", flush=True)
    for name, rs in results.items():
        wall, daemon, machine = (statistics.median(x[k] for x in rs) for k in range(3))
        print(f"median {name}: {wall:.2f} s, daemon {daemon:.2f} CPU-s, machine {machine:.2f} CPU-s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
