"""Fixtures for image tests: a spool directory that must be empty afterwards, options, a seeding helper."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lazyfs.catalog import list_refs
from lazyfs.config import SeedConfig
from lazyfs.image import ImageOptions, ImageSeedResult, Platform, seed_image
from lazyfs.manifest import parse_ref
from lazyfs.origin.base import Origin
from lazyfs.testing import MemoryOrigin
from tests.image.realimage import DockerRegistry, RealImage, build_real_image

KiB = 1024
# Small chunks: multi-chunk files stay small and tests fast.
CONFIG = SeedConfig(chunk_size=64 * KiB)
AMD64 = Platform("linux", "amd64")


@pytest.fixture
def spool_dir(tmp_path: Path) -> Iterator[Path]:
    """Where layers spool; every test leaves it empty (the spool is removed on success and failure)."""
    d = tmp_path / "spool"
    d.mkdir()
    yield d
    left = os.listdir(d)
    assert not left, f"spool not cleaned up: {left}"


@pytest.fixture
def options(spool_dir: Path) -> ImageOptions:
    return ImageOptions(spool_dir=str(spool_dir), platform=AMD64)


async def seed(src: str, origin: Origin, options: ImageOptions, name: str = "app:v1") -> ImageSeedResult:
    return await seed_image(src, origin, parse_ref(name), CONFIG, options)


async def assert_nothing_published(origin: MemoryOrigin) -> None:
    assert await list_refs(origin) == []
    assert await origin.list("manifests/") == []


# --- real tools (session-scoped: the image is built once, ~20 s after the cached debootstrap) ---------


@dataclass(frozen=True)
class Registries:
    anonymous: DockerRegistry
    private: DockerRegistry  # htpasswd: alice / PASSWORD
    public_src: str  # docker://... gzip layers, as umoci wrote them
    private_src: str  # docker://... zstd layers, recompressed by skopeo
    docker_config: Path  # a DOCKER_CONFIG directory with alice's credentials for the private one


PASSWORD = "s3cret pass:word"


@pytest.fixture(scope="session")
def real_image(tmp_path_factory: pytest.TempPathFactory) -> RealImage:
    return build_real_image(tmp_path_factory.mktemp("real-image"))


@pytest.fixture(scope="session")
def registries(tmp_path_factory: pytest.TempPathFactory, real_image: RealImage) -> Iterator[Registries]:
    work = tmp_path_factory.mktemp("registries")
    started: list[DockerRegistry] = []
    try:
        anonymous = DockerRegistry(work / "anonymous")
        started.append(anonymous)
        private = DockerRegistry(work / "private", {"alice": PASSWORD})
        started.append(private)
        public_src = anonymous.push(f"oci:{real_image.layout}:v3", "example/app:v3")
        private_src = private.push(f"oci:{real_image.layout}:v3", "private/app:v3", "--dest-compress-format", "zstd")
        conf = work / "docker-config"
        conf.mkdir()
        token = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
        (conf / "config.json").write_text(json.dumps({"auths": {private.host: {"auth": token}}}))
        yield Registries(anonymous, private, public_src, private_src, conf)
    finally:
        for r in started:
            r.stop()
