"""The Origin protocol: where published manifests, refs and packs live.

An origin is a flat key -> bytes object store.  Keys are ``/``-separated
relative paths (``refs/<name>/<tag>``, ``manifests/<digest>``,
``packs/<digest>``).  Every implementation passes the contract suite in
:mod:`lazyfs.testing`.

Guarantees every implementation gives:

* ``read(key, start, length)`` returns the bytes ``[start, start+length)``,
  clipped at the end of the object (so it is short only at the end); with
  ``length=None`` it reads to the end.  A missing object raises
  :class:`~lazyfs.errors.NotFoundError`.
* ``write(key, data)`` is atomic: a reader sees the old object, or all of the
  new one, never a prefix.  ``data`` may be a view of a buffer its caller
  reuses once the write returns: an origin that keeps the bytes copies them.  Read-only origins raise
  :class:`~lazyfs.errors.ReadOnlyError`.
* ``list(prefix)`` returns the keys under ``prefix`` (sorted); origins that
  cannot list (a static HTTP server) raise :class:`~lazyfs.errors.ReadOnlyError`.
* Transport failures are :class:`~lazyfs.errors.UnavailableError` (worth a
  retry), refused credentials :class:`~lazyfs.errors.AccessDeniedError`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["Origin", "check_key"]


@runtime_checkable
class Origin(Protocol):
    @property
    def url(self) -> str:
        """The URL this origin was opened from (credentials never included)."""
        ...

    @property
    def writable(self) -> bool: ...

    async def read(self, key: str, start: int = 0, length: int | None = None) -> bytes: ...

    async def write(self, key: str, data: bytes | memoryview) -> None: ...

    async def exists(self, key: str) -> bool: ...

    async def list(self, prefix: str) -> list[str]: ...

    async def aclose(self) -> None: ...


def check_key(key: str) -> str:
    """Reject keys that could escape an origin's root (``..``, absolute, empty components)."""
    from lazyfs.errors import UsageError

    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in key:
        raise UsageError(f"invalid origin key {key!r}")
    return key
