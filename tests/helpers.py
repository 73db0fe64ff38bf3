"""Shared test helpers: synthetic source trees and reading a published tree back.

* :func:`build_tree` creates a directory holding one of every kind of entry
  ``lazyfs seed`` must publish (empty, tiny, chunk-boundary and multi-chunk files,
  compressible and random data, duplicates, symlinks of every shape, hardlinks,
  setuid/setgid/sticky modes, arbitrary owners, nanosecond and pre-1970 mtimes,
  xattrs, a fifo, device nodes, a socket, and names with spaces, newlines and
  non-UTF-8 bytes).  Owners, device nodes and ``trusted.*`` xattrs need root;
  without it those entries are left out (:attr:`Tree.as_root` says which).
* :func:`read_chunk` / :func:`read_file` fetch a file's bytes from an origin the
  way a reader must: one range read per chunk in its pack, zstd-decompressed
  where the codec says so, the BLAKE3 digest checked against the manifest.
* :func:`assert_tree_matches` compares a manifest with the source tree entry for
  entry (``os.lstat`` metadata, symlink targets, hardlink identity, xattrs) and,
  given an origin, every file's bytes.
* :func:`walk_source` lists a source tree (bytes paths) the way the manifest
  names it.

Everything here works with any :class:`~lazyfs.origin.base.Origin`
(memory, file://, http://, s3://).
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import zstandard

from lazyfs.errors import IntegrityError
from lazyfs.manifest import Chunk, Codec, Entry, EntryType, Manifest, tree_key
from lazyfs.origin.base import Origin
from lazyfs.seed import ENTRY_TYPES

__all__ = [
    "Run",
    "Tree",
    "assert_one_line_error",
    "assert_tree_matches",
    "build_tree",
    "clean_env",
    "compressible_bytes",
    "pack_keys",
    "random_bytes",
    "read_all_files",
    "read_chunk",
    "read_file",
    "run_lazyfs",
    "supports_user_xattrs",
    "walk_source",
]

KiB = 1024

# Names a careless implementation would mangle: a space, a newline, bytes that are not UTF-8,
# UTF-8 that is not ASCII, a leading dash and a name that looks like an option.
ODD_NAMES: tuple[bytes, ...] = (
    b"with space",
    b"new\nline",
    b"latin1-\xe9\xff",
    "café-ünï".encode(),
    b"-dash",
    b"tab\there",
)


def random_bytes(n: int, seed: int = 0) -> bytes:
    """``n`` incompressible bytes (reproducible)."""
    return random.Random(seed).randbytes(n)


def compressible_bytes(n: int, seed: int = 0) -> bytes:
    """``n`` bytes of text that zstd shrinks several times (reproducible, yet not one repeated block)."""
    rng = random.Random(seed)
    words = [b"lazyfs", b"chunk", b"pack", b"manifest", b"origin", b"tensor", b"weights", b"layer", b"\n"]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choice(words) for _ in range(64)) + b"\n"
    return bytes(out[:n])


def evict_from_page_cache(path: Path) -> None:
    """Write ``path`` back and drop its pages from the page cache (``POSIX_FADV_DONTNEED``; no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def supports_user_xattrs(directory: Path) -> bool:
    """Whether files under ``directory`` accept ``user.*`` extended attributes."""
    with tempfile.NamedTemporaryFile(dir=directory) as f:
        try:
            os.setxattr(f.name, "user.lazyfs-probe", b"1")
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EPERM):
                return False
            raise
    return True


@dataclass
class Tree:
    """What :func:`build_tree` made, for assertions."""

    root: Path
    chunk_size: int
    as_root: bool
    xattrs: bool
    # manifest path -> content of every regular file (hardlinked names included)
    contents: dict[bytes, bytes] = field(default_factory=dict)

    def path(self, rel: bytes) -> bytes:
        return os.path.join(os.fsencode(self.root), rel)

    @property
    def file_bytes(self) -> int:
        """Bytes of file data, each inode once (what ``SeedResult.bytes_total`` counts)."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for rel, data in self.contents.items():
            st = os.lstat(self.path(rel))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += len(data)
        return total


def _write(tree: Tree, rel: bytes, data: bytes, mode: int = 0o644) -> bytes:
    p = tree.path(rel)
    with open(p, "wb") as f:
        f.write(data)
    os.chmod(p, mode)
    tree.contents[rel] = data
    return p


def _make_socket(path: bytes) -> None:
    # sun_path holds ~108 bytes: bind in a short temporary directory, then move the node.
    with tempfile.TemporaryDirectory(prefix="lzs") as short:
        tmp = os.path.join(short, "s")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(tmp)
        os.rename(os.fsencode(tmp), path)


def build_tree(root: Path, chunk_size: int = 64 * KiB, *, seed: int = 0) -> Tree:
    """Create (under the new or empty directory ``root``) a tree with every kind of entry.

    File sizes are relative to ``chunk_size`` so chunk boundaries are exercised at any
    chunk size; keep it small (64 KiB) for fast tests.
    """
    root.mkdir(parents=True, exist_ok=True)
    as_root = os.geteuid() == 0
    tree = Tree(root, chunk_size, as_root, supports_user_xattrs(root))
    cs = chunk_size

    # --- regular files at and around chunk boundaries ------------------------------------
    _write(tree, b"empty", b"")
    _write(tree, b"one-byte", b"x")
    _write(tree, b"exact-chunk", random_bytes(cs, seed + 1))
    _write(tree, b"chunk-plus-one", random_bytes(cs + 1, seed + 2))
    _write(tree, b"multi.bin", random_bytes(3 * cs + cs // 2, seed + 3))
    _write(tree, b"text.txt", compressible_bytes(2 * cs + 123, seed + 4))
    _write(tree, b"small.json", b'{"architectures": ["BertModel"], "hidden_size": 384}\n')

    # --- duplicates: identical files, and a file sharing a chunk with another -----------
    os.mkdir(tree.path(b"sub"))
    dup = random_bytes(cs + 77, seed + 5)
    _write(tree, b"dup-a", dup)
    _write(tree, b"sub/dup-b", dup)
    _write(tree, b"sub/shares-first-chunk", tree.contents[b"multi.bin"][:cs] + b"tail")

    # --- directories, deep and empty, with odd modes --------------------------------------
    os.makedirs(tree.path(b"sub/deeper/empty-dir"))
    os.makedirs(tree.path(b"sticky"))
    os.chmod(tree.path(b"sticky"), 0o1777)
    os.makedirs(tree.path(b"private-dir"))
    _write(tree, b"private-dir/inside", b"secret")
    os.chmod(tree.path(b"private-dir"), 0o700)

    # --- modes ------------------------------------------------------------------------------
    _write(tree, b"setuid", b"#!/bin/sh\n", 0o4755)
    _write(tree, b"setgid", b"#!/bin/sh\n", 0o2750)
    _write(tree, b"all-bits", b"s", 0o7777)
    _write(tree, b"no-perms", b"nobody may read me", 0o000)
    _write(tree, b"read-only", b"ro", 0o444)

    # --- symlinks: kept verbatim, never followed ----------------------------------------------
    os.symlink(b"one-byte", tree.path(b"link-relative"))
    os.symlink(b"does/not/exist", tree.path(b"link-dangling"))
    os.symlink(b"/etc/hostname", tree.path(b"link-absolute"))
    os.symlink(b"../text.txt", tree.path(b"sub/link-up"))
    os.symlink(b"sub", tree.path(b"link-to-dir"))
    os.symlink(b"\xff weird target\n", tree.path(b"link-odd-target"))
    os.symlink(b"x" * 1000, tree.path(b"link-long-target"))

    # --- hardlinks: one inode, several names (the first in tree order holds the data) -----
    _write(tree, b"hard-a", compressible_bytes(cs // 2, seed + 6), 0o640)
    os.link(tree.path(b"hard-a"), tree.path(b"sub/hard-b"))
    os.link(tree.path(b"hard-a"), tree.path(b"sub/deeper/hard-c"))
    tree.contents[b"sub/hard-b"] = tree.contents[b"sub/deeper/hard-c"] = tree.contents[b"hard-a"]
    os.mkfifo(tree.path(b"fifo-linked"))
    os.link(tree.path(b"fifo-linked"), tree.path(b"sub/fifo-linked-too"))

    # --- special files ------------------------------------------------------------------------
    os.mkfifo(tree.path(b"fifo"), 0o620)
    _make_socket(tree.path(b"socket"))
    if as_root:
        os.mknod(tree.path(b"dev-null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(tree.path(b"dev-block"), stat.S_IFBLK | 0o660, os.makedev(7, 200))

    # --- names --------------------------------------------------------------------------------
    os.mkdir(tree.path(b"names"))
    for i, name in enumerate(ODD_NAMES):
        _write(tree, b"names/" + name, f"file {i}\n".encode())
    os.mkdir(tree.path(b"names/dir with space"))
    _write(tree, b"names/dir with space/\xfe\xfd", b"inside odd dir")

    # --- xattrs -------------------------------------------------------------------------------
    if tree.xattrs:
        os.setxattr(tree.path(b"text.txt"), "user.comment", b"hello")
        os.setxattr(tree.path(b"text.txt"), "user.binary", bytes(range(256)))
        os.setxattr(tree.path(b"text.txt"), "user.empty", b"")
        os.setxattr(tree.path(b"sub"), "user.dir-attr", b"on a directory")
        os.setxattr(tree.path(b"hard-a"), "user.on-inode", b"shared by every name")
        if as_root:
            os.setxattr(tree.path(b"one-byte"), "trusted.lazyfs", b"root only")

    # --- owners (root only: chown to arbitrary ids, symlinks included) ---------------------------
    if as_root:
        os.chown(tree.path(b"text.txt"), 1234, 5678)
        os.chown(tree.path(b"setuid"), 0, 4294967294)
        os.chown(tree.path(b"sub"), 65534, 65534)
        os.chown(tree.path(b"link-dangling"), 4321, 8765, follow_symlinks=False)
        os.chown(tree.path(b"fifo"), 42, 43)
        os.chown(tree.path(b"hard-a"), 1000, 1000)
        os.chmod(tree.path(b"setuid"), 0o4755)  # chown clears setuid: set it again

    # --- mtimes, last (creating entries changes their directories' mtimes) -----------------------
    rng = random.Random(seed)
    for _, fs_path, _ in sorted(walk_source(root), key=lambda it: -it[0].count(b"/")):
        ns = 1_700_000_000_000_000_000 + rng.randrange(10**18)  # nanosecond precision, after 2023
        os.utime(fs_path, ns=(ns, ns), follow_symlinks=False)
    os.utime(tree.path(b"one-byte"), ns=(0, -1_234_567_891), follow_symlinks=False)  # before 1970
    os.utime(tree.path(b"empty"), ns=(0, 0), follow_symlinks=False)  # the epoch exactly
    return tree


def walk_source(root: Path) -> list[tuple[bytes, bytes, os.stat_result]]:
    """``(manifest path, filesystem path, lstat)`` for ``root`` and everything below it, in tree order.

    The root itself is ``b""``; paths are bytes, symlinks are never followed.
    """
    base = os.fsencode(root)
    st = os.lstat(base)
    out = [(b"", base, st)]
    stack = [b""] if stat.S_ISDIR(st.st_mode) else []
    while stack:
        rel = stack.pop()
        for name in os.listdir(os.path.join(base, rel) if rel else base):
            child = rel + b"/" + name if rel else name
            fs = os.path.join(base, child)
            cst = os.lstat(fs)
            out.append((child, fs, cst))
            if stat.S_ISDIR(cst.st_mode):
                stack.append(child)
    out.sort(key=lambda it: tree_key(it[0]))
    return out


def pack_keys(origin_objects: dict[str, bytes] | list[str]) -> list[str]:
    """The ``packs/...`` keys among ``origin_objects`` (a key list or a key -> bytes mapping)."""
    return sorted(k for k in origin_objects if k.startswith("packs/"))


# --- the command line ---------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Run:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without AWS settings (no real credentials, no instance-metadata probing)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env.update(extra)
    return env


def run_lazyfs(*args: str, env: dict[str, str] | None = None, user: int | None = None, timeout: float = 60) -> Run:
    """Run ``python -m lazyfs ARGS`` (as uid/gid ``user`` with ``setpriv`` when given)."""
    argv = [sys.executable, "-m", "lazyfs", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    t0 = time.monotonic()
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        errors="backslashreplace",
        env=env or clean_env(),
        cwd=REPO,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return Run(tuple(args), proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)


def assert_one_line_error(run: Run, *fragments: str, max_seconds: float = 15.0) -> None:
    what = f"lazyfs {' '.join(run.args)}"
    assert run.returncode != 0, f"{what}: exit status 0"
    assert "Traceback" not in run.stdout + run.stderr, f"{what}: traceback:\n{run.stderr}"
    lines = run.stderr.splitlines()
    assert len(lines) == 1, f"{what}: expected one line on stderr, got {len(lines)}:\n{run.stderr}"
    assert lines[0].startswith("lazyfs: error: "), f"{what}: {lines[0]!r}"
    for fragment in fragments:
        assert fragment in lines[0], f"{what}: {fragment!r} not in {lines[0]!r}"
    assert run.stdout == "", f"{what}: printed {run.stdout!r} on stdout"
    assert run.seconds < max_seconds, f"{what}: took {run.seconds:.1f} s"


# --- reading back -----------------------------------------------------------------------------


def _verify(chunk: Chunk, stored: bytes, where: str) -> bytes:
    if len(stored) != chunk.stored_size:
        raise IntegrityError(f"{where}: {len(stored)} stored bytes, expected {chunk.stored_size}")
    if chunk.codec is Codec.ZSTD:
        try:
            raw = zstandard.ZstdDecompressor().decompress(stored, max_output_size=chunk.size)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{where}: not a valid zstd frame: {exc}") from exc
    else:
        raw = stored
    if len(raw) != chunk.size:
        raise IntegrityError(f"{where}: {len(raw)} raw bytes, expected {chunk.size}")
    if blake3.blake3(raw).digest() != chunk.digest:
        raise IntegrityError(f"{where}: BLAKE3 digest mismatch")
    return raw


async def read_chunk(origin: Origin, manifest: Manifest, chunk: Chunk) -> bytes:
    """The raw bytes of ``chunk``: one range read in its pack, decompressed, digest-checked."""
    pack = manifest.packs[chunk.pack]
    stored = await origin.read(pack.key, chunk.offset, chunk.stored_size)
    return _verify(chunk, stored, f"chunk {chunk.digest.hex()[:16]} in {pack.key}@{chunk.offset}")


async def read_file(origin: Origin, manifest: Manifest, entry: Entry | bytes) -> bytes:
    """The bytes of a regular file (or a hardlink to one), read through the manifest and verified."""
    if isinstance(entry, bytes):
        found = manifest.entry(entry)
        if found is None:
            raise KeyError(entry)
        entry = found
    target = manifest.resolve(entry)
    if target.type is not EntryType.REG:
        raise ValueError(f"{entry.path!r} is a {target.type.name}, not a regular file")
    parts = [await read_chunk(origin, manifest, c) for c in manifest.file_chunks(target)]
    data = b"".join(parts)
    if len(data) != target.size:
        raise IntegrityError(f"{entry.path!r}: {len(data)} bytes read back, the manifest says {target.size}")
    return data


async def read_all_files(origin: Origin, manifest: Manifest, *, concurrency: int = 8) -> dict[bytes, bytes]:
    """Every regular file's bytes (hardlinks resolved), keyed by manifest path."""
    limit = asyncio.Semaphore(concurrency)
    entries = [e for e in manifest.entries if e.type is EntryType.REG]

    async def one(e: Entry) -> bytes:
        async with limit:
            return await read_file(origin, manifest, e)

    datas = await asyncio.gather(*(one(e) for e in entries))
    return {e.path: d for e, d in zip(entries, datas, strict=True)}


# --- comparing with the source -------------------------------------------------------------------



def _source_xattrs(fs_path: bytes) -> tuple[tuple[bytes, bytes], ...]:
    try:
        names = os.listxattr(fs_path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return ()
        raise
    return tuple(sorted((n.encode(), os.getxattr(fs_path, n, follow_symlinks=False)) for n in names))


def _check_metadata(e: Entry, st: os.stat_result) -> None:
    where = f"{e.path!r}"
    assert e.mode == stat.S_IMODE(st.st_mode), f"{where}: mode {e.mode:o} != {stat.S_IMODE(st.st_mode):o}"
    assert (e.uid, e.gid) == (st.st_uid, st.st_gid), f"{where}: owner {e.uid}:{e.gid} != {st.st_uid}:{st.st_gid}"
    assert e.mtime_ns == st.st_mtime_ns, f"{where}: mtime {e.mtime_ns} != {st.st_mtime_ns}"


def _read_source(fs_path: bytes) -> bytes:
    with open(fs_path, "rb") as f:
        return f.read()


async def assert_tree_matches(manifest: Manifest, src: Path, origin: Origin | None = None) -> None:
    """Assert ``manifest`` describes ``src`` (a directory or one file) exactly.

    Every source entry is in the manifest with its type, mode, owner, mtime (ns),
    size, symlink target (verbatim), device number and xattrs; the manifest has
    nothing else; names of one inode are one REG entry plus HARDLINK entries that
    point at it.  With ``origin``, every file's bytes are read back (verified) and
    compared with the source.
    """
    items = list(walk_source(src))
    single_file = not stat.S_ISDIR(items[0][2].st_mode)
    if single_file:
        _, fs_path, st = items[0]
        items = [(os.path.basename(fs_path), fs_path, st)]
        root = manifest.entry(b"")
        assert root is not None and root.type is EntryType.DIR, "a single-file seed needs a root directory"
    expected_paths = {rel for rel, _, _ in items} | {b""}
    got_paths = {e.path for e in manifest.entries}
    assert got_paths == expected_paths, (
        f"paths differ: missing {sorted(expected_paths - got_paths)!r}, extra {sorted(got_paths - expected_paths)!r}"
    )
    # The first name of an inode in tree order holds its data; the others are HARDLINK entries.
    primary: dict[tuple[int, int], bytes] = {}
    for rel, _, st in items:
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            primary.setdefault((st.st_dev, st.st_ino), rel)
    for rel, fs_path, st in items:
        e = manifest.entry(rel)
        assert e is not None
        _check_metadata(e, st)
        first = primary.get((st.st_dev, st.st_ino), rel)
        if first != rel:
            assert e.type is EntryType.HARDLINK, f"{rel!r}: another name of {first!r} is a {e.type.name}"
            assert e.target == first, f"{rel!r}: hardlink to {e.target!r}, expected {first!r}"
            assert e.size == 0 and not e.xattrs and not e.chunks
            continue
        expected_type = ENTRY_TYPES[stat.S_IFMT(st.st_mode)]
        assert e.type is expected_type, f"{rel!r}: type {e.type.name} != {expected_type.name}"
        if e.type is EntryType.SYMLINK:
            target = os.readlink(fs_path)
            assert e.target == target, f"{rel!r}: symlink target {e.target!r} != {target!r}"
            assert e.size == len(target)
        else:
            assert e.target == b"", f"{rel!r}: unexpected target {e.target!r}"
        if e.type in (EntryType.CHR, EntryType.BLK):
            assert e.rdev == st.st_rdev, f"{rel!r}: rdev {e.rdev} != {st.st_rdev}"
        else:
            assert e.rdev == 0
        if e.type is EntryType.REG:
            assert e.size == st.st_size, f"{rel!r}: size {e.size} != {st.st_size}"
            chunks = manifest.file_chunks(e)
            expected_chunks = -(-st.st_size // manifest.chunk_size)
            assert len(chunks) == expected_chunks, f"{rel!r}: {len(chunks)} chunks, expected {expected_chunks}"
        else:
            assert e.size == (len(e.target) if e.type is EntryType.SYMLINK else 0)
            assert not e.chunks
        xattrs = _source_xattrs(fs_path)
        assert e.xattrs == xattrs, f"{rel!r}: xattrs {e.xattrs!r} != {xattrs!r}"
    if origin is not None:
        for rel, fs_path, st in items:
            if stat.S_ISREG(st.st_mode):
                expected = await asyncio.to_thread(_read_source, fs_path)
                got = await read_file(origin, manifest, rel)
                assert got == expected, f"{rel!r}: {len(got)} bytes read back differ from the source"
