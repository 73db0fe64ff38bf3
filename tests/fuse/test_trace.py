"""Startup traces on real mounts: recorded, published to the origin, replayed on the next mount, replayed by
``lazyfs prefetch --trace``, ignored when corrupt, refused for read-only origins.

The origin directories of the session fixtures are shared with other tests, so every test that
publishes a trace works on a copy (:func:`isolated`); the image fixture gives each test a manifest
digest of its own (:meth:`Image.variant`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lazyfs.trace import decode
from tests.fuse.conftest import (
    IMAGE_PATH,
    Image,
    Mount,
    Mounter,
    Published,
    Runner,
    cached_chunks,
    image_config,
    lazyfs,
    read_file,
    wait_until,
)
from tools.test_origin import start_test_origin

pytestmark = pytest.mark.fuse


def isolated(p: Published, tmp_path: Path) -> Published:
    """``p`` with an origin directory of its own (a copy), so that a trace published to it stays here."""
    dst = tmp_path / "origin"
    shutil.copytree(p.origin_dir, dst)
    return dataclasses.replace(p, origin_dir=dst)


def trace_of(p: Published) -> tuple[int, ...]:
    data = (p.origin_dir / "traces" / p.digest).read_bytes()
    return decode(data, p.digest, len(p.manifest.chunks)).chunks


def wait_replay(m: Mount, *states: str) -> dict[str, object]:
    last: dict[str, object] = {}

    def ready() -> bool:
        nonlocal last
        last = m.status()["trace"]
        return last["replay"] in states

    wait_until(ready, 60, f"the trace replay of {m.mountpoint} to reach {states}", interval=0.05)
    return last


def chunks(p: Published, *rels: bytes) -> tuple[int, ...]:
    return tuple(i for r in rels for i in p.entry(r).chunks)


# --- recording and publishing ------------------------------------------------------------------------


def test_mount_records_first_accesses_in_order_and_publishes(bulk: Published, mounter: Mounter, tmp_path: Path) -> None:
    src = isolated(bulk, tmp_path)
    m = mounter.mount(src.file_url, src.ref, extra=["--record-trace"])
    order = [b"data/f2.bin", b"data/f0.bin", b"big.bin"]
    for rel in [*order, b"data/f2.bin"]:  # the second read of f2 adds nothing
        assert read_file(m.path(rel)) == src.contents[rel]
    st = m.status()["trace"]
    assert st["recording"] and st["recorded_chunks"] == len(chunks(src, *order))
    human = lazyfs("status", m.mountpoint).stdout
    assert f"trace      recording: {st['recorded_chunks']} chunks so far" in human

    res = lazyfs("trace", "publish", m.mountpoint)
    assert res.stdout == f"traces/{src.digest}\n" and "published a startup trace of" in res.stderr
    assert trace_of(src) == chunks(src, *order)  # exactly the first-access order
    shown = lazyfs("trace", "show", src.file_url, src.ref).stdout.splitlines()
    paths = [line.split()[3] for line in shown[3:]]
    assert paths[0] == "/data/f2.bin" and paths[-1] == "/big.bin" and len(paths) == st["recorded_chunks"]
    again = lazyfs("trace", "publish", m.mountpoint, check=False)
    assert again.returncode == 1 and "already published" in again.stderr and again.stderr.count("\n") == 1
    read_file(m.path(b"data/f1.bin"))  # after publishing: not recorded any more
    published = (src.origin_dir / "traces" / src.digest).read_bytes()
    mounter.umount(m)
    assert (src.origin_dir / "traces" / src.digest).read_bytes() == published, "unmount published again"

    # A new recording replaces the trace when the mount ends (umount publishes what was recorded).
    m = mounter.mount(src.file_url, src.ref, extra=["--record-trace"], mountpoint=m.mountpoint)
    read_file(m.path(b"data/f3.bin"))
    mounter.umount(m)
    assert trace_of(src) == chunks(src, b"data/f3.bin")


def test_recording_needs_a_writable_origin(bulk: Published, mounter: Mounter, tmp_path: Path) -> None:
    with start_test_origin(bulk.origin_dir, log_path=tmp_path / "origin.log") as origin:
        res = lazyfs("mount", origin.url + "/", bulk.ref, mounter.new_dir("mp"), "--cache-dir", tmp_path / "c",
                     "--record-trace", check=False)  # fmt: skip
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "read-only" in res.stderr, res.stderr
    assert "--record-trace" in res.stderr and "Traceback" not in res.stderr


# --- replay ------------------------------------------------------------------------------------------


def test_next_mount_replays_the_trace(bulk: Published, mounter: Mounter, tmp_path: Path) -> None:
    src = isolated(bulk, tmp_path)
    m = mounter.mount(src.file_url, src.ref)
    assert wait_replay(m, "none")["replay"] == "none"  # no trace published: no harm
    mounter.umount(m)
    m = mounter.mount(src.file_url, src.ref, extra=["--record-trace"])
    read_file(m.path(b"data/f1.bin"))
    read_file(m.path(b"big.bin"))
    mounter.umount(m)
    traced = chunks(src, b"data/f1.bin", b"big.bin")
    assert trace_of(src) == traced

    with start_test_origin(src.origin_dir, log_path=tmp_path / "origin.log") as origin:
        m = mounter.mount(origin.url + "/", src.ref)  # a fresh cache
        st = wait_replay(m, "done")
        assert (st["replay_chunks"], st["replay_done"], st["replay_fetched"]) == (len(traced), len(traced), len(traced))
        m.wait_idle()
        want = {src.manifest.chunks[i].digest.hex() for i in traced}
        assert set(cached_chunks(m.cache_dir)) == want, "exactly the traced chunks were fetched"
        assert origin.stats().bytes_for("packs/") == src.stored_bytes([b"data/f1.bin", b"big.bin"])
        origin.reset()
        assert read_file(m.path(b"data/f1.bin")) == src.contents[b"data/f1.bin"]
        assert read_file(m.path(b"big.bin")) == src.contents[b"big.bin"]
        assert origin.stats().requests_for("packs/") == 0, "the traced reads hit the cache"
        st = m.status()["trace"]
        assert st["first_reads"] == len(traced) == st["first_reads_prefetched"]
        assert "replay done" in lazyfs("status", m.mountpoint).stdout
        # A remount with that cache finds everything cached and fetches nothing.
        mounter.umount(m)
        origin.reset()
        m = mounter.mount(origin.url + "/", src.ref, cache_dir=m.cache_dir, mountpoint=m.mountpoint)
        st = wait_replay(m, "done")
        assert st["replay_cached"] == len(traced) and st["replay_fetched"] == 0
        assert origin.stats().requests_for("packs/") == 0


def test_prefetch_trace(bulk: Published, tree: Published, mounter: Mounter, tmp_path: Path) -> None:
    src = isolated(bulk, tmp_path)
    m = mounter.mount(src.file_url, src.ref, extra=["--record-trace"])
    read_file(m.path(b"data/f3.bin"))
    read_file(m.path(b"data/f0.bin"))
    mounter.umount(m)
    with start_test_origin(src.origin_dir, log_path=tmp_path / "origin.log") as origin:
        m = mounter.mount(origin.url + "/", src.ref, extra=["--no-trace-replay"])
        assert m.status()["trace"]["replay"] == "off"
        assert origin.stats().requests_for("traces/") == 0
        lazyfs("prefetch", m.mountpoint, "--trace", "-q")
        m.wait_idle()
        assert origin.stats().bytes_for("packs/") == src.stored_bytes([b"data/f3.bin", b"data/f0.bin"])
        origin.reset()
        read_file(m.path(b"data/f3.bin"))
        read_file(m.path(b"data/f0.bin"))
        assert origin.stats().requests_for("packs/") == 0
        res = lazyfs("prefetch", m.mountpoint, "big.bin", "--trace", check=False)
        assert res.returncode == 1 and "no paths" in res.stderr and res.stderr.count("\n") == 1

    plain = isolated(tree, tmp_path / "plain")
    m = mounter.mount(plain.file_url, plain.ref)
    res = lazyfs("prefetch", m.mountpoint, "--trace", check=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert "no startup trace is published" in res.stderr and "Traceback" not in res.stderr


def test_a_corrupt_trace_is_ignored_with_a_warning(bulk: Published, mounter: Mounter, tmp_path: Path) -> None:
    src = isolated(bulk, tmp_path)
    (src.origin_dir / "traces").mkdir()
    (src.origin_dir / "traces" / src.digest).write_bytes(b"\x95\xaclazyfs-trace\x01" + b"\xff" * 40)
    m = mounter.mount(src.file_url, src.ref)
    st = wait_replay(m, "invalid")
    assert "trace" in str(st["replay_error"])
    m.read_all(src)  # the mount works regardless
    assert "WARNING: ignoring the startup trace" in m.log()
    assert "trace invalid" in lazyfs("status", m.mountpoint).stdout
    res = lazyfs("prefetch", m.mountpoint, "--trace", check=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "trace" in res.stderr


# --- a container start, recorded by `lazyfs run` and replayed on the next node --------------------------

PROGRAM = (
    "import email.utils, random, tempfile, subprocess, hashlib, argparse, logging; "
    "print('started', hashlib.sha256(b'x').hexdigest()[:8], random.Random(1).random())"
)


def test_a_recorded_start_makes_the_next_start_hit_the_cache(
    debian_image: Image, runner: Runner, mounter: Mounter, tmp_path: Path
) -> None:
    img = debian_image.variant(image_config(Cmd=["python3", "-B", "-c", PROGRAM]), "traced")
    expected = runner(debian_image.file_url, img.ref, "--no-trace-replay").stdout
    assert expected.startswith("started ")

    # 1. The first start, recorded: every chunk it reads is fetched on demand.
    s1 = tmp_path / "s1.json"
    res = runner(debian_image.file_url, img.ref, "--record-trace", "--stats-json", s1)
    assert (res.returncode, res.stdout) == (0, expected), res.stderr
    assert "published a startup trace of" in res.stderr
    trace = decode((debian_image.origin_dir / "traces" / img.digest).read_bytes(), img.digest,
                   len(img.manifest.chunks))  # fmt: skip
    first = json.loads(s1.read_text())["trace"]
    assert first["recorded_chunks"] == len(trace.chunks) >= 10
    assert first["first_reads_other"] == first["first_reads"] == len(trace.chunks), "nothing prefetched the 1st time"
    python = img.manifest.entry(b"usr/bin/python3.11")
    assert python is not None and python.chunks[0] in trace.chunks
    assert trace.times_ms == tuple(sorted(trace.times_ms))

    with start_test_origin(debian_image.origin_dir, log_path=tmp_path / "origin.log") as origin:
        # Every pack request takes 30 ms, as from a distant object store.
        origin.set_faults(delay=0.03)
        url = origin.url + "/"

        # 2. `lazyfs run` on a node with an empty cache: the replay runs ahead of the program.
        s2 = tmp_path / "s2.json"
        res = runner(url, img.ref, "--stats-json", s2)
        assert (res.returncode, res.stdout) == (0, expected), res.stderr
        second = json.loads(s2.read_text())["trace"]
        assert second["replay"] == "done" and second["replay_done"] == len(trace.chunks)
        helped = second["first_reads_prefetched"] + second["first_reads_in_flight"]
        assert second["first_reads_other"] <= max(3, first["first_reads_other"] // 5), second
        assert helped >= 0.8 * second["first_reads"], second

        # 3. Demand misses of a start, measured at the origin: the same program chrooted into a fresh
        #    mount, once without the trace and once after the replay finished.
        def start(*extra: str) -> int:
            m = mounter.mount(url, img.ref, extra=extra)
            if not extra:
                wait_replay(m, "done")
                m.wait_idle()
            origin.reset()
            res = subprocess.run(
                ["/usr/sbin/chroot", m.mountpoint, "python3", "-B", "-c", PROGRAM],
                env={"PATH": IMAGE_PATH, "LANG": "C.UTF-8", "HOME": "/root"},
                capture_output=True, text=True, timeout=120, cwd="/",
            )  # fmt: skip
            assert (res.returncode, res.stdout) == (0, expected), res.stderr
            requests = origin.stats().requests_for("packs/")
            mounter.umount(m)
            return requests

        cold = start("--no-trace-replay")
        warm = start()
        assert cold >= 10, cold
        assert warm <= cold // 10, (cold, warm)
