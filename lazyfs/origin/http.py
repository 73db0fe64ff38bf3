"""``http://`` and ``https://host/prefix``: a read-only origin served by any static web server.

Mechanism: ``read(key, start, length)`` is one ``GET <prefix>/<key>`` with a
``Range: bytes=start-end`` header, over one lazily created
:class:`aiohttp.ClientSession` (so the origin can be built outside a running
loop; it belongs to the loop that first uses it).  ``exists`` is a ``HEAD``.
Redirects are followed (CDNs, object-store front ends).

Guarantees, because web servers and proxies vary and some are hostile:

* A ``206 Partial Content`` answer must carry a ``Content-Range`` that matches
  the range asked for (same start; the same end, or an earlier one only where
  the object ends there) and a body of exactly that size; anything else is
  :class:`~lazyfs.errors.UnavailableError`, never silently wrong bytes.
* A ``200`` answer to a ranged request (a server that ignores ``Range``) is
  sliced while it streams: bytes before the range are discarded, and the
  connection is dropped once the range is complete, so a 4 MiB read of a
  64 MiB pack does not buffer 64 MiB.
* ``416 Range Not Satisfiable`` means the range starts at or past the end:
  the answer is ``b""``, as the contract wants.
* Bodies are requested and accepted only without content coding
  (``Accept-Encoding: identity``), since a compressed body cannot be ranged.
* 404/410 -> :class:`~lazyfs.errors.NotFoundError`; 401/403 ->
  :class:`~lazyfs.errors.AccessDeniedError`; 408/429/5xx, refused or reset
  connections and timeouts -> :class:`~lazyfs.errors.UnavailableError`.
* ``write`` and ``list`` raise :class:`~lazyfs.errors.ReadOnlyError`: a static
  server can neither store nor enumerate objects.

Credentials in the URL (``https://user:pass@host/``) are sent as HTTP basic
auth and never appear in :attr:`HTTPOrigin.url` or in error messages.
The process environment (proxies, ``.netrc``) is deliberately not consulted.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aiohttp
from yarl import URL

from lazyfs import __version__
from lazyfs.config import OriginConfig
from lazyfs.errors import (
    AccessDeniedError,
    BadURLError,
    NotFoundError,
    OriginError,
    ReadOnlyError,
    UnavailableError,
)
from lazyfs.origin._common import check_prefix, check_range
from lazyfs.origin.base import check_key

__all__ = ["HTTPOrigin"]

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)


class HTTPOrigin:
    """A read-only origin under ``base_url`` (see the module docstring)."""

    def __init__(self, base_url: str, config: OriginConfig = OriginConfig()) -> None:
        try:
            parts = urlsplit(base_url)
        except ValueError as exc:
            raise BadURLError(f"{_redact(base_url)!r} is not a valid URL: {exc}") from exc
        if parts.scheme not in ("http", "https"):
            raise BadURLError(f"{base_url!r} is not an http:// or https:// URL")
        try:
            port = parts.port
        except ValueError as exc:
            raise BadURLError(f"{_redact(base_url)}: bad port number") from exc
        if not parts.hostname:
            raise BadURLError(f"{_redact(base_url)}: an http origin URL needs a host (http://host/prefix)")
        if parts.query or parts.fragment:
            raise BadURLError(f"{_redact(base_url)}: an http origin URL cannot have a query or a fragment")
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        netloc = host if port is None else f"{host}:{port}"
        self._base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        # Basic auth from the URL's user-info; aiohttp drops the header on cross-origin redirects.
        self._authorization = (
            aiohttp.encode_basic_auth(unquote(parts.username), unquote(parts.password or ""))
            if parts.username is not None
            else None
        )
        self._config = config
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def url(self) -> str:
        return self._base

    @property
    def writable(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"HTTPOrigin({self._base!r})"

    # --- the Origin protocol -------------------------------------------------------------------

    async def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        check_range(key, start, length)
        if length == 0:
            # No byte range is empty in HTTP; the contract still wants NotFoundError for a
            # missing key, so ask whether it exists.
            if not await self.exists(key):
                raise NotFoundError(f"{self._object_url(key)}: no such object")
            return b""
        url = self._object_url(key)
        headers: dict[str, str] = {}
        if length is not None:
            headers["Range"] = f"bytes={start}-{start + length - 1}"
        elif start:
            headers["Range"] = f"bytes={start}-"
        session = self._open_session()
        try:
            async with session.get(url, headers=headers) as resp:
                return await self._body(resp, url, start, length, ranged=bool(headers))
        except OriginError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise UnavailableError(f"GET {url}: {self._describe(exc)}") from exc

    async def write(self, key: str, data: bytes | memoryview) -> None:
        check_key(key)
        raise ReadOnlyError(f"{self._base} is read-only: an http(s) origin cannot be written")

    async def exists(self, key: str) -> bool:
        check_key(key)
        url = self._object_url(key)
        session = self._open_session()
        try:
            async with session.head(url, allow_redirects=True) as resp:
                if resp.status in (200, 204):
                    return True
                if resp.status in (404, 410):
                    return False
                raise self._status_error("HEAD", url, resp)
        except OriginError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise UnavailableError(f"HEAD {url}: {self._describe(exc)}") from exc

    async def list(self, prefix: str) -> list[str]:
        check_prefix(prefix)
        raise ReadOnlyError(
            f"{self._base}: a static HTTP origin cannot list its keys; "
            "name the ref explicitly, or list the file:// or s3:// origin it serves"
        )

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # --- internals ------------------------------------------------------------------------------

    def _object_url(self, key: str) -> URL:
        return URL(f"{self._base}/{quote(key, safe='/')}", encoded=True)

    def _open_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise UnavailableError(f"{self._base}: the origin is closed")
        if self._session is None:
            cfg = self._config
            headers = {"Accept-Encoding": "identity", "User-Agent": f"lazyfs/{__version__}"}
            if self._authorization is not None:
                headers["Authorization"] = self._authorization
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=cfg.max_connections),
                # `total` bounds a whole request (a 64 MiB pack on a slow link needs minutes);
                # `sock_connect` makes a dead host fail fast. No `connect` limit: it would also
                # count the wait for a free pooled connection, which is queueing, not failure.
                timeout=aiohttp.ClientTimeout(total=cfg.request_timeout, sock_connect=cfg.connect_timeout),
                headers=headers,
                auto_decompress=False,
                trust_env=False,
            )
        return self._session

    def _describe(self, exc: BaseException) -> str:
        cfg = self._config
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return f"could not connect in time (connect timeout {cfg.connect_timeout:g} s)"
        if isinstance(exc, TimeoutError):
            return f"no complete answer in time (request timeout {cfg.request_timeout:g} s)"
        text = str(exc).strip()
        return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__

    def _status_error(self, method: str, url: URL, resp: aiohttp.ClientResponse) -> OriginError:
        what = f"{method} {url}: HTTP {resp.status} {resp.reason or ''}".rstrip()
        if resp.status in (404, 410):
            return NotFoundError(f"{url}: no such object")
        if resp.status in (401, 403):
            return AccessDeniedError(f"{what} (access denied)")
        if resp.status in (408, 429) or resp.status >= 500:
            return UnavailableError(what)
        return OriginError(f"{what} (unexpected answer)")

    async def _body(
        self, resp: aiohttp.ClientResponse, url: URL, start: int, length: int | None, *, ranged: bool
    ) -> bytes:
        coding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if resp.status in (200, 206) and coding not in ("", "identity"):
            raise UnavailableError(f"GET {url}: the server sent a {coding}-encoded body; ranges need raw bytes")
        if resp.status == 206:
            if not ranged:
                raise UnavailableError(f"GET {url}: 206 Partial Content to a request without a Range")
            size = self._check_content_range(resp, url, start, length)
            # Read no more than announced: a hostile Content-Length must not make us buffer more.
            body, got = await _read_body(resp.content, size)
            if got != size:
                raise UnavailableError(
                    f"GET {url}: 206 body has {'at least ' if got > size else ''}{got} bytes, "
                    f"its Content-Range announced {size}"
                )
            return body
        if resp.status == 200:
            if not ranged:
                return await resp.read()
            return await self._slice(resp, start, length)
        if resp.status == 416 and ranged:
            total = _UNSATISFIED_RANGE.match(resp.headers.get("Content-Range", ""))
            if total is not None and int(total.group(1)) > start:
                raise UnavailableError(f"GET {url}: 416 for offset {start} of an object of {total.group(1)} bytes")
            return b""
        raise self._status_error("GET", url, resp)

    @staticmethod
    def _check_content_range(resp: aiohttp.ClientResponse, url: URL, start: int, length: int | None) -> int:
        """The body size a 206 announces, after checking it answers the range we asked for."""
        header = resp.headers.get("Content-Range", "")
        m = _CONTENT_RANGE.match(header)
        if m is None:
            raise UnavailableError(f"GET {url}: 206 with a missing or multi-part Content-Range {header!r}")
        first, last = int(m.group(1)), int(m.group(2))
        total = None if m.group(3) == "*" else int(m.group(3))
        want_last = None if length is None else start + length - 1
        ok = first == start and first <= last and (total is None or last < total)
        if ok and want_last is not None:
            # Shorter than asked only where the object ends.
            ok = last == want_last or (last < want_last and total is not None and last == total - 1)
        elif ok:
            ok = total is None or last == total - 1
        if not ok:
            asked = f"bytes={start}-{'' if want_last is None else want_last}"
            raise UnavailableError(f"GET {url}: asked for {asked}, the server answered Content-Range {header!r}")
        return last - first + 1

    @staticmethod
    async def _slice(resp: aiohttp.ClientResponse, start: int, length: int | None) -> bytes:
        """Bytes ``[start, start+length)`` of a full-body answer, read as it streams."""
        parts: list[memoryview] = []
        got = 0
        skip = start
        async for chunk in _pieces(resp.content):
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            piece = memoryview(chunk)[skip:]
            skip = 0
            if length is not None:
                piece = piece[: length - got]
            parts.append(piece)
            got += len(piece)
            if length is not None and got >= length:
                # Done: drop the connection rather than download the rest of the object.
                resp.close()
                break
        return b"".join(parts)


async def _pieces(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """A body's bytes as aiohttp received them, one buffer at a time, without joining them."""
    while True:
        piece, chunk_end = await content.readchunk()
        if piece:
            yield piece
        elif not chunk_end:  # (b"", True) marks the end of an HTTP chunk, (b"", False) the body's
            return


async def _read_body(content: aiohttp.StreamReader, limit: int) -> tuple[bytes, int]:
    """A body of at most ``limit`` bytes, and how many bytes it had (``limit + 1`` or more: too long).

    The body is copied once, joined from the buffers aiohttp received; its own readers
    (``readany``, ``readexactly``) join the buffers at hand on each wake-up and then join
    those pieces again.  Stops reading once past ``limit`` (a hostile body can be endless).
    """
    parts: list[bytes] = []
    got = 0
    async for piece in _pieces(content):
        parts.append(piece)
        got += len(piece)
        if got > limit:
            return b"", got
    return (parts[0] if len(parts) == 1 else b"".join(parts)), got


def _redact(url: str) -> str:
    """``url`` without its user-info, for error messages."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@", r"\1", url)
