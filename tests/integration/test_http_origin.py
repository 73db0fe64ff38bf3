"""The HTTP origin against real nginx and against deliberately misbehaving servers."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import pytest

from lazyfs.config import OriginConfig
from lazyfs.errors import (
    AccessDeniedError,
    NotFoundError,
    OriginError,
    ReadOnlyError,
    UnavailableError,
)
from lazyfs.origin import FileOrigin, HTTPOrigin, open_origin
from tests.integration.conftest import RawHTTPFactory, RawRequest, Stall, http_response
from tests.integration.servers import NginxFactory, free_port

pytestmark = pytest.mark.integration

FAST = OriginConfig(connect_timeout=1.0, request_timeout=0.5)


async def _served(tmp_path: Path, nginx: NginxFactory, extra: str = "") -> tuple[FileOrigin, str]:
    writer = FileOrigin(tmp_path / "www")
    await writer.write("obj", b"0123456789")
    await writer.write("denied/secret", b"s3cret")
    return writer, nginx(tmp_path / "www", extra)


# --- real nginx ------------------------------------------------------------------------------------


async def test_nginx_answers_ranges_with_206(tmp_path: Path, nginx: NginxFactory) -> None:
    _, url = await _served(tmp_path, nginx)
    origin = open_origin(url)
    try:
        assert isinstance(origin, HTTPOrigin)
        assert await origin.read("obj", 2, 3) == b"234"
        assert await origin.read("obj", 8, 100) == b"89"
        assert await origin.read("obj", 10, 5) == b""
        assert await origin.read("obj", 3) == b"3456789"
    finally:
        await origin.aclose()


async def test_missing_object_is_not_found(tmp_path: Path, nginx: NginxFactory) -> None:
    _, url = await _served(tmp_path, nginx)
    origin = HTTPOrigin(url)
    try:
        with pytest.raises(NotFoundError, match=r"/missing: no such object"):
            await origin.read("missing", 0, 10)
        assert await origin.exists("missing") is False
    finally:
        await origin.aclose()


async def test_forbidden_is_access_denied(tmp_path: Path, nginx: NginxFactory) -> None:
    _, url = await _served(tmp_path, nginx, "location /denied/ { deny all; }")
    origin = HTTPOrigin(url)
    try:
        with pytest.raises(AccessDeniedError, match="HTTP 403"):
            await origin.read("denied/secret")
        with pytest.raises(AccessDeniedError):
            await origin.exists("denied/secret")
        assert await origin.read("obj") == b"0123456789"
    finally:
        await origin.aclose()


async def test_server_error_is_unavailable(tmp_path: Path, nginx: NginxFactory) -> None:
    _, url = await _served(tmp_path, nginx, "location = /broken { return 502; }")
    origin = HTTPOrigin(url)
    try:
        with pytest.raises(UnavailableError, match="HTTP 502"):
            await origin.read("broken", 0, 10)
        with pytest.raises(UnavailableError, match="HTTP 502"):
            await origin.exists("broken")
    finally:
        await origin.aclose()


async def test_redirects_are_followed(tmp_path: Path, nginx: NginxFactory) -> None:
    _, url = await _served(tmp_path, nginx, "location = /moved { return 302 /obj; }")
    origin = HTTPOrigin(url)
    try:
        assert await origin.read("moved", 1, 2) == b"12"
        assert await origin.exists("moved")
    finally:
        await origin.aclose()


async def test_full_body_answer_is_sliced_and_cut_short(tmp_path: Path, nginx: NginxFactory) -> None:
    """nginx with ranges off answers 200 + the whole object: we slice it, and stop reading early."""
    writer = FileOrigin(tmp_path / "www")
    data = bytes(range(256)) * (32 * 4096)  # 32 MiB
    await writer.write("big", data)
    url = nginx(tmp_path / "www", "max_ranges 0;")
    origin = HTTPOrigin(url)
    try:
        assert await origin.read("big", 1000, 10) == data[1000:1010]
        assert await origin.read("big", 3 << 20, 5000) == data[3 << 20 :][:5000]
    finally:
        await origin.aclose()
    # nginx logs a request the client cut short only once it notices the close: wait (bounded).
    for _ in range(50):
        log = nginx.servers[-1].access_log()
        if sum("/big" in line for line in log) >= 2:
            break
        await asyncio.sleep(0.1)
    assert [line.split()[2] for line in log if "/big" in line] == ["200", "200"]
    # The connection was dropped once the range was complete: nginx did not send 32 MiB.
    sent = [int(line.split()[3]) for line in log if "/big" in line]
    assert all(n < len(data) for n in sent), sent


async def test_write_and_list_are_read_only(tmp_path: Path, nginx: NginxFactory) -> None:
    _, url = await _served(tmp_path, nginx)
    origin = HTTPOrigin(url)
    try:
        with pytest.raises(ReadOnlyError, match="read-only"):
            await origin.write("obj", b"x")
        with pytest.raises(ReadOnlyError, match="static HTTP origin cannot list"):
            await origin.list("refs/")
        assert origin.writable is False
    finally:
        await origin.aclose()


# --- transport failures -------------------------------------------------------------------------


async def test_connection_refused_is_unavailable_quickly() -> None:
    port = free_port()  # nothing listens there any more
    origin = HTTPOrigin(f"http://127.0.0.1:{port}/x", OriginConfig(connect_timeout=5, request_timeout=30))
    try:
        t0 = time.monotonic()
        with pytest.raises(UnavailableError, match=f"127.0.0.1:{port}"):
            await origin.read("obj", 0, 10)
        with pytest.raises(UnavailableError):
            await origin.exists("obj")
        assert time.monotonic() - t0 < 2.0
    finally:
        await origin.aclose()


async def test_server_that_never_answers_times_out(raw_http: RawHTTPFactory) -> None:
    server = await raw_http(lambda req: None)
    origin = HTTPOrigin(server.url, FAST)
    try:
        t0 = time.monotonic()
        with pytest.raises(UnavailableError, match=r"no complete answer in time \(request timeout 0.5 s\)"):
            await origin.read("obj", 0, 10)
        elapsed = time.monotonic() - t0
        assert 0.4 < elapsed < 2.0, elapsed
        with pytest.raises(UnavailableError):
            await origin.exists("obj")
    finally:
        await origin.aclose()


async def test_server_that_stalls_mid_body_times_out(raw_http: RawHTTPFactory) -> None:
    stall = Stall(http_response(206, BODY[0:10], {"Content-Range": "bytes 0-99/100", "Content-Length": "100"}))
    server = await raw_http(lambda req: stall)
    origin = HTTPOrigin(server.url, FAST)
    try:
        t0 = time.monotonic()
        with pytest.raises(UnavailableError, match="request timeout"):
            await origin.read("obj", 0, 100)
        assert time.monotonic() - t0 < 2.0
    finally:
        await origin.aclose()


async def test_connection_limit_is_respected(raw_http: RawHTTPFactory) -> None:
    server = await raw_http(lambda req: _ranged_answer(req, b"x" * 100), delay=0.02)
    origin = HTTPOrigin(server.url, OriginConfig(max_connections=2))
    try:
        results = await asyncio.gather(*(origin.read(f"k{i}", 0, 10) for i in range(12)))
        assert results == [b"x" * 10] * 12
        assert server.max_active == 2
        assert len(server.requests) == 12
    finally:
        await origin.aclose()


# --- hostile or broken answers ---------------------------------------------------------------------

BODY = bytes(range(100))


def _ranged_answer(req: RawRequest, body: bytes) -> bytes:
    """A correct server: 206 with the asked range (single ``bytes=a-b`` only)."""
    rng = req.headers.get("range")
    if rng is None:
        return http_response(200, body)
    first_text, last_text = rng.removeprefix("bytes=").split("-")
    first, last = int(first_text), min(int(last_text or len(body)), len(body) - 1)
    if first >= len(body):
        return http_response(416, headers={"Content-Range": f"bytes */{len(body)}"})
    return http_response(206, body[first : last + 1], {"Content-Range": f"bytes {first}-{last}/{len(body)}"})


@pytest.mark.parametrize(
    ("name", "answer"),
    [
        ("wrong start", http_response(206, BODY[0:10], {"Content-Range": "bytes 0-9/100"})),
        ("longer than asked", http_response(206, BODY[10:30], {"Content-Range": "bytes 10-29/100"})),
        ("short, not at the end", http_response(206, BODY[10:15], {"Content-Range": "bytes 10-14/100"})),
        ("end past total", http_response(206, BODY[10:20], {"Content-Range": "bytes 10-19/15"})),
        ("no Content-Range", http_response(206, BODY[10:20])),
        ("body longer than Content-Range", http_response(206, BODY[10:30], {"Content-Range": "bytes 10-19/100"})),
        ("garbage Content-Range", http_response(206, BODY[10:20], {"Content-Range": "bytes ten-19/100"})),
        ("body shorter than Content-Range", http_response(206, BODY[10:15], {"Content-Range": "bytes 10-19/100"})),
        (
            "multipart answer",
            http_response(206, b"--sep\r\n...", {"Content-Type": "multipart/byteranges; boundary=sep"}),
        ),
        ("416 although the object is longer", http_response(416, headers={"Content-Range": "bytes */100"})),
        ("gzip-encoded body", http_response(200, b"\x1f\x8b...", {"Content-Encoding": "gzip"})),
        (
            "206 cut short",
            http_response(206, BODY[10:15], {"Content-Range": "bytes 10-19/100", "Content-Length": "10"}),
        ),
        ("200 cut short before the range", http_response(200, BODY[:15], {"Content-Length": "100"})),
    ],
)
async def test_hostile_answers_are_unavailable(raw_http: RawHTTPFactory, name: str, answer: bytes) -> None:
    server = await raw_http(lambda req: answer)
    origin = HTTPOrigin(server.url, FAST)
    try:
        with pytest.raises(UnavailableError):
            await origin.read("obj", 10, 10)
    finally:
        await origin.aclose()
    assert server.requests[0].headers["range"] == "bytes=10-19"
    assert server.requests[0].headers["accept-encoding"] == "identity"


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, AccessDeniedError),
        (403, AccessDeniedError),
        (404, NotFoundError),
        (410, NotFoundError),
        (429, UnavailableError),
        (500, UnavailableError),
        (503, UnavailableError),
        (400, OriginError),
    ],
)
async def test_status_codes_map_to_errors(raw_http: RawHTTPFactory, status: int, error: type[Exception]) -> None:
    server = await raw_http(lambda req: http_response(status))
    origin = HTTPOrigin(server.url, FAST)
    try:
        with pytest.raises(error):
            await origin.read("obj", 0, 10)
    finally:
        await origin.aclose()


async def test_correct_short_answer_at_the_end_is_accepted(raw_http: RawHTTPFactory) -> None:
    server = await raw_http(lambda req: _ranged_answer(req, BODY))
    origin = HTTPOrigin(server.url, FAST)
    try:
        assert await origin.read("obj", 95, 10) == BODY[95:]
        assert await origin.read("obj", 100, 10) == b""
        assert await origin.read("obj", 40) == BODY[40:]
    finally:
        await origin.aclose()


async def test_unknown_total_in_content_range_is_accepted(raw_http: RawHTTPFactory) -> None:
    answer = http_response(206, BODY[10:20], {"Content-Range": "bytes 10-19/*"})
    server = await raw_http(lambda req: answer)
    origin = HTTPOrigin(server.url, FAST)
    try:
        assert await origin.read("obj", 10, 10) == BODY[10:20]
    finally:
        await origin.aclose()


async def test_url_credentials_are_sent_and_never_shown(raw_http: RawHTTPFactory) -> None:
    server = await raw_http(lambda req: http_response(404))
    host = server.url.removeprefix("http://")
    origin = open_origin(f"http://alice:p%40ss@{host}/prefix/")
    try:
        assert origin.url == f"http://{host}/prefix"
        with pytest.raises(NotFoundError) as info:
            await origin.read("obj")
        assert "p@ss" not in str(info.value) and "alice" not in str(info.value)
    finally:
        await origin.aclose()
    expected = base64.b64encode(b"alice:p@ss").decode()
    assert server.requests[0].headers["authorization"] == f"Basic {expected}"
    assert server.requests[0].path == "/prefix/obj"


async def test_keys_are_percent_encoded(raw_http: RawHTTPFactory) -> None:
    server = await raw_http(lambda req: http_response(200, b"ok"))
    origin = HTTPOrigin(server.url + "/p")
    try:
        assert await origin.read("a b/c?d#e%f") == b"ok"
    finally:
        await origin.aclose()
    assert server.requests[0].path == "/p/a%20b/c%3Fd%23e%25f"
