"""The manifest FORMAT: schema, canonical codec with limits, builder.  Imports nothing daemon-side.

The codec (msgpack, blake3) and the builder are imported on first use of one of their names,
so ``parse_ref`` and the data model cost a command that only needs them (``lazyfs mount``
before it starts its daemon, ``lazyfs run``) no more than the schema module.
"""

from typing import TYPE_CHECKING

from lazyfs._lazy import lazy_attributes
from lazyfs.manifest.schema import (
    DEFAULT_TAG,
    DIGEST_SIZE,
    FORMAT_VERSION,
    IMAGE_CONFIG_ANNOTATION,
    Chunk,
    Codec,
    Entry,
    EntryType,
    Manifest,
    Pack,
    Ref,
    parse_ref,
    tree_key,
)

if TYPE_CHECKING:
    from lazyfs.manifest.builder import ChunkLocation, ManifestBuilder
    from lazyfs.manifest.codec import LIMITS, Limits, decode, digest_of, encode

__all__ = [
    "DEFAULT_TAG",
    "DIGEST_SIZE",
    "FORMAT_VERSION",
    "IMAGE_CONFIG_ANNOTATION",
    "LIMITS",
    "Chunk",
    "ChunkLocation",
    "Codec",
    "Entry",
    "EntryType",
    "Limits",
    "Manifest",
    "ManifestBuilder",
    "Pack",
    "Ref",
    "decode",
    "digest_of",
    "encode",
    "parse_ref",
    "tree_key",
]

_LAZY = {
    "ChunkLocation": "lazyfs.manifest.builder",
    "ManifestBuilder": "lazyfs.manifest.builder",
    "LIMITS": "lazyfs.manifest.codec",
    "Limits": "lazyfs.manifest.codec",
    "decode": "lazyfs.manifest.codec",
    "digest_of": "lazyfs.manifest.codec",
    "encode": "lazyfs.manifest.codec",
}


__getattr__ = lazy_attributes(__name__, _LAZY)
