"""A controllable HTTP origin for tests and benchmarks: static files, Range, counters, faults.

The server (aiohttp, in its own process so a busy test never slows it down and a
hanging request never blocks the test) serves a directory with the layout of a
``file://`` origin (``refs/``, ``manifests/``, ``packs/``) on ``127.0.0.1``; a
lazyfs daemon mounts ``http://127.0.0.1:PORT/`` as its origin.

Serving: ``GET`` and ``HEAD`` of ``/<key>``.  One byte range per request
(``bytes=a-b``, ``bytes=a-``, ``bytes=-n``) is answered ``206`` with a
``Content-Range``; a range starting at or past the end gets ``416`` with
``Content-Range: bytes */SIZE``; a missing key ``404``; anything else (no or a
multi-part ``Range``) the whole object with ``200``.  Keys with ``..``, empty
segments or a leading ``/`` are refused (``404``), so nothing outside the root is
ever served.

Counters (``GET /_control/stats``): requests and body bytes in total and per key
prefix (the first path segment with its slash: ``packs/``, ``manifests/``,
``refs/``), every answered ``packs/`` range as ``[key, start, end)`` (the last
:data:`MAX_RANGES`), the number of requests each fault hit, and the requests in
progress.  ``POST /_control/reset`` zeroes the counters (not the requests in progress).

Faults (``POST /_control/faults`` with a JSON object; it *replaces* the current
set, so ``{}`` heals everything; ``GET`` returns the current set).  They apply to
reads under ``prefixes`` (default ``["packs/"]``); each answer passes through
them in this order:

``hang`` (bool)
    The request waits without an answer until the faults change (then it is
    answered under the new ones), the server stops, or :data:`MAX_HANG` seconds
    pass (then ``503``).  Nothing here waits unboundedly.
``fail`` (HTTP status, e.g. 503) / ``fail_next`` (int)
    Answer with that status (every request, or the next N: ``fail_next`` alone
    uses 503).
``delay`` (seconds)
    Wait that long before answering.
``corrupt`` (bool) / ``corrupt_next`` (int)
    XOR every byte of the body with 0x55 (every answer, or the next N): any
    chunk the body holds fails its digest check, whatever its codec.
``rate`` (bytes per second)
    Send the body at about that rate, in 1/50 s slices.

Python side: :func:`start_test_origin` starts the process and returns a
:class:`OriginProcess` (``url``, :meth:`~OriginProcess.set_faults`,
:meth:`~OriginProcess.heal`, :meth:`~OriginProcess.stats`,
:meth:`~OriginProcess.reset`, :meth:`~OriginProcess.stop`); it is a context
manager, and the server also dies with the process that started it (Linux
``PR_SET_PDEATHSIG``).  Command line::

    python tools/test_origin.py ROOT [--port 0]    # prints "LISTENING http://127.0.0.1:PORT"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiohttp import web

__all__ = [
    "MAX_HANG",
    "MAX_RANGES",
    "Faults",
    "OriginProcess",
    "OriginServerError",
    "OriginStats",
    "PrefixStats",
    "start_test_origin",
]

# A hung request gives up after this long even if nobody heals the origin: longer than any
# read deadline a test uses, short enough that a forgotten fault cannot wedge a run.
MAX_HANG = 120.0
# Ranges remembered for the stats: a whole test run of small chunks fits; a long benchmark
# keeps the most recent ones instead of growing without bound.
MAX_RANGES = 100_000
# Rate limiting sends the body in this many slices per second: smooth enough for a
# bandwidth test, few enough that Python's per-write overhead is noise.
RATE_SLICES_PER_S = 50
# How long a start waits for the server to report its port (a cold 2-core CI machine).
STARTUP_TIMEOUT = 20.0
# Control requests from the test side: the server answers them at once.
CONTROL_TIMEOUT = 10.0
# Corruption XORs every byte with 0x55 (a translate table: fast on megabytes).
_CORRUPT_TABLE = bytes(b ^ 0x55 for b in range(256))
_READY = "LISTENING "


# --- shared types -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Faults:
    """What the origin does wrong (see the module docstring); the default does nothing wrong."""

    hang: bool = False
    fail: int | None = None
    fail_next: int = 0
    delay: float = 0.0
    corrupt: bool = False
    corrupt_next: int = 0
    rate: int | None = None
    prefixes: tuple[str, ...] = ("packs/",)

    @classmethod
    def from_json(cls, obj: object) -> Faults:
        """Validate a control request body; raises ValueError with a readable reason."""
        if not isinstance(obj, dict):
            raise ValueError("faults must be a JSON object")
        unknown = set(obj) - {"hang", "fail", "fail_next", "delay", "corrupt", "corrupt_next", "rate", "prefixes"}
        if unknown:
            raise ValueError(f"unknown fault(s): {sorted(unknown)}")

        def flag(name: str) -> bool:
            v = obj.get(name, False)
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be true or false")
            return v

        def count(name: str) -> int:
            v = obj.get(name, 0)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer")
            return v

        fail = obj.get("fail")
        if fail is not None and (not isinstance(fail, int) or isinstance(fail, bool) or not 400 <= fail <= 599):
            raise ValueError("fail must be an HTTP error status (400-599) or null")
        delay = obj.get("delay", 0.0)
        if not isinstance(delay, int | float) or isinstance(delay, bool) or not 0 <= delay <= MAX_HANG:
            raise ValueError(f"delay must be a number of seconds between 0 and {MAX_HANG:g}")
        rate = obj.get("rate")
        if rate is not None and (not isinstance(rate, int) or isinstance(rate, bool) or rate <= 0):
            raise ValueError("rate must be a positive number of bytes per second or null")
        prefixes = obj.get("prefixes", ["packs/"])
        if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
            raise ValueError("prefixes must be a list of strings")
        return cls(
            hang=flag("hang"),
            fail=fail,
            fail_next=count("fail_next"),
            delay=float(delay),
            corrupt=flag("corrupt"),
            corrupt_next=count("corrupt_next"),
            rate=rate,
            prefixes=tuple(prefixes),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "hang": self.hang,
            "fail": self.fail,
            "fail_next": self.fail_next,
            "delay": self.delay,
            "corrupt": self.corrupt,
            "corrupt_next": self.corrupt_next,
            "rate": self.rate,
            "prefixes": list(self.prefixes),
        }


@dataclass(frozen=True, slots=True)
class PrefixStats:
    requests: int = 0
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class OriginStats:
    """A snapshot of the server's counters (``GET /_control/stats``)."""

    requests: int
    bytes: int
    by_prefix: dict[str, PrefixStats]
    # Answered ranges of pack reads: (key, start, end) with ``end`` exclusive, oldest first.
    ranges: list[tuple[str, int, int]]
    # Requests each fault acted on: hang, fail, delay, corrupt, rate.
    faulted: dict[str, int]
    inflight: int

    def requests_for(self, prefix: str) -> int:
        return self.by_prefix.get(prefix, PrefixStats()).requests

    def bytes_for(self, prefix: str) -> int:
        return self.by_prefix.get(prefix, PrefixStats()).bytes

    def times_served(self, key: str, start: int, end: int) -> int:
        """How many answered ranges covered all of ``[start, end)`` of ``key``."""
        return sum(1 for k, a, b in self.ranges if k == key and a <= start and end <= b)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> OriginStats:
        return cls(
            requests=int(obj["requests"]),
            bytes=int(obj["bytes"]),
            by_prefix={k: PrefixStats(int(v["requests"]), int(v["bytes"])) for k, v in obj["by_prefix"].items()},
            ranges=[(str(k), int(a), int(b)) for k, a, b in obj["ranges"]],
            faulted={str(k): int(v) for k, v in obj["faulted"].items()},
            inflight=int(obj["inflight"]),
        )


# --- the server (runs in its own process) -------------------------------------------------------


def _prefix_of(key: str) -> str:
    head, sep, _ = key.partition("/")
    return head + "/" if sep else ""


def _parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """``(start, end)`` (end exclusive) for one satisfiable range, ``None`` to send it all,
    ``"unsatisfiable"`` for a range starting at or past the end."""
    spec = header.strip()
    if not spec.lower().startswith("bytes=") or "," in spec:
        return None
    first, sep, last = spec[6:].strip().partition("-")
    if not sep:
        return None
    try:
        if not first:  # suffix: the last N bytes
            n = int(last)
            if n <= 0:
                return "unsatisfiable"
            return max(size - n, 0), size
        start = int(first)
        end = max(size, start + 1) if not last else int(last) + 1
    except ValueError:
        return None
    if start < 0 or end <= start:
        return None  # malformed: ignored, as RFC 9110 allows
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size)


def _read_file(path: Path, start: int, length: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, start)


class _Server:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.faults = Faults()
        self._changed = asyncio.Event()  # set (and replaced) whenever the faults change
        self.stopping = asyncio.Event()
        self.inflight = 0  # a gauge: reset() leaves it alone
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.by_prefix: dict[str, list[int]] = {}
        self.ranges: deque[tuple[str, int, int]] = deque(maxlen=MAX_RANGES)
        self.faulted = {"hang": 0, "fail": 0, "delay": 0, "corrupt": 0, "rate": 0}

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()  # wakes hung requests: they look at the new faults

    def stats_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "bytes": self.bytes,
            "by_prefix": {k: {"requests": v[0], "bytes": v[1]} for k, v in self.by_prefix.items()},
            "ranges": [list(r) for r in self.ranges],
            "faulted": dict(self.faulted),
            "inflight": self.inflight,
        }

    def _path(self, key: str) -> Path | None:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts) or "\0" in key:
            return None
        path = self.root.joinpath(*parts)
        return path if path.is_file() else None

    def _count(self, key: str, nbytes: int) -> None:
        self.requests += 1
        self.bytes += nbytes
        entry = self.by_prefix.setdefault(_prefix_of(key), [0, 0])
        entry[0] += 1
        entry[1] += nbytes

    async def _wait_for_change(self, within: float) -> bool:
        """Wait until the faults change (True) or the server stops / ``within`` seconds pass (False)."""
        changed = asyncio.ensure_future(self._changed.wait())
        stopping = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({changed, stopping}, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            stopping.cancel()
        return changed.done() and not changed.cancelled() and not self.stopping.is_set()

    async def serve(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        self.inflight += 1
        try:
            return await self._serve(request, key)
        finally:
            self.inflight -= 1

    async def _serve(self, request: web.Request, key: str) -> web.StreamResponse:
        # Hang first: a hung request re-reads the faults when they change.
        deadline = time.monotonic() + MAX_HANG
        faults = self.faults
        counted_hang = False
        while faults.hang and key.startswith(faults.prefixes):
            if not counted_hang:
                self.faulted["hang"] += 1
                counted_hang = True
            left = deadline - time.monotonic()
            if left <= 0 or not await self._wait_for_change(left):
                self._count(key, 0)
                return web.Response(status=503, text="hung, then gave up\n")
            faults = self.faults
        faulty = key.startswith(faults.prefixes)
        if faulty and (faults.fail is not None or faults.fail_next > 0):
            if faults.fail is None:
                self.set_faults(_replace(faults, fail_next=faults.fail_next - 1))
            self.faulted["fail"] += 1
            self._count(key, 0)
            return web.Response(status=faults.fail or 503, text="injected failure\n")
        if faulty and faults.delay > 0:
            self.faulted["delay"] += 1
            await asyncio.sleep(faults.delay)
            faults = self.faults

        path = self._path(key)
        if path is None:
            self._count(key, 0)
            return web.Response(status=404, text="no such object\n")
        size = path.stat().st_size
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        rng = _parse_range(request.headers.get("Range", ""), size) if "Range" in request.headers else None
        if rng == "unsatisfiable":
            self._count(key, 0)
            return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})
        start, end = rng if isinstance(rng, tuple) else (0, size)
        status = 206 if isinstance(rng, tuple) else 200
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        if request.method == "HEAD":
            self._count(key, 0)
            return web.Response(status=status, headers=headers)

        body = await asyncio.to_thread(_read_file, path, start, end - start)
        if faulty and (faults.corrupt or faults.corrupt_next > 0):
            if not faults.corrupt:
                self.set_faults(_replace(faults, corrupt_next=faults.corrupt_next - 1))
            self.faulted["corrupt"] += 1
            body = body.translate(_CORRUPT_TABLE)
        self._count(key, len(body))
        if key.startswith("packs/"):
            self.ranges.append((key, start, start + len(body)))
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        if faulty and faults.rate:
            self.faulted["rate"] += 1
            step = max(1, faults.rate // RATE_SLICES_PER_S)
            t0 = time.monotonic()
            for pos in range(0, len(body), step):
                await resp.write(body[pos : pos + step])
                ahead = t0 + (pos + step) / faults.rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
        else:
            await resp.write(body)
        await resp.write_eof()
        return resp


def _replace(f: Faults, **changes: Any) -> Faults:
    d = {**f.to_json(), **changes}
    d["prefixes"] = list(d["prefixes"])
    return Faults.from_json(d)


async def _serve_forever(root: Path, port: int) -> None:
    server = _Server(root)

    async def faults(request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                server.set_faults(Faults.from_json(await request.json()))
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(server.faults.to_json())

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(server.stats_json())

    async def reset(request: web.Request) -> web.Response:
        server.reset()
        return web.json_response(server.stats_json())

    app = web.Application()
    app.router.add_route("*", "/_control/faults", faults)
    app.router.add_get("/_control/stats", stats)
    app.router.add_post("/_control/reset", reset)
    app.router.add_get("/{key:.+}", server.serve)  # add_get answers HEAD too
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    # A short shutdown: requests still running when the server stops are cut off.
    site = web.TCPSite(runner, "127.0.0.1", port, shutdown_timeout=1.0, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"{_READY}http://127.0.0.1:{bound}", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stopping.set)
    try:
        await server.stopping.wait()
    finally:
        await runner.cleanup()


# --- the test side --------------------------------------------------------------------------------


class OriginServerError(RuntimeError):
    """The test origin could not be started or did not answer a control request."""


def _die_with_parent() -> None:
    """In the child, before exec: have the kernel send SIGTERM when the starting process dies."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass
class OriginProcess:
    """A running test origin (see the module docstring)."""

    url: str
    root: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    log_path: Path | None = None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def _control(self, method: str, path: str, body: object = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.url}/_control/{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=CONTROL_TIMEOUT) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:  # holds the connection: close it
                detail = exc.read().decode(errors="replace")
            raise OriginServerError(f"{method} /_control/{path}: HTTP {exc.code}: {detail}") from exc
        except OSError as exc:
            raise OriginServerError(f"{method} /_control/{path}: {exc}") from exc

    def set_faults(
        self,
        *,
        hang: bool = False,
        fail: int | None = None,
        fail_next: int = 0,
        delay: float = 0.0,
        corrupt: bool = False,
        corrupt_next: int = 0,
        rate: int | None = None,
        prefixes: tuple[str, ...] = ("packs/",),
    ) -> Faults:
        """Replace the current faults with these (no argument: heal)."""
        f = Faults(hang, fail, fail_next, delay, corrupt, corrupt_next, rate, prefixes)
        return Faults.from_json(self._control("POST", "faults", f.to_json()))

    def heal(self) -> None:
        self.set_faults()

    def faults(self) -> Faults:
        return Faults.from_json(self._control("GET", "faults"))

    def stats(self) -> OriginStats:
        return OriginStats.from_json(self._control("GET", "stats"))

    def reset(self) -> None:
        """Zero the counters (faults stay as they are)."""
        self._control("POST", "reset", {})

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Stop the server (hung requests are cut off); idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def log(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_test_origin(root: Path, *, port: int = 0, log_path: Path | None = None) -> OriginProcess:
    """Start a server for ``root`` on 127.0.0.1 (``port`` 0: a free one) and wait until it listens."""
    if not root.is_dir():
        raise OriginServerError(f"{root}: not a directory")
    argv = [sys.executable, os.path.abspath(__file__), str(root), "--port", str(port)]
    with contextlib.ExitStack() as stack:
        err = stack.enter_context(open(log_path, "ab")) if log_path is not None else subprocess.DEVNULL
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    assert process.stdout is not None
    deadline = time.monotonic() + STARTUP_TIMEOUT
    line = b""
    try:
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise OriginServerError(f"the test origin did not start within {STARTUP_TIMEOUT:g} s")
            ready, _, _ = select.select([process.stdout], [], [], left)
            if ready:
                byte = os.read(process.stdout.fileno(), 1)
                if not byte:
                    raise OriginServerError(f"the test origin exited at start-up (status {process.wait(timeout=5)})")
                line += byte
    except BaseException:
        process.kill()
        process.wait(timeout=10)
        raise
    finally:
        process.stdout.close()
    text = line.decode().strip()
    if not text.startswith(_READY):
        process.kill()
        process.wait(timeout=10)
        raise OriginServerError(f"the test origin said {text!r} instead of its address")
    return OriginProcess(text.removeprefix(_READY), root, process, log_path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="A controllable HTTP origin for tests (see the module docstring).")
    p.add_argument("root", type=Path, help="directory to serve (the layout of a file:// origin)")
    p.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free port)")
    args = p.parse_args(argv)
    if not args.root.is_dir():
        p.error(f"{args.root}: not a directory")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(args.root, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
