"""Integration fixtures: misbehaving servers and an S3 server that checks credentials.

(``nginx``, ``moto_s3`` and ``s3_bucket`` come from :mod:`tests.integration.servers`,
loaded for every test directory by ``tests/conftest.py``.)

* ``raw_http`` — ``await raw_http(respond) -> RawHTTPServer``: a loopback TCP server
  in the test's event loop that answers each request with whatever bytes
  ``respond(request)`` returns (or never answers when it returns ``None``): hostile
  Content-Range headers, 5xx, servers that accept and hang.
* ``moto_s3_auth`` (session) — a second moto server that enforces IAM
  authentication, with one user allowed ``s3:*`` (``.credentials``), one user with
  no permission (``.denied_credentials``) and a bucket (``.bucket``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import pytest

from lazyfs.origin.s3 import S3Credentials
from tests.integration.servers import MotoServer, ServerError, start_moto

# --- raw_http -----------------------------------------------------------------------------------------


@dataclass
class RawRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names


@dataclass(frozen=True)
class Stall:
    """Send ``prefix`` (say, headers and part of a body), then never say more."""

    prefix: bytes = b""


# What to answer: the raw response bytes, a Stall, or None (read the request, never answer).
Responder = Callable[[RawRequest], bytes | Stall | None]


def http_response(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 response that closes the connection; ``Content-Length`` is added
    unless ``headers`` set it (to lie about the body's size)."""
    all_headers = {"Content-Length": str(len(body)), "Connection": "close"}
    all_headers.update(headers or {})
    head = f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in all_headers.items())
    return head.encode() + b"\r\n" + body


@dataclass
class RawHTTPServer:
    url: str
    requests: list[RawRequest] = field(default_factory=list)
    active: int = 0
    max_active: int = 0


class RawHTTPFactory(Protocol):
    def __call__(self, respond: Responder, *, delay: float = 0.0) -> Awaitable[RawHTTPServer]: ...


@pytest.fixture
async def raw_http() -> AsyncIterator[RawHTTPFactory]:
    """``await raw_http(respond, delay=0.0)``: each request waits ``delay`` s, then gets ``respond(req)``."""
    servers: list[asyncio.Server] = []
    handlers: set[asyncio.Task[None]] = set()

    async def start(respond: Responder, *, delay: float = 0.0) -> RawHTTPServer:
        state = RawHTTPServer(url="")

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            state.active += 1
            state.max_active = max(state.max_active, state.active)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                if int(headers.get("content-length", "0")):
                    await reader.readexactly(int(headers["content-length"]))
                request = RawRequest(method, path, headers)
                state.requests.append(request)
                if delay:
                    await asyncio.sleep(delay)
                answer = respond(request)
                if answer is None or isinstance(answer, Stall):
                    if answer is not None:
                        writer.write(answer.prefix)
                    await asyncio.Event().wait()  # never say more (cancelled at teardown)
                    return
                writer.write(answer)
                await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass
            finally:
                state.active -= 1
                handlers.discard(task)
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        state.url = f"http://127.0.0.1:{port}"
        return state

    yield start
    for server in servers:
        server.close()
    for task in list(handlers):
        task.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)
    for server in servers:
        await server.wait_closed()


# --- moto with authentication ---------------------------------------------------------------------


@dataclass
class AuthMotoServer:
    server: MotoServer
    bucket: str
    credentials: S3Credentials
    denied_credentials: S3Credentials


@pytest.fixture(scope="session")
def moto_s3_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthMotoServer]:
    """A moto server that checks signatures and IAM policies (see the module docstring)."""
    import boto3

    try:
        server = start_moto(tmp_path_factory.mktemp("moto-auth"))
    except ServerError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        bucket = server.create_bucket()
        # Set up IAM while moto still accepts anything, then turn authentication on.
        iam = boto3.client(
            "iam",
            endpoint_url=server.endpoint,
            region_name=server.region,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        allow_all = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.create_user(UserName="lazyfs-writer")
        iam.put_user_policy(UserName="lazyfs-writer", PolicyName="s3", PolicyDocument=json.dumps(allow_all))
        iam.create_user(UserName="lazyfs-nobody")
        keys = [iam.create_access_key(UserName=u)["AccessKey"] for u in ("lazyfs-writer", "lazyfs-nobody")]
        req = urllib.request.Request(
            f"{server.endpoint}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
        creds = [S3Credentials(k["AccessKeyId"], k["SecretAccessKey"]) for k in keys]
        yield AuthMotoServer(server, bucket, creds[0], creds[1])
    finally:
        server.stop()
