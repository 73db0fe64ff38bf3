"""One exception tree for lazyfs.

Every error lazyfs raises on purpose is a :class:`LazyfsError`.  Each class
carries the ``errno`` that the FUSE adapter answers with, and the CLI prints
``str(exc)`` as one line and exits non-zero.  Lower layers wrap foreign
exceptions with ``raise X(...) from exc`` so the cause stays visible in logs.

::

    LazyfsError (EIO)
    ├── UsageError (EINVAL)            bad arguments: names, sizes, paths
    │   └── BadURLError                an origin URL lazyfs cannot use
    ├── ManifestError (EIO)            a manifest that fails validation
    ├── OriginError (EIO)              an object store misbehaved
    │   ├── NotFoundError (ENOENT)     the object does not exist
    │   ├── AccessDeniedError (EACCES) credentials refused
    │   ├── UnavailableError (EIO)     unreachable / 5xx / reset: worth retrying
    │   └── ReadOnlyError (EROFS)      the origin cannot be written (http)
    ├── IntegrityError (EIO)           bytes whose digest does not match
    ├── CacheError (EIO)               the local cache is unusable
    ├── SeedError (EIO)                a source tree that cannot be published
    ├── FilesystemError (any errno)    a filesystem operation refused (ENOENT, EROFS, ...)
    ├── DeadlineError (EIO)            a read could not be served in time
    ├── TraceError (EIO)               a startup trace that fails validation
    └── RunError (EIO)                 `lazyfs run` could not start or set up the program

"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "AccessDeniedError",
    "BadURLError",
    "CacheError",
    "DeadlineError",
    "FilesystemError",
    "IntegrityError",
    "LazyfsError",
    "ManifestError",
    "NotFoundError",
    "OriginError",
    "ReadOnlyError",
    "RunError",
    "SeedError",
    "TraceError",
    "UnavailableError",
    "UsageError",
]


class LazyfsError(Exception):
    """Base of every error lazyfs raises deliberately."""

    errno: int = _errno.EIO


class UsageError(LazyfsError):
    """The caller passed something lazyfs cannot accept (a bad name, size, path)."""

    errno = _errno.EINVAL


class BadURLError(UsageError):
    """An origin URL with an unknown scheme or a malformed location."""


class ManifestError(LazyfsError):
    """A manifest that is malformed, too large, or inconsistent."""


class OriginError(LazyfsError):
    """An origin (object store) failed to answer as expected."""


class NotFoundError(OriginError):
    """The requested object does not exist at the origin."""

    errno = _errno.ENOENT


class AccessDeniedError(OriginError):
    """The origin refused our credentials."""

    errno = _errno.EACCES


class UnavailableError(OriginError):
    """The origin could not be reached or answered with a server error; retrying may help."""


class ReadOnlyError(OriginError):
    """The origin cannot be written (for example a plain HTTP server)."""

    errno = _errno.EROFS


class IntegrityError(LazyfsError):
    """Bytes whose BLAKE3 digest does not match the one they were asked for."""


class CacheError(LazyfsError):
    """The local chunk cache cannot be used."""


class SeedError(LazyfsError):
    """A source tree that cannot be read or published."""


class DeadlineError(LazyfsError):
    """A read could not be served before its deadline."""


class FilesystemError(LazyfsError):
    """A filesystem request refused with a specific errno (ENOENT, ENOTDIR, EROFS, ENODATA...)."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(message or _errno.errorcode.get(errno, str(errno)))
        self.errno = errno


class TraceError(LazyfsError):
    """A startup trace (``traces/<digest>``) that is malformed, too large, or not for this manifest."""


class RunError(LazyfsError):
    """``lazyfs run`` failed before or around the program; ``exit_status`` follows ``docker run``:
    125 for lazyfs's own errors, 126 when the command cannot be executed, 127 when it is not found."""

    def __init__(self, message: str, exit_status: int = 125) -> None:
        super().__init__(message)
        self.exit_status = exit_status
