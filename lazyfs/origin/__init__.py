"""Origins: where published refs, manifests and packs live.

:func:`open_origin` picks the implementation from the URL's scheme:

=================================  ===================================================
``file:///abs/dir``                 :class:`FileOrigin` (a local or mounted directory)
``http://host/prefix``, ``https:``  :class:`HTTPOrigin` (read-only, any static server)
``s3://bucket/prefix``              :class:`S3Origin` (S3 and S3-compatible stores)
=================================  ===================================================

Opening does no network I/O (clients and credentials are set up on first use);
a URL lazyfs cannot use raises :class:`~lazyfs.errors.BadURLError` at once, with
one line saying what is wrong.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from lazyfs._lazy import lazy_attributes
from lazyfs.config import OriginConfig
from lazyfs.errors import BadURLError, UsageError
from lazyfs.origin.base import Origin, check_key
from lazyfs.origin.file import FileOrigin

if TYPE_CHECKING:
    from lazyfs.origin.http import HTTPOrigin
    from lazyfs.origin.s3 import S3Credentials, S3Origin, s3_config_from_env

__all__ = [
    "FileOrigin",
    "HTTPOrigin",
    "Origin",
    "S3Credentials",
    "S3Origin",
    "check_key",
    "open_origin",
    "s3_config_from_env",
]

# aiohttp and obstore cost ~0.3 s to import: load them when an http(s) or s3 origin is used,
# so commands that never touch one (status, umount, file:// seeds) start fast.
_LAZY = {
    "HTTPOrigin": "lazyfs.origin.http",
    "S3Credentials": "lazyfs.origin.s3",
    "S3Origin": "lazyfs.origin.s3",
    "s3_config_from_env": "lazyfs.origin.s3",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


_SCHEMES = "file:///abs/dir, http(s)://host/prefix or s3://bucket/prefix"


def open_origin(url: str, config: OriginConfig = OriginConfig()) -> Origin:
    """The origin that ``url`` names, configured by ``config`` (see the module docstring)."""
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:  # e.g. an unbalanced "[" in the host
        raise BadURLError(f"{url!r} is not a valid origin URL: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme == "file":
        return _open_file(url, parts.netloc, parts.path, parts.query, parts.fragment)
    if scheme in ("http", "https"):
        from lazyfs.origin.http import HTTPOrigin

        return HTTPOrigin(url.strip(), config)
    if scheme == "s3":
        return _open_s3(url, parts.netloc, parts.path, parts.query, parts.fragment, config)
    if not scheme:
        hint = f" (for a local directory: file://{url})" if url.startswith("/") else ""
        raise BadURLError(f"{url!r} has no scheme: use {_SCHEMES}{hint}")
    raise BadURLError(f"unknown origin scheme {scheme!r} in {url!r}: use {_SCHEMES}")


def _open_file(url: str, host: str, path: str, query: str, fragment: str) -> FileOrigin:
    if query or fragment:
        raise BadURLError(f"{url!r}: a file origin URL cannot have a query or a fragment")
    if host not in ("", "localhost"):
        # file://models/x parses "models" as a host: the classic missing third slash.
        raise BadURLError(f"{url!r}: file URLs need an absolute path, like file:///abs/dir (three slashes)")
    local = unquote(path)
    if not local.startswith("/"):
        raise BadURLError(f"{url!r}: file URLs need an absolute path, like file:///abs/dir")
    if "\0" in local:
        raise BadURLError(f"{url!r}: the path contains a NUL byte")
    return FileOrigin(local.rstrip("/") or "/")


def _open_s3(url: str, netloc: str, path: str, query: str, fragment: str, config: OriginConfig) -> S3Origin:
    from lazyfs.origin.s3 import S3Origin

    if query or fragment:
        raise BadURLError(f"{url!r}: an s3 origin URL cannot have a query or a fragment")
    if "@" in netloc or ":" in netloc:
        raise BadURLError(
            f"{url!r}: an s3 URL is s3://bucket/prefix; put credentials in the AWS environment or "
            "~/.aws and the endpoint in AWS_ENDPOINT_URL"
        )
    if not netloc:
        raise BadURLError(f"{url!r}: an s3 origin URL needs a bucket: s3://bucket/prefix")
    prefix = unquote(path).strip("/")
    if prefix:
        try:
            check_key(prefix)
        except UsageError as exc:
            raise BadURLError(f"{url!r}: invalid prefix {prefix!r} (empty, '.' or '..' segments)") from exc
    return S3Origin(netloc, prefix, config)
