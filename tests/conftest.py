"""Fixtures shared by every test directory.

The real-server fixtures (``nginx``, ``moto_s3``, ``s3_bucket``) live in
:mod:`tests.integration.servers` and are loaded here as a plugin, so contract,
FUSE and benchmark tests can serve an origin through real nginx or moto too.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
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


@pytest.fixture(autouse=True)
def checklogs(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail a test that logs an unexpected WARNING (or worse) from lazyfs or p2p.

    A warning means something went wrong (a bad chunk, a broken cache); tests that
    provoke one on purpose say so with ``@pytest.mark.allow_warnings``.
    """
    caplog.set_level(logging.WARNING, logger="lazyfs")
    caplog.set_level(logging.WARNING, logger="p2p")
    yield
    if request.node.get_closest_marker("allow_warnings"):
        return
    bad = [
        r
        for when in ("setup", "call")
        for r in caplog.get_records(when)
        if r.levelno >= logging.WARNING and r.name.startswith(("lazyfs", "p2p"))
    ]
    if bad:
        pytest.fail("unexpected warning logged: " + "; ".join(f"{r.name}: {r.getMessage()}" for r in bad[:5]))
