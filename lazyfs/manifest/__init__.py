"""The manifest FORMAT: schema, canonical codec with limits, builder.  Imports nothing daemon-side."""

from lazyfs.manifest.builder import ChunkLocation, ManifestBuilder
from lazyfs.manifest.codec import LIMITS, Limits, decode, digest_of, encode
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
