"""``lazyfs.loader`` on a real lazyfs mount (FUSE, daemon started through the CLI).

The fast path: the loader sends its read plan to the mount's daemon, which fetches the
chunks in that order and reports each one's verified cache file; the loader ``pread``s
those files, bypassing FUSE.  Checked here against ``safetensors.torch.load_file`` of the
source files:

* a model, a sharded model and a Hugging-Face-style symlink load equal, with chunks read
  from the cache (``last_statistics().chunks_from_cache > 0``); ``fast_path=False`` (reads
  through FUSE) is equal too;
* the plan is what the daemon fetches: a ``keys`` load pulls only those tensors' chunks
  from the origin;
* an origin that fails mid-load (``tools/test_origin.py`` answering 503) gives a
  ``LoaderError`` naming the file and a tensor within the mount's read timeout — never a
  partial dict — and once the origin heals, the same mount loads the model.

Models are generated and published with 64 KiB chunks so a few MiB make hundreds of chunks.
These tests need /dev/fuse and root (the CI machine has both); they fail, never skip, without.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3
import pytest
import safetensors
import safetensors.torch
import torch

from lazyfs.loader import LoaderError, api, iter_tensors, last_statistics, load_file, safe_open
from lazyfs.loader.direct import uncached
from lazyfs.loader.readers import CONTROL_XATTR, DIRECT_MIN, CacheReader, _UnixHTTPConnection
from tests.helpers import evict_from_page_cache, run_lazyfs
from tools.test_origin import OriginProcess, start_test_origin

pytestmark = pytest.mark.fuse

KiB = 1024
MiB = 1024 * KiB
CHUNK = "64KiB"
# Short, so the failure test is quick; long enough for a loaded 2-core machine to serve a chunk.
READ_TIMEOUT = 2.0
REF = "loader:v1"


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(ref)
    for k, r in ref.items():
        assert got[k].dtype == r.dtype and got[k].shape == r.shape, k
        assert torch.equal(as_bytes(got[k]), as_bytes(r)), k


def rand(dtype: torch.dtype, *shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    size = torch.empty(0, dtype=dtype).element_size()
    return torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


@dataclass(frozen=True)
class Published:
    src: Path
    origin_dir: Path

    @property
    def file_url(self) -> str:
        return f"file://{self.origin_dir}"


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    """A tree of models, seeded once with ``lazyfs seed --chunk-size 64KiB``."""
    src = tmp_path_factory.mktemp("src")
    (src / "model").mkdir()
    model = {
        "embed": rand(torch.bfloat16, 1024, 1536, seed=1),  # 3 MiB
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "mask": torch.arange(1000) % 7 == 0,
        "f8": rand(torch.float8_e4m3fn, 333, 77, seed=2),
    }
    model |= {f"layers.{i}.norm": rand(torch.float32, 64 + i, seed=10 + i) for i in range(200)}
    model |= {f"layers.{i}.w": rand(torch.float16, 256, 512 + i, seed=500 + i) for i in range(8)}
    model["lm_head"] = rand(torch.bfloat16, 2048, 1024, seed=3)  # 4 MiB, last in the file
    safetensors.torch.save_file(model, src / "model" / "model.safetensors", metadata={"format": "pt"})
    (src / "model" / "config.json").write_text("{}")

    (src / "sharded").mkdir()
    weight_map: dict[str, str] = {}
    for s in range(2):
        shard = {f"s{s}.{j}": rand(torch.bfloat16, 300, 700 + j, seed=100 * s + j) for j in range(4)}
        name = f"model-{s + 1:05d}-of-00002.safetensors"
        safetensors.torch.save_file(shard, src / "sharded" / name)
        weight_map |= dict.fromkeys(shard, name)
    (src / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    # Hugging Face cache layout: snapshots/<rev>/model.safetensors -> ../../blobs/<hash>
    (src / "hub" / "blobs").mkdir(parents=True)
    (src / "hub" / "snapshots" / "rev").mkdir(parents=True)
    safetensors.torch.save_file({"w": rand(torch.float32, 512, 512, seed=7)}, src / "hub" / "blobs" / "abc123")
    os.symlink("../../blobs/abc123", src / "hub" / "snapshots" / "rev" / "model.safetensors")

    # For the failure test: 8 MiB in 32 tensors of 256 KiB.
    (src / "failing").mkdir()
    failing = {f"t{i:02d}": rand(torch.bfloat16, 128 * KiB, seed=1000 + i) for i in range(32)}
    safetensors.torch.save_file(failing, src / "failing" / "model.safetensors")

    origin_dir = tmp_path_factory.mktemp("origin")
    run = run_lazyfs("seed", str(src), f"file://{origin_dir}", "--name", REF, "--chunk-size", CHUNK, "-q", timeout=120)
    assert run.returncode == 0, run.stderr
    return Published(src, origin_dir)


class Mounts:
    """Mounts through ``lazyfs mount`` (each with its own cache); all unmounted at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.mountpoints: list[tuple[Path, Path]] = []

    def __call__(self, origin: str, ref: str = REF) -> Path:
        n = len(self.mountpoints)
        mp, cache = self.tmp_path / f"mnt{n}", self.tmp_path / f"cache{n}"
        mp.mkdir()
        run = run_lazyfs(
            "mount", origin, ref, str(mp), "--cache-dir", str(cache), "--read-timeout", str(READ_TIMEOUT), timeout=60
        )
        assert run.returncode == 0, run.stderr
        assert os.path.ismount(mp)
        self.mountpoints.append((mp, cache))
        return mp

    def cache_of(self, mp: Path) -> Path:
        return next(cache for m, cache in self.mountpoints if m == mp)

    def remount(self, mp: Path, origin: str, ref: str = REF) -> None:
        """Stop ``mp``'s daemon and mount it again on the same cache: a fresh daemon, a warm cache."""
        run = run_lazyfs("umount", str(mp), timeout=60)
        assert run.returncode == 0, run.stderr
        run = run_lazyfs(
            "mount", origin, ref, str(mp), "--cache-dir", str(self.cache_of(mp)),
            "--read-timeout", str(READ_TIMEOUT), timeout=60,
        )
        assert run.returncode == 0, run.stderr

    def daemon_log(self, mp: Path) -> str:
        for m, cache in self.mountpoints:
            if m == mp:
                with contextlib.suppress(OSError):
                    return (cache / "daemon.log").read_text(errors="replace")[-3000:]
        return ""

    def unmount_all(self) -> None:
        for mp, _ in reversed(self.mountpoints):
            if os.path.ismount(mp):
                run = run_lazyfs("umount", str(mp), timeout=60)
                if run.returncode != 0 and os.path.ismount(mp):
                    subprocess.run(["umount", "-l", str(mp)], check=False, timeout=30)


@pytest.fixture(scope="module")
def mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mounts]:
    m = Mounts(tmp_path_factory.mktemp("mounts"))
    try:
        yield m
    finally:
        m.unmount_all()


@pytest.fixture(scope="module")
def file_mount(published: Published, mounts: Mounts) -> Path:
    """The published tree mounted from its ``file://`` origin (one mount for the module)."""
    return mounts(published.file_url)


@dataclass(frozen=True)
class HTTPMount:
    origin: OriginProcess
    mountpoint: Path


@pytest.fixture(scope="module")
def http_server(published: Published, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OriginProcess]:
    log = tmp_path_factory.mktemp("origin-log") / "origin.log"
    with start_test_origin(published.origin_dir, log_path=log) as origin:
        yield origin


@pytest.fixture(scope="module")
def http_mountpoint(http_server: OriginProcess, mounts: Mounts) -> Path:
    return mounts(http_server.url)


@pytest.fixture
def http_mount(http_server: OriginProcess, http_mountpoint: Path) -> Iterator[HTTPMount]:
    """The tree mounted from the controllable HTTP origin (one mount; faults healed after each test).

    Tests using it read disjoint files, so each starts with a cold cache for its file.
    """
    try:
        yield HTTPMount(http_server, http_mountpoint)
    finally:
        http_server.heal()


def stats() -> tuple[int, int, int]:
    s = last_statistics()
    assert s is not None
    return s.files, s.chunks_from_cache, s.chunks_from_mount


# --- the fast path ------------------------------------------------------------------------------------


def test_fast_path_reads_verified_chunks_from_the_cache(published: Published, file_mount: Path) -> None:
    mp = file_mount
    ref = safetensors.torch.load_file(published.src / "model" / "model.safetensors")
    path = mp / "model" / "model.safetensors"

    assert_same(load_file(path), ref)  # cold: the daemon fetches in plan order
    files, from_cache, from_mount = stats()
    assert files == 1 and from_cache > 0 and from_mount == 0

    assert_same(load_file(path), ref)  # warm
    assert stats()[1] > 0

    assert_same(load_file(path, fast_path=False), ref)  # through FUSE
    assert stats()[1:] == (0, 0)

    keys = ["lm_head", "layers.3.norm", "scalar", "empty"]
    assert_same(dict(iter_tensors(path, keys=keys)), {k: ref[k] for k in keys})
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(as_bytes(f.get_slice("embed")[100:103, 5:9]), as_bytes(ref["embed"][100:103, 5:9]))


def checks() -> tuple[int, int, int]:
    s = last_statistics()
    assert s is not None
    return s.chunks_from_cache, s.chunks_checked, s.chunks_mismatched


@pytest.mark.allow_warnings  # the loader warns about each torn cache file it meets
def test_a_fresh_daemon_leaves_the_check_of_cache_files_to_the_loader(
    published: Published, mounts: Mounts
) -> None:
    """A daemon that has not read a cache file reports it with its xxh3; the loader checks the bytes.

    Corrupt cache files (same size, one byte flipped) are caught by that check and read
    through the mount, where the daemon drops them and fetches the chunks again.
    """
    mp = mounts(published.file_url)
    path = mp / "model" / "model.safetensors"
    ref = safetensors.torch.load_file(published.src / "model" / "model.safetensors")

    assert_same(load_file(path), ref)  # cold: this daemon fetched, checked and cached every chunk
    from_cache, checked, bad = checks()
    assert from_cache > 0 and checked == 0 and bad == 0

    data = (published.src / "model" / "model.safetensors").read_bytes()
    distinct = len({blake3.blake3(data[at : at + 64 * KiB]).digest() for at in range(0, len(data), 64 * KiB)})
    mounts.remount(mp, published.file_url)
    assert_same(load_file(path), ref)  # a fresh daemon: nothing read by it yet
    from_cache, checked, bad = checks()
    # Each cache file checked once (~8 MiB in 64 KiB chunks); the header's chunk is read three times.
    assert checked == distinct > 100 and from_cache >= checked + 2 and bad == 0

    mounts.remount(mp, published.file_url)
    files = sorted(p for p in (mounts.cache_of(mp) / "chunks").rglob("*") if p.is_file())
    assert len(files) > 100
    # Every third file, and the first chunk's: the header read meets it before the tensors do.
    first = data[: 64 * KiB]
    first_file = next(p for p in files if p.name == blake3.blake3(first).hexdigest())
    for chunk_file in {*files[::3], first_file}:
        with open(chunk_file, "r+b") as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(size // 2)
            byte = fh.read(1)
            fh.seek(size // 2)
            fh.write(bytes([byte[0] ^ 0x40]))
    assert_same(load_file(path), ref)
    from_cache, checked, bad = checks()
    assert bad > 0 and checked > 0, (from_cache, checked, bad)
    # The daemon dropped each torn file and cached the chunk again: the next load reads them all cleanly.
    assert_same(load_file(path), ref)
    assert checks()[2] == 0

    # The CUDA path (a pinned ring, run here on the CPU) reads and checks whole chunks the same way.
    mounts.remount(mp, published.file_url)
    source = api._Source(str(path))
    try:
        pipeline = api._Pipeline(source, source.header.tensors, torch.device("cpu"), 3, 2 * api.RING_BUFFER)
        source.start(pipeline.units)  # what pipeline.run() does before it picks the CPU path
        assert_same(dict(pipeline._run_device()), ref)
        reader = source.reader
        assert isinstance(reader, CacheReader)
        assert reader.chunks_checked == distinct and reader.chunks_mismatched == 0
    finally:
        source.close()


def _cached_pages(files: list[Path]) -> int:
    n = 0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            n += sum(not uncached(fd, at, 4096) for at in range(0, os.fstat(fd).st_size - 4095, 4096))
        finally:
            os.close(fd)
    return n


def test_cache_files_out_of_the_page_cache_are_read_direct(published: Published, mounts: Mounts) -> None:
    """With ``direct_io``, 1 MiB chunks, a fresh daemon and its cache files out of the page cache,
    the loader reads and checks them with O_DIRECT and leaves them out of it (the daemon starts
    no read-ahead)."""
    ref_name = "loader:mib"
    run = run_lazyfs(
        "seed", str(published.src), published.file_url, "--name", ref_name, "--chunk-size", "1MiB", "-q", timeout=120
    )
    assert run.returncode == 0, run.stderr
    mp = mounts(published.file_url, ref_name)
    path = mp / "model" / "model.safetensors"
    ref = safetensors.torch.load_file(published.src / "model" / "model.safetensors")
    # Cold: the daemon writes what it fetches around the page cache, so the loader reads the
    # files it was just told about with O_DIRECT too.
    assert_same(load_file(path, direct_io=True), ref)
    s = last_statistics()
    assert s is not None and s.chunks_from_cache > 0 and s.bytes_direct >= s.bytes - MiB

    mounts.remount(mp, published.file_url, ref_name)
    files = sorted(p for p in (mounts.cache_of(mp) / "chunks").rglob("*") if p.is_file())
    size = (published.src / "model" / "model.safetensors").stat().st_size
    assert len(files) == -(-size // MiB)
    for f in files:
        evict_from_page_cache(f)
    assert _cached_pages(files) == 0
    assert_same(load_file(path, direct_io=True), ref)
    s = last_statistics()
    assert s is not None and s.chunks_checked == len(files) and s.chunks_mismatched == 0
    assert s.bytes_direct >= s.bytes - MiB  # all but the header and a last chunk under DIRECT_MIN
    # Nothing pulled into the page cache behind the loader's back: the header's pages (read
    # buffered, ~20 KiB), and a last chunk too small to be worth a direct read, at most.
    assert _cached_pages([f for f in files if f.stat().st_size >= DIRECT_MIN]) <= 8

    assert_same(load_file(path, fast_path=False, direct_io=True), ref)  # through FUSE: never O_DIRECT there
    s = last_statistics()
    assert s is not None and s.bytes_direct == 0 and s.chunks_from_cache == 0

    # Without direct_io (the default) a fresh daemon hands the files to the kernel's read-ahead.
    mounts.remount(mp, published.file_url, ref_name)
    for f in files:
        evict_from_page_cache(f)
    assert_same(load_file(path), ref)
    s = last_statistics()
    assert s is not None and s.bytes_direct == 0 and s.chunks_checked == len(files)
    assert _cached_pages(files) > len(files) * 200


def test_sharded_and_symlinked_models_on_a_mount(published: Published, file_mount: Path) -> None:
    mp = file_mount
    src = published.src
    shards: dict[str, torch.Tensor] = {}
    for f in sorted((src / "sharded").glob("*.safetensors")):
        shards |= safetensors.torch.load_file(f)
    assert_same(load_file(mp / "sharded"), shards)
    assert stats()[:2][0] == 2 and stats()[1] > 0
    assert_same(load_file(mp / "sharded" / "model.safetensors.index.json", keys=["s1.2"]), {"s1.2": shards["s1.2"]})
    assert stats()[0] == 1  # only the shard holding s1.2 was opened

    # The daemon knows the blob by its real path: the loader resolves the link first.
    ref = safetensors.torch.load_file(src / "hub" / "blobs" / "abc123")
    assert_same(load_file(mp / "hub" / "snapshots" / "rev" / "model.safetensors"), ref)
    assert stats()[1] > 0


def test_the_plan_is_what_the_daemon_fetches(published: Published, http_mount: HTTPMount) -> None:
    """A ``keys`` load of the last tensor pulls that tensor's chunks, not the 8 MiB before it."""
    mp, http_origin = http_mount.mountpoint, http_mount.origin
    http_origin.reset()
    ref = safetensors.torch.load_file(published.src / "model" / "model.safetensors")
    got = load_file(mp / "model" / "model.safetensors", keys=["lm_head"])
    assert_same(got, {"lm_head": ref["lm_head"]})
    assert stats()[1] > 0
    served = http_origin.stats().bytes_for("packs/")
    wanted = ref["lm_head"].numel() * 2
    # The header's chunk, kernel read-ahead around it and chunk rounding: well under 1 MiB.
    assert wanted <= served <= wanted + 1 * MiB, (served, wanted)


def test_the_daemon_answers_a_plan_as_chunks_arrive_not_in_plan_order(
    published: Published, http_server: OriginProcess, mounts: Mounts, tmp_path: Path
) -> None:
    """A chunk that is slow to come (its pack hangs) does not hold back the answers for the rest.

    The file's first half is a copy of a file published before, so its chunks live in that
    earlier pack; the second half is new, in a pack of its own.  With the earlier pack hanging,
    the plan's answers for the second half must arrive first (in plan order they waited for
    chunk 0, and the fetches behind the window never started).
    """
    half = 8 * 64 * KiB
    old, new = os.urandom(half), os.urandom(half)
    packs = published.origin_dir / "packs"
    before = set(os.listdir(packs))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(old)
    run = run_lazyfs("seed", str(tmp_path / "a"), published.file_url, "--name", "order:a", "--chunk-size", CHUNK,
                     "-q", timeout=60)
    assert run.returncode == 0, run.stderr
    old_packs = set(os.listdir(packs)) - before
    assert len(old_packs) == 1
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "y.bin").write_bytes(old + new)
    run = run_lazyfs("seed", str(tmp_path / "b"), published.file_url, "--name", "order:b", "--chunk-size", CHUNK,
                     "-q", timeout=60)
    assert run.returncode == 0, run.stderr
    assert len(set(os.listdir(packs)) - before - old_packs) == 1  # the new half only

    mp = mounts(http_server.url, "order:b")
    sock = os.getxattr(mp, CONTROL_XATTR).decode()
    http_server.set_faults(hang=True, prefixes=(f"packs/{old_packs.pop()}",))
    conn = _UnixHTTPConnection(sock, timeout=30)
    try:
        conn.request("POST", "/plan", body=json.dumps({"path": "y.bin", "ranges": [[0, 2 * half]], "verify": "xxh3"}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert json.loads(resp.readline()) == {"chunk_size": 64 * KiB}
        seen: list[int] = []
        while len(seen) < 8:
            ev = json.loads(resp.readline())
            assert "path" in ev, ev  # not an error: the hanging chunks' deadline (2 s) has not passed
            seen.append(ev["chunk"])
        assert sorted(seen) == list(range(8, 16)), seen  # the new half, while the old one hangs
        http_server.heal()
        rest = [json.loads(resp.readline()) for _ in range(8)]
        assert sorted(ev["chunk"] for ev in rest) == list(range(8))
    finally:
        http_server.heal()
        conn.close()


# --- an origin that fails mid-load ------------------------------------------------------------------------


def test_origin_failing_mid_load(published: Published, http_mount: HTTPMount, mounts: Mounts) -> None:
    mp, http_origin = http_mount.mountpoint, http_mount.origin
    path = mp / "failing" / "model.safetensors"
    ref = safetensors.torch.load_file(published.src / "failing" / "model.safetensors")
    # Each pack request takes 0.2 s: the first tensors land, most chunks are still to fetch.
    http_origin.set_faults(delay=0.2)
    it = iter_tensors(path, threads=2)
    first, tensor = next(it)
    assert torch.equal(as_bytes(tensor), as_bytes(ref[first]))
    http_origin.set_faults(fail=503)
    t0 = time.monotonic()
    seen = [first]
    with pytest.raises(LoaderError) as info:
        for name, _ in it:
            seen.append(name)
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert str(path) in msg and "loading tensor 't" in msg, msg
    assert len(seen) < len(ref)
    assert elapsed < READ_TIMEOUT + 3, f"the error took {elapsed:.1f} s (read timeout {READ_TIMEOUT} s)"

    # load_file under the same failure: an exception, never a partial dict.
    result = None
    t0 = time.monotonic()
    with pytest.raises(LoaderError, match=r"failing/model.safetensors: loading tensor 't\d\d'"):
        result = load_file(path)
    assert result is None
    assert time.monotonic() - t0 < READ_TIMEOUT + 3

    # The origin heals: the same mount serves the whole model.
    http_origin.heal()
    assert_same(load_file(path), ref)
    assert stats()[1] > 0, mounts.daemon_log(mp)
