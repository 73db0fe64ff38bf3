"""Every origin implementation passes :class:`lazyfs.testing.OriginContract`.

The HTTP origin runs behind real nginx (objects laid into the served directory with
the file origin, as ``lazyfs seed`` would), once with Range support and once with
ranges disabled (nginx then answers 200 with the whole body, which the origin must
slice); the S3 origin runs against moto's standalone server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import pytest

from lazyfs.origin import FileOrigin, HTTPOrigin
from lazyfs.testing import FaultyOrigin, MemoryOrigin, OriginContract, OriginSubject
from tests.integration.servers import MotoServer, NginxFactory


class TestMemoryOrigin(OriginContract):
    @pytest.fixture
    async def origin_subject(self) -> AsyncIterator[OriginSubject]:
        origin = MemoryOrigin()
        yield OriginSubject.of(origin)
        await origin.aclose()


class TestReadOnlyMemoryOrigin(OriginContract):
    """The fake posing as a static HTTP server: the contract's read-only branch, without a server."""

    @pytest.fixture
    async def origin_subject(self) -> AsyncIterator[OriginSubject]:
        origin = MemoryOrigin(writable=False, listable=False)

        async def put(key: str, data: bytes) -> None:
            origin.put_nowait(key, data)

        yield OriginSubject(origin, put, lists=False)
        await origin.aclose()


class TestFaultyOriginWithoutFaults(OriginContract):
    @pytest.fixture
    async def origin_subject(self) -> AsyncIterator[OriginSubject]:
        origin = FaultyOrigin(MemoryOrigin(), seed=1)
        yield OriginSubject.of(origin)
        await origin.aclose()


class TestFileOrigin(OriginContract):
    @pytest.fixture
    async def origin_subject(self, tmp_path: Path) -> AsyncIterator[OriginSubject]:
        origin = FileOrigin(tmp_path / "not" / "yet" / "created")
        yield OriginSubject.of(origin)
        await origin.aclose()


@pytest.mark.integration
class TestHTTPOrigin(OriginContract):
    nginx_config: ClassVar[str] = ""

    @pytest.fixture
    async def origin_subject(self, tmp_path: Path, nginx: NginxFactory) -> AsyncIterator[OriginSubject]:
        served = tmp_path / "www"
        writer = FileOrigin(served / "models" / "origin")
        base = nginx(served, self.nginx_config)
        origin = HTTPOrigin(f"{base}/models/origin/")
        yield OriginSubject(origin, writer.write, lists=False)
        await origin.aclose()


@pytest.mark.integration
class TestHTTPOriginWithoutRangeSupport(TestHTTPOrigin):
    nginx_config = "max_ranges 0;"


@pytest.mark.integration
class TestS3Origin(OriginContract):
    @pytest.fixture
    async def origin_subject(self, moto_s3: MotoServer, s3_bucket: str) -> AsyncIterator[OriginSubject]:
        origin = moto_s3.origin(s3_bucket, "some/prefix")
        yield OriginSubject.of(origin)
        await origin.aclose()
