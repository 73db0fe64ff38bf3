"""``tools/test_origin.py`` itself: a correct origin when healthy, and faults that do what they say.

The FUSE tests trust its counters and faults, so they are checked here first: the origin
contract through lazyfs's own HTTP origin, then each fault, the counters and shutdown.
(No mount here: the module overrides the FUSE requirement.)
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from lazyfs.config import OriginConfig
from lazyfs.errors import UnavailableError
from lazyfs.origin import FileOrigin, HTTPOrigin
from lazyfs.testing import OriginContract, OriginSubject
from tools.test_origin import OriginProcess, OriginServerError, start_test_origin

DATA = bytes(range(256)) * 64  # 16 KiB, every byte value


@pytest.fixture(scope="session", autouse=True)
def _fuse_is_required() -> None:
    """Overrides the directory's FUSE check: nothing here mounts."""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OriginProcess]:
    root = tmp_path_factory.mktemp("served")
    (root / "packs").mkdir()
    (root / "packs" / "p1").write_bytes(DATA)
    (root / "refs").mkdir()
    (root / "refs" / "r").write_bytes(b"ref\n")
    server = start_test_origin(root, log_path=root.parent / "origin.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def origin(served: OriginProcess) -> Iterator[OriginProcess]:
    served.heal()
    served.reset()
    yield served
    served.heal()


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        with exc:  # holds the connection: close it
            return exc.code, dict(exc.headers), exc.read()


class TestToolOriginContract(OriginContract):
    """Healthy, the tool is an origin like nginx: lazyfs's HTTP origin passes the whole contract."""

    large_size: ClassVar[int] = 9 * 1024 * 1024 + 12345

    @pytest.fixture
    async def origin_subject(self, served: OriginProcess) -> AsyncIterator[OriginSubject]:
        sub = f"contract-{uuid.uuid4().hex[:8]}"
        writer = FileOrigin(served.root / sub)
        http = HTTPOrigin(f"{served.url}/{sub}")
        yield OriginSubject(http, writer.write, lists=False)
        await http.aclose()
        await writer.aclose()


def test_ranges_and_heads(origin: OriginProcess) -> None:
    url = f"{origin.url}/packs/p1"
    status, headers, body = _get(url)
    assert (status, headers["Accept-Ranges"], body) == (200, "bytes", DATA)
    status, headers, body = _get(url, {"Range": "bytes=10-19"})
    assert (status, headers["Content-Range"], body) == (206, f"bytes 10-19/{len(DATA)}", DATA[10:20])
    status, headers, body = _get(url, {"Range": "bytes=16000-"})
    assert (status, body) == (206, DATA[16000:])
    status, headers, body = _get(url, {"Range": "bytes=-5"})
    assert (status, body) == (206, DATA[-5:])
    status, headers, body = _get(url, {"Range": "bytes=99999-"})
    assert (status, headers["Content-Range"]) == (416, f"bytes */{len(DATA)}")
    status, headers, body = _get(url, method="HEAD")
    assert (status, headers["Content-Length"], body) == (200, str(len(DATA)), b"")
    for bad in ("packs/../refs/r", "packs//p1", "missing"):
        assert _get(f"{origin.url}/{bad}")[0] == 404


def test_counters_per_prefix_and_ranges(origin: OriginProcess) -> None:
    _get(f"{origin.url}/packs/p1", {"Range": "bytes=0-99"})
    _get(f"{origin.url}/packs/p1", {"Range": "bytes=100-299"})
    _get(f"{origin.url}/refs/r")
    stats = origin.stats()
    assert stats.requests == 3 and stats.bytes == 300 + 4
    assert stats.requests_for("packs/") == 2 and stats.bytes_for("packs/") == 300
    assert stats.requests_for("refs/") == 1 and stats.requests_for("manifests/") == 0
    assert stats.ranges == [("packs/p1", 0, 100), ("packs/p1", 100, 300)]
    assert stats.times_served("packs/p1", 10, 20) == 1 and stats.times_served("packs/p1", 50, 150) == 0
    origin.reset()
    assert origin.stats().requests == 0


def test_fail_and_fail_next(origin: OriginProcess) -> None:
    origin.set_faults(fail=503)
    assert _get(f"{origin.url}/packs/p1")[0] == 503
    assert _get(f"{origin.url}/refs/r")[0] == 200, "faults apply to packs/ unless told otherwise"
    origin.set_faults(fail=404, prefixes=("refs/",))
    assert _get(f"{origin.url}/refs/r")[0] == 404
    origin.set_faults(fail_next=2)
    assert [_get(f"{origin.url}/packs/p1")[0] for _ in range(3)] == [503, 503, 200]
    assert origin.stats().faulted["fail"] == 4


def test_corrupt_and_corrupt_next(origin: OriginProcess) -> None:
    origin.set_faults(corrupt_next=1)
    bad = _get(f"{origin.url}/packs/p1", {"Range": "bytes=0-999"})[2]
    good = _get(f"{origin.url}/packs/p1", {"Range": "bytes=0-999"})[2]
    assert good == DATA[:1000] and len(bad) == 1000
    assert all(a != b for a, b in zip(bad, good, strict=True)), "every byte is changed"
    origin.set_faults(corrupt=True)
    assert _get(f"{origin.url}/packs/p1")[2] != DATA
    assert _get(f"{origin.url}/packs/p1")[2] != DATA


def test_delay_and_rate(origin: OriginProcess) -> None:
    origin.set_faults(delay=0.3)
    t0 = time.monotonic()
    assert _get(f"{origin.url}/packs/p1")[2] == DATA
    assert 0.3 <= time.monotonic() - t0 < 3
    origin.set_faults(rate=len(DATA) * 4)  # 0.25 s for the body
    t0 = time.monotonic()
    assert _get(f"{origin.url}/packs/p1")[2] == DATA
    assert 0.2 <= time.monotonic() - t0 < 3


def test_hang_until_healed(origin: OriginProcess) -> None:
    origin.set_faults(hang=True)
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(_get(f"{origin.url}/packs/p1")[2]), daemon=True)
    t.start()
    time.sleep(0.5)
    assert not got and origin.stats().inflight == 1
    origin.heal()
    t.join(10)
    assert got == [DATA], "a hung request is answered under the new faults"


def test_bad_faults_are_refused(origin: OriginProcess) -> None:
    bodies: list[object] = [{"fail": 200}, {"nope": 1}, {"delay": -1}, {"rate": 0}, {"hang": "yes"}, []]
    for body in bodies:
        req = urllib.request.Request(f"{origin.url}/_control/faults", data=json.dumps(body).encode(), method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        with info.value:
            assert info.value.code == 400
    assert origin.faults().hang is False


async def test_a_hung_request_ends_when_the_server_stops(tmp_path: Path) -> None:
    (tmp_path / "packs").mkdir()
    (tmp_path / "packs" / "p").write_bytes(b"x" * 100)
    server = start_test_origin(tmp_path)
    http = HTTPOrigin(server.url, OriginConfig(request_timeout=60))
    try:
        server.set_faults(hang=True)
        task = asyncio.create_task(http.read("packs/p", 0, 10))
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        await asyncio.to_thread(server.stop)
        with pytest.raises(UnavailableError):
            await asyncio.wait_for(task, 10)
        assert time.monotonic() - t0 < 5
    finally:
        server.stop()
        await http.aclose()
    with pytest.raises(OriginServerError):
        server.stats()
