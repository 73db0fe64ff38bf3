"""Minimal Debian root filesystems for image tests and benchmarks, built with debootstrap and cached.

``build_root(["python3-minimal"])`` returns the path of a bookworm ``minbase`` root with those
packages, building it once (about a minute and ~100 MB of downloads from the Debian mirror) and
reusing it afterwards: the cache key is the suite, the variant and the sorted package list, and
the tree is built in a temporary directory next to its final place and renamed into it, so a
killed build never leaves a half root behind.  A lock file serialises concurrent builders.

CLI::

    python tools/rootfs.py build [--include PKG,...]     # prints the root's path
    python tools/rootfs.py clean                         # removes every cached root
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["CACHE", "RootfsError", "build_root"]

CACHE = Path(os.environ.get("LAZYFS_ROOTFS_CACHE", "/var/tmp/lazyfs-rootfs"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BUILD_TIMEOUT = 1200.0


class RootfsError(RuntimeError):
    pass


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _unmount_below(root: Path) -> None:
    """debootstrap mounts /proc and /sys inside the target while it runs; a killed run may leave them."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for p in sorted((p for p in points if p.startswith(str(root) + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", p], check=False, capture_output=True)


def build_root(packages: Sequence[str] = ("python3-minimal",), *, suite: str = SUITE, mirror: str = MIRROR) -> Path:
    """A cached minbase root of ``suite`` with ``packages`` (root only: debootstrap needs it)."""
    if shutil.which("debootstrap") is None:
        raise RootfsError("debootstrap is not installed (apt-get install debootstrap)")
    include = sorted(set(packages))
    key = hashlib.sha256(f"{suite}\0minbase\0{','.join(include)}".encode()).hexdigest()[:16]
    final = CACHE / f"{suite}-{key}"
    if (final / "root" / "usr").is_dir():
        return final / "root"
    with _locked(CACHE / f"{suite}-{key}.lock"):
        if (final / "root" / "usr").is_dir():
            return final / "root"
        work = Path(tempfile.mkdtemp(prefix=f".{suite}-{key}-", dir=CACHE))
        try:
            argv = ["debootstrap", "--variant=minbase"]
            if include:
                argv.append("--include=" + ",".join(include))
            argv += [suite, str(work / "root"), mirror]
            try:
                res = subprocess.run(argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
            except subprocess.TimeoutExpired as exc:
                raise RootfsError(f"debootstrap took more than {BUILD_TIMEOUT:.0f} s") from exc
            if res.returncode != 0:
                tail = (res.stdout + res.stderr).strip().splitlines()[-5:]
                raise RootfsError("debootstrap failed: " + " | ".join(tail))
            _unmount_below(work)
            # Downloaded .debs and apt lists are not part of the system; keep the root lean.
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for child in (work / "root" / junk).glob("*"):
                    if child.is_file():
                        child.unlink()
            if final.exists():
                shutil.rmtree(final)
            work.rename(final)
        finally:
            if work.exists():
                _unmount_below(work)
                shutil.rmtree(work, ignore_errors=True)
    return final / "root"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--include", default="python3-minimal", help="comma-separated packages")
    sub.add_parser("clean")
    args = p.parse_args(argv)
    if args.cmd == "clean":
        for child in CACHE.glob("*"):
            _unmount_below(child)
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink()
        return 0
    try:
        print(build_root([x for x in args.include.split(",") if x]))
    except RootfsError as exc:
        print(f"rootfs: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
