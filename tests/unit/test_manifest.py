"""The manifest format: canonical encoding, hostile-input decoding, the builder.

Three layers of tests:

* properties (hypothesis): random valid trees built through :class:`ManifestBuilder`
  round-trip exactly, encode deterministically and independently of insertion order;
* fuzzing: random bytes, truncations, byte mutations and structurally valid msgpack
  holding wrong objects either raise :class:`ManifestError` or decode to a manifest
  that re-encodes to the very same bytes;
* one explicit test per validation rule, each checking the error message.

Raw wire objects are edited through the field positions below (see the codec's
docstring for the layout), then packed with msgpack exactly as the encoder does.
"""

from __future__ import annotations

import copy
import itertools
import re
import time
from dataclasses import dataclass, replace
from typing import Any

import blake3
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazyfs.errors import LazyfsError, ManifestError
from lazyfs.manifest import (
    DIGEST_SIZE,
    FORMAT_VERSION,
    LIMITS,
    Chunk,
    ChunkLocation,
    Codec,
    Entry,
    EntryType,
    Limits,
    Manifest,
    ManifestBuilder,
    Pack,
    decode,
    digest_of,
    encode,
    tree_key,
)
from lazyfs.manifest.codec import MAGIC

# Field positions in the wire format.
M_MAGIC, M_VERSION, M_CHUNK_SIZE, M_ANNOTATIONS, M_PACKS, M_CHUNKS, M_ENTRIES = range(7)
P_DIGEST, P_SIZE = range(2)
C_DIGEST, C_SIZE, C_PACK, C_OFFSET, C_STORED, C_CODEC = range(6)
E_PATH, E_TYPE, E_MODE, E_UID, E_GID, E_MTIME, E_SIZE, E_TARGET, E_RDEV, E_XATTRS, E_CHUNKS = range(11)

CS = LIMITS.min_chunk_size  # small numbers keep the explicit cases readable
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def dg(label: str) -> bytes:
    """A deterministic 32-byte digest for a label."""
    return blake3.blake3(label.encode()).digest()


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


def assert_rejected_or_canonical(data: bytes) -> None:
    """The decoder's contract on hostile input: ManifestError, or exact re-encoding."""
    try:
        m = decode(data)
    except ManifestError:
        return
    assert encode(m) == data


# --- a small hand-made manifest that exercises every entry type -------------------------------

P0, P1 = Pack(dg("p0"), CS + 100), Pack(dg("p1"), 50)
C_FULL, C_TAIL, C_Z = dg("full"), dg("tail"), dg("zstd")


def base_builder() -> ManifestBuilder:
    b = ManifestBuilder(CS)
    b.locate(C_FULL, ChunkLocation(P0, 0, CS, Codec.NONE, CS))
    b.locate(C_TAIL, ChunkLocation(P0, CS, 100, Codec.NONE, 100))
    b.locate(C_Z, ChunkLocation(P1, 0, 50, Codec.ZSTD, 3000))

    def add(path: bytes, t: EntryType, digests: tuple[bytes, ...] = (), **kw: Any) -> None:
        b.add(Entry(path, t, kw.pop("mode", 0o644), 1000, 1000, 1_700_000_000_000_000_000, **kw), digests)

    add(b"", EntryType.DIR, mode=0o755)
    add(b"dev", EntryType.CHR, rdev=(1 << 8) | 3)
    add(b"dir", EntryType.DIR, mode=0o1777, xattrs=((b"user.a", b"1"), (b"user.b", b"\x00\xff")))
    add(b"dir/file", EntryType.REG, (C_FULL, C_TAIL), size=CS + 100, mode=0o4755)
    add(b"dir/link", EntryType.SYMLINK, size=4, target=b"file", mode=0o777)
    add(b"empty", EntryType.REG, size=0)
    add(b"fifo", EntryType.FIFO)
    add(b"hl", EntryType.HARDLINK, target=b"dir/file")
    add(b"small", EntryType.REG, (C_Z,), size=3000)
    add(b"sock", EntryType.SOCK)
    return b


def base_manifest() -> Manifest:
    return base_builder().build({"a": "1", "b": "2"})


def base_obj() -> Any:
    return unpack(encode(base_manifest()))


def ent(obj: Any, path: bytes) -> list[Any]:
    """The mutable wire entry at *path*."""
    for e in obj[M_ENTRIES]:
        if e[E_PATH] == path:
            assert isinstance(e, list)
            return e
    raise KeyError(path)


def wire_entry(path: bytes, t: EntryType, *, size: int = 0, target: bytes = b"") -> list[Any]:
    return [path, int(t), 0o644, 0, 0, 0, size, target, 0, [], []]


def insert_sorted(obj: Any, e: list[Any]) -> None:
    obj[M_ENTRIES].append(e)
    obj[M_ENTRIES].sort(key=lambda x: tree_key(x[E_PATH]))


def rejects(data: Any, match: str, limits: Limits = LIMITS) -> ManifestError:
    """decode() must raise ManifestError whose message matches *match* (a regex)."""
    if not isinstance(data, bytes):
        data = pack(data)
    with pytest.raises(ManifestError, match=match) as info:
        decode(data, limits)
    return info.value


def test_base_manifest_layout() -> None:
    m = base_manifest()
    data = encode(m)
    assert pack(base_obj()) == data  # mutations below start from canonical bytes
    assert decode(data) == m
    assert [e.path for e in m.entries] == [
        b"",
        b"dev",
        b"dir",
        b"dir/file",
        b"dir/link",
        b"empty",
        b"fifo",
        b"hl",
        b"small",
        b"sock",
    ]
    assert [c.digest for c in m.chunks] == [C_FULL, C_TAIL, C_Z]
    assert m.packs == (P0, P1)
    assert m.chunks[2] == Chunk(C_Z, 3000, 1, 0, 50, Codec.ZSTD)


def test_golden_bytes_pin_format_1() -> None:
    """The smallest manifest, byte for byte: a change here is a format change (bump FORMAT_VERSION)."""
    m = Manifest(CS, (Entry(b"", EntryType.DIR, 0o755, 0, 0, 0),), (), ())
    data = encode(m)
    assert data.hex() == ("97c40f6c617a7966732d6d616e696665737401cd1000909090919bc40001cd01ed00000000c400009090")
    assert digest_of(data) == blake3.blake3(data).hexdigest()
    assert len(bytes.fromhex(digest_of(data))) == DIGEST_SIZE
    assert FORMAT_VERSION == 1


# --- property tests ------------------------------------------------------------------------------

NAME_BYTES = [b for b in range(1, 256) if b != ord("/")]
NAMES = st.one_of(
    st.sampled_from(
        [
            b"a",
            b"with space",
            b"new\nline",
            b"\xff\xfe\x80",
            b".hidden",
            b"...",
            b"a-b",
            b"x" * 255,
            "ünïcødé".encode(),
            b"\\",
            b"-rf",
            b"a b\tc\r",
        ]
    ),
    st.lists(st.sampled_from(NAME_BYTES), min_size=1, max_size=8).map(bytes),
)
XATTR_NAMES = st.one_of(
    st.sampled_from([b"user.a", b"security.capability", b"trusted.x", b"user.\xff"]),
    st.lists(st.sampled_from(range(1, 256)), min_size=1, max_size=12).map(bytes),
)
MODES = st.one_of(st.sampled_from([0, 0o4755, 0o2755, 0o1777, 0o7777, 0o6711]), st.integers(0, 0o7777))
IDS = st.one_of(st.sampled_from([0, 65534, 2**32 - 1]), st.integers(0, 2**32 - 1))
MTIMES = st.one_of(st.sampled_from([0, -1, -(2**63), 2**63 - 1]), st.integers(-(2**63), 2**63 - 1))
TARGETS = st.one_of(
    st.sampled_from([b"..", b"/etc/passwd", b"../../x", b"a" * 4096, b"with space/\n"]),
    st.lists(st.sampled_from(range(1, 256)), min_size=1, max_size=40).map(bytes),
)
FILE_TYPES = [EntryType.REG] * 4 + [
    EntryType.SYMLINK,
    EntryType.SYMLINK,
    EntryType.CHR,
    EntryType.BLK,
    EntryType.FIFO,
    EntryType.SOCK,
]


@dataclass
class Tree:
    """A random valid tree, as a seeder would feed it to the builder."""

    chunk_size: int
    items: list[tuple[Entry, tuple[bytes, ...]]]  # in generation order (parents first)
    locations: list[tuple[bytes, ChunkLocation]]
    annotations: dict[str, str]

    def build(self, order: list[int] | None = None, loc_order: list[int] | None = None) -> Manifest:
        b = ManifestBuilder(self.chunk_size)
        for i in loc_order if loc_order is not None else range(len(self.locations)):
            b.locate(*self.locations[i])
        for i in order if order is not None else range(len(self.items)):
            b.add(*self.items[i])
        return b.build(dict(self.annotations))


@st.composite
def trees(draw: st.DrawFn, max_dirs: int = 5, max_leaves: int = 12) -> Tree:
    chunk_size = draw(
        st.one_of(st.sampled_from([CS, 4 << 20, LIMITS.max_chunk_size]), st.integers(CS, LIMITS.max_chunk_size))
    )
    used: set[bytes] = {b""}
    uniq = itertools.count()

    def fresh(parent: bytes) -> bytes:
        name = draw(NAMES)
        if name in (b".", b".."):
            name += b"_"
        path = parent + b"/" + name if parent else name
        while path in used:
            name = name[:200] + b"~" + str(next(uniq)).encode()
            path = parent + b"/" + name if parent else name
        used.add(path)
        return path

    def entry(path: bytes, t: EntryType, **kw: Any) -> Entry:
        xattrs: tuple[tuple[bytes, bytes], ...] = ()
        if t is not EntryType.HARDLINK:
            xd = draw(st.dictionaries(XATTR_NAMES, st.binary(max_size=24), max_size=3))
            xattrs = tuple(draw(st.permutations(list(xd.items()))))  # any order: the builder sorts
        return Entry(path, t, draw(MODES), draw(IDS), draw(IDS), draw(MTIMES), xattrs=xattrs, **kw)

    pool: dict[int, list[bytes]] = {}  # raw size -> digests: reuse one to deduplicate
    new_digests: list[tuple[bytes, int]] = []

    def chunk_digest(size: int) -> bytes:
        same_size = pool.setdefault(size, [])
        if len(same_size) > 0 and draw(st.booleans()):
            return draw(st.sampled_from(same_size))
        d = dg(f"chunk {size} {len(new_digests)}")
        same_size.append(d)
        new_digests.append((d, size))
        return d

    items: list[tuple[Entry, tuple[bytes, ...]]] = [(entry(b"", EntryType.DIR), ())]
    dirs = [b""]
    for _ in range(draw(st.integers(0, max_dirs))):
        path = fresh(draw(st.sampled_from(dirs)))
        dirs.append(path)
        items.append((entry(path, EntryType.DIR), ()))
    linkable: list[bytes] = []
    for _ in range(draw(st.integers(0, max_leaves))):
        path = fresh(draw(st.sampled_from(dirs)))
        t = draw(st.sampled_from(FILE_TYPES))
        linkable.append(path)
        if t is EntryType.REG:
            full = draw(st.integers(0, 3))
            tail = draw(st.one_of(st.sampled_from([0, 1, chunk_size - 1]), st.integers(0, chunk_size - 1)))
            sizes = [chunk_size] * full + ([tail] if tail else [])
            digests = tuple(chunk_digest(s) for s in sizes)
            items.append((entry(path, t, size=sum(sizes)), digests))
        elif t is EntryType.SYMLINK:
            target = draw(TARGETS)
            items.append((entry(path, t, size=len(target), target=target), ()))
        elif t in (EntryType.CHR, EntryType.BLK):
            rdev = draw(st.one_of(st.sampled_from([0, (8 << 8) | 1, 2**64 - 1]), st.integers(0, 2**64 - 1)))
            items.append((entry(path, t, rdev=rdev), ()))
        else:
            items.append((entry(path, t), ()))
    if linkable:
        for _ in range(draw(st.integers(0, 3))):
            path = fresh(draw(st.sampled_from(dirs)))
            items.append((entry(path, EntryType.HARDLINK, target=draw(st.sampled_from(linkable))), ()))

    # Spread the stored chunks over several packs, with gaps (bytes of other manifests) between them.
    if draw(st.booleans()):
        new_digests.append((dg("located but unused"), 7))  # must not leak into the manifest
    n_packs = draw(st.integers(1, 4))
    ends = [0] * n_packs
    placed: list[tuple[bytes, int, int, int, int, Codec]] = []
    for d, size in new_digests:
        p = draw(st.integers(0, n_packs - 1))
        codec = draw(st.sampled_from(Codec))
        stored = size if codec is Codec.NONE else draw(st.integers(1, size))
        offset = ends[p] + draw(st.integers(0, 2))
        ends[p] = offset + stored
        placed.append((d, size, p, offset, stored, codec))
    packs = [Pack(dg(f"pack {i}"), max(1, end + draw(st.integers(0, 2)))) for i, end in enumerate(ends)]
    locations = [
        (d, ChunkLocation(packs[p], offset, stored, codec, size)) for d, size, p, offset, stored, codec in placed
    ]
    annotations = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=3))
    return Tree(chunk_size, items, locations, annotations)


def check_semantics(tree: Tree, m: Manifest) -> None:
    """The manifest says what the tree said."""
    assert m.entries[0].path == b""
    keys = [tree_key(e.path) for e in m.entries]
    assert keys == sorted(keys)
    assert len(m.entries) == len(tree.items)
    locations = dict(tree.locations)
    referenced: list[bytes] = []
    for given_entry, digests in sorted(tree.items, key=lambda item: tree_key(item[0].path)):
        e = m.entry(given_entry.path)
        assert e is not None
        assert e == replace(given_entry, xattrs=tuple(sorted(given_entry.xattrs)), chunks=e.chunks)
        if e.type is EntryType.HARDLINK:
            target = m.resolve(e)
            assert target.path == e.target and target.type not in (EntryType.DIR, EntryType.HARDLINK)
        if e.type is not EntryType.REG:
            assert e.chunks == ()
            continue
        chunks = m.file_chunks(e)
        assert [c.digest for c in chunks] == list(digests)
        assert sum(c.size for c in chunks) == e.size
        for c in chunks:
            loc = locations[c.digest]
            assert (m.packs[c.pack], c.offset, c.stored_size, c.codec, c.size) == (
                loc.pack,
                loc.offset,
                loc.stored_size,
                loc.codec,
                loc.size,
            )
        for d in digests:
            if d not in referenced:
                referenced.append(d)
    assert [c.digest for c in m.chunks] == referenced  # deduplicated, first-reference order
    assert m.total_size == sum(e.size for e, _ in tree.items if e.type is EntryType.REG)
    assert m.stored_size == sum(c.stored_size for c in m.chunks)
    assert dict(m.annotations) == tree.annotations


@PROPERTY
@given(tree=trees(), data=st.data())
def test_roundtrip_deterministic_and_order_independent(tree: Tree, data: st.DataObject) -> None:
    m = tree.build()
    b = encode(m)
    check_semantics(tree, m)
    assert decode(b) == m
    assert encode(m) == b
    assert encode(decode(b)) == b
    assert digest_of(encode(decode(b))) == digest_of(b)

    # The same content added in another order (entries, locations, xattrs) gives the same bytes.
    order = data.draw(st.permutations(range(len(tree.items))))
    loc_order = data.draw(st.permutations(range(len(tree.locations))))
    shuffled = Tree(
        tree.chunk_size,
        [(replace(e, xattrs=tuple(data.draw(st.permutations(e.xattrs)))), d) for e, d in tree.items],
        tree.locations,
        tree.annotations,
    )
    m2 = shuffled.build(order, loc_order)
    assert m2 == m
    assert encode(m2) == b


def test_chunk_shared_within_and_across_files() -> None:
    """A zero-filled file repeats one chunk; a copy of it reuses the same table rows."""
    zero = dg("zeros")
    b = ManifestBuilder(CS)
    b.locate(zero, ChunkLocation(P1, 10, 20, Codec.ZSTD, CS))
    b.add(Entry(b"", EntryType.DIR, 0o755, 0, 0, 0))
    b.add(Entry(b"a", EntryType.REG, 0o644, 0, 0, 0, size=3 * CS), [zero] * 3)
    b.add(Entry(b"b", EntryType.REG, 0o644, 0, 0, 0, size=CS), [zero])
    m = decode(encode(b.build()))
    assert m.chunks == (Chunk(zero, CS, 0, 10, 20, Codec.ZSTD),)
    assert m.packs == (P1,)
    a, bb = m.entry(b"a"), m.entry(b"b")
    assert a is not None and bb is not None
    assert a.chunks == (0, 0, 0) and bb.chunks == (0,)
    assert m.total_size == 4 * CS and m.stored_size == 20


def test_tree_order_is_component_wise_not_bytewise() -> None:
    """b"a-c" < b"a/b" bytewise, but a directory's contents come right after it."""
    b = ManifestBuilder(CS)
    for path, t in [(b"a-c", EntryType.FIFO), (b"a/b", EntryType.FIFO), (b"a", EntryType.DIR), (b"", EntryType.DIR)]:
        b.add(Entry(path, t, 0o755, 0, 0, 0))
    m = b.build()
    assert [e.path for e in m.entries] == [b"", b"a", b"a/b", b"a-c"]
    obj = unpack(encode(m))
    obj[M_ENTRIES].sort(key=lambda e: e[E_PATH])  # bytewise: "", "a", "a-c", "a/b"
    rejects(obj, r"^entry b'a/b': entries are not sorted in tree order or a path repeats$")


def test_boundary_values_are_accepted() -> None:
    """The largest legal name, path, xattrs, ids, times and device number round-trip."""
    comps = [b"d" * 255] * 15 + [b"e" * 200, b"f" * 55]
    deep = b"/".join(comps)
    assert len(deep) == LIMITS.max_path
    b = ManifestBuilder(LIMITS.max_chunk_size)
    b.add(Entry(b"", EntryType.DIR, 0o7777, 2**32 - 1, 2**32 - 1, -(2**63)))
    for i in range(1, len(comps)):
        b.add(Entry(b"/".join(comps[:i]), EntryType.DIR, 0, 0, 0, 2**63 - 1))
    many = tuple((b"user.%03d" % i, b"") for i in range(LIMITS.max_xattrs))
    big = ((b"n" * LIMITS.max_xattr_name, b"v" * LIMITS.max_xattr_value),)
    b.add(Entry(deep, EntryType.BLK, 0o6000, 0, 0, 0, rdev=2**64 - 1, xattrs=many))
    b.add(Entry(b"x" * 255, EntryType.SYMLINK, 0, 0, 0, 0, size=4096, target=b"t" * 4096, xattrs=big))
    m = b.build()
    data = encode(m)
    assert decode(data) == m and encode(decode(data)) == data


# --- fuzzing -------------------------------------------------------------------------------------


def test_every_truncation_of_a_valid_manifest_is_rejected() -> None:
    data = encode(base_manifest())
    for n in range(len(data)):
        with pytest.raises(ManifestError):
            decode(data[:n])


def test_every_single_byte_mutation_is_rejected_or_canonical() -> None:
    data = encode(base_manifest())
    for i in range(len(data)):
        for new in {data[i] ^ 0x01, data[i] ^ 0x80, 0x00, 0xFF, 0xC1, 0x90, 0xDD}:
            if new != data[i]:
                assert_rejected_or_canonical(data[:i] + bytes([new]) + data[i + 1 :])


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes(data: bytes) -> None:
    assert_rejected_or_canonical(data)


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_after_a_valid_header(tail: bytes) -> None:
    assert_rejected_or_canonical(b"\x97" + pack(MAGIC) + b"\x01" + tail)


@FUZZ
@given(tree=trees(max_dirs=3, max_leaves=6), data=st.data())
def test_truncations_and_byte_edits_of_random_manifests(tree: Tree, data: st.DataObject) -> None:
    b = encode(tree.build())
    for n in data.draw(st.lists(st.integers(0, len(b) - 1), min_size=1, max_size=10)):
        with pytest.raises(ManifestError):
            decode(b[:n])
    edits = st.tuples(st.integers(0, len(b) - 1), st.integers(0, 255), st.sampled_from(["set", "insert", "delete"]))
    for i, v, op in data.draw(st.lists(edits, min_size=1, max_size=10)):
        if op == "set":
            mutated = b[:i] + bytes([v]) + b[i + 1 :]
        elif op == "insert":
            mutated = b[:i] + bytes([v]) + b[i:]
        else:
            mutated = b[:i] + b[i + 1 :]
        assert_rejected_or_canonical(mutated)


# Values a wrong manifest might hold: every msgpack type, near-miss integers, maps.
LEAVES: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, 1, -1, 2, 255, 256, 0o7777, 2**32 - 1, 2**32, 2**40, 2**63 - 1, 2**64 - 1, -(2**63)]),
    st.floats(),
    st.binary(max_size=40),
    st.sampled_from([b"", b".", b"..", b"a/../b", b"dir", b"dir/file", b"hl", MAGIC, C_FULL, C_FULL[:31]]),
    st.text(max_size=10),
    st.just({}),
    st.dictionaries(st.text(max_size=3), st.integers(0, 9), min_size=1, max_size=2),
)
OBJECTS: st.SearchStrategy[Any] = st.recursive(LEAVES, lambda kids: st.lists(kids, max_size=12), max_leaves=20)
# What an edit puts in place of a node: cheaper to draw than OBJECTS, and as good at breaking things.
REPLACEMENTS: st.SearchStrategy[Any] = st.one_of(LEAVES, st.lists(LEAVES, max_size=4), st.lists(st.lists(LEAVES)))


def _node_paths(obj: Any, prefix: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    out = [prefix]
    if isinstance(obj, list):
        for i, child in enumerate(obj):
            out += _node_paths(child, (*prefix, i))
    return out


def _mutate(obj: Any, data: st.DataObject) -> Any:
    """One structural edit somewhere in a decoded wire object."""
    obj = copy.deepcopy(obj)
    path = data.draw(st.sampled_from(_node_paths(obj)))
    if not path:
        return data.draw(REPLACEMENTS)
    parent = obj
    for i in path[:-1]:
        parent = parent[i]
    i = path[-1]
    op = data.draw(st.sampled_from(["replace", "replace", "delete", "insert", "duplicate", "swap"]))
    if op == "replace":
        parent[i] = data.draw(REPLACEMENTS)
    elif op == "delete":
        del parent[i]
    elif op == "insert":
        parent.insert(i, data.draw(REPLACEMENTS))
    elif op == "duplicate":
        parent.insert(i, copy.deepcopy(parent[i]))
    else:
        j = data.draw(st.integers(0, len(parent) - 1))
        parent[i], parent[j] = parent[j], parent[i]
    return obj


@FUZZ
@given(tree=trees(max_dirs=3, max_leaves=6), data=st.data())
def test_structural_mutations_of_random_manifests(tree: Tree, data: st.DataObject) -> None:
    obj = unpack(encode(tree.build()))
    for _ in range(5):
        assert_rejected_or_canonical(pack(_mutate(obj, data)))


@FUZZ
@given(data=st.data())
def test_structural_mutations_of_the_base_manifest(data: st.DataObject) -> None:
    obj = base_obj()
    for _ in range(5):
        obj2 = _mutate(obj, data)
        assert_rejected_or_canonical(pack(obj2))
        assert_rejected_or_canonical(pack(_mutate(obj2, data)))  # two edits can cancel out checks


@FUZZ
@given(OBJECTS, st.lists(OBJECTS, min_size=5, max_size=5))
def test_random_objects(obj: Any, fields: list[Any]) -> None:
    assert_rejected_or_canonical(pack(obj))
    assert_rejected_or_canonical(pack([MAGIC, 1, *fields]))


@pytest.mark.parametrize(
    "data",
    [
        b"\x91" * 5000 + b"\x00",  # nesting deeper than msgpack's stack
        b"\x97" + pack(MAGIC) + b"\x01" + b"\x91" * 1020 + b"\x00",
        b"\xdd\xff\xff\xff\xff" * 1000,  # arrays that announce 2^32-1 elements each
        b"\xdd\x00\xf4\x24\x00" * 1000,  # ... or 16 million, within the entry limit
        b"\xc6\xff\xff\xff\xff",  # a 4 GiB bin
        b"\xdb\x7f\xff\xff\xff",  # a 2 GiB str
        b"\x97" + pack(MAGIC) + b"\x01" + b"\xdf\xff\xff\xff\xff",  # a huge map
    ],
    ids=["deep", "deep-after-header", "huge-arrays", "16M-arrays", "huge-bin", "huge-str", "huge-map"],
)
def test_bombs_fail_fast(data: bytes) -> None:
    start = time.monotonic()
    rejects(data, "not valid msgpack")
    assert time.monotonic() - start < 2.0


# --- one test per validation rule ----------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pack(5),
        pack([]),
        pack([MAGIC]),
        pack({}),
        pack([b"lazyfs-manifesx", 1, CS, [], [], [], []]),
        pack(["lazyfs-manifest", 1, CS, [], [], [], []]),  # a str, not bin
        pack([1, MAGIC, CS, [], [], [], []]),
    ],
)
def test_bad_magic(data: bytes) -> None:
    rejects(data, r"^not a lazyfs manifest \(bad magic\)$")


@pytest.mark.parametrize("version", [2, 0, -1, "1", True, 1.0, None, b"\x01", [1]])
def test_unknown_version(version: Any) -> None:
    obj = base_obj()
    obj[M_VERSION] = version
    rejects(obj, rf"^unsupported manifest format {re.escape(repr(version))} \(this lazyfs reads format 1\)$")


def test_version_is_checked_before_the_layout() -> None:
    """A future format may change the layout: say 'unsupported format', not 'wrong field count'."""
    rejects([MAGIC, 2, "anything"], r"unsupported manifest format 2")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ("manifest-6", r"^manifest: expected 7 fields, found 6$"),
        ("manifest-8", r"^manifest: expected 7 fields, found 8$"),
        ("pack-3", r"^packs\[0\]: expected 2 fields, found 3$"),
        ("chunk-5", r"^chunks\[1\]: expected 6 fields, found 5$"),
        ("chunk-7", r"^chunks\[1\]: expected 6 fields, found 7$"),
        ("entry-10", r"^entries\[3\]: expected 11 fields, found 10$"),
        ("entry-12", r"^entries\[3\]: expected 11 fields, found 12$"),
        ("xattr-1", r"^entry b'dir': xattr: expected 2 fields, found 1$"),
        ("xattr-3", r"^entry b'dir': xattr: expected 2 fields, found 3$"),
        ("annotation-3", r"^annotations\[0\]: expected 2 fields, found 3$"),
        ("entries-not-array", r"^entries: expected an array$"),
        ("chunk-not-array", r"^chunks\[0\]: expected an array$"),
        ("chunk-indices-not-array", r"^entry b'dir/file': expected an array$"),
    ],
)
def test_wrong_field_counts_and_shapes(edit: str, match: str) -> None:
    obj = base_obj()
    if edit == "manifest-6":
        obj.pop()
    elif edit == "manifest-8":
        obj.append([])
    elif edit == "pack-3":
        obj[M_PACKS][0].append(0)
    elif edit == "chunk-5":
        obj[M_CHUNKS][1].pop()
    elif edit == "chunk-7":
        obj[M_CHUNKS][1].append(0)
    elif edit == "entry-10":
        obj[M_ENTRIES][3].pop()
    elif edit == "entry-12":
        obj[M_ENTRIES][3].append([])
    elif edit == "xattr-1":
        ent(obj, b"dir")[E_XATTRS][0].pop()
    elif edit == "xattr-3":
        ent(obj, b"dir")[E_XATTRS][0].append(b"")
    elif edit == "annotation-3":
        obj[M_ANNOTATIONS][0].append("x")
    elif edit == "entries-not-array":
        obj[M_ENTRIES] = b"entries"
    elif edit == "chunk-not-array":
        obj[M_CHUNKS][0] = 7
    else:
        ent(obj, b"dir/file")[E_CHUNKS] = 0
    rejects(obj, match)


@pytest.mark.parametrize(
    ("where", "value", "what"),
    [
        ("chunk_size", True, "chunk_size"),
        ("uid", True, r"entry b'dir/file': uid"),
        ("gid", False, r"entry b'dir/file': gid"),
        ("mode", True, r"entry b'dir/file': mode"),
        ("size", False, r"entry b'empty': size"),
        ("type", True, r"entry b'dir/file': type"),
        ("pack.size", True, r"packs\[1\].size"),
        ("chunk.codec", False, r"chunks\[0\].codec"),
        ("chunk.pack", False, r"chunks\[0\].pack"),
        ("chunk index", False, r"entry b'dir/file': chunk index"),
        ("mtime", 1.5, r"entry b'dir/file': mtime"),
        ("uid", None, r"entry b'dir/file': uid"),
        ("uid", "0", r"entry b'dir/file': uid"),
    ],
)
def test_bools_and_other_non_integers(where: str, value: Any, what: str) -> None:
    obj = base_obj()
    f, e, empty = obj[M_CHUNKS][0], ent(obj, b"dir/file"), ent(obj, b"empty")
    if where == "chunk_size":
        obj[M_CHUNK_SIZE] = value
    elif where in ("uid", "gid", "mode", "type", "mtime"):
        e[{"uid": E_UID, "gid": E_GID, "mode": E_MODE, "type": E_TYPE, "mtime": E_MTIME}[where]] = value
    elif where == "size":
        empty[E_SIZE] = value
    elif where == "pack.size":
        obj[M_PACKS][1][P_SIZE] = value
    elif where == "chunk.codec":
        f[C_CODEC] = value
    elif where == "chunk.pack":
        f[C_PACK] = value
    else:
        e[E_CHUNKS][0] = value
    rejects(obj, rf"^{what}: expected an integer$")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        (E_MODE, -1, r"mode: -1 is outside \[0, 4095\]"),
        (E_MODE, 0o10000, r"mode: 4096 is outside \[0, 4095\]"),
        (E_UID, -1, r"uid: -1 is outside \[0, 4294967295\]"),
        (E_UID, 2**32, r"uid: 4294967296 is outside \[0, 4294967295\]"),
        (E_GID, 2**32, r"gid: 4294967296 is outside \[0, 4294967295\]"),
        (E_GID, 2**64 - 1, r"gid: 18446744073709551615 is outside \[0, 4294967295\]"),
        (E_MTIME, 2**63, r"mtime: 9223372036854775808 is outside \[-9223372036854775808, 9223372036854775807\]"),
        (E_SIZE, -1, r"size: -1 is outside \[0, 1125899906842624\]"),
        (E_SIZE, 2**50 + 1, r"size: 1125899906842625 is outside \[0, 1125899906842624\]"),
        (E_TYPE, 0, r"type: 0 is outside \[1, 8\]"),
        (E_TYPE, 9, r"type: 9 is outside \[1, 8\]"),
        (E_RDEV, -1, r"rdev: -1 is outside \[0, 18446744073709551615\]"),
    ],
)
def test_entry_integers_out_of_range(field: int, value: int, match: str) -> None:
    obj = base_obj()
    ent(obj, b"dir/file")[field] = value
    rejects(obj, rf"^entry b'dir/file': {match}$")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        (C_SIZE, 0, r"chunks\[0\].size: 0 is outside \[1, 4096\]"),
        (C_SIZE, CS + 1, r"chunks\[0\].size: 4097 is outside \[1, 4096\]"),
        (C_SIZE, -1, r"chunks\[0\].size: -1 is outside \[1, 4096\]"),
        (C_PACK, -1, r"chunks\[0\].pack: -1 is outside \[0, 1\]"),
        (C_PACK, 2, r"chunks\[0\].pack: 2 is outside \[0, 1\]"),
        (C_OFFSET, -1, r"chunks\[0\].offset: -1 is outside \[0, 4196\]"),
        (C_STORED, 0, r"chunks\[0\].stored_size: 0 is outside \[1, 4096\]"),
        (C_CODEC, -1, r"chunks\[0\].codec: -1 is outside \[0, 1\]"),
    ],
)
def test_chunk_integers_out_of_range(field: int, value: int, match: str) -> None:
    obj = base_obj()
    obj[M_CHUNKS][0][field] = value
    rejects(obj, rf"^{match}$")


@pytest.mark.parametrize(
    ("value", "match"),
    [(0, r"0 is outside"), (-1, r"-1 is outside"), (2**40 + 1, r"1099511627777 is outside")],
)
def test_pack_size_out_of_range(value: int, match: str) -> None:
    obj = base_obj()
    obj[M_PACKS][0][P_SIZE] = value
    rejects(obj, rf"^packs\[0\].size: {match} \[1, 1099511627776\]$")


@pytest.mark.parametrize("value", [CS - 1, 0, -1, LIMITS.max_chunk_size + 1, 2**64 - 1])
def test_chunk_size_out_of_range(value: int) -> None:
    obj = base_obj()
    obj[M_CHUNK_SIZE] = value
    rejects(obj, rf"^chunk_size: {value} is outside \[4096, 268435456\]$")


_DOTS = r"{P} has an empty, '\.' or '\.\.' component \(escapes the root\)"


@pytest.mark.parametrize(
    ("path", "match"),
    [
        (b"..", _DOTS),
        (b".", _DOTS),
        (b"dir/..", _DOTS),
        (b"dir/../../etc", _DOTS),
        (b"dir/./file", _DOTS),
        (b"dir//file", _DOTS),
        (b"/dir/file", _DOTS),
        (b"dir/file/", _DOTS),
        (b"/", _DOTS),
        (b"dir/fi\x00le", r"{P} contains a NUL byte"),
        (b"\x00", r"{P} contains a NUL byte"),
        (b"dir/" + b"x" * 256, r"a component of {P} is longer than 255 bytes"),
        (b"/".join([b"d" * 255] * 15 + [b"e" * 200, b"f" * 56]), r"4097 bytes, over the limit of 4096"),
        ("dir/file", r"expected bytes"),
    ],
)
def test_bad_paths(path: Any, match: str) -> None:
    obj = base_obj()
    ent(obj, b"dir/file")[E_PATH] = path
    rejects(obj, r"^entries\[3\]\.path: " + match.replace("{P}", re.escape(repr(path))) + "$")


def test_path_limits_are_configurable() -> None:
    class ShortNames(Limits):
        max_name = 3

    class ShortPaths(Limits):
        max_path = 7

    data = encode(base_manifest())
    rejects(data, r"^entries\[3\]\.path: a component of b'dir/file' is longer than 3 bytes$", ShortNames())
    rejects(data, r"^entries\[3\]\.path: 8 bytes, over the limit of 7$", ShortPaths())


def test_missing_root() -> None:
    obj = base_obj()
    obj[M_ENTRIES] = []
    obj[M_CHUNKS] = obj[M_PACKS] = []
    rejects(obj, r"^entries: the tree has no root$")


def test_first_entry_must_be_the_root() -> None:
    obj = base_obj()
    del obj[M_ENTRIES][0]
    rejects(obj, r"^entries: the first entry must be the root directory$")


@pytest.mark.parametrize("t", [EntryType.REG, EntryType.SYMLINK, EntryType.FIFO, EntryType.HARDLINK])
def test_root_must_be_a_directory(t: EntryType) -> None:
    obj = base_obj()
    obj[M_ENTRIES][0][E_TYPE] = int(t)
    rejects(obj, r"^entries: the first entry must be the root directory$")


def test_unsorted_entries() -> None:
    obj = base_obj()
    es = obj[M_ENTRIES]
    es[5], es[6] = es[6], es[5]  # fifo before empty
    rejects(obj, r"^entry b'empty': entries are not sorted in tree order or a path repeats$")


def test_child_before_its_directory() -> None:
    obj = base_obj()
    es = obj[M_ENTRIES]
    es[2], es[3] = es[3], es[2]  # dir/file before dir
    rejects(obj, r"^entry b'dir/file': its parent is not a directory in the manifest$")


def test_duplicate_paths() -> None:
    obj = base_obj()
    obj[M_ENTRIES].insert(7, copy.deepcopy(ent(obj, b"fifo")))
    rejects(obj, r"^entry b'fifo': entries are not sorted in tree order or a path repeats$")


def test_second_root() -> None:
    obj = base_obj()
    obj[M_ENTRIES].insert(1, copy.deepcopy(obj[M_ENTRIES][0]))
    rejects(obj, r"^entry b'': entries are not sorted in tree order or a path repeats$")


@pytest.mark.parametrize("parent", [b"nodir", b"dev", b"dir/file", b"dir/link", b"hl", b"fifo", b"empty"])
def test_parent_missing_or_not_a_directory(parent: bytes) -> None:
    obj = base_obj()
    insert_sorted(obj, wire_entry(parent + b"/x", EntryType.FIFO))
    rejects(obj, rf"^entry {re.escape(repr(parent + b'/x'))}: its parent is not a directory in the manifest$")


def test_file_size_not_covered_by_its_chunks() -> None:
    obj = base_obj()
    ent(obj, b"dir/file")[E_SIZE] = CS + 101
    rejects(obj, r"^entry b'dir/file': chunks cover 4196 bytes but the file is 4197$")


def test_file_bigger_than_its_chunks() -> None:
    obj = base_obj()
    ent(obj, b"empty")[E_SIZE] = 5
    rejects(obj, r"^entry b'empty': chunks cover 0 bytes but the file is 5$")


def test_non_last_chunk_shorter_than_chunk_size() -> None:
    obj = base_obj()
    obj[M_CHUNK_SIZE] = 2 * CS  # the file's first chunk (4096 bytes) is now short
    rejects(obj, r"^entry b'dir/file': chunk 0 is 4096 bytes; all but the last must be 8192$")


def test_short_chunk_repeated_in_the_middle() -> None:
    obj = base_obj()
    ent(obj, b"dir/file")[E_CHUNKS] = [0, 1, 1]
    ent(obj, b"dir/file")[E_SIZE] = CS + 200
    rejects(obj, r"^entry b'dir/file': chunk 1 is 100 bytes; all but the last must be 4096$")


@pytest.mark.parametrize("index", [3, -1, 2**32])
def test_chunk_index_out_of_range(index: int) -> None:
    obj = base_obj()
    ent(obj, b"dir/file")[E_CHUNKS].append(index)
    rejects(obj, rf"^entry b'dir/file': chunk index: {index} is outside \[0, 2\]$")


def test_chunk_index_with_an_empty_chunk_table() -> None:
    obj = base_obj()
    obj[M_CHUNKS] = obj[M_PACKS] = []
    rejects(obj, r"^entry b'dir/file': chunk index: 0 is outside \[0, -1\]$")


def test_chunk_past_pack_end() -> None:
    obj = base_obj()
    obj[M_CHUNKS][1][C_OFFSET] = CS + 1  # 4097 + 100 > 4196
    rejects(obj, r"^chunks\[1\]: bytes 4097\+100 run past the end of pack 0$")


def test_chunk_offset_beyond_pack() -> None:
    obj = base_obj()
    obj[M_CHUNKS][1][C_OFFSET] = CS + 101
    rejects(obj, r"^chunks\[1\]\.offset: 4197 is outside \[0, 4196\]$")


def test_offset_plus_stored_size_does_not_wrap() -> None:
    """offset + stored_size past 2^40 (or 2^64 in a C reader) is past the end, not a small number."""
    obj = base_obj()
    obj[M_PACKS][0][P_SIZE] = 2**40
    obj[M_CHUNKS][1][C_OFFSET] = 2**40
    rejects(obj, r"^chunks\[1\]: bytes 1099511627776\+100 run past the end of pack 0$")
    obj[M_CHUNKS][1][C_OFFSET] = 2**64 - 1
    rejects(obj, r"^chunks\[1\]\.offset: 18446744073709551615 is outside \[0, 1099511627776\]$")


def test_stored_bigger_than_raw() -> None:
    obj = base_obj()
    obj[M_CHUNKS][2][C_STORED] = 3001
    rejects(obj, r"^chunks\[2\]\.stored_size: 3001 is outside \[1, 3000\]$")


def test_uncompressed_chunk_stored_at_another_size() -> None:
    obj = base_obj()
    obj[M_CHUNKS][2][C_CODEC] = int(Codec.NONE)  # 3000 raw bytes stored in 50
    rejects(obj, r"^chunks\[2\]: an uncompressed chunk must be stored at its raw size$")


@pytest.mark.parametrize("codec", [2, 3, 255])
def test_unknown_codec(codec: int) -> None:
    obj = base_obj()
    obj[M_CHUNKS][2][C_CODEC] = codec
    rejects(obj, rf"^chunks\[2\]\.codec: {codec} is outside \[0, 1\]$")


def test_duplicate_chunk_digests() -> None:
    obj = base_obj()
    obj[M_CHUNKS][1][C_DIGEST] = C_FULL
    rejects(obj, rf"^chunks\[1\]: duplicate chunk {C_FULL.hex()}$")


def test_duplicate_pack_digests() -> None:
    obj = base_obj()
    obj[M_PACKS][1][P_DIGEST] = P0.digest
    rejects(obj, rf"^packs\[1\]: duplicate pack {P0.digest.hex()}$")


def test_unreferenced_chunk() -> None:
    obj = base_obj()
    obj[M_CHUNKS].append([dg("orphan"), 10, 1, 0, 10, 0])
    rejects(obj, r"^chunks: a chunk is not referenced by any file$")


def test_unreferenced_pack() -> None:
    obj = base_obj()
    obj[M_PACKS].append([dg("orphan pack"), 10])
    rejects(obj, r"^packs: a pack is not referenced by any chunk$")


def test_pack_table_not_in_first_reference_order() -> None:
    obj = base_obj()
    obj[M_PACKS].reverse()  # consistent, but not canonical
    for c in obj[M_CHUNKS]:
        c[C_PACK] = 1 - c[C_PACK]
    rejects(obj, r"^chunks\[0\]: pack table is not in first-reference order$")


def test_chunk_table_not_in_first_reference_order() -> None:
    obj = base_obj()
    chunks = obj[M_CHUNKS]
    chunks[0], chunks[1] = chunks[1], chunks[0]  # consistent, but not canonical
    ent(obj, b"dir/file")[E_CHUNKS] = [1, 0]
    rejects(obj, r"^entry b'dir/file': chunk table is not in first-reference order$")


@pytest.mark.parametrize(
    ("digest", "match"),
    [
        (C_FULL[:31], r"a digest is 32 bytes, found 31"),
        (b"", r"a digest is 32 bytes, found 0"),
        (C_FULL + b"\x00", r"33 bytes, over the limit of 32"),
        (C_FULL.hex(), r"expected bytes"),
        (None, r"expected bytes"),
    ],
)
def test_digest_wrong_length_or_type(digest: Any, match: str) -> None:
    obj = base_obj()
    obj[M_CHUNKS][0][C_DIGEST] = digest
    rejects(obj, rf"^chunks\[0\]\.digest: {match}$")
    obj = base_obj()
    obj[M_PACKS][0][P_DIGEST] = digest
    rejects(obj, rf"^packs\[0\]\.digest: {match}$")


def test_hardlink_to_missing() -> None:
    obj = base_obj()
    ent(obj, b"hl")[E_TARGET] = b"nope"
    rejects(obj, r"^entry b'hl': hardlink to missing b'nope'$")


def test_hardlink_to_directory() -> None:
    obj = base_obj()
    ent(obj, b"hl")[E_TARGET] = b"dir"
    rejects(obj, r"^entry b'hl': hardlink to a dir b'dir'$")


def test_hardlink_to_hardlink() -> None:
    obj = base_obj()
    insert_sorted(obj, wire_entry(b"hm", EntryType.HARDLINK, target=b"hl"))
    rejects(obj, r"^entry b'hm': hardlink to a hardlink b'hl'$")


def test_hardlink_to_itself() -> None:
    obj = base_obj()
    ent(obj, b"hl")[E_TARGET] = b"hl"
    rejects(obj, r"^entry b'hl': hardlink to a hardlink b'hl'$")


@pytest.mark.parametrize("target", [b"dev", b"dir/link", b"fifo", b"sock", b"empty", b"hl"])
def test_hardlinks_to_non_directories_are_fine_but_not_chains(target: bytes) -> None:
    obj = base_obj()
    insert_sorted(obj, wire_entry(b"hm", EntryType.HARDLINK, target=target))
    if target == b"hl":
        rejects(obj, r"hardlink to a hardlink")
        return
    m = decode(pack(obj))
    e = m.entry(b"hm")
    assert e is not None and m.resolve(e).path == target


@pytest.mark.parametrize("path", [b"hl", b"dir/link"])
@pytest.mark.parametrize("target", [b"", b"a\x00b"])
def test_link_target_empty_or_nul(path: bytes, target: bytes) -> None:
    obj = base_obj()
    e = ent(obj, path)
    e[E_TARGET] = target
    if e[E_TYPE] == EntryType.SYMLINK:
        e[E_SIZE] = len(target)
    rejects(obj, rf"^entry {re.escape(repr(path))}: a link needs a non-empty target without NUL$")


def test_link_target_too_long() -> None:
    obj = base_obj()
    e = ent(obj, b"dir/link")
    e[E_TARGET], e[E_SIZE] = b"t" * 4097, 4097
    rejects(obj, r"^entry b'dir/link': target: 4097 bytes, over the limit of 4096$")


def test_symlink_size_is_target_length() -> None:
    obj = base_obj()
    ent(obj, b"dir/link")[E_SIZE] = 5
    rejects(obj, r"^entry b'dir/link': a symlink's size must be its target's length$")


@pytest.mark.parametrize("path", [b"empty", b"dir", b"fifo", b"dev", b"sock", b""])
def test_target_on_a_non_link(path: bytes) -> None:
    obj = base_obj()
    ent(obj, path)[E_TARGET] = b"x"
    rejects(obj, rf"^entry {re.escape(repr(path))}: only links have a target$")


@pytest.mark.parametrize("path", [b"empty", b"dir", b"fifo", b"sock", b"dir/link", b"hl", b""])
def test_rdev_on_a_non_device(path: bytes) -> None:
    obj = base_obj()
    ent(obj, path)[E_RDEV] = 1
    rejects(obj, rf"^entry {re.escape(repr(path))}: only device nodes have a device number$")


@pytest.mark.parametrize("path", [b"dir", b"fifo", b"dev", b"sock", b""])
def test_size_on_a_non_file(path: bytes) -> None:
    obj = base_obj()
    ent(obj, path)[E_SIZE] = 4096
    rejects(obj, rf"^entry {re.escape(repr(path))}: only files and symlinks have a size$")


def test_hardlink_has_no_size_or_xattrs() -> None:
    obj = base_obj()
    ent(obj, b"hl")[E_SIZE] = CS + 100
    rejects(obj, r"^entry b'hl': a hardlink carries no size or xattrs of its own$")
    obj = base_obj()
    ent(obj, b"hl")[E_XATTRS] = [[b"user.a", b""]]
    rejects(obj, r"^entry b'hl': a hardlink carries no size or xattrs of its own$")


@pytest.mark.parametrize("path", [b"dir/link", b"hl", b"fifo"])
def test_chunks_on_a_non_file(path: bytes) -> None:
    obj = base_obj()
    ent(obj, path)[E_CHUNKS] = [0]
    rejects(obj, rf"^entry {re.escape(repr(path))}: only regular files have chunks$")


def test_xattrs_unsorted() -> None:
    obj = base_obj()
    ent(obj, b"dir")[E_XATTRS].reverse()
    rejects(obj, r"^entry b'dir': xattr names must be unique and sorted$")


def test_xattrs_duplicate() -> None:
    obj = base_obj()
    xs = ent(obj, b"dir")[E_XATTRS]
    xs[1][0] = xs[0][0]
    rejects(obj, r"^entry b'dir': xattr names must be unique and sorted$")


def test_xattrs_too_many() -> None:
    obj = base_obj()
    ent(obj, b"dir")[E_XATTRS] = [[b"user.%03d" % i, b""] for i in range(LIMITS.max_xattrs + 1)]
    rejects(obj, r"^entry b'dir': more than 256 xattrs$")


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        (b"n" * 256, b"", r"xattr name: 256 bytes, over the limit of 255"),
        (b"user.a", b"v" * 65537, r"xattr value: 65537 bytes, over the limit of 65536"),
        (b"", b"", r"empty xattr name or NUL in it"),
        (b"user\x00a", b"", r"empty xattr name or NUL in it"),
        ("user.a", b"", r"xattr name: expected bytes"),
        (b"user.a", "v", r"xattr value: expected bytes"),
    ],
)
def test_xattr_too_large_or_malformed(name: Any, value: Any, match: str) -> None:
    obj = base_obj()
    ent(obj, b"dir")[E_XATTRS] = [[name, value]]
    rejects(obj, rf"^entry b'dir': {match}$")


def test_annotations_unsorted_or_duplicate() -> None:
    obj = base_obj()
    obj[M_ANNOTATIONS].reverse()
    rejects(obj, r"^annotations: keys must be unique and sorted$")
    obj[M_ANNOTATIONS] = [["a", "1"], ["a", "2"]]
    rejects(obj, r"^annotations: keys must be unique and sorted$")


@pytest.mark.parametrize(
    ("kv", "match"),
    [
        ([b"a", "1"], r"annotations\[0\]\.key: expected a string"),
        (["a", 1], r"annotations\[0\]\.value: expected a string"),
        (["k" * 1025, ""], r"annotations\[0\]\.key: longer than 1024"),
    ],
)
def test_annotation_types(kv: list[Any], match: str) -> None:
    obj = base_obj()
    obj[M_ANNOTATIONS] = [kv]
    rejects(obj, rf"^{match}$")


def test_size_over_limit() -> None:
    class Tiny(Limits):
        max_bytes = 100

    data = encode(base_manifest())
    rejects(data, rf"^manifest is {len(data)} bytes, over the 100 byte limit$", Tiny())


def test_count_limits() -> None:
    class Few(Limits):
        max_entries = 3
        max_chunks = 2
        max_xattrs = 1
        max_file_size = 4000

    data = encode(base_manifest())
    rejects(data, r"^chunks: 3 chunks, over the limit of 2$", Few())
    Few.max_chunks = 3
    rejects(data, r"^entries: 10 entries, over the limit of 3$", Few())
    Few.max_entries = 10
    rejects(data, r"^entry b'dir': more than 1 xattrs$", Few())
    Few.max_xattrs = 2
    rejects(data, r"^entry b'dir/file': size: 4196 is outside \[0, 4000\]$", Few())
    Few.max_file_size = 4196
    assert decode(data, Few()) == base_manifest()


@pytest.mark.parametrize(
    ("where", "match"),
    [
        ("root", r"^not a lazyfs manifest \(bad magic\)$"),
        ("annotations", r"^annotations: expected an array$"),
        ("packs", r"^packs: expected an array$"),
        ("pack", r"^packs\[0\]: expected an array$"),
        ("entry", r"^entries\[2\]: expected an array$"),
        ("xattrs", r"^entry b'dir': xattrs: expected an array$"),
        ("path", r"^entries\[2\]\.path: expected bytes$"),
        ("uid", r"^entry b'dir': uid: expected an integer$"),
        ("nonempty", r"^manifest is not valid msgpack: ValueError: 1 exceeds max_map_len\(0\)$"),
    ],
)
def test_maps_are_disallowed(where: str, match: str) -> None:
    obj = base_obj()
    if where == "root":
        obj = {}
    elif where == "nonempty":
        ent(obj, b"dir")[E_XATTRS] = {b"user.a": b"1"}
    elif where in ("annotations", "packs"):
        obj[M_ANNOTATIONS if where == "annotations" else M_PACKS] = {}
    elif where == "pack":
        obj[M_PACKS][0] = {}
    elif where == "entry":
        obj[M_ENTRIES][2] = {}
    else:
        ent(obj, b"dir")[{"xattrs": E_XATTRS, "path": E_PATH, "uid": E_UID}[where]] = {}
    rejects(obj, match)


@pytest.mark.parametrize("garbage", [b"\x00", b"\xc0", b"\x90", b"\xc1", b"\x97"], ids=bytes.hex)
def test_trailing_garbage(garbage: bytes) -> None:
    data = encode(base_manifest())
    rejects(data + garbage, r"^manifest is not valid msgpack: ")
    rejects(data + data, r"^manifest is not valid msgpack: ExtraData")


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\xd4\x01\x00", b"\xd6\xff\x00\x00\x00\x00", b"\xa1\xff", b"\x92\x01"],
    ids=["empty", "never-used-byte", "ext", "timestamp", "bad-utf8", "incomplete"],
)
def test_not_msgpack(data: bytes) -> None:
    err = rejects(data, r"^manifest is not valid msgpack: \w+")
    assert isinstance(err.__cause__, Exception)  # raised `from` the msgpack error


def _replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1, old
    return data.replace(old, new)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"manifest\x01", b"manifest\xcc\x01"),  # version as uint8
        (b"manifest\x01", b"manifest\xd0\x01"),  # version as int8
        (b"\x01\xcd\x10\x00\x92", b"\x01\xce\x00\x00\x10\x00\x92"),  # chunk_size as uint32
        (b"\x01\xcd\x10\x00\x92", b"\x01\xcf\x00\x00\x00\x00\x00\x00\x10\x00\x92"),  # ... as uint64
        (b"\xc4\x20" + C_Z, b"\xc5\x00\x20" + C_Z),  # a digest as bin16
        (b"\xc4\x0flazyfs", b"\xc6\x00\x00\x00\x0flazyfs"),  # the magic as bin32
        (b"\xa1a\xa11", b"\xd9\x01a\xa11"),  # an annotation key as str8
        (b"\x92\xa1a", b"\xdc\x00\x02\xa1a"),  # an array as array16
    ],
    ids=["uint8", "int8", "uint32", "uint64", "bin16", "bin32", "str8", "array16"],
)
def test_non_canonical_encodings_are_rejected(old: bytes, new: bytes) -> None:
    """Each of these decodes to the same manifest; only the shortest form has the manifest's digest."""
    data = encode(base_manifest())
    rejects(_replace_once(data, old, new), r"^manifest is not in canonical form")


def test_errors_are_lazyfs_errors() -> None:
    err = rejects(b"", "not valid msgpack")
    assert isinstance(err, LazyfsError)


# --- the builder ---------------------------------------------------------------------------------


def test_builder_requires_a_location_for_every_chunk() -> None:
    b = ManifestBuilder(CS)
    b.add(Entry(b"", EntryType.DIR, 0o755, 0, 0, 0))
    b.add(Entry(b"f", EntryType.REG, 0o644, 0, 0, 0, size=1), [dg("nowhere")])
    with pytest.raises(ManifestError, match=rf"^chunk {dg('nowhere').hex()} of b'f' has no stored location$"):
        b.build()


def test_encode_refuses_an_invalid_manifest() -> None:
    """encode() validates: a broken manifest fails at publish time, not at mount time."""
    b = base_builder()
    b.remove(b"")
    with pytest.raises(ManifestError, match="the first entry must be the root directory"):
        encode(b.build())
    b = base_builder()
    b.add(Entry(b"orphan/x", EntryType.FIFO, 0, 0, 0, 0))
    with pytest.raises(ManifestError, match="its parent is not a directory"):
        encode(b.build())


def test_builder_add_replaces_and_remove_takes_the_subtree() -> None:
    b = base_builder()
    assert set(b.paths()) >= {b"dir", b"dir/file", b"dir/link"}
    b.add(Entry(b"fifo", EntryType.SOCK, 0o600, 0, 0, 0))
    got = b.get(b"fifo")
    assert got is not None and got.type is EntryType.SOCK
    b.remove(b"dir")
    b.remove(b"hl")  # it pointed into dir/
    b.remove(b"missing")  # a no-op
    assert b.get(b"dir/file") is None and b.get(b"dir") is None
    assert b.get(b"dirx") is None
    m = decode(encode(b.build()))
    assert [e.path for e in m.entries] == [b"", b"dev", b"empty", b"fifo", b"small", b"sock"]
    assert [c.digest for c in m.chunks] == [C_Z]  # chunks of removed files are gone
    assert m.packs == (P1,)


def test_builder_remove_is_component_wise() -> None:
    b = base_builder()
    b.add(Entry(b"dirx", EntryType.FIFO, 0, 0, 0, 0))
    b.remove(b"dir")
    assert b.get(b"dirx") is not None


def test_builder_first_location_wins() -> None:
    b = base_builder()
    assert b.location(C_FULL) == ChunkLocation(P0, 0, CS, Codec.NONE, CS)
    b.locate(C_FULL, ChunkLocation(P1, 0, 10, Codec.ZSTD, CS))
    assert b.location(C_FULL) == ChunkLocation(P0, 0, CS, Codec.NONE, CS)
    assert b.location(dg("unknown")) is None


def test_builder_sorts_xattrs_and_annotations() -> None:
    b = ManifestBuilder(CS)
    b.add(Entry(b"", EntryType.DIR, 0o755, 0, 0, 0, xattrs=((b"user.z", b"1"), (b"user.a", b"2"))))
    m = b.build({"z": "1", "a": "2"})
    assert m.entries[0].xattrs == ((b"user.a", b"2"), (b"user.z", b"1"))
    assert m.annotations == (("a", "2"), ("z", "1"))
    assert decode(encode(m)) == m


def test_builder_assigns_chunks_only_to_regular_files() -> None:
    """A hardlink shares its target's chunks through resolve(), it does not list them."""
    m = base_manifest()
    hl, f = m.entry(b"hl"), m.entry(b"dir/file")
    assert hl is not None and f is not None
    assert hl.chunks == () and m.resolve(hl) is f
    assert m.file_chunks(hl) == m.file_chunks(f) == [m.chunks[0], m.chunks[1]]
    assert m.entry(b"nope") is None
    assert f.name == b"file" and f.parent == b"dir"
    assert m.entries[0].name == b"" and m.entries[0].parent == b""
    assert m.total_size == CS + 100 + 3000
    assert m.stored_size == CS + 100 + 50
    assert P0.key == f"packs/{P0.digest.hex()}"
