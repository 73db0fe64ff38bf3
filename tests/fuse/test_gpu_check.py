"""bench/gpu_check.py's every stage, dry-run on the CPU with a real mount.

The GPU machine is borrowed for minutes, so the script it runs must work the first time:
here its ``cold`` stage (O_DIRECT rate, evicted loads) and ``mount`` stage (seed, ``lazyfs
mount``, loads through the mount with a first, a hot and a fresh daemon) run end to end on
a small file with ``--device cpu``, and the JSON it writes is checked: the page cache was
really dropped, the first load through the mount fetched the file's chunks from the origin
(the generated model has no two chunks alike), and the loader read every chunk from the
lazyfs cache, none through FUSE.  Needs root (drop_caches) and /dev/fuse, as CI has.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuse

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_cold_and_mount_stages_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    res = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--size", "24MiB", "--dir", str(tmp_path / "d"),
         "--repeat", "1", "--stages", "cold,mount", "--json", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "mount stage failed" not in res.stdout, res.stdout
    figures = json.loads(out.read_text())
    size = figures["machine"]["size"]

    cold = figures["cold"]
    assert len(cold["o_direct_s"]) == 4 and all(t > 0 for t in cold["o_direct_s"])
    assert max(cold["resident"]) <= 0.05, cold  # every cold load started with the file evicted
    assert len(cold["lazyfs"]) == len(cold["safetensors"]) == 2

    mount = figures["mount"]
    assert "error" not in mount, mount
    # zstd saves ~20 % on bf16 N(0, 0.02): the origin sent most of the file, deduplicated nothing.
    assert 0.6 * size < mount["origin_bytes"] <= size, mount
    from_cache, through_fuse = mount["chunks"]
    assert from_cache >= size // (4 << 20) and through_fuse == 0, mount
    assert mount["hot_s"] and mount["fresh_s"] and mount["fresh_hot_s"] and mount["safetensors_on_mount_s"]
    assert "equal to safetensors of the original: yes" in res.stdout
    # Nothing stays mounted.
    assert not os.path.ismount(tmp_path / "d" / "mnt")
