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
    # The validator accepted only arrays, ints, bytes and str, each where encode() puts the same
    # value, so packing the decoded object gives encode()'s bytes -- in C, 5x faster than _pack(m).
    if msgpack.packb(obj, use_bin_type=True) != data:
        raise ManifestError(_NOT_CANONICAL)
    return m


_ETYPE_MIN, _ETYPE_MAX = min(EntryType), max(EntryType)
_ETYPES = {int(t): t for t in EntryType}
_ETYPE_LIST = tuple(EntryType(i) if i in _ETYPES else EntryType.DIR for i in range(_ETYPE_MAX + 1))  # [0] unused
_CODEC_MAX = max(Codec)
_CODECS = tuple(Codec(i) for i in range(_CODEC_MAX + 1))


def _order_key(path: bytes) -> bytes:
    """A bytes key that sorts NUL-free paths exactly like :func:`tree_key` (component-wise).

    With every ``/`` turned into NUL, the first byte where two paths differ is either a byte of
    two differing names (compared as ``tree_key`` compares them) or the end of a name in one
    path against a longer name in the other (NUL, or the path's end, sorts first: the shorter
    name first, as in ``tree_key``).  Bytes compare in C, without a list per path.
    """
    return path.replace(b"/", b"\0")


class _EntryState:
    """What checking an entry needs from those before it."""

    __slots__ = ("next_chunk", "prev_key", "types")

    def __init__(self) -> None:
        self.types: dict[bytes, EntryType] = {}
        self.prev_key = b""  # _order_key of the previous entry
        self.next_chunk = 0  # the chunk table must be in first-reference order


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
        out: list[Chunk] = []
        append = out.append
        seen: set[bytes] = set()
        add = seen.add
        pack_sizes = [p.size for p in packs]
        npacks = len(packs)
        codecs = _CODECS
        next_pack = 0  # packs must appear in first-reference order
        for i, c in enumerate(items):
            # The common case is checked in one expression, without building a message; anything
            # it does not accept goes through _chunk(), the per-rule checks that name the problem.
            if type(c) is list and len(c) == 6:
                d, size, pack, offset, stored, codec = c
                if (
                    type(d) is bytes
                    and len(d) == DIGEST_SIZE
                    and d not in seen
                    and type(size) is int
                    and 1 <= size <= chunk_size
                    and type(pack) is int
                    and 0 <= pack <= next_pack
                    and pack < npacks
                    and type(offset) is int
                    and type(stored) is int
                    and 1 <= stored <= size
                    and offset >= 0
                    and offset + stored <= pack_sizes[pack]
                    and type(codec) is int
                    and 0 <= codec <= _CODEC_MAX
                    and (codec != Codec.NONE or stored == size)
                ):
                    add(d)
                    if pack == next_pack:
                        next_pack += 1
                    append(Chunk(d, size, pack, offset, stored, codecs[codec]))
                    continue
            chunk = self._chunk(i, c, packs, chunk_size, seen, next_pack)
            add(chunk.digest)
            next_pack = max(next_pack, chunk.pack + 1)
            append(chunk)
        if next_pack != len(packs):
            raise ManifestError("packs: a pack is not referenced by any chunk")
        return out

    def _chunk(self, i: int, c: Any, packs: list[Pack], chunk_size: int, seen: set[bytes], next_pack: int) -> Chunk:
        """One chunk, every rule checked in turn: raises the first problem (or returns the chunk)."""
        what = f"chunks[{i}]"
        d, size, pack, offset, stored, codec = self._list(c, what, 6)
        d = self._digest(d, f"{what}.digest")
        size = self._int(size, f"{what}.size", 1, chunk_size)
        pack = self._int(pack, f"{what}.pack", 0, len(packs) - 1)
        offset = self._int(offset, f"{what}.offset", 0, packs[pack].size)
        stored = self._int(stored, f"{what}.stored_size", 1, size)
        codec = self._int(codec, f"{what}.codec", 0, _CODEC_MAX)
        if d in seen:
            raise ManifestError(f"{what}: duplicate chunk {d.hex()}")
        if pack > next_pack:
            raise ManifestError(f"{what}: pack table is not in first-reference order")
        if offset + stored > packs[pack].size:
            raise ManifestError(f"{what}: bytes {offset}+{stored} run past the end of pack {pack}")
        if codec == Codec.NONE and stored != size:
            raise ManifestError(f"{what}: an uncompressed chunk must be stored at its raw size")
        return Chunk(d, size, pack, offset, stored, _CODECS[codec])

    def _path(self, v: Any, what: str) -> bytes:
        L = self.limits
        p = self._bytes(v, what, L.max_path)
        if p == b"":
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
        append = out.append
        st = _EntryState()
        types = st.types
        chunk_sizes = [c.size for c in chunks]
        last = len(chunks) - 1
        # A path this short cannot have a component over the name limit (nor be over the path limit).
        short = min(L.max_name, L.max_path)
        max_id, max_path, max_size, max_rdev = L.max_id, L.max_path, L.max_file_size, L.max_rdev
        mtime_lo, mtime_hi = L.mtime_range
        DIR, REG, SYMLINK, HARDLINK = EntryType.DIR, EntryType.REG, EntryType.SYMLINK, EntryType.HARDLINK
        etypes = _ETYPE_LIST
        for i, e in enumerate(items):
            # The common case -- a well-formed entry -- is checked in a few
            # expressions and no message is built; anything else goes through _entry(), which
            # checks rule by rule and names the first problem.  (A 30k-entry image manifest
            # decoded in 2.6 s with per-field messages built for every field, 1.3 s with a
            # fast path that still formatted a few per entry, ~0.4 s like this.)
            if i and type(e) is list and len(e) == 11:
                path, etype, mode, uid, gid, mtime, size, target, rdev, xattrs, echunks = e
                if type(path) is not bytes or not 0 < len(path) <= short:
                    append(self._entry(i, e, st, chunks, chunk_size))
                    continue
                q = b"/" + path + b"/"
                key = path.replace(b"/", b"\0")
                j = path.rfind(b"/")
                parent = path[:j] if j >= 0 else b""
                if (
                    b"\0" not in path
                    and b"//" not in q
                    and b"/./" not in q
                    and b"/../" not in q
                    and key > st.prev_key
                    and types.get(parent) is DIR
                    and type(etype) is int
                    and 1 <= etype <= _ETYPE_MAX
                    and type(mode) is int
                    and 0 <= mode <= 0o7777
                    and type(uid) is int
                    and 0 <= uid <= max_id
                    and type(gid) is int
                    and 0 <= gid <= max_id
                    and type(mtime) is int
                    and mtime_lo <= mtime <= mtime_hi
                    and type(size) is int
                    and 0 <= size <= max_size
                    and type(target) is bytes
                    and len(target) <= max_path
                    and type(rdev) is int
                    and 0 <= rdev <= max_rdev
                    and type(xattrs) is list
                    and type(echunks) is list
                ):
                    et = etypes[etype]
                    # Everything _entry() checks before the xattrs has passed: the same first error.
                    xa = self._xattrs(xattrs, f"entry {path!r}") if xattrs else ()
                    next_chunk = st.next_chunk
                    if et is REG:
                        ok = not target and not rdev
                        if ok and echunks:
                            for c in echunks:
                                if type(c) is int and 0 <= c <= next_chunk and c <= last:
                                    if c == next_chunk:
                                        next_chunk += 1
                                else:
                                    ok = False
                                    break
                            if ok:
                                ok = (len(echunks) - 1) * chunk_size + chunk_sizes[echunks[-1]] == size
                                if ok and len(echunks) > 1:
                                    ok = all(chunk_sizes[c] == chunk_size for c in echunks[:-1])
                        elif ok:
                            ok = not size
                    elif et is SYMLINK:
                        ok = not echunks and not rdev and size == len(target) > 0 and b"\0" not in target
                    elif et is HARDLINK:
                        ok = not echunks and not rdev and not size and not xa and target != b"" and b"\0" not in target
                    elif et is EntryType.CHR or et is EntryType.BLK:
                        ok = not echunks and not size and not target
                    else:  # DIR, FIFO, SOCK
                        ok = not echunks and not size and not target and not rdev
                    if ok:
                        types[path] = et
                        st.prev_key = key
                        st.next_chunk = next_chunk
                        append(Entry(path, et, mode, uid, gid, mtime, size, target, rdev, xa, tuple(echunks)))
                        continue
            append(self._entry(i, e, st, chunks, chunk_size))
        if st.next_chunk != len(chunks):
            raise ManifestError("chunks: a chunk is not referenced by any file")
        for e in out:
            if e.type is HARDLINK:
                t = types.get(e.target)
                if t is None:
                    raise ManifestError(f"entry {e.path!r}: hardlink to missing {e.target!r}")
                if t in (EntryType.DIR, EntryType.HARDLINK):
                    raise ManifestError(f"entry {e.path!r}: hardlink to a {t.name.lower()} {e.target!r}")
        return out

    def _entry(self, i: int, e: Any, st: _EntryState, chunks: list[Chunk], chunk_size: int) -> Entry:
        """One entry, every rule checked in turn: raises the first problem (or returns the entry)."""
        L = self.limits
        what = f"entries[{i}]"
        fields = self._list(e, what, 11)
        (path, etype, mode, uid, gid, mtime, size, target, rdev, xattrs, echunks) = fields
        path = self._path(path, f"{what}.path")
        what = f"entry {path!r}"
        etype_v = self._int(etype, f"{what}: type", _ETYPE_MIN, _ETYPE_MAX)
        et = _ETYPES[etype_v]
        if i == 0 and (path != b"" or et is not EntryType.DIR):
            raise ManifestError("entries: the first entry must be the root directory")
        key = _order_key(path)
        if i > 0 and not st.prev_key < key:
            raise ManifestError(f"{what}: entries are not sorted in tree order or a path repeats")
        st.prev_key = key
        if i > 0:
            parent = path.rsplit(b"/", 1)[0] if b"/" in path else b""
            if st.types.get(parent) is not EntryType.DIR:
                raise ManifestError(f"{what}: its parent is not a directory in the manifest")
        st.types[path] = et
        mode = self._int(mode, f"{what}: mode", 0, 0o7777)
        uid = self._int(uid, f"{what}: uid", 0, L.max_id)
        gid = self._int(gid, f"{what}: gid", 0, L.max_id)
        mtime = self._int(mtime, f"{what}: mtime", *L.mtime_range)
        size = self._int(size, f"{what}: size", 0, L.max_file_size)
        target = self._bytes(target, f"{what}: target", L.max_path)
        rdev = self._int(rdev, f"{what}: rdev", 0, L.max_rdev)
        xa = self._xattrs(xattrs, what)
        indices = self._list(echunks, what)
        idx = [self._int(c, f"{what}: chunk index", 0, len(chunks) - 1) for c in indices]
        for c in idx:
            if c > st.next_chunk:
                raise ManifestError(f"{what}: chunk table is not in first-reference order")
            st.next_chunk = max(st.next_chunk, c + 1)
        self._check_kind(what, et, size, target, rdev, xa, idx, chunks, chunk_size)
        return Entry(path, et, mode, uid, gid, mtime, size, target, rdev, xa, tuple(idx))

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
