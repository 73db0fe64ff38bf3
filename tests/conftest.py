"""Fixtures shared by every test directory.

The real-server fixtures (``nginx``, ``moto_s3``, ``s3_bucket``) live in
:mod:`tests.integration.servers` and are loaded here as a plugin, so contract,
FUSE and benchmark tests can serve an origin through real nginx or moto too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lazyfs.origin.file import FileOrigin
from lazyfs.testing import MemoryOrigin

pytest_plugins = ["tests.integration.servers"]


@pytest.fixture
async def memory_origin() -> AsyncIterator[MemoryOrigin]:
    """An empty, writable in-memory origin."""
    origin = MemoryOrigin()
    yield origin
    await origin.aclose()


@pytest.fixture
async def file_origin(tmp_path: Path) -> AsyncIterator[FileOrigin]:
    """An origin in a new directory (not yet created: the first write creates it)."""
    origin = FileOrigin(tmp_path / "origin")
    yield origin
    await origin.aclose()
