"""Permissions: the kernel enforces the manifest's modes for other users, and a non-root daemon works.

Other users are simulated with ``setpriv --reuid=65534 --regid=65534 --clear-groups``
(user ``nobody``), running ``cat``/``stat``: no Python needed on that side.

The non-root daemon needs two things this machine does not give ``nobody`` by default,
and the test grants exactly those, for its duration only:

* ``/dev/fuse`` is ``crw-------`` here (Debian/udev ships it ``0666``).  libfuse3 opens
  ``/dev/fuse`` itself *before* it falls back to the setuid ``fusermount3`` and gives up
  on ``EACCES`` — so the test first checks that lazyfs reports this as one clear error
  line, then makes the device ``0666`` (as on a stock distribution) and restores it.
* The Python interpreter lives under ``/root`` (mode 0700), which ``nobody`` cannot
  traverse; the daemon runs with the single ambient capability ``CAP_DAC_READ_SEARCH``
  (read any file) so it can start at all.  It still lacks what root has for FUSE: it
  cannot ``mount(2)`` (libfuse goes through the setuid ``fusermount3``), cannot use
  ``allow_other`` (no ``user_allow_other`` in /etc/fuse.conf) and cannot write
  ``/sys/class/bdi/*/read_ahead_kb`` — which ``status`` reports in a note.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuse.conftest import Mounter, Published, lazyfs, mounted, publish, read_file

pytestmark = pytest.mark.fuse

NOBODY = 65534
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
# What a non-root daemon needs here to start Python at all (see the module docstring).
AS_NOBODY_DAEMON = (*AS_NOBODY, "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search")


def as_nobody(*argv: str | bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*AS_NOBODY, *argv], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def shared_dir() -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="lazyfs-perm-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def perms(shared_dir: Path) -> Published:
    """A tiny tree with modes that matter to other users, owned by root."""
    src = shared_dir / "src"
    (src / "dir700").mkdir(parents=True)
    for rel, mode in (("public", 0o644), ("secret", 0o600), ("dir700/inside", 0o644), ("exec-only", 0o711)):
        (src / rel).write_bytes(f"{rel}\n".encode())
        os.chmod(src / rel, mode)
    os.chmod(src / "dir700", 0o700)
    p = publish(src, shared_dir / "origin", "perms:v1")
    for path in (p.origin_dir, *p.origin_dir.rglob("*")):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return p


def _shared_mountpoint(shared_dir: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix="mp-", dir=shared_dir))


def test_the_kernel_enforces_manifest_permissions_for_other_users(
    perms: Published, shared_dir: Path, mounter: Mounter
) -> None:
    # As root, allow_other is the default.
    m = mounter.mount(perms.file_url, perms.ref, mountpoint=_shared_mountpoint(shared_dir))
    line = next(x for x in Path("/proc/self/mounts").read_text().splitlines() if f" {m.mountpoint} " in x)
    assert "allow_other" in line and "default_permissions" in line
    ok = as_nobody("cat", m.path(b"public"))
    assert ok.returncode == 0 and ok.stdout == b"public\n", ok
    for rel in (b"secret", b"dir700/inside", b"exec-only"):
        denied = as_nobody("cat", m.path(rel))
        assert denied.returncode != 0 and b"Permission denied" in denied.stderr, (rel, denied)
    # stat of a name inside a 0700 directory is refused too (no search permission).
    denied = as_nobody("stat", m.path(b"dir700/inside"))
    assert denied.returncode != 0 and b"Permission denied" in denied.stderr
    # Root reads everything.
    assert read_file(m.path(b"secret")) == b"secret\n"


def test_without_allow_other_other_users_see_nothing(perms: Published, shared_dir: Path, mounter: Mounter) -> None:
    m = mounter.mount(perms.file_url, perms.ref, mountpoint=_shared_mountpoint(shared_dir), extra=["--no-allow-other"])
    denied = as_nobody("cat", m.path(b"public"))
    assert denied.returncode != 0 and b"Permission denied" in denied.stderr, denied
    assert read_file(m.path(b"public")) == b"public\n"


@contextlib.contextmanager
def _dev_fuse_mode(mode: int) -> Iterator[None]:
    old = os.stat("/dev/fuse").st_mode & 0o7777
    os.chmod("/dev/fuse", mode)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", old)


def test_a_non_root_daemon(perms: Published, shared_dir: Path, mounter: Mounter) -> None:
    home = shared_dir / "nobody-home"
    mp, cache, run = home / "mp", home / "cache", home / "run"
    for d in (home, mp, cache, run):
        d.mkdir()
        os.chown(d, NOBODY, NOBODY)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "XDG_RUNTIME_DIR": str(run)}

    if os.stat("/dev/fuse").st_mode & 0o006 != 0o006:
        # libfuse cannot open /dev/fuse as this user: one clear line, no traceback, nothing mounted.
        res = lazyfs(
            "mount", perms.file_url, perms.ref, mp, "--cache-dir", cache, prefix=AS_NOBODY_DAEMON, env=env, check=False
        )
        assert res.returncode != 0
        assert res.stderr.startswith("lazyfs: error: ") and res.stderr.count("\n") == 1, res.stderr
        assert "/dev/fuse" in res.stderr and "Traceback" not in res.stderr
        assert not mounted(mp)

    with _dev_fuse_mode(0o666):
        m = mounter.mount(perms.file_url, perms.ref, mountpoint=mp, cache_dir=cache, prefix=AS_NOBODY_DAEMON, env=env)
        try:
            st = os.stat(f"/proc/{m.pid}")
            assert st.st_uid == NOBODY, "the daemon runs as nobody"
            line = next(x for x in Path("/proc/self/mounts").read_text().splitlines() if f" {mp} " in x)
            assert f"user_id={NOBODY}" in line and "allow_other" not in line
            # The owner reads its files (cat as nobody: root is refused without allow_other).
            assert as_nobody("cat", m.path(b"public")).stdout == b"public\n"
            assert as_nobody("cat", m.path(b"dir700/inside")).returncode != 0, "modes still apply to the owner"
            status = m.cli_status()
            assert status["pid"] == m.pid
            assert any("read_ahead_kb" in n for n in status["notes"]), status["notes"]
            human = lazyfs("status", mp, prefix=AS_NOBODY_DAEMON, env=env).stdout
            assert "note" in human and "read_ahead_kb" in human
            with pytest.raises(PermissionError):
                read_file(m.path(b"public"))  # root is not the mount's user
        finally:
            mounter.umount(m)
    assert any(cache.joinpath("chunks").rglob("*")), "the cache was written by nobody"
    assert all(p.stat().st_uid == NOBODY for p in cache.rglob("*"))
