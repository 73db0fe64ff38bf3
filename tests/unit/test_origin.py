"""Unit tests: URL parsing, the in-memory fake, the fault injector, and origin details
that need no server (the contract suite covers the shared behaviour)."""

from __future__ import annotations

import asyncio
import fcntl
import mmap
import os
from pathlib import Path
from typing import Any

import pytest

from lazyfs.config import OriginConfig
from lazyfs.errors import (
    BadURLError,
    NotFoundError,
    OriginError,
    ReadOnlyError,
    UnavailableError,
    UsageError,
)
from lazyfs.origin import FileOrigin, HTTPOrigin, Origin, S3Credentials, S3Origin, open_origin
from lazyfs.origin.file import TEMP_SUFFIX
from lazyfs.origin.s3 import _summary, check_bucket_name, s3_config_from_env
from lazyfs.testing import FaultStatistics, FaultyOrigin, MemoryOrigin, OriginStatistics

# --- open_origin ------------------------------------------------------------------------------------


def test_file_urls(tmp_path: Path) -> None:
    origin = open_origin(f"file://{tmp_path}/models/")
    assert isinstance(origin, FileOrigin)
    assert origin.root == tmp_path / "models"
    assert origin.url == (tmp_path / "models").as_uri()
    assert isinstance(open_origin(f"file://localhost{tmp_path}"), FileOrigin)
    spaced = open_origin(f"file://{tmp_path}/with%20space")
    assert isinstance(spaced, FileOrigin) and spaced.root == tmp_path / "with space"


def test_http_urls() -> None:
    origin = open_origin("https://cdn.example.com/models/")
    assert isinstance(origin, HTTPOrigin)
    assert origin.url == "https://cdn.example.com/models"
    assert not origin.writable
    assert open_origin("http://[::1]:8080").url == "http://[::1]:8080"
    assert open_origin("HTTP://Host.Example:81/a/b").url == "http://host.example:81/a/b"
    secret = open_origin("https://user:secret@host/p")
    assert secret.url == "https://host/p" and "secret" not in repr(secret)


def test_s3_urls() -> None:
    origin = open_origin("s3://my-bucket/some/prefix/")
    assert isinstance(origin, S3Origin)
    assert origin.url == "s3://my-bucket/some/prefix"
    assert origin.writable
    assert open_origin("s3://my-bucket").url == "s3://my-bucket"
    assert open_origin("s3://my-bucket/").url == "s3://my-bucket"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://host/x", "unknown origin scheme 'ftp'"),
        ("gs://bucket/x", "unknown origin scheme 'gs'"),
        ("/abs/dir", "has no scheme.*file:///abs/dir"),
        ("models/dir", "has no scheme"),
        ("", "has no scheme"),
        ("file://models/dir", "absolute path.*three slashes"),
        ("file:relative/dir", "absolute path"),
        ("file:///dir?x=1", "query"),
        ("s3://", "needs a bucket"),
        ("s3:///prefix", "needs a bucket"),
        ("s3://ab/x", "not a valid S3 bucket name"),
        ("s3://My_Bucket/x", "not a valid S3 bucket name"),
        ("s3://bucket/a/../b", "invalid prefix"),
        ("s3://bucket/a//b", "invalid prefix"),
        ("s3://key:secret@bucket/x", "s3://bucket/prefix"),
        ("s3://bucket:9000/x", "s3://bucket/prefix"),
        ("s3://bucket/x?versionId=1", "query"),
        ("http://", "needs a host"),
        ("http:///path", "needs a host"),
        ("http://host:99999/x", "bad port"),
        ("https://host/x?token=abc", "query"),
        ("https://host/x#frag", "fragment"),
        ("http://[::1/x", "not a valid origin URL"),
    ],
)
def test_bad_urls_are_one_clear_line(url: str, message: str) -> None:
    with pytest.raises(BadURLError, match=message) as info:
        open_origin(url)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, UsageError)


def test_file_root_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"x")
    with pytest.raises(BadURLError, match="exists and is not a directory"):
        open_origin(f"file://{tmp_path}/plain")


@pytest.mark.parametrize("url", ["http://user:hunter2@host:99999/x", "https://u:hunter2@host/x?q=1"])
def test_bad_url_messages_hide_credentials(url: str) -> None:
    with pytest.raises(BadURLError) as info:
        open_origin(url)
    assert "hunter2" not in str(info.value)


def test_s3_endpoint_checks() -> None:
    with pytest.raises(BadURLError, match="must start with http"):
        S3Origin("bucket", config=OriginConfig(s3_endpoint="localhost:9000"))
    with pytest.raises(BadURLError, match="plain http"):
        S3Origin("bucket", config=OriginConfig(s3_endpoint="http://minio:9000", s3_allow_http=False))
    S3Origin("bucket", config=OriginConfig(s3_endpoint="https://minio:9000", s3_allow_http=False))


def test_every_origin_is_an_origin(tmp_path: Path) -> None:
    for origin in (
        FileOrigin(tmp_path),
        HTTPOrigin("http://h/"),
        S3Origin("bucket"),
        MemoryOrigin(),
        FaultyOrigin(MemoryOrigin()),
    ):
        assert isinstance(origin, Origin)


# --- S3 helpers ----------------------------------------------------------------------------------------


def test_s3_config_from_env() -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://generic:1",
        "AWS_ENDPOINT_URL_S3": "http://s3-specific:2",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_REGION": "eu-central-1",
    }
    config = s3_config_from_env(env)
    assert config.s3_endpoint == "http://s3-specific:2"
    assert config.s3_region == "eu-central-1"
    fallback = s3_config_from_env({"AWS_ENDPOINT_URL": "http://generic:1", "AWS_DEFAULT_REGION": "eu-west-1"})
    assert (fallback.s3_endpoint, fallback.s3_region) == ("http://generic:1", "eu-west-1")
    assert s3_config_from_env({"AWS_REGION": ""}).s3_region is None
    explicit = OriginConfig(s3_region="us-west-2", max_connections=3)
    merged = s3_config_from_env(env, explicit)
    assert (merged.s3_region, merged.s3_endpoint, merged.max_connections) == (
        "us-west-2",
        "http://s3-specific:2",
        3,
    )


def test_s3_credentials_repr_hides_secrets() -> None:
    creds = S3Credentials("AKIAEXAMPLE", "top-secret", "session-token")
    assert "top-secret" not in repr(creds) and "session-token" not in repr(creds)
    assert "AKIAEXAMPLE" in repr(creds)


@pytest.mark.parametrize("name", ["abc", "my.bucket-1", "a" * 63, "0bucket9"])
def test_valid_bucket_names(name: str) -> None:
    assert check_bucket_name(name) == name


@pytest.mark.parametrize("name", ["", "ab", "a" * 64, "-bucket", "bucket-", "Bucket", "a..b", "a_b"])
def test_invalid_bucket_names(name: str) -> None:
    with pytest.raises(BadURLError):
        check_bucket_name(name)


def test_obstore_error_summary() -> None:
    text = (
        "Generic S3 error: Error performing GET http://h/b/k in 6ms - Server returned non-2xx status code: "
        '403 Forbidden: <?xml version="1.0"?><Error><Code>InvalidAccessKeyId</Code>'
        "<Message>The AWS Access Key Id you provided does not exist.</Message></Error>"
        "\n\nDebug source:\nGeneric { ... }"
    )
    status, code, reason = _summary(RuntimeError(text))
    assert (status, code) == (403, "InvalidAccessKeyId")
    assert reason == "HTTP 403 InvalidAccessKeyId: The AWS Access Key Id you provided does not exist."
    status, code, reason = _summary(RuntimeError("HTTP error: error sending request\n\nDebug source: x"))
    assert (status, code, reason) == (None, None, "HTTP error: error sending request")


# --- FileOrigin specifics -----------------------------------------------------------------------------


async def test_file_origin_creates_its_root_on_first_write(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b"
    origin = FileOrigin(root)
    assert await origin.list("") == []
    assert await origin.exists("x") is False
    assert not root.exists()
    await origin.write("refs/x/y", b"1")
    assert (root / "refs" / "x" / "y").read_bytes() == b"1"


async def test_file_origin_hides_and_reserves_temporary_files(tmp_path: Path) -> None:
    origin = FileOrigin(tmp_path)
    await origin.write("dir/obj", b"1")
    (tmp_path / "dir" / f".obj.1234{TEMP_SUFFIX}").write_bytes(b"half-written")
    assert await origin.list("") == ["dir/obj"]
    with pytest.raises(UsageError, match="reserved"):
        await origin.write(f"dir/x{TEMP_SUFFIX}", b"x")


async def test_file_origin_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    origin = FileOrigin(tmp_path)
    await origin.write("a", b"object")
    with pytest.raises(OriginError, match="parent of this key is an object"):
        await origin.write("a/b", b"x")
    await origin.write("d/e", b"x")
    with pytest.raises(OriginError, match="keys below this one exist"):
        await origin.write("d", b"x")
    names = await asyncio.to_thread(lambda: sorted(p.name for p in tmp_path.rglob("*")))
    assert names == ["a", "d", "e"]


async def test_file_origin_lists_files_only(tmp_path: Path) -> None:
    origin = FileOrigin(tmp_path)
    await origin.write("refs/a/b", b"1")
    (tmp_path / "refs" / "emptydir").mkdir()
    os.symlink(tmp_path / "refs" / "a", tmp_path / "refs" / "link-to-dir")
    assert await origin.list("refs/") == ["refs/a/b"]


async def test_file_origin_does_not_block_the_loop(tmp_path: Path) -> None:
    """Reads run in a worker thread: the loop keeps ticking during a large read."""
    origin = FileOrigin(tmp_path)
    await origin.write("big", os.urandom(32 * 1024 * 1024))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        for _ in range(4):
            await origin.read("big")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert ticks > 4


def _direct_io_works(directory: Path) -> bool:
    """Whether the file system under ``directory`` takes an aligned O_DIRECT write."""
    buf = mmap.mmap(-1, 4096)
    try:
        fd = os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        return os.write(fd, buf) == 4096
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(directory / "probe")


async def test_file_origin_writes_aligned_buffers_past_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page-aligned buffer goes out with O_DIRECT up to its last whole block, the tail and a
    ``bytes`` object through the page cache; the object is the same bytes either way."""
    direct = _direct_io_works(tmp_path)
    writes: list[tuple[bool, int]] = []
    real_write = os.write

    def spy(fd: int, data: Any) -> int:
        n = real_write(fd, data)
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):  # the origin's, no one else's
            writes.append((bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT), n))
        return n

    direct_tries: list[int] = []
    real_fcntl = fcntl.fcntl

    def fcntl_spy(fd: int, cmd: int, arg: int = 0) -> Any:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            direct_tries.append(fd)
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(os, "write", spy)
    monkeypatch.setattr(fcntl, "fcntl", fcntl_spy)
    origin = FileOrigin(tmp_path)
    size = 3 * 1024 * 1024 + 123  # whole blocks, then a 123-byte tail
    data = os.urandom(size)
    aligned = mmap.mmap(-1, size + 4096)
    aligned[:size] = data
    await origin.write("packs/aligned", memoryview(aligned)[:size])
    assert (tmp_path / "packs" / "aligned").read_bytes() == data
    if direct:
        assert sum(n for d, n in writes if d) == size - 123 and sum(n for d, n in writes if not d) == 123
    else:  # tmpfs before Linux 6.6, say: all through the page cache
        assert not any(d for d, _ in writes) and sum(n for _, n in writes) == size
    writes.clear()
    assert len(direct_tries) == 1
    await origin.write("packs/bytes", data)  # not aligned in memory: O_DIRECT is not even tried
    assert (tmp_path / "packs" / "bytes").read_bytes() == data
    assert not any(d for d, _ in writes) and sum(n for _, n in writes) == size
    writes.clear()
    await origin.write("packs/shifted", memoryview(aligned)[1 : size + 1])  # writable, one byte off
    assert (tmp_path / "packs" / "shifted").read_bytes() == aligned[1 : size + 1]
    assert not any(d for d, _ in writes) and len(direct_tries) == 1
    writes.clear()
    await origin.write("small", memoryview(aligned)[:8192])  # small objects are not worth it
    assert (tmp_path / "small").read_bytes() == data[:8192]
    assert writes == [(False, 8192)]


# --- HTTPOrigin without a server ----------------------------------------------------------------------


async def test_http_origin_refuses_writes_and_listing_without_io() -> None:
    origin = HTTPOrigin("http://127.0.0.1:9/")  # the discard port: nothing is sent
    with pytest.raises(ReadOnlyError, match="read-only"):
        await origin.write("k", b"x")
    with pytest.raises(ReadOnlyError, match="cannot list"):
        await origin.list("refs/")
    with pytest.raises(UsageError):
        await origin.write("../k", b"x")
    await origin.aclose()
    with pytest.raises(UnavailableError, match="closed"):
        await origin.read("k")


# --- MemoryOrigin -------------------------------------------------------------------------------------


async def test_memory_origin_statistics() -> None:
    origin = MemoryOrigin({"a": b"12345"})
    assert origin.statistics() == OriginStatistics()
    assert await origin.read("a", 1, 3) == b"234"
    assert await origin.read("a", 10) == b""
    with pytest.raises(NotFoundError):
        await origin.read("missing")
    await origin.write("b", b"xy")
    assert await origin.exists("b")
    assert await origin.list("") == ["a", "b"]
    assert origin.statistics() == OriginStatistics(
        reads=3, bytes_read=3, writes=1, bytes_written=2, exists_calls=1, lists=1
    )
    origin.reset_statistics()
    assert origin.statistics() == OriginStatistics()
    assert dict(origin.objects) == {"a": b"12345", "b": b"xy"}


async def test_memory_origin_read_only_mode() -> None:
    origin = MemoryOrigin(url="http://fake/", writable=False, listable=False)
    origin.put_nowait("k", b"v")
    assert await origin.read("k") == b"v"
    assert not origin.writable
    with pytest.raises(ReadOnlyError):
        await origin.write("k", b"w")
    with pytest.raises(ReadOnlyError):
        await origin.list("")
    assert origin.statistics().writes == 1 and origin.statistics().bytes_written == 0


# --- FaultyOrigin -------------------------------------------------------------------------------------


async def test_faulty_origin_is_transparent_by_default() -> None:
    inner = MemoryOrigin({"k": b"value"})
    faulty = FaultyOrigin(inner)
    assert faulty.url == inner.url and faulty.writable
    assert await faulty.read("k") == b"value"
    assert faulty.statistics() == FaultStatistics(calls=1)


async def test_fail_next() -> None:
    faulty = FaultyOrigin(MemoryOrigin({"k": b"v"}))
    faulty.fail_next(2)
    with pytest.raises(UnavailableError, match="injected fault: read 'k'"):
        await faulty.read("k")
    with pytest.raises(UnavailableError):
        await faulty.exists("k")
    assert await faulty.read("k") == b"v"
    faulty.fail_next(1, NotFoundError)
    with pytest.raises(NotFoundError):
        await faulty.read("k")
    assert faulty.statistics().errors == 3


async def test_error_rate_is_seeded_and_reproducible() -> None:
    async def pattern(seed: int) -> list[bool]:
        faulty = FaultyOrigin(MemoryOrigin({"k": b"v"}), seed=seed)
        faulty.error_rate = 0.5
        out = []
        for _ in range(40):
            try:
                await faulty.read("k")
                out.append(True)
            except UnavailableError:
                out.append(False)
        return out

    a, b, c = await pattern(7), await pattern(7), await pattern(8)
    assert a == b
    assert a != c
    assert 5 < a.count(False) < 35


async def test_operations_filter() -> None:
    faulty = FaultyOrigin(MemoryOrigin({"k": b"v"}))
    faulty.operations = {"write"}
    faulty.error_rate = 1.0
    assert await faulty.read("k") == b"v"
    with pytest.raises(UnavailableError):
        await faulty.write("k", b"w")


async def test_truncation_and_corruption() -> None:
    data = bytes(range(256)) * 4
    faulty = FaultyOrigin(MemoryOrigin({"k": data}), seed=3)
    faulty.truncate_next(1)
    short = await faulty.read("k")
    assert len(short) < len(data) and data.startswith(short)
    faulty.corrupt_next(1)
    bad = await faulty.read("k", 10, 100)
    assert len(bad) == 100 and bad != data[10:110]
    assert sum(x != y for x, y in zip(bad, data[10:110], strict=True)) == 1
    assert await faulty.read("k") == data
    faulty.corrupt_rate = 1.0
    assert await faulty.read("k") != data
    assert await faulty.read("k", 0, 0) == b""  # nothing to damage
    stats = faulty.statistics()
    assert (stats.truncations, stats.corruptions) == (1, 2)


async def test_delay() -> None:
    faulty = FaultyOrigin(MemoryOrigin({"k": b"v"}))
    faulty.delay = 0.05
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await faulty.read("k")
    assert loop.time() - t0 >= 0.045
    assert faulty.statistics().delays == 1


async def test_hang_until_healed_or_cancelled() -> None:
    faulty = FaultyOrigin(MemoryOrigin({"k": b"v"}))
    faulty.hang = True
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await faulty.read("k")
    pending = asyncio.create_task(faulty.read("k"))
    await asyncio.sleep(0.01)
    assert not pending.done()
    faulty.heal()
    assert await pending == b"v"
    assert faulty.statistics().hangs == 2
    assert await faulty.read("k") == b"v"
