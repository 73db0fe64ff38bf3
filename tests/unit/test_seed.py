"""``lazyfs.seed``: publishing a tree, reading it back through the manifest, dedup, resume, failures.

Every round trip reads the bytes back from the origin the way a reader does
(pack range -> zstd -> BLAKE3, :mod:`tests.helpers`) and compares entries with
``os.lstat`` of the source.  Chunks are 64 KiB (packs a few hundred KiB where a
test needs many packs) so the tests stay fast.
"""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazyfs.catalog import load_manifest, resolve_ref
from lazyfs.config import SeedConfig
from lazyfs.errors import NotFoundError, OriginError, SeedError, UnavailableError, UsageError
from lazyfs.manifest import Codec, EntryType, Manifest, Ref, digest_of, encode, parse_ref
from lazyfs.origin.base import Origin
from lazyfs.progress import LineProgress
from lazyfs.seed import SeedResult, seed
from lazyfs.testing import FaultyOrigin, MemoryOrigin
from tests.helpers import (
    Tree,
    assert_tree_matches,
    build_tree,
    compressible_bytes,
    pack_keys,
    random_bytes,
    read_all_files,
    read_file,
)

KiB = 1024
CHUNK = 64 * KiB
CONFIG = SeedConfig(chunk_size=CHUNK)
# Small packs: a few chunks each, so a tree spans many packs and an upload can stop half-way.
SMALL_PACKS = SeedConfig(chunk_size=CHUNK, pack_size=4 * CHUNK, upload_concurrency=2)
REF = parse_ref("models/test:v1")


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return build_tree(tmp_path / "src", CHUNK)


async def _published(origin: MemoryOrigin, ref: Ref = REF) -> tuple[str, Manifest]:
    digest = await resolve_ref(origin, ref)
    _, manifest = await load_manifest(origin, digest)
    return digest, manifest


def _many_files(root: Path, n: int = 12, size: int = 3 * CHUNK, seed: int = 100) -> Path:
    """``n`` incompressible multi-chunk files: with SMALL_PACKS, about one pack per file."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"f{i:02d}.bin").write_bytes(random_bytes(size, seed + i))
    return root


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# --- round trip ---------------------------------------------------------------------------------


async def test_every_entry_type_round_trips(tree: Tree, memory_origin: MemoryOrigin) -> None:
    result = await seed(tree.root, memory_origin, REF, CONFIG)

    # What the result says is what was published: the ref, then the manifest it names.
    digest, manifest = await _published(memory_origin)
    assert digest == result.digest and manifest == result.manifest
    assert memory_origin.objects[REF.key] == f"{digest}\n".encode()
    await assert_tree_matches(manifest, tree.root, memory_origin)

    # Every kind of entry made it, as itself.
    types = {e.path: e.type for e in manifest.entries}
    assert types[b"link-dangling"] is EntryType.SYMLINK
    assert types[b"sub/hard-b"] is EntryType.HARDLINK and types[b"sub/deeper/hard-c"] is EntryType.HARDLINK
    assert types[b"sub/fifo-linked-too"] is EntryType.HARDLINK
    assert types[b"fifo"] is EntryType.FIFO and types[b"socket"] is EntryType.SOCK
    assert types[b"names/new\nline"] is EntryType.REG and types[b"names/latin1-\xe9\xff"] is EntryType.REG
    if tree.as_root:
        assert types[b"dev-null"] is EntryType.CHR and types[b"dev-block"] is EntryType.BLK
        null = manifest.entry(b"dev-null")
        assert null is not None and (os.major(null.rdev), os.minor(null.rdev)) == (1, 3)
        text = manifest.entry(b"text.txt")
        assert text is not None and (text.uid, text.gid) == (1234, 5678)
    setuid = manifest.entry(b"setuid")
    assert setuid is not None and setuid.mode == 0o4755
    sticky = manifest.entry(b"sticky")
    assert sticky is not None and sticky.mode == 0o1777
    link = manifest.entry(b"link-odd-target")
    assert link is not None and link.target == b"\xff weird target\n"
    old = manifest.entry(b"one-byte")
    assert old is not None and old.mtime_ns == -1_234_567_891
    if tree.xattrs:
        text = manifest.entry(b"text.txt")
        assert text is not None and (b"user.binary", bytes(range(256))) in text.xattrs
        assert (b"user.empty", b"") in text.xattrs

    # The result's accounting.
    assert result.ref == REF
    assert result.files == sum(1 for e in manifest.entries if e.type is EntryType.REG)
    assert result.bytes_total == tree.file_bytes == manifest.total_size
    assert result.chunks_new == len(manifest.chunks)
    assert result.bytes_new == sum(c.size for c in manifest.chunks)
    assert result.packs_uploaded == len(manifest.packs) and result.packs_skipped == 0
    assert result.bytes_uploaded == sum(p.size for p in manifest.packs)
    assert result.seconds >= 0


async def test_files_at_chunk_boundaries(tree: Tree, memory_origin: MemoryOrigin) -> None:
    result = await seed(tree.root, memory_origin, REF, CONFIG)
    m = result.manifest

    def sizes(path: bytes) -> list[int]:
        e = m.entry(path)
        assert e is not None
        return [c.size for c in m.file_chunks(e)]

    assert sizes(b"empty") == []
    assert sizes(b"one-byte") == [1]
    assert sizes(b"exact-chunk") == [CHUNK]
    assert sizes(b"chunk-plus-one") == [CHUNK, 1]
    assert sizes(b"multi.bin") == [CHUNK, CHUNK, CHUNK, CHUNK // 2]
    for path in (b"empty", b"one-byte", b"exact-chunk", b"chunk-plus-one", b"multi.bin"):
        assert await read_file(memory_origin, m, path) == tree.contents[path]


async def test_a_single_file(tmp_path: Path, memory_origin: MemoryOrigin) -> None:
    src = tmp_path / "model.safetensors"
    src.write_bytes(random_bytes(2 * CHUNK + 5))
    os.chmod(src, 0o640)
    result = await seed(src, memory_origin, REF, CONFIG)
    assert [e.path for e in result.manifest.entries] == [b"", b"model.safetensors"]
    root = result.manifest.entries[0]
    assert root.type is EntryType.DIR and root.mode == 0o755
    await assert_tree_matches(result.manifest, src, memory_origin)


async def test_an_empty_directory(tmp_path: Path, memory_origin: MemoryOrigin) -> None:
    (tmp_path / "empty").mkdir()
    result = await seed(tmp_path / "empty", memory_origin, REF, CONFIG)
    assert [e.path for e in result.manifest.entries] == [b""]
    assert result.packs_uploaded == 0 and pack_keys(dict(memory_origin.objects)) == []
    await assert_tree_matches(result.manifest, tmp_path / "empty", memory_origin)


# --- canonical manifests --------------------------------------------------------------------------


async def test_the_same_tree_gives_the_same_manifest_bytes(tree: Tree, tmp_path: Path) -> None:
    first, second = MemoryOrigin(), MemoryOrigin()
    a = await seed(tree.root, first, REF, CONFIG)
    b = await seed(tree.root, second, REF, CONFIG)
    assert a.digest == b.digest
    assert first.objects[f"manifests/{a.digest}"] == second.objects[f"manifests/{b.digest}"]
    assert digest_of(encode(a.manifest)) == a.digest
    # Same packs too: a resumed seed depends on it.
    assert pack_keys(dict(first.objects)) == pack_keys(dict(second.objects))

    # A copy with other inode numbers, another directory order on disk and another location.
    copy = tmp_path / "copy"
    await asyncio.to_thread(subprocess.run, ["cp", "-a", str(tree.root), str(copy)], check=True)
    c = await seed(copy, MemoryOrigin(), REF, CONFIG)
    assert c.digest == a.digest


async def test_metadata_changes_change_the_digest(tree: Tree, memory_origin: MemoryOrigin) -> None:
    before = await seed(tree.root, memory_origin, REF, CONFIG)
    st = os.lstat(tree.root / "one-byte")
    os.utime(tree.root / "one-byte", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    after = await seed(tree.root, memory_origin, REF, CONFIG)
    assert after.digest != before.digest
    assert after.bytes_uploaded == 0  # only metadata changed: no chunk is new
    assert memory_origin.objects[REF.key] == f"{after.digest}\n".encode()  # the ref moved


# --- compression --------------------------------------------------------------------------------


def _partly_zero(n: int, zero_fraction: float, seed: int) -> bytes:
    zeros = int(n * zero_fraction)
    return bytes(zeros) + random_bytes(n - zeros, seed)


async def test_zstd_only_where_it_saves_ten_percent(tmp_path: Path, memory_origin: MemoryOrigin) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "text").write_bytes(compressible_bytes(CHUNK))
    (src / "random").write_bytes(random_bytes(CHUNK, 1))
    (src / "saves-5pct").write_bytes(_partly_zero(CHUNK, 0.05, 2))
    (src / "saves-20pct").write_bytes(_partly_zero(CHUNK, 0.20, 3))
    result = await seed(src, memory_origin, REF, CONFIG)
    m = result.manifest

    def chunk(name: bytes) -> tuple[Codec, float]:
        e = m.entry(name)
        assert e is not None
        (c,) = m.file_chunks(e)
        return c.codec, c.stored_size / c.size

    codec, ratio = chunk(b"text")
    assert codec is Codec.ZSTD and ratio < 0.5
    assert chunk(b"random") == (Codec.NONE, 1.0)
    assert chunk(b"saves-5pct") == (Codec.NONE, 1.0)
    codec, ratio = chunk(b"saves-20pct")
    assert codec is Codec.ZSTD and ratio <= 0.9
    await assert_tree_matches(m, src, memory_origin)


# --- deduplication ------------------------------------------------------------------------------


async def test_identical_chunks_are_stored_once(tree: Tree, memory_origin: MemoryOrigin) -> None:
    result = await seed(tree.root, memory_origin, REF, CONFIG)
    m = result.manifest
    a, b = m.entry(b"dup-a"), m.entry(b"sub/dup-b")
    assert a is not None and b is not None and a.chunks == b.chunks
    multi, shares = m.entry(b"multi.bin"), m.entry(b"sub/shares-first-chunk")
    assert multi is not None and shares is not None and multi.chunks[0] == shares.chunks[0]
    assert len({c.digest for c in m.chunks}) == len(m.chunks)
    # Each chunk's stored bytes appear once in the packs: nothing else was uploaded.
    assert result.bytes_uploaded == sum(c.stored_size for c in m.chunks)
    # dup-b (2 chunks), shares-first-chunk (1), setgid == setuid (1 chunk: the same script).
    assert result.chunks_reused == 4
    assert result.chunks_new + result.chunks_reused == sum(len(e.chunks) for e in m.entries)


async def test_a_second_tree_uploads_only_its_new_chunks(tmp_path: Path, memory_origin: MemoryOrigin) -> None:
    first = _many_files(tmp_path / "v1", n=6)
    one = await seed(first, memory_origin, parse_ref("model:v1"), SMALL_PACKS)
    first_packs = set(pack_keys(dict(memory_origin.objects)))

    second = tmp_path / "v2"
    shutil.copytree(first, second)
    (second / "f00.bin").unlink()
    (second / "new.bin").write_bytes(random_bytes(2 * CHUNK + 10, 999))  # 3 new chunks
    _overwrite(second / "f01.bin", 2 * CHUNK, b"changed")  # its last chunk changes, the others stay
    memory_origin.reset_statistics()
    two = await seed(second, memory_origin, parse_ref("model:v2"), SMALL_PACKS)

    assert two.chunks_new == 4
    assert two.bytes_new == 2 * CHUNK + 10 + CHUNK
    assert two.bytes_uploaded == two.bytes_new  # random data is stored as is
    stats = memory_origin.statistics()
    assert stats.bytes_written == two.bytes_uploaded + len(encode(two.manifest)) + 65
    new_packs = set(pack_keys(dict(memory_origin.objects))) - first_packs
    assert two.packs_uploaded == len(new_packs) and two.packs_skipped == 0
    # v2's manifest points into v1's packs for what they share, and both read back.
    used = {p.key for p in two.manifest.packs}
    assert used & first_packs and used & new_packs
    await assert_tree_matches(two.manifest, second, memory_origin)
    await assert_tree_matches(one.manifest, first, memory_origin)


@pytest.mark.allow_warnings
async def test_unreadable_manifests_at_the_origin_are_ignored_for_dedup(
    tree: Tree, memory_origin: MemoryOrigin, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = b"not a manifest"
    memory_origin.put_nowait(f"manifests/{digest_of(garbage)}", garbage)
    memory_origin.put_nowait(f"manifests/{'0' * 64}", b"named after another digest")
    with caplog.at_level(logging.WARNING, logger="lazyfs.seed"):
        result = await seed(tree.root, memory_origin, REF, CONFIG)
    assert sum("ignoring manifests/" in r.getMessage() for r in caplog.records) == 2
    await assert_tree_matches(result.manifest, tree.root, memory_origin)


# --- idempotence and resumption -------------------------------------------------------------------


async def test_reseeding_an_unchanged_tree_uploads_nothing(tree: Tree, memory_origin: MemoryOrigin) -> None:
    first = await seed(tree.root, memory_origin, REF, CONFIG)
    before = dict(memory_origin.objects)
    memory_origin.reset_statistics()
    again = await seed(tree.root, memory_origin, REF, CONFIG)
    stats = memory_origin.statistics()
    assert again.digest == first.digest
    assert (again.bytes_uploaded, again.packs_uploaded, again.chunks_new, again.bytes_new) == (0, 0, 0, 0)
    assert again.chunks_reused == first.chunks_new + first.chunks_reused
    # One write: the ref (the manifest exists already); no pack is even looked at.
    assert (stats.writes, stats.bytes_written) == (1, 65)
    assert dict(memory_origin.objects) == before


class InterruptedOrigin(FaultyOrigin):
    """Lets ``packs`` pack writes through, then fails (``hang=False``) or blocks (``hang=True``) the rest."""

    def __init__(self, inner: Origin, packs: int, *, hang: bool = False) -> None:
        super().__init__(inner, operations={"write"})
        self.allowed = packs
        self.hang_after = hang
        self.stopped = asyncio.Event()  # set once a pack write is refused or held

    async def write(self, key: str, data: bytes | memoryview) -> None:
        if key.startswith("packs/"):
            if self.allowed > 0:
                self.allowed -= 1
            elif self.hang_after:
                self.hang = True
                self.stopped.set()
            else:
                self.fail_next(1)
                self.stopped.set()
        await super().write(key, data)


def _assert_nothing_published(origin: MemoryOrigin) -> None:
    leaked = [k for k in origin.objects if not k.startswith("packs/")]
    assert leaked == [], f"a failed seed published {leaked}"


async def _assert_resumes(src: Path, origin: MemoryOrigin, present: set[str]) -> SeedResult:
    """Re-run the seed: it uploads exactly the packs that are missing, and the result reads back."""
    sizes = {k: len(origin.objects[k]) for k in present}
    origin.reset_statistics()
    result = await seed(src, origin, REF, SMALL_PACKS)
    all_packs = {p.key for p in result.manifest.packs}
    assert present <= all_packs, "the interrupted seed wrote packs the finished one does not use"
    assert result.packs_skipped == len(present)
    assert result.packs_uploaded == len(all_packs - present)
    assert result.bytes_uploaded == sum(p.size for p in result.manifest.packs) - sum(sizes.values())
    writes = origin.statistics().writes
    assert writes == result.packs_uploaded + 2  # the missing packs, the manifest, the ref
    # Same packs as an uninterrupted seed to a fresh origin.
    fresh = MemoryOrigin()
    clean = await seed(src, fresh, REF, SMALL_PACKS)
    assert clean.digest == result.digest and set(pack_keys(dict(fresh.objects))) == all_packs
    await assert_tree_matches(result.manifest, src, origin)
    return result


async def test_a_failed_upload_publishes_nothing_and_a_rerun_resumes(tmp_path: Path) -> None:
    src = _many_files(tmp_path / "src")
    inner = MemoryOrigin()
    faulty = InterruptedOrigin(inner, packs=3)
    with pytest.raises(UnavailableError, match="injected fault"):
        await seed(src, faulty, REF, SMALL_PACKS)
    _assert_nothing_published(inner)
    present = set(pack_keys(dict(inner.objects)))
    assert 0 < len(present) <= 3
    await _assert_resumes(src, inner, present)


async def test_a_cancelled_seed_publishes_nothing_and_a_rerun_resumes(tmp_path: Path) -> None:
    src = _many_files(tmp_path / "src")
    inner = MemoryOrigin()
    faulty = InterruptedOrigin(inner, packs=4, hang=True)
    task = asyncio.create_task(seed(src, faulty, REF, SMALL_PACKS))
    async with asyncio.timeout(10):
        await faulty.stopped.wait()
    await asyncio.sleep(0.01)  # the held write is now waiting inside the origin
    assert faulty.statistics().hangs >= 1 and not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    faulty.heal()
    await asyncio.sleep(0.01)  # let cancelled uploads unwind
    assert asyncio.all_tasks() == {asyncio.current_task()}, "the cancelled seed left tasks running"
    _assert_nothing_published(inner)
    present = set(pack_keys(dict(inner.objects)))
    assert 0 < len(present) <= 4
    await _assert_resumes(src, inner, present)


async def test_a_failed_reseed_leaves_the_old_ref(tree: Tree, memory_origin: MemoryOrigin) -> None:
    old = await seed(tree.root, memory_origin, REF, CONFIG)
    (tree.root / "new-file").write_bytes(random_bytes(3 * CHUNK, 77))
    faulty = InterruptedOrigin(memory_origin, packs=0)
    with pytest.raises(UnavailableError):
        await seed(tree.root, faulty, REF, CONFIG)
    assert memory_origin.objects[REF.key] == f"{old.digest}\n".encode()
    assert [k for k in memory_origin.objects if k.startswith("manifests/")] == [f"manifests/{old.digest}"]


async def test_a_failed_manifest_write_leaves_no_ref(tree: Tree, memory_origin: MemoryOrigin) -> None:
    class NoManifests(FaultyOrigin):
        async def write(self, key: str, data: bytes | memoryview) -> None:
            if key.startswith("manifests/"):
                self.fail_next(1, OriginError)
            await super().write(key, data)

    with pytest.raises(OriginError, match="injected fault"):
        await seed(tree.root, NoManifests(memory_origin), REF, CONFIG)
    assert not any(k.startswith(("refs/", "manifests/")) for k in memory_origin.objects)


# --- bad input ----------------------------------------------------------------------------------


async def test_bad_sources(tmp_path: Path, memory_origin: MemoryOrigin) -> None:
    with pytest.raises(SeedError, match="no such file or directory"):
        await seed(tmp_path / "missing", memory_origin, REF, CONFIG)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(SeedError, match="not a directory or a regular file"):
        await seed(tmp_path / "fifo", memory_origin, REF, CONFIG)
    assert dict(memory_origin.objects) == {}


async def test_bad_targets(tree: Tree) -> None:
    read_only = MemoryOrigin(writable=False)
    with pytest.raises(UsageError, match="read-only"):
        await seed(tree.root, read_only, REF, CONFIG)
    with pytest.raises(UsageError, match="NAME"):
        await seed(tree.root, MemoryOrigin(), parse_ref("x@" + "a" * 64), CONFIG)


async def test_a_read_error_names_the_file(
    tree: Tree, memory_origin: MemoryOrigin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO from the disk in the middle of a file (root reads anything, so the error is injected)."""
    bad_inode = os.stat(tree.root / "multi.bin").st_ino
    real_pread, real_preadv = os.pread, os.preadv

    def check(fd: int, offset: int) -> None:
        if os.fstat(fd).st_ino == bad_inode and offset >= CHUNK:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    def pread(fd: int, n: int, offset: int) -> bytes:
        check(fd, offset)
        return real_pread(fd, n, offset)

    def preadv(fd: int, buffers: Sequence[memoryview], offset: int, flags: int = 0) -> int:
        check(fd, offset)
        return real_preadv(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(os, "preadv", preadv)
    with pytest.raises(SeedError, match=r"multi\.bin: Input/output error"):
        await seed(tree.root, memory_origin, REF, CONFIG)
    assert not any(k.startswith(("refs/", "manifests/")) for k in memory_origin.objects)


async def test_files_that_change_during_the_seed(tree: Tree, memory_origin: MemoryOrigin) -> None:
    from lazyfs.manifest import ManifestBuilder
    from lazyfs.seed import publish, scan_tree

    # Deleted between the scan and the read.
    builder = ManifestBuilder(CHUNK)
    files = scan_tree(tree.root, builder)
    os.unlink(tree.root / "exact-chunk")
    with pytest.raises(SeedError, match="exact-chunk: No such file or directory"):
        await publish(memory_origin, builder, files, REF, CONFIG)

    # A name with a newline still makes a one-line message.
    builder = ManifestBuilder(CHUNK)
    files = scan_tree(tree.root, builder)
    os.unlink(tree.root / "names" / "new\nline")
    with pytest.raises(SeedError) as info:
        await publish(memory_origin, builder, files, REF, CONFIG)
    assert "\n" not in str(info.value) and "names/new\\nline: No such file" in str(info.value)

    # Shrunk between the scan and the read.
    builder = ManifestBuilder(CHUNK)
    files = scan_tree(tree.root, builder)
    os.truncate(tree.root / "multi.bin", CHUNK + 10)
    with pytest.raises(SeedError, match=r"multi\.bin changed while being published"):
        await publish(memory_origin, builder, files, REF, CONFIG)
    assert not any(k.startswith(("refs/", "manifests/")) for k in memory_origin.objects)


# An unreadable file is tested through the CLI as uid 65534 (tests/unit/test_cli_seed.py): root reads anything.


# --- progress -------------------------------------------------------------------------------------


def test_line_progress_prints_periodic_lines() -> None:
    out = io.StringIO()
    p = LineProgress("seed x:1", out, interval=0.0)
    p.start(4 * 1024 * 1024)
    for _ in range(4):
        p.advance(1024 * 1024)
    p.finish()
    lines = out.getvalue().splitlines()
    assert len(lines) == 5
    assert lines[0].startswith("seed x:1: 1.0 MiB / 4.0 MiB (25%), ")
    assert lines[-1].startswith("seed x:1: 4.0 MiB / 4.0 MiB (100%), ") and lines[-1].endswith("/s")

    quiet = io.StringIO()
    p = LineProgress("seed", quiet, interval=3600.0)
    p.start(10)
    p.advance(5)
    p.advance(5)
    p.finish()
    assert quiet.getvalue().count("\n") == 1 and "(100%)" in quiet.getvalue()


async def test_seed_reports_progress(tree: Tree, memory_origin: MemoryOrigin) -> None:
    out = io.StringIO()
    result = await seed(tree.root, memory_origin, REF, CONFIG, LineProgress("seed", out, interval=0.0))
    lines = out.getvalue().splitlines()
    assert len(lines) == result.chunks_new + result.chunks_reused + 1
    assert "(100%)" in lines[-1]


# --- property: random small trees round-trip --------------------------------------------------------

_names = st.binary(min_size=1, max_size=12).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)
_files = st.dictionaries(
    st.tuples(st.sampled_from([b"", b"d", b"d/e", b"x y"]), _names),
    st.one_of(st.binary(max_size=9000), st.integers(0, 9000).map(lambda n: bytes(n % 7 for _ in range(n)))),
    max_size=8,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=_files, links=st.lists(st.tuples(_names, st.binary(min_size=1, max_size=30)), max_size=3))
def test_random_trees_round_trip(files: dict[tuple[bytes, bytes], bytes], links: list[tuple[bytes, bytes]]) -> None:
    config = SeedConfig(chunk_size=4096, pack_size=16 * 1024)
    with tempfile.TemporaryDirectory() as tmp:
        root = os.fsencode(tmp) + b"/src"
        for d in (b"", b"/d/e", b"/x y"):
            os.makedirs(root + d, exist_ok=True)
        for (d, name), data in files.items():
            path = os.path.join(root, d, name) if d else os.path.join(root, name)
            if os.path.lexists(path):
                continue  # a name that is also a directory
            with open(path, "wb") as f:
                f.write(data)
        for name, target in links:
            path = os.path.join(root, b"L" + name)
            if b"\0" not in target and not os.path.lexists(path):
                os.symlink(target, path)
        src = Path(os.fsdecode(root))

        async def go() -> None:
            origin = MemoryOrigin()
            result = await seed(src, origin, REF, config)
            await assert_tree_matches(result.manifest, src, origin)
            again = await seed(src, origin, REF, config)
            assert again.digest == result.digest and again.bytes_uploaded == 0
            read = await read_all_files(origin, result.manifest)
            assert sum(map(len, read.values())) == result.bytes_total

        asyncio.run(go())


async def test_missing_ref_is_not_found(memory_origin: MemoryOrigin) -> None:
    with pytest.raises(NotFoundError, match="not published"):
        await resolve_ref(memory_origin, REF)


def test_stat_helpers_agree_with_the_kernel(tree: Tree) -> None:
    # Guards the test fixture itself: the tree really has what the tests above rely on.
    assert stat.S_IMODE(os.lstat(tree.root / "setuid").st_mode) == 0o4755
    assert os.lstat(tree.root / "hard-a").st_nlink == 3
    assert stat.S_ISSOCK(os.lstat(tree.root / "socket").st_mode)


class _HeldWrites(MemoryOrigin):
    """Pack writes wait until ``release`` is set; ``writing`` is set when one has begun."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = asyncio.Event()
        self.release = asyncio.Event()

    async def write(self, key: str, data: bytes | memoryview) -> None:
        if key.startswith("packs/"):
            self.writing.set()
            await self.release.wait()
        await super().write(key, data)


async def test_a_pack_being_uploaded_holds_only_its_joined_bytes() -> None:
    """Once a pack is joined, the chunks' own copies are let go; a cancelled upload's buffer is not reused."""
    from lazyfs.manifest import Pack
    from lazyfs.seed import _PackBuffers, _Uploads

    origin = _HeldWrites()
    uploads = _Uploads(origin, asyncio.Semaphore(2), buffers=_PackBuffers(1 << 20))
    pieces = [os.urandom(1000), os.urandom(3000)]
    located: list[Pack] = []
    await uploads.submit(pieces, 4000, located.append)
    await asyncio.wait_for(origin.writing.wait(), 10)
    assert pieces == [] and len(located) == 1 and located[0].size == 4000
    origin.release.set()
    await uploads.drain()
    assert len(origin.objects[located[0].key]) == 4000
    assert len(uploads.buffers._free) == 1  # done: the buffer goes back for the next pack

    origin.writing.clear()
    origin.release.clear()
    await uploads.submit([os.urandom(10)], 10, located.append)
    await asyncio.wait_for(origin.writing.wait(), 10)
    assert uploads.buffers._free == []
    uploads.cancel()
    with pytest.raises(asyncio.CancelledError):
        await uploads.drain()
    # A worker thread could still be writing from it: the cancelled upload's buffer is dropped, not reused.
    assert uploads.buffers._free == []
