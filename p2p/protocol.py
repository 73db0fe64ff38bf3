"""The peer protocol: one read-only HTTP endpoint.

``GET /v1/chunks/<digest>`` where ``<digest>`` is the chunk's BLAKE3-256 in
lowercase hex (64 characters).  Request headers:

* ``Authorization: Bearer <cluster token>`` — required; without it, or with a
  wrong one, the answer is 401 and no data;
* ``X-Lazyfs-Priority: 0|1|2`` — the asking reader's priority (demand,
  read-ahead, background); the home schedules its own origin fetch by it;
* ``X-Lazyfs-Timeout: <seconds>`` — how long the asker will wait; the server
  gives up (504) rather than work for nobody;
* ``X-Lazyfs-Cached-Only: 1`` — answer only from memory or the cache (404
  otherwise); used to find holders when the origin is down;
* ``Range: bytes=a-b`` — standard single ranges (206 / 416);
* ``Accept-Encoding: zstd`` — the asker takes a compressed body: a whole-chunk
  answer may then come as one zstd frame with ``Content-Encoding: zstd``
  (Content-Length is the compressed size); the asker decompresses it, with the
  chunk size as the limit, before verifying.  Ranges are never compressed.

Answers: 200/206 with the raw chunk bytes (``application/octet-stream``),
401, 404 (unknown digest, or not cached with ``Cached-Only``), 416, 503 with
``X-Lazyfs-Reason: origin`` when the server's own origin fetch failed, 504.
There is nothing else: no listing, no paths, no writes.
"""

from __future__ import annotations

import hmac
import re

__all__ = [
    "CACHED_ONLY",
    "CHUNK_PATH",
    "PRIORITY",
    "REASON",
    "TIMEOUT",
    "ZSTD",
    "accepts_zstd",
    "bearer",
    "digest_from_hex",
    "token_matches",
]

CHUNK_PATH = "/v1/chunks/{digest}"
PRIORITY = "X-Lazyfs-Priority"
TIMEOUT = "X-Lazyfs-Timeout"
CACHED_ONLY = "X-Lazyfs-Cached-Only"
REASON = "X-Lazyfs-Reason"
ZSTD = "zstd"

_HEX64 = re.compile(r"[0-9a-f]{64}")


def digest_from_hex(text: str) -> bytes | None:
    """The 32-byte digest named by ``text``, or None if it is not exactly 64 lowercase hex digits."""
    if _HEX64.fullmatch(text) is None:
        return None
    return bytes.fromhex(text)


def bearer(token: bytes) -> str:
    return "Bearer " + token.decode("ascii")


def token_matches(header: str | None, token: bytes) -> bool:
    """Constant-time check of an ``Authorization`` header against the cluster token."""
    if header is None or not header.startswith("Bearer "):
        return False
    try:
        given = header[7:].encode("ascii")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(given, token)


def accepts_zstd(header: str | None) -> bool:
    """Whether an ``Accept-Encoding`` header lists zstd (without ``q=0``)."""
    for item in (header or "").split(","):
        name, _, params = item.partition(";")
        if name.strip().lower() == ZSTD:
            return params.replace(" ", "").lower() not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False
