"""The registry client against a fake registry: anonymous, Basic and Bearer auth with credentials from a
docker config directory, redirects that must not carry credentials, platform selection, verification,
limits and plain-http policy; plus the parsers (references, ``config.json``, ``WWW-Authenticate``).
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lazyfs.errors import (
    AccessDeniedError,
    IntegrityError,
    LazyfsError,
    NotFoundError,
    SeedError,
    UnavailableError,
    UsageError,
)
from lazyfs.image import ImageLimits, ImageOptions, Platform
from lazyfs.image.reference import (
    DockerArchiveRef,
    OciLayoutRef,
    RegistryRef,
    is_loopback_host,
    parse_image_ref,
)
from lazyfs.image.registry import Credentials, RegistrySource, load_credentials, parse_www_authenticate
from lazyfs.testing import MemoryOrigin
from tests.helpers import read_file
from tests.image.conftest import assert_nothing_published, seed
from tests.image.fakeregistry import FakeRegistry, manifest_list
from tests.image.imagebuild import BuiltImage, Layer, build_image, write_layout


def _image() -> BuiltImage:
    return build_image([
        Layer("gzip").dir("usr/bin").file("usr/bin/tool", b"#!/bin/sh\necho tool\n" * 1000, mode=0o755),
        Layer("zstd").file("etc/motd", b"hello\n").hardlink("usr/bin/tool2", "usr/bin/tool"),
    ])


@pytest.fixture
async def registry() -> AsyncIterator[FakeRegistry]:
    reg = FakeRegistry()
    await reg.start()
    reg.push("team/app", "v1", _image())
    yield reg
    await reg.close()


def docker_config(tmp_path: Path, auths: dict[str, object]) -> str:
    d = tmp_path / "docker-config"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"auths": auths}))
    return str(d)


def _auth(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_anonymous_pull_matches_the_layout(
    tmp_path: Path, registry: FakeRegistry, options: ImageOptions
) -> None:
    origin = MemoryOrigin()
    out = await seed(f"docker://{registry.host}/team/app:v1", origin, options)
    layout = write_layout(tmp_path / "layout", _image())
    local = await seed(f"oci:{layout}", MemoryOrigin(), options)
    assert out.result.digest == local.result.digest
    assert out.image.manifest_digest == _image().manifest_digest
    assert await read_file(origin, out.result.manifest, b"usr/bin/tool2") == b"#!/bin/sh\necho tool\n" * 1000
    assert out.layer_bytes == sum(len(registry.blobs[d]) for d in _image().layer_digests)
    # by digest too
    by_digest = await seed(f"docker://{registry.host}/team/app@{_image().manifest_digest}", MemoryOrigin(), options)
    assert by_digest.result.digest == out.result.digest


async def test_basic_auth_with_credentials_from_the_docker_config(
    tmp_path: Path, registry: FakeRegistry, spool_dir: Path
) -> None:
    registry.auth = "basic"
    src = f"docker://{registry.host}/team/app:v1"
    origin = MemoryOrigin()
    with pytest.raises(AccessDeniedError, match=r"requires credentials .* none for 127\.0\.0\.1:\d+"):
        await seed(src, origin, ImageOptions(spool_dir=str(spool_dir), docker_config_dir=str(tmp_path / "none")))
    wrong = docker_config(tmp_path, {registry.host: _auth("alice", "wrong")})
    with pytest.raises(AccessDeniedError, match=r"refused the credentials \(401\): UNAUTHORIZED"):
        await seed(src, origin, ImageOptions(spool_dir=str(spool_dir), docker_config_dir=wrong))
    await assert_nothing_published(origin)
    good = docker_config(tmp_path, {f"http://{registry.host}/v1/": _auth("alice", "s3cret")})
    out = await seed(src, origin, ImageOptions(spool_dir=str(spool_dir), docker_config_dir=good))
    assert out.result.files == 2
    assert all(s.authorization == Credentials("alice", "s3cret").basic() for s in registry.seen[-4:])


async def test_bearer_token_flow(tmp_path: Path, registry: FakeRegistry, spool_dir: Path) -> None:
    registry.auth = "bearer"
    src = f"docker://{registry.host}/team/app:v1"
    with pytest.raises(AccessDeniedError, match="token service refused"):
        await seed(src, MemoryOrigin(), ImageOptions(spool_dir=str(spool_dir)))
    conf = docker_config(tmp_path, {registry.host: {"username": "alice", "password": "s3cret"}})
    registry.seen.clear()
    await seed(src, MemoryOrigin(), ImageOptions(spool_dir=str(spool_dir), docker_config_dir=conf))
    token_requests = [s for s in registry.seen if s.server == "token"]
    assert len(token_requests) == 1  # the token is reused for the manifest, config and layers
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(token_requests[0].path).query)
    assert query == {"service": ['fake "registry"'], "scope": ["repository:team/app:pull"]}
    assert token_requests[0].authorization == Credentials("alice", "s3cret").basic()
    served = [s for s in registry.seen if s.server == "registry" and s.authorization == "Bearer tok-user"]
    assert len(served) == 4  # manifest, config, 2 layers
    registry.anonymous_tokens = True  # public images: an anonymous token
    out = await seed(src, MemoryOrigin(), ImageOptions(spool_dir=str(spool_dir)))
    assert out.result.files == 2


async def test_blob_redirects_do_not_carry_credentials(
    tmp_path: Path, registry: FakeRegistry, spool_dir: Path
) -> None:
    registry.auth = "basic"
    registry.redirect_blobs = True
    conf = docker_config(tmp_path, {registry.host: _auth("alice", "s3cret")})
    out = await seed(f"docker://{registry.host}/team/app:v1", MemoryOrigin(),
                     ImageOptions(spool_dir=str(spool_dir), docker_config_dir=conf))
    storage = [s for s in registry.seen if s.server == "storage"]
    assert len(storage) == 3  # config + 2 layers
    assert all(s.authorization is None for s in storage)
    assert out.result.files == 2


async def test_redirect_to_plain_http_elsewhere_is_refused(registry: FakeRegistry, options: ImageOptions) -> None:
    registry.redirect_blobs = True
    registry.redirect_to = "http://blobs.example.invalid/x"
    origin = MemoryOrigin()
    with pytest.raises(SeedError, match=r"refusing plain http to blobs\.example\.invalid"):
        await seed(f"docker://{registry.host}/team/app:v1", origin, options)
    await assert_nothing_published(origin)


async def test_a_tampered_layer_is_refused(registry: FakeRegistry, options: ImageOptions) -> None:
    registry.tamper.add(_image().layer_digests[1])
    origin = MemoryOrigin()
    with pytest.raises(LazyfsError, match=r"^layer 2/2 sha256:[0-9a-f]{12}: (blob: content is|corrupt compressed)"):
        await seed(f"docker://{registry.host}/team/app:v1", origin, options)
    await assert_nothing_published(origin)


async def test_tampered_config_and_manifest_digest_header(registry: FakeRegistry, options: ImageOptions) -> None:
    cfg = json.loads(_image().manifest)["config"]["digest"]
    registry.tamper.add(cfg)
    with pytest.raises(IntegrityError, match="config: content is"):
        await seed(f"docker://{registry.host}/team/app:v1", MemoryOrigin(), options)
    registry.tamper.clear()
    registry.wrong_content_digest = True
    with pytest.raises(IntegrityError, match="the registry says sha256:000000000000"):
        await seed(f"docker://{registry.host}/team/app:v1", MemoryOrigin(), options)


async def test_manifest_list_platform_selection(registry: FakeRegistry, spool_dir: Path) -> None:
    amd = build_image([Layer().file("arch", b"amd64")])
    arm = build_image([Layer().file("arch", b"arm64")])
    for img in (amd, arm):
        registry.push("multi", img.manifest_digest, img)
    registry.push_raw("multi", "latest", manifest_list([(amd, "amd64", ""), (arm, "arm64", "v8")]),
                      "application/vnd.docker.distribution.manifest.list.v2+json")
    for plat, want in (("linux/amd64", b"amd64"), ("linux/arm64", b"arm64")):
        origin = MemoryOrigin()
        out = await seed(f"docker://{registry.host}/multi", origin,
                         ImageOptions(spool_dir=str(spool_dir), platform=Platform.parse(plat)))
        assert await read_file(origin, out.result.manifest, b"arch") == want


async def test_registry_errors(registry: FakeRegistry, spool_dir: Path) -> None:
    opts = ImageOptions(spool_dir=str(spool_dir))
    with pytest.raises(NotFoundError, match=r"manifest v2: not found \(404\): MANIFEST_UNKNOWN manifest unknown"):
        await seed(f"docker://{registry.host}/team/app:v2", MemoryOrigin(), opts)
    small = ImageOptions(spool_dir=str(spool_dir), limits=ImageLimits(max_manifest_bytes=64))
    with pytest.raises(SeedError, match="over the 64 byte limit"):
        await seed(f"docker://{registry.host}/team/app:v1", MemoryOrigin(), small)
    registry.push_raw("old", "v1", json.dumps({"schemaVersion": 1, "fsLayers": []}).encode(),
                      "application/vnd.docker.distribution.manifest.v1+prettyjws")
    with pytest.raises(SeedError, match="schema 1 manifests are not supported"):
        await seed(f"docker://{registry.host}/old:v1", MemoryOrigin(), opts)


async def test_unreachable_registry(options: ImageOptions) -> None:
    from tests.unit.test_cli_seed import closed_port

    with pytest.raises(UnavailableError, match=r"cannot reach 127\.0\.0\.1:\d+"):
        await seed(f"docker://127.0.0.1:{closed_port()}/app:v1", MemoryOrigin(), options)


def test_plain_http_policy() -> None:
    loop = RegistrySource(RegistryRef("127.0.0.1:5000", "a"), ImageOptions())
    assert loop.base == "http://127.0.0.1:5000"
    remote = RegistrySource(RegistryRef("registry.example.com", "a"), ImageOptions())
    assert remote.base == "https://registry.example.com"
    insecure = RegistrySource(RegistryRef("registry.example.com:5000", "a"), ImageOptions(insecure_registry=True))
    assert insecure.base == "http://registry.example.com:5000"
    hub = RegistrySource(RegistryRef("docker.io", "library/python"), ImageOptions())
    assert hub.base == "https://registry-1.docker.io"
    for host in ("localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]"):
        assert is_loopback_host(host), host
    for host in ("10.0.0.1", "example.com", "localhost.example.com", "::2", "128.0.0.1"):
        assert not is_loopback_host(host), host


# --- parsers --------------------------------------------------------------------------------------


def test_parse_image_refs(tmp_path: Path) -> None:
    assert parse_image_ref("./model") is None
    assert parse_image_ref("docker://registry.example.com:5000/team/app:1.0") == RegistryRef(
        "registry.example.com:5000", "team/app", "1.0")
    assert parse_image_ref("docker://localhost/app") == RegistryRef("localhost", "app", "latest")
    assert parse_image_ref("docker://[::1]:5000/app:v1") == RegistryRef("[::1]:5000", "app", "v1")
    assert parse_image_ref("docker://python:3.12") == RegistryRef("docker.io", "library/python", "3.12")
    assert parse_image_ref("docker://org/app") == RegistryRef("docker.io", "org/app", "latest")
    d = "sha256:" + "a" * 64
    assert parse_image_ref(f"docker://127.0.0.1:5000/app@{d}") == RegistryRef("127.0.0.1:5000", "app", None, d)
    for bad in ("docker://127.0.0.1:5000/App:v1", "docker://host.io/app:bad/tag", "docker://h.io/app@sha256:xyz",
                "docker://h.io/", "docker://h.io/a:" + "t" * 200, "docker://bad_host.io/app"):
        with pytest.raises(UsageError):
            parse_image_ref(bad)
    (tmp_path / "lay:out").mkdir()
    assert parse_image_ref(f"oci:{tmp_path}/lay:out") == OciLayoutRef(f"{tmp_path}/lay:out")
    assert parse_image_ref(f"oci:{tmp_path}/layout:v2") == OciLayoutRef(f"{tmp_path}/layout", "v2")
    assert parse_image_ref("oci:dir") == OciLayoutRef("dir")
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"")
    assert parse_image_ref(f"docker-archive:{archive}") == DockerArchiveRef(str(archive))
    assert parse_image_ref(f"docker-archive:{archive}:repo/app:v1") == DockerArchiveRef(str(archive), "repo/app:v1")
    assert parse_image_ref(f"docker-archive:{archive}:@1") == DockerArchiveRef(str(archive), "@1")
    assert str(RegistryRef("docker.io", "library/python", "3.12")) == "docker://docker.io/library/python:3.12"


def test_load_credentials(tmp_path: Path) -> None:
    conf = docker_config(tmp_path, {
        "https://index.docker.io/v1/": _auth("hub", "h"),
        "https://reg.example.com:5000/v2/": _auth("u", "p:with:colons"),
        "plain.example.com": {"username": "x", "password": "y"},
        "helper.example.com": {},
    })
    assert load_credentials(conf, "docker.io") == Credentials("hub", "h")
    assert load_credentials(conf, "reg.example.com:5000") == Credentials("u", "p:with:colons")
    assert load_credentials(conf, "PLAIN.example.com") == Credentials("x", "y")
    assert load_credentials(conf, "helper.example.com") is None
    assert load_credentials(conf, "other.example.com") is None
    assert load_credentials(str(tmp_path / "missing"), "docker.io") is None
    assert load_credentials(None, "docker.io") is None
    assert "p:with" not in repr(Credentials("u", "p:with:colons"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"auths": {"h.io": {"auth": "bm9jb2xvbg=="}}}))  # "nocolon"
    with pytest.raises(UsageError, match="not base64 of user:password"):
        load_credentials(str(bad), "h.io")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_credentials(str(bad), "h.io")


def test_parse_www_authenticate() -> None:
    assert parse_www_authenticate('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                                  'scope="repository:library/python:pull"') == (
        "bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                   "scope": "repository:library/python:pull"})
    assert parse_www_authenticate('Basic realm="Registry Realm"') == ("basic", {"realm": "Registry Realm"})
    assert parse_www_authenticate('Bearer realm="x", service="a \\"quoted\\" b",error=insufficient_scope') == (
        "bearer", {"realm": "x", "service": 'a "quoted" b', "error": "insufficient_scope"})
