"""``docker://HOST[:PORT]/REPO[:TAG|@DIGEST]``: pull an image over the registry v2 API (aiohttp).

* **Manifests**: ``GET /v2/REPO/manifests/REF`` accepting OCI index/manifest and Docker
  manifest list/v2; an index is narrowed to one platform (linux and the host's architecture
  unless told otherwise), then that manifest is fetched by digest.  Manifests and configs
  are size-limited and verified against their digest (a manifest fetched by tag against
  ``Docker-Content-Digest`` when the registry sends one).
* **Blobs** stream from ``GET /v2/REPO/blobs/DIGEST`` straight into the flattener (a worker
  thread reads the response through :class:`_LoopReader`); the flattener verifies size and
  digest as the bytes pass.  Redirects (registries send blobs from object storage) are
  followed by hand so the ``Authorization`` header never leaves the registry's host.
* **Auth**: anonymous first; a ``401`` with ``WWW-Authenticate: Basic`` is answered with
  the credentials, ``Bearer realm=...,service=...,scope=...`` with a token from the realm
  (asked with the credentials when there are some).  Credentials come from
  ``config.json`` in the docker config directory: ``auths[HOST].auth`` (base64
  ``user:password``) or ``username``/``password``.  Credential helpers are not run.
* **Transport**: https, certificate checked; plain http only for a loopback registry
  (127.0.0.0/8, ::1, localhost) or with ``insecure_registry``.  Credentials are never sent
  over plain http to anything else, and an https registry may not redirect to http.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import logging
import re
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from lazyfs.errors import AccessDeniedError, IntegrityError, NotFoundError, SeedError, UnavailableError, UsageError
from lazyfs.image.layers import READ_SIZE, show
from lazyfs.image.oci import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    config_descriptor,
    image_from_manifest,
    index_manifests,
    manifest_kind,
    parse_json_object,
    select_platform,
    sha256_digest,
    verify_blob,
)
from lazyfs.image.reference import DOCKER_HUB, RegistryRef, is_loopback_host
from lazyfs.image.source import ImageOptions, LayerRef, Readable, ResolvedImage

__all__ = ["Credentials", "RegistrySource", "load_credentials", "parse_www_authenticate"]

log = logging.getLogger(__name__)

_ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST))
_MAX_REDIRECTS = 5
# A token answer or an error body is small; anything larger is not what we asked for.
_MAX_SMALL_BODY = 1 << 20
_DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never print a password
        return f"Credentials(username={self.username!r}, password=***)"

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def _auth_key(key: str) -> str:
    """An ``auths`` key (``host:port``, ``https://host:port/v1/``) -> ``host:port``."""
    if "://" in key:
        key = urllib.parse.urlsplit(key).netloc
    return key.split("/", 1)[0].lower()


def load_credentials(config_dir: str | None, host: str) -> Credentials | None:
    """The credentials ``config.json`` in ``config_dir`` holds for registry ``host`` (or None)."""
    if config_dir is None:
        return None
    path = Path(config_dir) / "config.json"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        cfg = json.loads(data)
    except ValueError as exc:
        raise UsageError(f"{path} is not valid JSON") from exc
    auths = cfg.get("auths") if isinstance(cfg, dict) else None
    if not isinstance(auths, dict):
        return None
    wanted = {host.lower()} | (set(_DOCKER_HUB_KEYS) if host == DOCKER_HUB else set())
    for key, entry in auths.items():
        if not isinstance(key, str) or not isinstance(entry, dict):
            continue
        if _auth_key(key) not in wanted and key not in wanted:
            continue
        auth = entry.get("auth")
        if isinstance(auth, str) and auth:
            try:
                user, sep, password = base64.b64decode(auth, validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError) as exc:
                raise UsageError(f"{path}: auths[{key!r}].auth is not base64 of user:password") from exc
            if not sep:
                raise UsageError(f"{path}: auths[{key!r}].auth is not base64 of user:password")
            return Credentials(user, password)
        name, secret = entry.get("username"), entry.get("password")
        if isinstance(name, str) and isinstance(secret, str) and name:
            return Credentials(name, secret)
    return None


_AUTH_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*(?:,|$)')


def parse_www_authenticate(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="..."`` -> ``("bearer", {"realm": ..., ...})``."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        m = _AUTH_PARAM.match(rest, pos)
        if m is None:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return scheme.lower(), params


def _registry_message(body: bytes) -> str:
    try:
        errors = json.loads(body).get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            return f": {errors[0].get('code', '')} {str(errors[0].get('message', ''))[:200]}".rstrip()
    except (ValueError, AttributeError):
        pass
    return ""


class _LoopReader:
    """Blocking ``read(n)`` for a worker thread, over an aiohttp response read on the event loop."""

    def __init__(self, resp: aiohttp.ClientResponse, loop: asyncio.AbstractEventLoop, timeout: float, what: str):
        self._resp = resp
        self._loop = loop
        self._timeout = timeout
        self._what = what

    def read(self, size: int = -1, /) -> bytes:
        n = size if size > 0 else READ_SIZE
        fut = asyncio.run_coroutine_threadsafe(self._resp.content.read(n), self._loop)
        try:
            return fut.result(self._timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise UnavailableError(f"{self._what}: no data for {self._timeout:g} s") from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UnavailableError(f"{self._what}: {exc.__class__.__name__}: {exc}") from exc


class RegistrySource:
    def __init__(self, ref: RegistryRef, options: ImageOptions) -> None:
        self.ref = ref
        self.options = options
        self.description = str(ref)
        loopback = is_loopback_host(ref.hostname)
        self.plain_http_ok = loopback or options.insecure_registry
        self.scheme = "http" if self.plain_http_ok else "https"
        self.base = f"{self.scheme}://{ref.endpoint}"
        self._credentials = load_credentials(options.docker_config_dir, ref.host)
        self._authorization: str | None = None
        self._session: aiohttp.ClientSession | None = None

    def _http_ok(self, host: str | None) -> bool:
        """Plain http is fine to a loopback host, or anywhere when the user said --insecure-registry."""
        return self.options.insecure_registry or is_loopback_host(host or "")

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(
                total=None, connect=self.options.connect_timeout, sock_read=self.options.read_timeout
            )
            self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- HTTP with auth and redirects ----------------------------------------------------------

    async def _get(self, url: str, headers: Mapping[str, str], what: str) -> aiohttp.ClientResponse:
        """GET ``url`` following redirects; Authorization is sent to the registry's host only."""
        session = self._open_session()
        registry = urllib.parse.urlsplit(self.base).netloc
        for _ in range(_MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme == "http" and not self._http_ok(parts.hostname):
                raise SeedError(f"{what}: refusing plain http to {parts.netloc} (use https, or --insecure-registry)")
            if parts.scheme not in ("http", "https"):
                raise SeedError(f"{what}: the registry redirected to a {parts.scheme!r} URL")
            hdrs = dict(headers)
            if parts.netloc == registry and self._authorization:
                hdrs["Authorization"] = self._authorization
            try:
                resp = await session.get(url, headers=hdrs, allow_redirects=False)
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise UnavailableError(f"{what}: cannot reach {parts.netloc}: {exc.__class__.__name__}: {exc}") from exc
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.headers.get("Location")
                resp.release()
                if not location:
                    raise SeedError(f"{what}: redirect without a Location")
                url = urllib.parse.urljoin(url, location)
                continue
            return resp
        raise SeedError(f"{what}: more than {_MAX_REDIRECTS} redirects")

    async def _request(self, path: str, headers: Mapping[str, str], what: str) -> aiohttp.ClientResponse:
        """GET a registry path; authenticate on a 401 and try once more; map errors to lazyfs errors."""
        url = self.base + path
        resp = await self._get(url, headers, what)
        if resp.status == 401:
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.release()
            await self._authenticate(challenge, what)
            resp = await self._get(url, headers, what)
        if resp.status == 200:
            return resp
        body = await self._small_body(resp, what, soft=True)
        detail = _registry_message(body)
        if resp.status == 401:
            raise AccessDeniedError(f"{what}: the registry refused the credentials (401){detail}")
        if resp.status == 403:
            raise AccessDeniedError(f"{what}: access denied (403){detail}")
        if resp.status == 404:
            raise NotFoundError(f"{what}: not found (404){detail}")
        if resp.status == 429 or resp.status >= 500:
            raise UnavailableError(f"{what}: the registry answered {resp.status}{detail}")
        raise SeedError(f"{what}: the registry answered {resp.status}{detail}")

    async def _authenticate(self, challenge: str, what: str) -> None:
        scheme, params = parse_www_authenticate(challenge)
        creds = self._credentials
        if scheme == "basic":
            if creds is None:
                raise AccessDeniedError(
                    f"{what}: the registry requires credentials and the docker config has none for "
                    f"{self.ref.host} (add an 'auths' entry to config.json; credential helpers are not run)"
                )
            self._authorization = creds.basic()
            return
        if scheme != "bearer" or "realm" not in params:
            raise AccessDeniedError(f"{what}: the registry asks for unsupported authentication {show(challenge[:80])}")
        realm = urllib.parse.urlsplit(params["realm"])
        if realm.scheme not in ("http", "https") or not realm.netloc:
            raise SeedError(f"{what}: bad token realm {show(params['realm'])}")
        if realm.scheme == "http" and not self._http_ok(realm.hostname):
            raise SeedError(f"{what}: refusing to ask a token over plain http from {realm.netloc}")
        query = [("scope", params.get("scope") or f"repository:{self.ref.repository}:pull")]
        if "service" in params:
            query.insert(0, ("service", params["service"]))
        sep = "&" if realm.query else "?"
        url = params["realm"] + sep + urllib.parse.urlencode(query)
        headers = {"Authorization": creds.basic()} if creds is not None else {}
        session = self._open_session()
        try:
            async with session.get(url, headers=headers, allow_redirects=False) as resp:
                body = await self._small_body(resp, f"{what}: token", soft=resp.status != 200)
                if resp.status in (401, 403):
                    raise AccessDeniedError(f"{what}: the token service refused the credentials ({resp.status})")
                if resp.status != 200:
                    raise UnavailableError(f"{what}: the token service answered {resp.status}")
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UnavailableError(f"{what}: cannot reach the token service {realm.netloc}: {exc}") from exc
        answer = parse_json_object(body, f"{what}: token answer")
        token = answer.get("token") or answer.get("access_token")
        if not isinstance(token, str) or not token:
            raise SeedError(f"{what}: the token service gave no token")
        self._authorization = f"Bearer {token}"

    @staticmethod
    async def _small_body(resp: aiohttp.ClientResponse, what: str, limit: int = _MAX_SMALL_BODY, *,
                          soft: bool = False) -> bytes:
        """At most ``limit`` bytes of a body; over it is an error (or, ``soft``, cut)."""
        try:
            length = resp.content_length
            if length is not None and length > limit and not soft:
                raise SeedError(f"{what}: {length} bytes, over the {limit} byte limit")
            data = bytearray()
            while len(data) <= limit:
                piece = await resp.content.read(min(READ_SIZE, limit + 1 - len(data)))
                if not piece:
                    break
                data += piece
            if len(data) > limit and not soft:
                raise SeedError(f"{what}: over the {limit} byte limit")
            return bytes(data[:limit])
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UnavailableError(f"{what}: {exc.__class__.__name__}: {exc}") from exc
        finally:
            resp.release()

    # -- the image -------------------------------------------------------------------------------

    async def _manifest(self, reference: str, limit: int) -> tuple[bytes, str, str]:
        """``(bytes, media type, digest)`` of a manifest or index, verified."""
        what = f"{self.description}: manifest {reference[:19]}"
        resp = await self._request(f"/v2/{self.ref.repository}/manifests/{reference}", {"Accept": _ACCEPT}, what)
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        sent = _header(resp.headers, "Docker-Content-Digest")
        data = await self._small_body(resp, what, limit)
        if reference.startswith(("sha256:", "sha512:")):
            verify_blob(data, reference, what)
            digest = reference
        else:
            digest = sha256_digest(data)
            if sent and sent.startswith("sha256:") and sent != digest:
                raise IntegrityError(f"{what}: content is {digest[:19]}..., the registry says {sent[:19]}...")
        return data, media_type, digest

    async def resolve(self) -> ResolvedImage:
        limits = self.options.limits
        what = self.description
        data, media_type, digest = await self._manifest(self.ref.reference, limits.max_manifest_bytes)
        for _ in range(4):
            obj = parse_json_object(data, f"{what}: manifest")
            if manifest_kind(obj, media_type, f"{what}: manifest") == "manifest":
                break
            desc = select_platform(index_manifests(obj, f"{what}: index"), self.options.platform, what)
            if desc.size > limits.max_manifest_bytes:
                raise SeedError(f"{what}: manifest of {desc.size} bytes, over the limit")
            data, media_type, digest = await self._manifest(desc.digest, limits.max_manifest_bytes)
            media_type = media_type or desc.media_type
        else:
            raise SeedError(f"{what}: indexes nested too deep")
        cdesc = config_descriptor(data, f"{what}: manifest")
        config = await self._blob_small(cdesc, limits.max_config_bytes, f"{what}: config")
        return image_from_manifest(data, digest, media_type, config, self.options, what)

    async def _blob_small(self, desc: Descriptor, limit: int, what: str) -> bytes:
        if desc.size > limit:
            raise SeedError(f"{what}: {desc.size} bytes, over the {limit} byte limit")
        resp = await self._request(f"/v2/{self.ref.repository}/blobs/{desc.digest}", {}, what)
        data = await self._small_body(resp, what, limit)
        if len(data) != desc.size:
            raise IntegrityError(f"{what}: {len(data)} bytes, its descriptor says {desc.size}")
        verify_blob(data, desc.digest, what)
        return data

    @asynccontextmanager
    async def open_layer(self, layer: LayerRef) -> AsyncIterator[Readable]:
        what = f"{self.description}: {layer.label}"
        resp = await self._request(f"/v2/{self.ref.repository}/blobs/{layer.locator}", {}, what)
        try:
            yield _LoopReader(resp, asyncio.get_running_loop(), self.options.read_timeout + 5, what)
        finally:
            if resp.content.at_eof():
                resp.release()  # read to the end: the connection can be reused
            else:
                resp.close()


def _header(headers: CIMultiDictProxy[str], name: str) -> str:
    v: Any = headers.get(name)
    return v.strip() if isinstance(v, str) else ""
