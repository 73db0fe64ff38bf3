"""The loader's exceptions (no torch here, so the header code can raise them in a daemon).

::

    LazyfsError
    └── LoaderError            a tensor could not be loaded; the message names the file (and tensor)
        ├── HeaderError        the safetensors header is malformed or inconsistent
        └── LoaderIOError      a read failed (EIO from a mount, a vanished or unreadable file)

Catch :class:`LoaderError` for "this model could not be loaded", whatever the reason.
"""

from __future__ import annotations

from lazyfs.errors import LazyfsError

__all__ = ["HeaderError", "LoaderError", "LoaderIOError"]


class LoaderError(LazyfsError):
    """A tensor could not be loaded (bad file, failed read, missing key)."""


class HeaderError(LoaderError):
    """A safetensors file whose header is malformed or inconsistent."""


class LoaderIOError(LoaderError):
    """A read the loader needed failed (EIO from a mount, a vanished file)."""
