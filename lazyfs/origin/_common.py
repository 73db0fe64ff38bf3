"""Argument checks shared by every origin implementation (private).

They keep the contract's edge cases (negative ranges, hostile prefixes)
answered the same way by the file, HTTP, S3 and in-memory origins.
"""

from __future__ import annotations

from lazyfs.errors import UsageError
from lazyfs.origin.base import check_key

__all__ = ["check_prefix", "check_range", "clip"]


def check_range(key: str, start: int, length: int | None) -> str:
    """Validate a read request; returns ``key`` (checked with :func:`check_key`)."""
    check_key(key)
    if start < 0:
        raise UsageError(f"{key}: negative read offset {start}")
    if length is not None and length < 0:
        raise UsageError(f"{key}: negative read length {length}")
    return key


def check_prefix(prefix: str) -> str:
    """Validate a ``list`` prefix: empty, or a key-like string with an optional trailing ``/``.

    A prefix is matched as a plain string (``refs/ll`` matches ``refs/llama/8b``), as
    S3 does; it must still not climb out of the origin (``..``) or be absolute.
    """
    if prefix:
        check_key(prefix.removesuffix("/"))
    return prefix


def clip(data: bytes, start: int, length: int | None) -> bytes:
    """``data[start:start+length]`` (to the end when ``length`` is None)."""
    return data[start:] if length is None else data[start : start + length]
