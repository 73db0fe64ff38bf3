"""Assemble a canonical :class:`Manifest` from entries given in any order.

The seeder (or an image flattener) adds entries as it discovers them, each
regular file with the digests of its chunks, and tells the builder where every
digest is stored.  :meth:`ManifestBuilder.build` sorts the tree, numbers the
chunk and pack tables in first-reference order and returns the one canonical
manifest for that content, so publishing the same tree twice gives the same
bytes and digest.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from lazyfs.errors import ManifestError
from lazyfs.manifest.schema import Chunk, Codec, Entry, EntryType, Manifest, Pack, tree_key

__all__ = ["ChunkLocation", "ManifestBuilder"]


@dataclass(frozen=True, slots=True)
class ChunkLocation:
    """Where the stored bytes of one chunk live at the origin."""

    pack: Pack
    offset: int
    stored_size: int
    codec: Codec
    size: int  # raw size


class ManifestBuilder:
    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self._entries: dict[bytes, tuple[Entry, tuple[bytes, ...]]] = {}
        self._locations: dict[bytes, ChunkLocation] = {}

    def add(self, entry: Entry, chunk_digests: Iterable[bytes] = ()) -> None:
        """Add (or replace) the entry at ``entry.path``; regular files list their chunk digests in order."""
        self._entries[entry.path] = (entry, tuple(chunk_digests))

    def remove(self, path: bytes) -> None:
        """Remove ``path`` and everything below it (what an OCI whiteout does)."""
        prefix = path + b"/"
        for p in [p for p in self._entries if p == path or p.startswith(prefix)]:
            del self._entries[p]

    def get(self, path: bytes) -> Entry | None:
        item = self._entries.get(path)
        return None if item is None else item[0]

    def paths(self) -> list[bytes]:
        return list(self._entries)

    def locate(self, digest: bytes, location: ChunkLocation) -> None:
        self._locations.setdefault(digest, location)

    def location(self, digest: bytes) -> ChunkLocation | None:
        return self._locations.get(digest)

    def build(self, annotations: dict[str, str] | None = None) -> Manifest:
        chunk_index: dict[bytes, int] = {}
        pack_index: dict[bytes, int] = {}
        chunks: list[Chunk] = []
        packs: list[Pack] = []
        entries: list[Entry] = []
        for path in sorted(self._entries, key=tree_key):
            entry, digests = self._entries[path]
            if entry.type is EntryType.REG:
                idx = []
                for d in digests:
                    i = chunk_index.get(d)
                    if i is None:
                        loc = self._locations.get(d)
                        if loc is None:
                            raise ManifestError(f"chunk {d.hex()} of {path!r} has no stored location")
                        p = pack_index.get(loc.pack.digest)
                        if p is None:
                            p = pack_index[loc.pack.digest] = len(packs)
                            packs.append(loc.pack)
                        i = chunk_index[d] = len(chunks)
                        chunks.append(Chunk(d, loc.size, p, loc.offset, loc.stored_size, loc.codec))
                    idx.append(i)
                entry = replace(entry, chunks=tuple(idx))
            if entry.xattrs:  # listxattr() order is arbitrary; the canonical form sorts by name
                entry = replace(entry, xattrs=tuple(sorted(entry.xattrs)))
            entries.append(entry)
        return Manifest(
            chunk_size=self.chunk_size,
            entries=tuple(entries),
            chunks=tuple(chunks),
            packs=tuple(packs),
            annotations=tuple(sorted((annotations or {}).items())),
        )
