"""The chunk cache with real processes: concurrent daemons on one directory, and SIGKILL at any moment.

Children are plain ``python -c`` subprocesses running WORKER; they print one JSON
line when they start working ({"ready": ...}) and one when they finish.  Chunk
contents derive from their index, so every process knows the right bytes.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3

import lazyfs
from lazyfs.store import ChunkStore
from lazyfs.store.cache import CHECKPOINTS

REPO = Path(lazyfs.__file__).resolve().parent.parent
UNIVERSE = 60


def make_chunk(i: int) -> tuple[bytes, bytes]:
    rng = random.Random(i)
    data = rng.randbytes(rng.randrange(1, 16_000))
    return blake3(data).digest(), data


WORKER = textwrap.dedent(
    """
    import json, logging, os, random, signal, sys
    from pathlib import Path
    from blake3 import blake3
    import lazyfs.store.cache as cache
    from lazyfs.store import ChunkStore

    directory, seed, ops, capacity, universe, kill_at, kill_after = sys.argv[1:]
    seed, ops, capacity, universe, kill_after = map(int, (seed, ops, capacity, universe, kill_after))

    def make_chunk(i):
        rng = random.Random(i)
        data = rng.randbytes(rng.randrange(1, 16_000))
        return blake3(data).digest(), data

    class Count(logging.Handler):
        n = 0
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                Count.n += 1
                print(json.dumps({"warning": record.getMessage()}), file=sys.stderr, flush=True)
    logging.getLogger("lazyfs").addHandler(Count())

    if kill_at != "-":
        passed = 0
        def hook(name):
            global passed
            if name == kill_at:
                passed += 1
                if passed == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        cache._crash_hook = hook

    chunks = [make_chunk(i) for i in range(universe)]
    rng = random.Random(seed)
    bad = over = reads = hits = 0
    with ChunkStore.open(Path(directory), capacity) as store:
        print(json.dumps({"ready": os.getpid()}), flush=True)
        for n in range(ops):
            digest, data = chunks[rng.randrange(universe)]
            op = rng.random()
            if op < 0.4:
                store.put(digest, data)
            elif op < 0.7:
                got = store.read(digest)
                reads += 1; hits += got is not None
                bad += got is not None and got != data
            elif op < 0.85:
                off = rng.randrange(len(data)); size = rng.randrange(1, 5000)
                got = store.read(digest, off, size)
                reads += 1; hits += got is not None
                bad += got is not None and got != data[off : off + size]
            elif op < 0.95:
                with store.pinned(digest):
                    path = store.path_of(digest)
                    if path is not None:
                        with open(path, "rb") as f:  # the loader's fast path
                            bad += f.read() != data
            else:
                store.evict(capacity // 2)
            over += store.statistics().bytes > capacity
    print(json.dumps({"bad": bad, "over": over, "reads": reads, "hits": hits, "warnings": Count.n}), flush=True)
    """
)


def start_worker(
    directory: Path, seed: int, ops: int, capacity: int, kill_at: str = "-", kill_after: int = 0
) -> subprocess.Popen[str]:
    args = [str(directory), str(seed), str(ops), str(capacity), str(UNIVERSE), kill_at, str(kill_after)]
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"worker died before it was ready: {err}")
    assert "ready" in json.loads(line)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Children started by a test; any still running at the end are killed (by pid) and reaped."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def check_consistent(directory: Path) -> tuple[Any, Any]:
    """verify(repair=True), then a clean verify, then every read is None or the right bytes."""
    with ChunkStore.open(directory) as store:
        repaired = store.verify(repair=True)
        after = store.verify()
        assert after.clean, after
        assert repaired.torn == 0, repaired  # SIGKILL never tears a written file
        for i in range(UNIVERSE):
            digest, data = make_chunk(i)
            assert store.read(digest) in (None, data)
            got = store.read(digest, 7, 100)
            assert got in (None, data[7:107])
        assert store.statistics().bytes <= store.capacity
        assert os.listdir(directory / "tmp") == []
    return repaired, after


def test_concurrent_processes(tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    capacity = 150_000  # about 20 of the 60 chunks: constant eviction
    for seed in range(3):
        procs.append(start_worker(tmp_path, seed, 500, capacity))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.splitlines()[-1]))
    for r in results:
        assert (r["bad"], r["over"], r["warnings"]) == (0, 0, 0), r
        assert r["hits"] > 0, r  # they really shared the cache
    _, after = check_consistent(tmp_path)
    assert after.checked > 0


def test_sigkill_at_random_moments(tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    rng = random.Random(1234)
    for round_ in range(10):
        proc = start_worker(tmp_path, round_, 1_000_000, 60_000)
        procs.append(proc)
        wait_ready(proc)
        try:
            proc.wait(timeout=rng.uniform(0.0, 0.25))
            pytest.fail("a worker with a million operations finished")
        except subprocess.TimeoutExpired:
            pass
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        check_consistent(tmp_path)


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_sigkill_at_each_checkpoint(
    tmp_path: Path, procs: list[subprocess.Popen[str]], checkpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    # 30 000 bytes ≈ 4 chunks: after the first few inserts every insert evicts; the 12th
    # passage through a checkpoint is well inside that regime (evict() runs 1 op in 20).
    proc = start_worker(tmp_path, 7, 5_000, 30_000, kill_at=checkpoint, kill_after=12)
    procs.append(proc)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    temps = os.listdir(tmp_path / "tmp")
    assert len(temps) == (1 if checkpoint.startswith("temp-") else 0)
    caplog.set_level(logging.INFO, logger="lazyfs.store")
    repaired, _ = check_consistent(tmp_path)
    if checkpoint == "renamed":  # renamed into chunks/, not committed
        assert repaired.orphans == 1
    elif checkpoint in ("insert-evicted", "evict-committed"):  # evicted entries gone, files not yet unlinked
        assert repaired.orphans >= 1
    else:
        assert repaired.orphans == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
