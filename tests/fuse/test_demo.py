"""The README's main command runs end to end (seed, mount, load, compare, unmount)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.fuse.conftest import host_mounts_under

ROOT = Path(__file__).resolve().parents[2]


def _run_demo(args: list[str]) -> tuple[str, str]:
    """Run the demo once; return its stdout and the mount point it used."""
    res = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    m = re.search(r"^\$ lazyfs mount \S+ \S+ (\S+)", res.stdout, re.M)
    assert m, res.stdout[-2000:]
    return res.stdout, m.group(1)


def test_demo_runs_and_unmounts(tmp_path: Path) -> None:
    origin = f"file://{tmp_path / 'origin'}"
    args = [sys.executable, str(ROOT / "tools" / "demo.py"), "--origin", origin, "--cache-dir", str(tmp_path / "c")]
    first, mp1 = _run_demo(args)
    assert "identical to loading from" in first and ": True" in first
    assert "from cache 0," in first  # a cold start: everything from the origin
    second, mp2 = _run_demo(args)
    assert "bytes from origin 0," in second  # the cache served the whole second start
    # Each run unmounted and removed its own mount point.  (Only these two: a machine that
    # runs CI may hold other, older demo mounts that this run must not judge.)
    for mp in (mp1, mp2):
        assert not host_mounts_under(mp), f"{mp} is still mounted"
        assert not os.path.exists(mp), f"{mp} was not removed"
