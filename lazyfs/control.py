"""The names of a mount's control channel: extended attributes of the mount's root.

Kept apart from the daemon (aiohttp, pyfuse3) and the filesystem core (the fetcher) so that the
commands that talk to a running daemon -- ``lazyfs run``, ``status``, ``prefetch``, ``umount`` --
start without importing either.
"""

from __future__ import annotations

__all__ = ["CONTROL_XATTR", "CONTROL_XATTR_PREFIX", "STATUS_XATTR"]

# Names under this prefix answer getxattr on the root but are not listed: the daemon's control channel.
CONTROL_XATTR_PREFIX = b"user.lazyfs."
CONTROL_XATTR = CONTROL_XATTR_PREFIX + b"control"  # -> path of the control socket
STATUS_XATTR = CONTROL_XATTR_PREFIX + b"status"  # -> status JSON
