"""Canonical encoding of manifests, and a decoder that treats its input as hostile.

Wire format (format 1): one msgpack array, no maps, so the encoding of a given
:class:`Manifest` is unique (msgpack always picks the shortest integer form)::

    [MAGIC, 1, chunk_size,
     [[key, value], ...],                                  annotations (str, sorted)
     [[digest, size], ...],                                packs
     [[digest, size, pack, offset, stored_size, codec], ...],  chunks
     [[path, type, mode, uid, gid, mtime_ns, size, target, rdev,
       [[name, value], ...], [chunk index, ...]], ...]]    entries

The decoder accepts only canonical input: every field is type- and
range-checked, the tree must be well formed (root first, sorted, parents are
directories, no ``.``/``..``/empty components), each regular file's chunks must
tile it exactly, every chunk must lie inside its pack, and tables must be in
first-reference order.  Therefore ``encode(decode(b)) == b`` for every ``b`` it
accepts, and the digest of the bytes identifies the manifest.
"""

from __future__ import annotations

from typing import Any

import blake3
import msgpack

from lazyfs.errors import ManifestError
from lazyfs.manifest.schema import (
    DIGEST_SIZE,
    FORMAT_VERSION,
    Chunk,
    Codec,
    Entry,
    EntryType,
    Manifest,
    Pack,
    tree_key,
)

__all__ = ["LIMITS", "Limits", "decode", "digest_of", "encode"]

MAGIC = b"lazyfs-manifest"
_NOT_CANONICAL = "manifest is not in canonical form (a value is not in its shortest msgpack encoding)"


class Limits:
    """Upper bounds the decoder enforces; generous for real trees, fatal for bombs."""

    # ~100 bytes an entry: a 1-million-file image stays well below this.
    max_bytes = 512 * 1024 * 1024
    max_entries = 4_000_000
    max_chunks = 16_000_000
    max_path = 4096  # PATH_MAX
    max_name = 255  # NAME_MAX
    max_xattrs = 256
    max_xattr_name = 255  # XATTR_NAME_MAX
    max_xattr_value = 65536  # XATTR_SIZE_MAX
    max_annotation = 1 << 20
    min_chunk_size = 4096
    max_chunk_size = 256 * 1024 * 1024
    max_file_size = 1 << 50  # 1 PiB
    max_pack_size = 1 << 40
    max_id = (1 << 32) - 1  # uid/gid
    max_rdev = (1 << 64) - 1
    mtime_range = (-(1 << 63), (1 << 63) - 1)


LIMITS = Limits()


def digest_of(data: bytes) -> str:
    """Hex BLAKE3-256 of manifest bytes: the manifest's identity."""
    return blake3.blake3(data).hexdigest()


def encode(m: Manifest) -> bytes:
    """Canonical bytes of *m*.  The result is validated, so invalid manifests never get published."""
    data = _pack(m)
    decode(data)  # the builder's output must satisfy the decoder: fail loudly at publish time
    return data


def _pack(m: Manifest) -> bytes:
    obj = [
        MAGIC,
        FORMAT_VERSION,
        m.chunk_size,
        [[k, v] for k, v in m.annotations],
        [[p.digest, p.size] for p in m.packs],
        [[c.digest, c.size, c.pack, c.offset, c.stored_size, int(c.codec)] for c in m.chunks],
        [
            [
                e.path,
                int(e.type),
                e.mode,
                e.uid,
                e.gid,
                e.mtime_ns,
                e.size,
                e.target,
                e.rdev,
                [[k, v] for k, v in e.xattrs],
                list(e.chunks),
            ]
            for e in m.entries
        ],
    ]
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def decode(data: bytes, limits: Limits = LIMITS) -> Manifest:
    """Parse and validate manifest bytes; raises :class:`ManifestError` naming the first problem."""
    if len(data) > limits.max_bytes:
        raise ManifestError(f"manifest is {len(data)} bytes, over the {limits.max_bytes} byte limit")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=limits.max_bytes,
            max_str_len=limits.max_annotation,
            # at least 11 (the fields of an entry), so small custom limits fail with a clear message
            # An array cannot hold more elements than there are bytes: msgpack reserves memory
            # for a declared length before reading, so cap it by the input size.
            max_array_len=min(len(data), max(limits.max_entries, limits.max_chunks, limits.max_xattrs, 11)),
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # ValueError, ExtraData, StackError (empty str()), UnicodeDecodeError, ...
        raise ManifestError(f"manifest is not valid msgpack: {exc.__class__.__name__}: {exc}") from exc
    m = _Validator(limits).manifest(obj)
    # msgpack admits several encodings of one value (an int in a wider form than needed, a short
    # string as str16, ...); accept only the one encode() produces, so one manifest has one digest.
    if _pack(m) != data:
        raise ManifestError(_NOT_CANONICAL)
    return m


_ETYPE_MIN, _ETYPE_MAX = min(EntryType), max(EntryType)
_ETYPES = {int(t): t for t in EntryType}
_CODEC_MAX = max(Codec)


class _Validator:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    # -- primitives ------------------------------------------------------------

    @staticmethod
    def _list(v: Any, what: str, n: int | None = None) -> list[Any]:
        if not isinstance(v, list):
            raise ManifestError(f"{what}: expected an array")
        if n is not None and len(v) != n:
            raise ManifestError(f"{what}: expected {n} fields, found {len(v)}")
        return v

    @staticmethod
    def _int(v: Any, what: str, lo: int, hi: int) -> int:
        # bool is an int subclass in Python; msgpack booleans are not integers.
        if not isinstance(v, int) or isinstance(v, bool):
            raise ManifestError(f"{what}: expected an integer")
        if not lo <= v <= hi:
            raise ManifestError(f"{what}: {v} is outside [{lo}, {hi}]")
        return v

    @staticmethod
    def _bytes(v: Any, what: str, max_len: int) -> bytes:
        if not isinstance(v, bytes):
            raise ManifestError(f"{what}: expected bytes")
        if len(v) > max_len:
            raise ManifestError(f"{what}: {len(v)} bytes, over the limit of {max_len}")
        return v

    @staticmethod
    def _str(v: Any, what: str, max_len: int) -> str:
        if not isinstance(v, str):
            raise ManifestError(f"{what}: expected a string")
        if len(v) > max_len:
            raise ManifestError(f"{what}: longer than {max_len}")
        return v

    # -- structure -------------------------------------------------------------

    def manifest(self, obj: Any) -> Manifest:
        L = self.limits
        if not isinstance(obj, list) or len(obj) < 2 or obj[0] != MAGIC:
            raise ManifestError("not a lazyfs manifest (bad magic)")
        version = obj[1]
        if type(version) is not int or version != FORMAT_VERSION:  # not True, not 1.0
            raise ManifestError(f"unsupported manifest format {version!r} (this lazyfs reads format 1)")
        _, _, chunk_size, annotations, packs, chunks, entries = self._list(obj, "manifest", 7)
        chunk_size = self._int(chunk_size, "chunk_size", L.min_chunk_size, L.max_chunk_size)
        anns = self._annotations(annotations)
        pack_objs = self._packs(packs)
        chunk_objs = self._chunks(chunks, pack_objs, chunk_size)
        entry_objs = self._entries(entries, chunk_objs, chunk_size)
        return Manifest(
            chunk_size=chunk_size,
            entries=tuple(entry_objs),
            chunks=tuple(chunk_objs),
            packs=tuple(pack_objs),
            annotations=anns,
        )

    def _annotations(self, v: Any) -> tuple[tuple[str, str], ...]:
        out: list[tuple[str, str]] = []
        for i, kv in enumerate(self._list(v, "annotations")):
            k, val = self._list(kv, f"annotations[{i}]", 2)
            out.append(
                (
                    self._str(k, f"annotations[{i}].key", 1024),
                    self._str(val, f"annotations[{i}].value", self.limits.max_annotation),
                )
            )
        keys = [k for k, _ in out]
        if keys != sorted(set(keys)):
            raise ManifestError("annotations: keys must be unique and sorted")
        return tuple(out)

    def _packs(self, v: Any) -> list[Pack]:
        out = []
        seen: set[bytes] = set()
        for i, p in enumerate(self._list(v, "packs")):
            d, size = self._list(p, f"packs[{i}]", 2)
            d = self._digest(d, f"packs[{i}].digest")
            if d in seen:
                raise ManifestError(f"packs[{i}]: duplicate pack {d.hex()}")
            seen.add(d)
            out.append(Pack(d, self._int(size, f"packs[{i}].size", 1, self.limits.max_pack_size)))
        return out

    def _digest(self, v: Any, what: str) -> bytes:
        d = self._bytes(v, what, DIGEST_SIZE)
        if len(d) != DIGEST_SIZE:
            raise ManifestError(f"{what}: a digest is {DIGEST_SIZE} bytes, found {len(d)}")
        return d

    def _chunks(self, v: Any, packs: list[Pack], chunk_size: int) -> list[Chunk]:
        items = self._list(v, "chunks")
        if len(items) > self.limits.max_chunks:
            raise ManifestError(f"chunks: {len(items)} chunks, over the limit of {self.limits.max_chunks}")
        out = []
        seen: set[bytes] = set()
        next_pack = 0  # packs must appear in first-reference order
        for i, c in enumerate(items):
            what = f"chunks[{i}]"
            if type(c) is not list or len(c) != 6:
                self._list(c, what, 6)
            d, size, pack, offset, stored, codec = c
            # One expression for the common case; the per-field checks (and their messages) only
            # for a bad chunk.
            if not (
                type(d) is bytes
                and len(d) == DIGEST_SIZE
                and type(size) is int
                and 1 <= size <= chunk_size
                and type(pack) is int
                and 0 <= pack < len(packs)
                and type(offset) is int
                and 0 <= offset <= packs[pack].size
                and type(stored) is int
                and 1 <= stored <= size
                and type(codec) is int
                and 0 <= codec <= _CODEC_MAX
            ):
                d = self._digest(d, f"{what}.digest")
                size = self._int(size, f"{what}.size", 1, chunk_size)
                pack = self._int(pack, f"{what}.pack", 0, len(packs) - 1)
                offset = self._int(offset, f"{what}.offset", 0, packs[pack].size)
                stored = self._int(stored, f"{what}.stored_size", 1, size)
                codec = self._int(codec, f"{what}.codec", 0, _CODEC_MAX)
            if d in seen:
                raise ManifestError(f"{what}: duplicate chunk {d.hex()}")
            seen.add(d)
            if pack > next_pack:
                raise ManifestError(f"{what}: pack table is not in first-reference order")
            next_pack = max(next_pack, pack + 1)
            if offset + stored > packs[pack].size:
                raise ManifestError(f"{what}: bytes {offset}+{stored} run past the end of pack {pack}")
            codec_v = codec
            if codec_v == Codec.NONE and stored != size:
                raise ManifestError(f"{what}: an uncompressed chunk must be stored at its raw size")
            out.append(Chunk(d, size, pack, offset, stored, Codec(codec_v)))
        if next_pack != len(packs):
            raise ManifestError("packs: a pack is not referenced by any chunk")
        return out

    def _path(self, v: Any, what: str) -> bytes:
        L = self.limits
        p = self._bytes(v, what, L.max_path)
        if p == b"":
            return p
        # Fast path for the common case: no NUL, no empty/'.'/'..' component, short enough that
        # no component can be over the name limit.  Anything else gets the component walk below.
        q = b"/" + p + b"/"
        if (
            len(p) <= L.max_name
            and b"\0" not in p
            and b"//" not in q
            and b"/./" not in q
            and b"/../" not in q
        ):
            return p
        for comp in p.split(b"/"):
            if comp in (b"", b".", b".."):
                raise ManifestError(f"{what}: {p!r} has an empty, '.' or '..' component (escapes the root)")
            if b"\0" in comp:
                raise ManifestError(f"{what}: {p!r} contains a NUL byte")
            if len(comp) > L.max_name:
                raise ManifestError(f"{what}: a component of {p!r} is longer than {L.max_name} bytes")
        return p

    def _entries(self, v: Any, chunks: list[Chunk], chunk_size: int) -> list[Entry]:
        L = self.limits
        items = self._list(v, "entries")
        if not items:
            raise ManifestError("entries: the tree has no root")
        if len(items) > L.max_entries:
            raise ManifestError(f"entries: {len(items)} entries, over the limit of {L.max_entries}")
        out: list[Entry] = []
        types: dict[bytes, EntryType] = {}
        prev_key: list[bytes] | None = None
        next_chunk = 0  # chunk table must be in first-reference order
        for i, e in enumerate(items):
            what = f"entries[{i}]"
            fields = self._list(e, what, 11)
            (path, etype, mode, uid, gid, mtime, size, target, rdev, xattrs, echunks) = fields
            path = self._path(path, f"{what}.path")
            what = f"entry {path!r}"
            etype_v = self._int(etype, f"{what}: type", _ETYPE_MIN, _ETYPE_MAX)
            et = _ETYPES[etype_v]
            if i == 0 and (path != b"" or et is not EntryType.DIR):
                raise ManifestError("entries: the first entry must be the root directory")
            key = tree_key(path)
            if prev_key is not None and not prev_key < key:
                raise ManifestError(f"{what}: entries are not sorted in tree order or a path repeats")
            prev_key = key
            if i > 0:
                parent = path.rsplit(b"/", 1)[0] if b"/" in path else b""
                if types.get(parent) is not EntryType.DIR:
                    raise ManifestError(f"{what}: its parent is not a directory in the manifest")
            types[path] = et
            # The common case is checked in one expression; only a bad entry pays for the
            # per-field checks that name what is wrong (a 30k-entry image manifest decoded in
            # 2.6 s with per-field messages built for every field, most of it f-strings).
            if not (
                type(mode) is int
                and 0 <= mode <= 0o7777
                and type(uid) is int
                and 0 <= uid <= L.max_id
                and type(gid) is int
                and 0 <= gid <= L.max_id
                and type(mtime) is int
                and L.mtime_range[0] <= mtime <= L.mtime_range[1]
                and type(size) is int
                and 0 <= size <= L.max_file_size
                and type(target) is bytes
                and len(target) <= L.max_path
                and type(rdev) is int
                and 0 <= rdev <= L.max_rdev
            ):
                mode = self._int(mode, f"{what}: mode", 0, 0o7777)
                uid = self._int(uid, f"{what}: uid", 0, L.max_id)
                gid = self._int(gid, f"{what}: gid", 0, L.max_id)
                mtime = self._int(mtime, f"{what}: mtime", *L.mtime_range)
                size = self._int(size, f"{what}: size", 0, L.max_file_size)
                target = self._bytes(target, f"{what}: target", L.max_path)
                rdev = self._int(rdev, f"{what}: rdev", 0, L.max_rdev)
            xa = self._xattrs(xattrs, what)
            indices = self._list(echunks, what)
            last = len(chunks) - 1
            if all(type(c) is int and 0 <= c <= last for c in indices):
                idx = indices
            else:
                idx = [self._int(c, f"{what}: chunk index", 0, last) for c in indices]
            for c in idx:
                if c > next_chunk:
                    raise ManifestError(f"{what}: chunk table is not in first-reference order")
                next_chunk = max(next_chunk, c + 1)
            self._check_kind(what, et, size, target, rdev, xa, idx, chunks, chunk_size)
            out.append(Entry(path, et, mode, uid, gid, mtime, size, target, rdev, xa, tuple(idx)))
        if next_chunk != len(chunks):
            raise ManifestError("chunks: a chunk is not referenced by any file")
        for e in out:
            if e.type is EntryType.HARDLINK:
                t = types.get(e.target)
                if t is None:
                    raise ManifestError(f"entry {e.path!r}: hardlink to missing {e.target!r}")
                if t in (EntryType.DIR, EntryType.HARDLINK):
                    raise ManifestError(f"entry {e.path!r}: hardlink to a {t.name.lower()} {e.target!r}")
        return out

    def _xattrs(self, v: Any, what: str) -> tuple[tuple[bytes, bytes], ...]:
        L = self.limits
        items = self._list(v, f"{what}: xattrs")
        if len(items) > L.max_xattrs:
            raise ManifestError(f"{what}: more than {L.max_xattrs} xattrs")
        out = []
        for kv in items:
            k, val = self._list(kv, f"{what}: xattr", 2)
            k = self._bytes(k, f"{what}: xattr name", L.max_xattr_name)
            if not k or b"\0" in k:
                raise ManifestError(f"{what}: empty xattr name or NUL in it")
            out.append((k, self._bytes(val, f"{what}: xattr value", L.max_xattr_value)))
        keys = [k for k, _ in out]
        if keys != sorted(set(keys)):
            raise ManifestError(f"{what}: xattr names must be unique and sorted")
        return tuple(out)

    @staticmethod
    def _check_kind(
        what: str,
        et: EntryType,
        size: int,
        target: bytes,
        rdev: int,
        xattrs: tuple[tuple[bytes, bytes], ...],
        idx: list[int],
        chunks: list[Chunk],
        chunk_size: int,
    ) -> None:
        if et is not EntryType.REG and idx:
            raise ManifestError(f"{what}: only regular files have chunks")
        if et not in (EntryType.CHR, EntryType.BLK) and rdev:
            raise ManifestError(f"{what}: only device nodes have a device number")
        if et in (EntryType.SYMLINK, EntryType.HARDLINK):
            if not target or b"\0" in target:
                raise ManifestError(f"{what}: a link needs a non-empty target without NUL")
        elif target:
            raise ManifestError(f"{what}: only links have a target")
        if et is EntryType.SYMLINK and size != len(target):
            raise ManifestError(f"{what}: a symlink's size must be its target's length")
        if et is EntryType.HARDLINK and (size or xattrs):
            raise ManifestError(f"{what}: a hardlink carries no size or xattrs of its own")
        if et not in (EntryType.REG, EntryType.SYMLINK) and size:
            raise ManifestError(f"{what}: only files and symlinks have a size")
        if et is EntryType.REG:
            total = 0
            for n, c in enumerate(idx):
                csize = chunks[c].size
                if n < len(idx) - 1 and csize != chunk_size:
                    rule = f"all but the last must be {chunk_size}"
                    raise ManifestError(f"{what}: chunk {n} is {csize} bytes; {rule}")
                total += csize
            if total != size:
                raise ManifestError(f"{what}: chunks cover {total} bytes but the file is {size}")
