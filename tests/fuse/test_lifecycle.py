"""A mount's life: umount, SIGTERM, SIGKILL mid-read, status and prefetch, and mount errors."""

from __future__ import annotations

import errno
import os
import re
import signal
import threading
import time
from pathlib import Path

import blake3
import pytest

from tests.fuse.conftest import (
    MiB,
    Mount,
    Mounter,
    Origins,
    Published,
    cached_chunks,
    daemons_of,
    force_unmount,
    lazyfs,
    mounted,
    pid_alive,
    read_file,
    wait_until,
)
from tests.integration.servers import free_port

pytestmark = pytest.mark.fuse


# --- 10. umount, SIGTERM, status, prefetch -------------------------------------------------------------


def test_umount_stops_the_daemon_and_empties_the_mountpoint(tree: Published, mounter: Mounter) -> None:
    m = mounter.mount(tree.file_url, tree.ref)
    assert read_file(m.path(b"multi.bin")) == tree.contents[b"multi.bin"]
    assert pid_alive(m.pid)
    mounter.umount(m)  # asserts: not mounted, daemon gone, mountpoint empty
    res = lazyfs("umount", m.mountpoint, check=False)
    assert res.returncode != 0 and res.stderr.startswith("lazyfs: error: ") and res.stderr.count("\n") == 1


def test_umount_of_a_mount_in_use_fails_in_one_line_and_works_once_it_is_free(
    tree: Published, mounter: Mounter
) -> None:
    """A file held open keeps the mount busy: ``umount`` tries again for a moment (the daemon
    itself holds a directory open briefly while it lists it ahead), then says so, and the
    mount keeps serving; once the file is closed, ``umount`` works."""
    m = mounter.mount(tree.file_url, tree.ref)
    with open(m.path(b"multi.bin"), "rb") as f:
        t0 = time.monotonic()
        res = lazyfs("umount", m.mountpoint, check=False)
        waited = time.monotonic() - t0
        assert res.returncode != 0 and res.stderr.startswith("lazyfs: error: cannot unmount ")
        assert res.stderr.count("\n") == 1 and "busy" in res.stderr
        assert 2 <= waited < 20
        assert mounted(m.mountpoint) and f.read() == tree.contents[b"multi.bin"]
    mounter.umount(m)


def test_sigterm_unmounts(tree: Published, mounter: Mounter) -> None:
    m = mounter.mount(tree.file_url, tree.ref)
    assert read_file(m.path(b"one-byte")) == b"x"
    os.kill(m.pid, signal.SIGTERM)
    wait_until(lambda: not mounted(m.mountpoint), 10, "SIGTERM to unmount")
    wait_until(lambda: not pid_alive(m.pid), 10, "the daemon to exit after SIGTERM")
    assert os.listdir(m.mountpoint) == []
    assert "Traceback" not in m.log()


def test_status_and_prefetch(tree: Published, origins: Origins, mounter: Mounter) -> None:
    origin = origins(tree)
    m = mounter.mount(origin.url + "/", tree.ref)
    human = lazyfs("status", m.mountpoint).stdout
    assert tree.ref in human and tree.digest in human and f"pid {m.pid}" in human
    assert re.search(r"metadata   \d+ lookups \(\d+ not found\), \d+ listings", human), human
    st = m.cli_status()
    assert st["digest"] == tree.digest and st["pid"] == m.pid and st["bytes"] == tree.manifest.total_size
    assert st["fetch"]["bytes_from_origin"] == 0

    res = lazyfs("prefetch", m.mountpoint, "-q")
    assert res.returncode == 0
    st = m.cli_status()
    assert st["fetch"]["bytes_from_origin"] == tree.manifest.stored_size
    assert st["cache"]["entries"] == len(tree.manifest.chunks)
    assert origin.stats().bytes_for("packs/") == tree.manifest.stored_size

    origin.reset()
    m.read_all(tree)
    assert origin.stats().requests_for("packs/") == 0, "prefetched: reads need nothing from the origin"
    assert m.status()["fetch"]["bytes_from_origin"] == tree.manifest.stored_size


def test_prefetch_of_a_path_warms_only_that(tree: Published, origins: Origins, mounter: Mounter) -> None:
    origin = origins(tree)
    m = mounter.mount(origin.url + "/", tree.ref)
    # Every file reachable under sub/, hardlink names included.
    under = [rel for rel in tree.contents if rel.startswith(b"sub/")]
    assert b"sub/hard-b" in under and b"sub/dup-b" in under
    lazyfs("prefetch", m.mountpoint, os.path.join(m.mountpoint, "sub"), "-q")
    st = m.wait_idle()
    want = tree.stored_bytes(under)
    assert st["fetch"]["bytes_from_origin"] == want
    assert origin.stats().bytes_for("packs/") == want

    origin.reset()
    for rel in under:
        assert read_file(m.path(rel)) == tree.contents[rel], rel
    assert origin.stats().requests_for("packs/") == 0, "everything under sub/ was warmed"
    assert read_file(m.path(b"text.txt")) == tree.contents[b"text.txt"]
    assert origin.stats().requests_for("packs/") > 0, "nothing outside sub/ was"
    # A relative path (to the mountpoint) and a single file work too; a path outside is refused.
    lazyfs("prefetch", m.mountpoint, "exact-chunk", "-q")
    res = lazyfs("prefetch", m.mountpoint, "/etc", check=False)
    assert res.returncode != 0 and res.stderr.startswith("lazyfs: error: ") and "Traceback" not in res.stderr
    res = lazyfs("prefetch", m.mountpoint, "no/such/file", check=False)
    assert res.returncode != 0 and res.stderr.startswith("lazyfs: error: ") and "Traceback" not in res.stderr


# --- 7. SIGKILL mid-read ------------------------------------------------------------------------------


def test_sigkill_mid_read_then_recovery(bulk: Published, origins: Origins, mounter: Mounter) -> None:
    """Kill the daemon while large reads are in flight and chunks are being written back;
    the cache must verify (or be repaired) and a remount must serve correct bytes."""
    origin = origins(bulk)
    m = None
    for round_ in range(2):
        # ~1 MiB/s: the whole tree takes seconds, so the kill lands mid-read and mid-write-back.
        origin.set_faults(rate=1 * MiB)
        m = mounter.mount(
            origin.url + "/", bulk.ref, mountpoint=None if m is None else m.mountpoint,
            cache_dir=None if m is None else m.cache_dir,
        )  # fmt: skip
        errors: list[OSError] = []

        def reader(mount_path: bytes, errors: list[OSError] = errors) -> None:
            try:
                read_file(mount_path)
            except OSError as exc:
                errors.append(exc)

        # A small file finishes first and its chunks are written back while the others,
        # big.bin above all (~1.5 s at this rate), are still arriving: then the kill.
        files = (b"data/f0.bin", b"data/f3.bin") if round_ == 0 else (b"data/f1.bin", b"data/f2.bin")
        threads = [threading.Thread(target=reader, args=(m.path(rel),), daemon=True) for rel in (*files, b"big.bin")]
        for t in threads:
            t.start()
        want = len(bulk.chunks_of(files[0])) - 1

        def arrived(m: Mount = m, want: int = want) -> bool:
            st = m.status()
            return bool(st["cache"]["inserts"] > want and st["fetch"]["bytes_from_origin"] > 0)

        wait_until(arrived, 30, "chunks to arrive")
        mounter.kill(m)
        for t in threads:
            t.join(15)
            assert not t.is_alive(), "a reader of a dead mount must fail, not hang"
        assert errors, "the kill must land mid-read"
        assert all(e.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO) for e in errors), errors
        force_unmount(m.mountpoint)
        assert not mounted(m.mountpoint)

        res = lazyfs("cache", "verify", "--cache-dir", m.cache_dir, check=False)
        if res.returncode != 0:
            assert "--repair" in res.stderr
            lazyfs("cache", "verify", "--repair", "--cache-dir", m.cache_dir)
            lazyfs("cache", "verify", "--cache-dir", m.cache_dir)
        for name in cached_chunks(m.cache_dir):
            data = (m.cache_dir / "chunks" / name[:2] / name).read_bytes()
            assert blake3.blake3(data).hexdigest() == name, "a chunk file with the wrong bytes"

    assert m is not None
    origin.heal()
    m2 = mounter.mount(origin.url + "/", bulk.ref, mountpoint=m.mountpoint, cache_dir=m.cache_dir)
    m2.read_all(bulk)
    assert m2.status()["fetch"]["cache_hits"] > 0, "what was cached before the kills is used"
    mounter.umount(m2)
    lazyfs("cache", "verify", "--cache-dir", m.cache_dir)


# --- 12. mount errors ----------------------------------------------------------------------------------


def _assert_one_line_error(stderr: str, *needles: str) -> None:
    assert stderr.startswith("lazyfs: error: "), stderr
    assert stderr.count("\n") == 1 and stderr.endswith("\n"), stderr
    assert "Traceback" not in stderr
    for n in needles:
        assert n in stderr, (n, stderr)


@pytest.mark.parametrize("case", ["bad-ref", "unknown-ref", "missing-mountpoint", "unreachable-origin"])
def test_mount_errors_are_one_line_and_leave_nothing_behind(
    tree: Published, mounter: Mounter, tmp_path: Path, case: str
) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    cache = tmp_path / "cache"
    origin, ref, needle = tree.file_url, tree.ref, ""
    if case == "bad-ref":
        ref, needle = "Not A Ref!", "bad reference"
    elif case == "unknown-ref":
        ref, needle = "tree:nope", "not published"
    elif case == "missing-mountpoint":
        mp, needle = tmp_path / "does" / "not" / "exist", "not a directory"
    else:
        origin = f"http://127.0.0.1:{free_port()}/"  # nothing listens there
    t0 = time.monotonic()
    res = lazyfs("mount", origin, ref, mp, "--cache-dir", cache, "--read-timeout", "2", check=False)
    assert time.monotonic() - t0 < 20
    assert res.returncode != 0
    assert res.stdout == ""
    _assert_one_line_error(res.stderr, needle)
    assert not mounted(mp)
    assert daemons_of(mp) == []
    log = cache / "daemon.log"
    if log.exists():
        assert "Traceback" not in log.read_text(errors="replace")


def test_mounting_twice_at_one_place_is_refused(tree: Published, mounter: Mounter, tmp_path: Path) -> None:
    m = mounter.mount(tree.file_url, tree.ref)
    res = lazyfs("mount", tree.file_url, tree.ref, m.mountpoint, "--cache-dir", tmp_path / "c2", check=False)
    assert res.returncode != 0
    _assert_one_line_error(res.stderr, "already mounted")
    assert daemons_of(m.mountpoint) == [m.pid], "no second daemon"
    assert read_file(m.path(b"one-byte")) == b"x", "the first mount still works"


def test_status_of_something_that_is_not_a_mount(tmp_path: Path) -> None:
    for cmd in ("status", "prefetch", "umount"):
        res = lazyfs(cmd, tmp_path, check=False)
        assert res.returncode != 0
        _assert_one_line_error(res.stderr, str(tmp_path))
