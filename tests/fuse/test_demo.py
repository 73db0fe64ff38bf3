"""The README's main command runs end to end (seed, mount, load, compare, unmount)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_and_unmounts(tmp_path: Path) -> None:
    origin = f"file://{tmp_path / 'origin'}"
    args = [sys.executable, str(ROOT / "tools" / "demo.py"), "--origin", origin, "--cache-dir", str(tmp_path / "c")]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "identical to loading from" in first.stdout and ": True" in first.stdout
    assert "from cache 0," in first.stdout  # a cold start: everything from the origin
    second = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "bytes from origin 0," in second.stdout  # the cache served the whole second start
    mounts = Path("/proc/self/mountinfo").read_text()
    assert "lazyfs-demo-" not in mounts
