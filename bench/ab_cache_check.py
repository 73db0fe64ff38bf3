"""A/B of two ways a loader reads a warm lazyfs cache, each load on a fresh daemon.

    python bench/ab_cache_check.py [--what checks|direct|prefault] [--size 2GiB] [--pairs 4] [--hot]

``--what checks`` (default): who checks a warm cache file's xxh3.
  A: the daemon reads and checks each chunk file before reporting it (the loader's plan without
  ``"verify": "xxh3"``, read units not cut at chunk boundaries: the behaviour before 2026-11-28).
  B: the daemon reports unread files with their xxh3 and the loader checks them as it copies.
``--what prefault``: A: destination pages faulted in one by one inside the reads (before
  2026-11-28 17:00).  B: each read unit's pages mapped first with ``MADV_POPULATE_WRITE`` (now).
``--what direct``: how the loader reads cache files that are not in the page cache.
  A: through the page cache, the daemon starting the kernel's read-ahead of each file (the
  default).  B: ``load_file(direct_io=True)``: ``O_DIRECT`` into a reused buffer, no read-ahead.

Both run in one process, alternating A B / B A, each load on a fresh daemon over the same warm
cache (filled once with ``lazyfs prefetch`` from a ``file://`` origin), the page cache dropped
before each load unless ``--hot``.  Prints each load's time, the daemon's and the loader's CPU
seconds and the loader's minor faults (fresh tensor memory costs ~2.5 us a page on this VM),
then the median of each side.  Run as root (drop_caches, mounts).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lazyfs.loader
from bench.bench_loader import touch
from bench.common import Mount, drop_caches, ensure_weights, lazyfs_argv, seed_once, wait_quiet, warm_memory
from lazyfs.cli import parse_size
from lazyfs.loader import api, readers


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _daemon_checks() -> Callable[[], None]:
    """Make this process's loader behave as before: the daemon checks files, units ignore chunks."""
    readers.CacheReader.client_checks = False

    def undo() -> None:
        readers.CacheReader.client_checks = True

    return undo


def _no_switch() -> Callable[[], None]:
    return lambda: None


def _no_prefault() -> Callable[[], None]:
    """Make this process's loader fault destination pages in one by one inside its reads."""
    api.PREFAULT = False

    def undo() -> None:
        api.PREFAULT = True

    return undo


# --what: (what side A does, what side B does, switch to side A returning its undo, B's direct_io)
COMPARISONS: dict[str, tuple[str, str, Callable[[], Callable[[], None]], bool]] = {
    "checks": ("daemon checks", "loader checks", _daemon_checks, False),
    "direct": ("page cache + read-ahead", "O_DIRECT", _no_switch, True),
    "prefault": ("a fault per page", "MADV_POPULATE_WRITE per unit", _no_prefault, False),
}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--what", choices=sorted(COMPARISONS), default="checks", help="what to compare (see above)")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp/lazyfs-bench"), help="bench directory (cached input)")
    p.add_argument("--size", type=parse_size, default=parse_size("2GiB"))
    p.add_argument("--pairs", type=int, default=4, help="A/B pairs (default 4)")
    p.add_argument("--hot", action="store_true", help="keep the page cache (the chunk files stay in memory)")
    a = p.parse_args(argv)
    weights = ensure_weights(a.dir, a.size)
    ref = seed_once(weights.parent, a.dir / "origin", f"bench-weights:s{a.size}")
    run = a.dir / f"ab-{os.getpid()}"
    origin = f"file://{(a.dir / 'origin').resolve()}"
    cache = run / "cache"
    times: dict[str, list[float]] = {"A": [], "B": []}
    try:
        with Mount(origin, ref, run / "fill", cache) as m:
            subprocess.run(lazyfs_argv("prefetch", str(m.mountpoint), "-q"), check=True, timeout=1800)
        warm_memory(6)
        for i in range(a.pairs):
            for side in ("A", "B") if i % 2 == 0 else ("B", "A"):
                undo = COMPARISONS[a.what][2]() if side == "A" else (lambda: None)
                try:
                    with Mount(origin, ref, run / f"mnt{i}{side}", cache) as m:
                        assert m.pid is not None
                        path = m.mountpoint / weights.name
                        wait_quiet(0.10, 60)
                        if not a.hot:
                            drop_caches()
                        d0, r0 = _cpu_seconds(m.pid), resource.getrusage(resource.RUSAGE_SELF)
                        t0 = time.perf_counter()
                        got = lazyfs.loader.load_file(path, direct_io=COMPARISONS[a.what][3] and side == "B")
                        touch(got)
                        dt = time.perf_counter() - t0
                        r1, d1 = resource.getrusage(resource.RUSAGE_SELF), _cpu_seconds(m.pid)
                        st = lazyfs.loader.last_statistics()
                finally:
                    undo()
                del got
                gc.collect()
                assert st is not None
                times[side].append(dt)
                loader_cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
                print(json.dumps({"side": side, "seconds": round(dt, 3), "gbps": round(a.size / dt / 1e9, 2),
                                  "daemon_cpu_s": round(d1 - d0, 2), "loader_cpu_s": round(loader_cpu, 2),
                                  "loader_minflt": r1.ru_minflt - r0.ru_minflt, "checked": st.chunks_checked,
                                  "from_cache": st.chunks_from_cache, "direct_mib": st.bytes_direct >> 20}),
                      flush=True)
    finally:
        shutil.rmtree(run, ignore_errors=True)
    for side, xs in times.items():
        what = COMPARISONS[a.what][0 if side == "A" else 1]
        print(f"{side} ({what}): median {statistics.median(xs):.2f} s of {[round(x, 2) for x in xs]}")
    print(f"B / A: {statistics.median(times['B']) / statistics.median(times['A']):.2f} (below 1: B is faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
