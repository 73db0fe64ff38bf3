"""A/B: ``lazyfs seed`` of this checkout against an earlier revision, alternated in one invocation.

    python bench/ab_seed.py --base REV [--size 1GiB] [--pairs 4]

Checks ``REV`` out into a temporary git worktree, then seeds the same bf16 safetensors file
(``ensure_weights`` in bench/common.py: generated once, kept in ``--dir``) to a fresh ``file://``
origin with each tree in turn, A B / B A, the same interpreter and virtualenv for both.  The
source is read once first, so every run starts with it in the page cache; ``sync`` before each
run keeps one run's writeback out of the next.  Prints each run's wall time, CPU seconds
(user + system of the whole command) and minor page faults, then the median of each side.

Written for the pack path of 2026-11-28 (``O_DIRECT`` pack writes from reused aligned
buffers, sealing off the publish loop, ``keep_freed_memory``); any two revisions compare.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import ensure_weights, wait_quiet  # noqa: E402
from lazyfs.cli import parse_size  # noqa: E402


def seed_once(tree: Path, src: Path, origin: Path) -> tuple[float, float, int]:
    """(wall s, CPU s, minor faults) of one ``lazyfs seed`` run from ``tree``."""
    shutil.rmtree(origin, ignore_errors=True)
    os.sync()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "lazyfs", "seed", str(src), origin.as_uri(), "--name", "ab:v1"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, after.ru_minflt - before.ru_minflt


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--base", required=True, help="the git revision to compare against (A)")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp/lazyfs-bench"), help="bench directory (cached input)")
    p.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    p.add_argument("--pairs", type=int, default=4, help="A/B pairs (default 4)")
    args = p.parse_args(argv)

    src = ensure_weights(args.dir, args.size)
    with open(src, "rb") as f:
        while f.read(16 << 20):
            pass
    results: dict[str, list[tuple[float, float, int]]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="ab-seed-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(base), args.base], check=True)
        try:
            sides = {"A": base, "B": REPO}
            for i in range(args.pairs):
                for side in ("AB" if i % 2 == 0 else "BA"):
                    wait_quiet()
                    r = seed_once(sides[side], src, Path(tmp) / "origin")
                    results[side].append(r)
                    print(f"{side} ({'base' if side == 'A' else 'this checkout'}): "
                          f"{r[0]:.2f} s wall, {r[1]:.2f} CPU-s, {r[2]} minor faults", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in results.items()}
    print(f"input: {src} ({os.path.getsize(src) / 1e9:.2f} GB), {args.pairs} pairs")
    print(f"A {args.base}: median {med['A'][0]:.2f} s wall, {med['A'][1]:.2f} CPU-s")
    print(f"B this checkout: median {med['B'][0]:.2f} s wall ({med['B'][0] / med['A'][0]:.2f}x A), "
          f"{med['B'][1]:.2f} CPU-s ({med['B'][1] / med['A'][1]:.2f}x A)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
