"""Reading what an origin publishes: refs -> manifest digests -> verified manifests."""

from __future__ import annotations

import asyncio
import re

from lazyfs.errors import ManifestError, NotFoundError
from lazyfs.manifest import Manifest, Ref, decode, digest_of
from lazyfs.origin.base import Origin

__all__ = ["list_refs", "load_manifest", "resolve_ref"]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# A ref object is one digest and a newline; anything much larger is not a ref.
_MAX_REF_BYTES = 1024


async def resolve_ref(origin: Origin, ref: Ref) -> str:
    """The manifest digest ``ref`` points at (a digest ref is returned as is)."""
    if ref.digest is not None:
        return ref.digest
    try:
        data = await origin.read(ref.key, 0, _MAX_REF_BYTES)
    except NotFoundError:
        raise NotFoundError(f"{ref} is not published at {origin.url}") from None
    text = data.decode("ascii", "replace").strip()
    if not _HEX64.match(text):
        raise ManifestError(f"ref {ref} at {origin.url} is malformed (expected a 64-hex digest)")
    return text


async def load_manifest(origin: Origin, digest: str) -> tuple[bytes, Manifest]:
    """Fetch ``manifests/<digest>``, check its digest, decode it (as hostile input)."""
    try:
        data = await origin.read(f"manifests/{digest}")
    except NotFoundError:
        raise NotFoundError(f"manifest {digest} is missing at {origin.url}") from None
    return data, await asyncio.to_thread(verify_manifest, data, digest)


def verify_manifest(data: bytes, digest: str) -> Manifest:
    actual = digest_of(data)
    if actual != digest:
        raise ManifestError(f"manifest {digest} does not match its content (digest {actual})")
    return decode(data)


async def list_refs(origin: Origin) -> list[str]:
    """Every ``name:tag`` published at ``origin`` (origins that can list only)."""
    keys = await origin.list("refs/")
    out = []
    for k in keys:
        name, _, tag = k.removeprefix("refs/").rpartition("/")
        if name and tag:
            out.append(f"{name}:{tag}")
    return out
