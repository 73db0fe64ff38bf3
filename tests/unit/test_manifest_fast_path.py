"""The decoder's fast paths agree with its rule-by-rule checks, verdict and message.

``_Validator._chunks`` and ``_entries`` accept the common case in one expression and send
anything else through ``_chunk`` / ``_entry``, which check each rule in turn and name the first
problem.  :class:`Reference` sends *every* chunk and entry through those, so it is the decoder
without fast paths; on valid manifests and on hostile edits of them both must return the same
manifest or raise the same message.  Also: the ordering key the decoder compares agrees with
:func:`tree_key`.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lazyfs.errors import ManifestError
from lazyfs.manifest import LIMITS, Chunk, Entry, Limits, Manifest, Pack, decode, encode, tree_key
from lazyfs.manifest.codec import _NOT_CANONICAL, _EntryState, _order_key, _pack, _Validator
from tests.unit.test_manifest import (
    FUZZ,
    NAMES,
    PROPERTY,
    Tree,
    _mutate,
    base_obj,
    pack,
    trees,
    unpack,
)


class Reference(_Validator):
    """The decoder with no fast path: every chunk and entry checked rule by rule."""

    def _chunks(self, v: Any, packs: list[Pack], chunk_size: int) -> list[Chunk]:
        items = self._list(v, "chunks")
        if len(items) > self.limits.max_chunks:
            raise ManifestError(f"chunks: {len(items)} chunks, over the limit of {self.limits.max_chunks}")
        out: list[Chunk] = []
        seen: set[bytes] = set()
        next_pack = 0
        for i, c in enumerate(items):
            chunk = self._chunk(i, c, packs, chunk_size, seen, next_pack)
            seen.add(chunk.digest)
            next_pack = max(next_pack, chunk.pack + 1)
            out.append(chunk)
        if next_pack != len(packs):
            raise ManifestError("packs: a pack is not referenced by any chunk")
        return out

    def _entries(self, v: Any, chunks: list[Chunk], chunk_size: int) -> list[Entry]:
        items = self._list(v, "entries")
        if not items:
            raise ManifestError("entries: the tree has no root")
        if len(items) > self.limits.max_entries:
            raise ManifestError(f"entries: {len(items)} entries, over the limit of {self.limits.max_entries}")
        st_ = _EntryState()
        out = [self._entry(i, e, st_, chunks, chunk_size) for i, e in enumerate(items)]
        if st_.next_chunk != len(chunks):
            raise ManifestError("chunks: a chunk is not referenced by any file")
        for e in out:
            if e.type.name == "HARDLINK":
                t = st_.types.get(e.target)
                if t is None:
                    raise ManifestError(f"entry {e.path!r}: hardlink to missing {e.target!r}")
                if t.name in ("DIR", "HARDLINK"):
                    raise ManifestError(f"entry {e.path!r}: hardlink to a {t.name.lower()} {e.target!r}")
        return out


def reference_decode(data: bytes, limits: Limits = LIMITS) -> Manifest:
    obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_map_len=0, max_ext_len=0)
    m = Reference(limits).manifest(obj)
    if _pack(m) != data:  # the original canonical check: re-encode the manifest, not the wire object
        raise ManifestError(_NOT_CANONICAL)
    return m


def verdict(fn: Any, data: bytes) -> tuple[str, Any]:
    try:
        return "ok", fn(data)
    except ManifestError as exc:
        return "error", str(exc)


def assert_same(data: bytes) -> None:
    # Bytes that are not msgpack at all fail in msgpack before any fast path; skip those.
    try:
        msgpack.unpackb(data, raw=False, strict_map_key=True, max_map_len=0, max_ext_len=0)
    except Exception:
        return
    assert verdict(decode, data) == verdict(reference_decode, data)


@PROPERTY
@given(tree=trees())
def test_valid_trees_decode_alike(tree: Tree) -> None:
    data = encode(tree.build())
    assert decode(data) == reference_decode(data)


@FUZZ
@given(tree=trees(max_dirs=3, max_leaves=6), data=st.data())
def test_edited_trees_fail_alike(tree: Tree, data: st.DataObject) -> None:
    obj = unpack(encode(tree.build()))
    for _ in range(5):
        assert_same(pack(_mutate(obj, data)))


@FUZZ
@given(data=st.data())
def test_edited_base_manifest_fails_alike(data: st.DataObject) -> None:
    obj = base_obj()
    for _ in range(5):
        obj2 = _mutate(obj, data)
        assert_same(pack(obj2))
        assert_same(pack(_mutate(obj2, data)))


@pytest.mark.parametrize(
    "edit",
    [
        lambda o: o[6][3].__setitem__(0, b"dir//file"),  # an empty component, short path
        lambda o: o[6][1].__setitem__(0, b"/dev"),  # a leading slash: its parent would be the root
        lambda o: o[6][1].__setitem__(0, b"."),
        lambda o: o[6].insert(3, [b"dir/.", 7, 0o644, 0, 0, 0, 0, b"", 0, [], []]),  # sorts right after dir
        lambda o: o[6].insert(3, [b"dir/..", 7, 0o644, 0, 0, 0, 0, b"", 0, [], []]),
        lambda o: o[6][3].__setitem__(0, b"dir/" + b"x" * 300),  # long: not the fast path's case
        lambda o: o[6][3].__setitem__(0, b"dir/fi\0le"),
        lambda o: o[6][3].__setitem__(9, [[b"user.b", b"1"], [b"user.a", b"2"]]),  # unsorted xattrs
        lambda o: o[6][7].__setitem__(9, [[b"user.a", b"1"]]),  # a hardlink with xattrs
        lambda o: o[6][3].__setitem__(10, [1, 0]),  # chunks out of first-reference order
        lambda o: o[5][1].__setitem__(2, 1),  # a chunk in a pack referenced too early
        lambda o: o[5].append(list(o[5][0])),  # a duplicate chunk
    ],
)
def test_hand_made_edits_fail_alike(edit: Any) -> None:
    obj = base_obj()
    edit(obj)
    data = pack(obj)
    assert verdict(decode, data)[0] == "error"
    assert_same(data)


@PROPERTY
@given(st.lists(st.lists(NAMES, min_size=1, max_size=4).map(b"/".join), min_size=2, max_size=8))
def test_order_key_sorts_like_tree_key(paths: list[bytes]) -> None:
    paths = [p for p in paths if b"\0" not in p]
    assert sorted(paths, key=_order_key) == sorted(paths, key=tree_key)
    for a in paths:
        for b in paths:
            assert (_order_key(a) < _order_key(b)) == (tree_key(a) < tree_key(b))
