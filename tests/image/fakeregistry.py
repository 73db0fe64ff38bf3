"""A small registry v2 server (aiohttp) for tests of the client: auth flows, redirects, bad answers.

It serves what :meth:`FakeRegistry.push` stored, asks for Basic or Bearer auth when told to,
can send blobs through a redirect to a second "storage" server, and records every
request's path and Authorization header so tests can check what was sent where.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.image.imagebuild import BuiltImage

__all__ = ["FakeRegistry", "Seen"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclass
class Seen:
    server: str
    path: str
    authorization: str | None


@dataclass
class FakeRegistry:
    auth: str = "none"  # "none", "basic", "bearer"
    users: dict[str, str] = field(default_factory=lambda: {"alice": "s3cret"})
    anonymous_tokens: bool = False  # bearer: the token service also serves anonymous pulls
    redirect_blobs: bool = False
    redirect_to: str | None = None  # a fixed Location for blob redirects (overrides the storage server)
    tamper: set[str] = field(default_factory=set)  # digests served with a flipped byte
    wrong_content_digest: bool = False
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    server: TestServer | None = None
    storage: TestServer | None = None

    # -- content ---------------------------------------------------------------------------

    def push(self, repo: str, tag: str, image: BuiltImage) -> None:
        self.blobs.update(image.blobs)
        self.manifests[(repo, tag)] = (image.manifest, OCI_MANIFEST)
        self.manifests[(repo, image.manifest_digest)] = (image.manifest, OCI_MANIFEST)

    def push_raw(self, repo: str, ref: str, data: bytes, media_type: str) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.manifests[(repo, ref)] = (data, media_type)
        self.manifests[(repo, digest)] = (data, media_type)
        return digest

    # -- serving ---------------------------------------------------------------------------

    @property
    def host(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v2/", self._root)
        app.router.add_get(r"/v2/{repo:.+}/manifests/{ref}", self._manifest)
        app.router.add_get(r"/v2/{repo:.+}/blobs/{digest}", self._blob)
        app.router.add_get("/token", self._token)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        storage = web.Application()
        storage.router.add_get("/storage/{digest}", self._storage_blob)
        self.storage = TestServer(storage, host="127.0.0.1")
        await self.storage.start_server()

    async def close(self) -> None:
        for s in (self.server, self.storage):
            if s is not None:
                await s.close()

    def _check(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization")
        self.seen.append(Seen("registry", request.path, auth))
        if self.auth == "none":
            return None
        if self.auth == "basic":
            if auth and self._basic_ok(auth):
                return None
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                status=401, headers={"WWW-Authenticate": 'Basic realm="fake registry"'},
            )
        if auth and auth.startswith("Bearer tok-"):
            return None
        realm = f"http://{self.host}/token"
        scope = f"repository:{request.match_info.get('repo', '')}:pull"
        return web.json_response(
            {"errors": [{"code": "UNAUTHORIZED", "message": "token required"}]}, status=401,
            headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="fake \\"registry\\"",scope="{scope}"'},
        )

    def _basic_ok(self, header: str) -> bool:
        if not header.startswith("Basic "):
            return False
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return self.users.get(user) == password

    async def _root(self, request: web.Request) -> web.Response:
        return self._check(request) or web.json_response({})

    async def _token(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization")
        self.seen.append(Seen("token", request.path_qs, auth))
        if request.query.get("service") != 'fake "registry"' or not request.query.get("scope"):
            return web.json_response({"error": "bad request"}, status=400)
        if auth and self._basic_ok(auth):
            return web.json_response({"token": "tok-user", "expires_in": 300})
        if auth is None and self.anonymous_tokens:
            return web.json_response({"access_token": "tok-anon"})
        return web.json_response({"error": "denied"}, status=401)

    async def _manifest(self, request: web.Request) -> web.Response:
        refused = self._check(request)
        if refused is not None:
            return refused
        item = self.manifests.get((request.match_info["repo"], request.match_info["ref"]))
        if item is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]},
                                     status=404)
        data, media_type = item
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if self.wrong_content_digest:
            digest = "sha256:" + "0" * 64
        return web.Response(body=data, headers={"Content-Type": media_type, "Docker-Content-Digest": digest})

    def _blob_bytes(self, digest: str) -> bytes | None:
        data = self.blobs.get(digest)
        if data is not None and digest in self.tamper:
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 1]) + data[mid + 1 :]
        return data

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        refused = self._check(request)
        if refused is not None:
            return refused
        digest = request.match_info["digest"]
        data = self._blob_bytes(digest)
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown"}]}, status=404)
        if self.redirect_blobs:
            assert self.storage is not None
            location = self.redirect_to or f"http://127.0.0.1:{self.storage.port}/storage/{digest}?sig=x"
            raise web.HTTPTemporaryRedirect(location)
        return web.Response(body=data, content_type="application/octet-stream")

    async def _storage_blob(self, request: web.Request) -> web.Response:
        self.seen.append(Seen("storage", request.path, request.headers.get("Authorization")))
        data = self._blob_bytes(request.match_info["digest"])
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data, content_type="application/octet-stream")


def manifest_list(entries: list[tuple[BuiltImage, str, str]]) -> bytes:
    """A Docker manifest list: (image, architecture, variant) entries, all linux."""
    return json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": img.manifest_digest, "size": len(img.manifest),
             "platform": {"os": "linux", "architecture": arch, **({"variant": variant} if variant else {})}}
            for img, arch, variant in entries
        ],
    }).encode()
