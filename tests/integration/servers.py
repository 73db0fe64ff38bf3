"""Real servers for tests: nginx (static files with Range support) and moto (the S3 API).

A pytest plugin (``tests/conftest.py`` loads it for every test directory) plus plain
helpers that benchmarks and tools can call without pytest:

* ``nginx`` fixture — a factory ``nginx(root, extra_config="") -> base URL`` that
  starts one nginx per call serving ``root`` on ``127.0.0.1:<free port>``; every
  server started through it is stopped when the test ends.  ``extra_config`` is
  pasted into the ``server { }`` block (``location /denied/ { deny all; }``,
  ``max_ranges 0;`` ...); ``nginx.servers[-1].access_log()`` shows what was asked.
  :func:`start_nginx` is the same without pytest.
* ``moto_s3`` fixture (session) — one moto S3 server (:class:`MotoServer`) with
  ready-made credentials and config; ``s3_bucket`` (function) creates a fresh,
  empty bucket on it and returns its name; ``moto_s3.origin(bucket, prefix)``
  opens an :class:`~lazyfs.origin.s3.S3Origin` on it.

Servers are processes in their own session: they never outlive the test run
(stopped at fixture teardown, killed if they ignore SIGTERM, and sent SIGTERM by the
kernel if the test process itself dies), and a missing binary
fails the test with a message saying what to install; it never skips.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lazyfs.config import OriginConfig
from lazyfs.origin.s3 import S3Credentials, S3Origin

__all__ = [
    "MotoServer",
    "NginxFactory",
    "NginxServer",
    "ServerError",
    "free_port",
    "start_moto",
    "start_nginx",
]

NGINX_BINARY = "/usr/sbin/nginx"
# Generous: a cold start on a loaded 2-core CI machine; a healthy server answers in < 1 s.
STARTUP_TIMEOUT = 20.0
MOTO_REGION = "us-east-1"


class ServerError(RuntimeError):
    """A test server could not be started."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the server binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_answers(
    port: int, path: str, process: subprocess.Popen[bytes], what: str, log: Callable[[], str]
) -> None:
    """Poll ``GET path`` until the server answers anything; fail early if it exits."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if process.poll() is not None:
            raise ServerError(f"{what} exited with status {process.returncode} at start-up:\n{log()}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", path)
            conn.getresponse().read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise ServerError(f"{what} did not answer within {STARTUP_TIMEOUT:g} s:\n{log()}") from None
            time.sleep(0.02)
        finally:
            conn.close()


def _die_with_parent() -> None:
    """In the child, before exec: have the kernel send SIGTERM if the test process dies.

    Servers run in their own session (a Ctrl-C in the terminal goes to pytest, which
    stops them in order); this covers the case where pytest itself is killed.
    """
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no log)"


# --- nginx ------------------------------------------------------------------------------------------


@dataclass
class NginxServer:
    url: str
    root: Path
    workdir: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    def stop(self) -> None:
        _stop(self.process)

    def error_log(self) -> str:
        return _tail(self.workdir / "error.log")

    def access_log(self) -> list[str]:
        """One line per request served (method, URI, status, bytes, Range header)."""
        path = self.workdir / "access.log"
        return path.read_text().splitlines() if path.exists() else []


def _nginx_conf(root: Path, workdir: Path, port: int, extra_config: str) -> str:
    # Run as root (CI), workers would switch to "nobody" and could not read pytest's 0700
    # temporary directories; keep them as root there. Elsewhere the directive is ignored.
    user = "user root;" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {workdir / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
daemon off;
{user}
# One worker: tests need correctness, and this machine has 2 cores for everything.
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 512; }}
http {{
    default_type application/octet-stream;
    log_format ranges '$request_method $uri $status $body_bytes_sent "$http_range"';
    access_log {workdir / "access.log"} ranges;
{temp}
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        # A static origin: files only. A directory is "no such object" (404), not a 301 to
        # "dir/" and a 403, which is what nginx would answer by default.
        location / {{ try_files $uri =404; }}
        {extra_config}
    }}
}}
"""


def start_nginx(root: Path, workdir: Path, *, extra_config: str = "") -> NginxServer:
    """Start nginx serving ``root`` (state and logs in ``workdir``); returns once it answers."""
    binary = shutil.which("nginx") or NGINX_BINARY
    if not os.access(binary, os.X_OK):
        raise ServerError(f"nginx is not installed ({NGINX_BINARY} missing): apt-get install nginx-light")
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):  # a free port can be taken between free_port() and bind()
        port = free_port()
        conf = workdir / "nginx.conf"
        conf.write_text(_nginx_conf(root.resolve(), workdir.resolve(), port, extra_config))
        with open(workdir / "stderr.log", "wb") as stderr:
            process = subprocess.Popen(
                [binary, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

        def log() -> str:
            return _tail(workdir / "error.log") + _tail(workdir / "stderr.log")

        try:
            _wait_until_answers(port, "/", process, "nginx", log)
        except ServerError:
            _stop(process)
            if attempt < 2 and "Address already in use" in log():
                continue
            raise
        return NginxServer(f"http://127.0.0.1:{port}", root, workdir, process)
    raise AssertionError("unreachable")


class NginxFactory:
    """Starts nginx servers on demand: ``url = nginx(root, extra_config="")``.

    ``servers`` lists those started (for their logs); :meth:`stop_all` stops them.
    """

    def __init__(self, workdirs: Callable[[], Path]) -> None:
        self._workdirs = workdirs
        self.servers: list[NginxServer] = []

    def __call__(self, root: Path, extra_config: str = "") -> str:
        try:
            server = start_nginx(root, self._workdirs(), extra_config=extra_config)
        except ServerError as exc:
            pytest.fail(str(exc), pytrace=False)
        self.servers.append(server)
        return server.url

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxFactory]:
    """``nginx(root: Path, extra_config: str = "") -> "http://127.0.0.1:PORT"`` (see the module doc)."""
    factory = NginxFactory(lambda: tmp_path_factory.mktemp("nginx"))
    try:
        yield factory
    finally:
        factory.stop_all()


# --- moto -------------------------------------------------------------------------------------------


@dataclass
class MotoServer:
    endpoint: str
    workdir: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    # moto accepts any credentials unless started with enforce_auth; these are signed anyway.
    credentials: S3Credentials = field(default_factory=lambda: S3Credentials("testing-key", "testing-secret"))
    region: str = MOTO_REGION

    def config(self, *, request_timeout: float = 30.0, connect_timeout: float = 2.0) -> OriginConfig:
        """An :class:`OriginConfig` pointing at this server."""
        return OriginConfig(
            s3_endpoint=self.endpoint,
            s3_region=self.region,
            request_timeout=request_timeout,
            connect_timeout=connect_timeout,
        )

    def origin(
        self,
        bucket: str,
        prefix: str = "",
        *,
        config: OriginConfig | None = None,
        credentials: S3Credentials | None = None,
    ) -> S3Origin:
        """An S3 origin on this server (with this server's credentials unless others are given)."""
        return S3Origin(bucket, prefix, config or self.config(), credentials=credentials or self.credentials)

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default) and return its name."""
        name = name or f"test-{uuid.uuid4().hex[:16]}"
        req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(req, timeout=10) as resp:  # unsigned: fine before auth is on
            resp.read()
        return name

    def stop(self) -> None:
        _stop(self.process)

    def log(self) -> str:
        return _tail(self.workdir / "moto.log")


def start_moto(workdir: Path, *, env: dict[str, str] | None = None) -> MotoServer:
    """Start ``python -m moto.server`` on 127.0.0.1 (a separate process: no shared GIL)."""
    try:
        import moto.server  # noqa: F401  (only to fail early and clearly)
    except ImportError as exc:
        raise ServerError(f"moto is not installed: pip install 'moto[server]' ({exc})") from exc
    workdir.mkdir(parents=True, exist_ok=True)
    # The server does not need (and must not be confused by) the caller's AWS settings.
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    server_env.update(env or {})
    for attempt in range(3):
        port = free_port()
        with open(workdir / "moto.log", "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=server_env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        try:
            _wait_until_answers(port, "/moto-api/", process, "moto", lambda: _tail(workdir / "moto.log"))
        except ServerError:
            _stop(process)
            if attempt < 2 and "Address already in use" in _tail(workdir / "moto.log"):
                continue
            raise
        return MotoServer(f"http://127.0.0.1:{port}", workdir, process)
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One moto S3 server for the whole run; use ``s3_bucket`` for an isolated bucket."""
    try:
        server = start_moto(tmp_path_factory.mktemp("moto"))
    except ServerError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_s3: MotoServer) -> str:
    """A new, empty bucket on ``moto_s3``."""
    return moto_s3.create_bucket()
