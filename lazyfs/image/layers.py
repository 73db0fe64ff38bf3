"""Layers -> one tree: decompress, verify and apply OCI changesets in order, spooling file contents.

Each layer is read once, as a stream, in a worker thread::

    blob bytes ─► VerifyingReader (size + digest of the blob as stored)
               ─► gzip / zstd / plain (sniffed by magic; the media type only says what is allowed)
               ─► VerifyingReader (the config's diff_id: sha256 of the uncompressed tar)
               ─► tarfile 'r|' (streaming: no seeks, no member index kept)
               ─► LayerTree: names, inodes, whiteouts; regular files' bytes spooled to disk

No layer is ever held in memory: a regular file's data is copied 1 MiB at a time into the
spool — its own file when large, an append-only shared segment when small (see SMALL_FILE) —
and published from there (:class:`lazyfs.seed.SourceFile` with an offset).  Both digests are
checked when the stream ends, before anything is published, so a corrupt or truncated blob
aborts the seed.

The tree follows what runtimes (containerd, umoci) produce when they unpack the layers:

* later entries replace earlier ones (a directory over a directory only updates its
  metadata and keeps its contents; anything else removes the old name and everything
  below it first);
* ``.wh.NAME`` removes NAME and everything below it *from lower layers* (OCI: a whiteout
  never hides an entry of its own layer); ``.wh..wh..opq`` makes its directory opaque:
  every descendant that did not come from this layer is dropped; other ``.wh..wh.*``
  names are aufs metadata and are ignored; no ``.wh.`` name is ever materialised;
* a hardlink names an inode that already exists — an earlier entry of this layer or a
  file of a lower layer — and adds a name to it; removing one name (whiteout, replacement)
  leaves the others with the content, and the spooled bytes go only with the last name (a
  large file's spool file at once, a segment when none of its files is named any more);
* a parent directory missing from a layer is created like runtimes do: 0755, root-owned
  (mtime 0 here, so the same image always gives the same manifest).

Tar entries are hostile input.  Refused, with one line naming the layer and the entry:
absolute names, ``..`` / ``.`` / empty components, NUL bytes, names over PATH_MAX or a
component over NAME_MAX, an entry whose parent is a symlink (writing through it could
land outside the root; runtimes resolve such links, we do not follow any) or not a
directory, hardlinks to missing, escaping, directory or self targets, whiteouts of
``.``/``..``, size fields over :attr:`ImageLimits.max_file_size` or past the end of the
stream, unsupported entry types, and more names than :attr:`ImageLimits.max_entries`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import gzip
import hashlib
import io
import os
import re
import tarfile
import threading
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

import zstandard

from lazyfs.errors import IntegrityError, SeedError
from lazyfs.image.source import ImageLimits, LayerRef, Readable
from lazyfs.manifest import LIMITS, Entry, EntryType, ManifestBuilder, tree_key
from lazyfs.seed import SourceFile

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "LayerTree",
    "VerifyingReader",
    "check_digest",
    "compression_of",
    "open_decompressed",
    "show",
]

# Reads of 1 MiB keep the per-call overhead (Python frames, GIL hand-offs) well under the
# cost of hashing and decompressing the bytes.
READ_SIZE = 1 << 20

# tarfile's stream buffer: measured on a Debian root layer, 1 MiB beat 64 KiB and 10 KiB
# (fewer Python-level loops per large file outweigh re-slicing the buffer per header).
TAR_BUFSIZE = READ_SIZE
# Files up to SMALL_FILE bytes are appended to shared segment files of about SEGMENT_SIZE:
# one spool file per entry costs a create and an unlink each, measured here at ~1.1 ms and
# ~0.6 ms on ext4 under load — 10 of 14 s for a 5,400-file Debian root.  Larger files keep
# their own spool file, so deleting them frees their space at once; a segment is removed when
# its last live file goes.
SMALL_FILE = 256 * 1024
SEGMENT_SIZE = 64 * 1024 * 1024

WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
_MAX_ID = (1 << 32) - 1
_MAX_DEV = (1 << 32) - 1

_DIGEST_RE = re.compile(r"(sha256|sha512):([0-9a-f]+)")
_HEX_LEN = {"sha256": 64, "sha512": 128}


def show(name: str | bytes) -> str:
    """A name for a one-line message: non-printable characters escaped, never a newline."""
    text = name.decode("utf-8", "backslashreplace") if isinstance(name, bytes) else name
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if len(text) > 200:
        text = text[:200] + "..."
    return repr(text)


def check_digest(digest: str, what: str) -> tuple[str, str]:
    """``sha256:<hex>`` / ``sha512:<hex>`` -> ``(algorithm, hex)``; SeedError for anything else."""
    m = _DIGEST_RE.fullmatch(digest)
    if not m or len(m.group(2)) != _HEX_LEN[m.group(1)]:
        raise SeedError(f"{what}: unsupported or malformed digest {show(digest)}")
    return m.group(1), m.group(2)


class VerifyingReader(io.RawIOBase):
    """Counts and hashes what passes through; at the end the size and digest must match.

    Reading more bytes than ``size`` fails at once (a stream that never ends cannot make
    us spool forever); a short stream or a different digest fails at its end.
    """

    def __init__(
        self,
        inner: Readable,
        digest: str | None,
        size: int | None,
        what: str,
        on_read: Callable[[int], None] | None = None,
        abort: threading.Event | None = None,
    ) -> None:
        super().__init__()
        self._inner = inner
        self._digest = digest
        self._hash = hashlib.new(check_digest(digest, what)[0]) if digest else None
        self._size = size
        self._what = what
        self._on_read = on_read
        self._abort = abort
        self._n = 0
        self.finished = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        if self._abort is not None and self._abort.is_set():
            raise SeedError("cancelled")
        if not len(view):
            return 0
        data = self._inner.read(len(view))
        n = len(data)
        if n == 0:
            if not self.finished:
                self._finish()
            return 0
        if n > len(view):
            raise SeedError(f"{self._what}: the stream returned more bytes than asked for")
        view[:n] = data
        self._n += n
        if self._size is not None and self._n > self._size:
            raise IntegrityError(f"{self._what}: longer than the {self._size} bytes its descriptor says")
        if self._hash is not None:
            self._hash.update(data)
        if self._on_read is not None:
            self._on_read(n)
        return n

    def _finish(self) -> None:
        self.finished = True
        if self._size is not None and self._n != self._size:
            raise IntegrityError(f"{self._what}: {self._n} bytes, but its descriptor says {self._size} (truncated?)")
        if self._hash is not None and self._digest is not None:
            actual = f"{self._hash.name}:{self._hash.hexdigest()}"
            if actual != self._digest:
                raise IntegrityError(f"{self._what}: content is {actual[:19]}..., expected {self._digest[:19]}...")


def _drain(stream: Readable) -> None:
    while stream.read(READ_SIZE):
        pass


# --- compression -------------------------------------------------------------------------------

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# media type -> compression ("" plain); every type a registry, a layout or buildkit writes.
_MEDIA_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
}


def compression_of(media_type: str, what: str) -> str | None:
    """The compression a layer media type declares: "", "gzip", "zstd"; None for unknown ("")."""
    if not media_type:
        return None
    kind = _MEDIA_TYPES.get(media_type)
    if kind is None:
        why = "encrypted layers are not supported" if "encrypted" in media_type else "not a layer type lazyfs reads"
        raise SeedError(f"{what}: media type {show(media_type)}: {why}")
    return kind


def open_decompressed(blob: io.BufferedReader[Any], media_type: str, what: str) -> Readable:
    """The uncompressed tar stream of ``blob``.

    The compression is taken from the data's magic bytes, as containerd does (a layer
    labelled plain but gzipped still unpacks); a media type that promises gzip or zstd
    over data that is neither is refused.
    """
    declared = compression_of(media_type, what)
    magic = blob.peek(4)[:4]
    sniffed = "gzip" if magic[:2] == _GZIP_MAGIC else "zstd" if magic == _ZSTD_MAGIC else ""
    if declared and declared != sniffed:
        raise SeedError(f"{what}: media type {show(media_type)} says {declared}, but the data is not {declared}")
    if sniffed == "gzip":
        return gzip.GzipFile(fileobj=blob, mode="rb")
    if sniffed == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(
            blob, read_size=READ_SIZE, read_across_frames=True, closefd=False
        )
    return blob


# --- the tree ------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Inode:
    type: EntryType
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    target: bytes = b""  # symlink target, verbatim
    rdev: int = 0
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    spool: str | None = None  # REG with data: its spool file (own, or a segment)
    spool_offset: int = 0  # where its bytes start in ``spool``
    segment: _Segment | None = None  # the shared segment holding it, if small
    nlink: int = 0  # names in the tree (non-directories)


@dataclass(slots=True, eq=False)
class _Segment:
    path: str
    size: int = 0
    live: int = 0  # spooled files in it that still have a name
    sealed: bool = False


@dataclass(slots=True, eq=False)
class _Node:
    inode: _Inode
    layer: int  # the layer that created (or last re-declared) this name
    children: dict[bytes, _Node] | None = None  # directories only


def _implicit_dir(layer: int) -> _Node:
    # What runtimes create for a parent the layer does not list: 0755, root.  mtime 0
    # instead of "now" keeps one image -> one manifest.
    return _Node(_Inode(EntryType.DIR, 0o755, 0, 0, 0), layer, {})


class _Refused(Exception):
    """An entry-level problem; LayerTree adds the layer and entry to the message."""


def _split(name: str, what: str = "name") -> list[bytes]:
    """A tar name -> components under the root; [] is the root itself.

    A leading ``./`` (``tar -C dir .``) is dropped and trailing slashes ignored; anything
    that could address outside the root, or is not a plain relative path, is refused.
    """
    raw = name.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise _Refused(f"the {what} contains a NUL byte")
    if raw.startswith(b"/"):
        raise _Refused(f"the {what} is an absolute path")
    while raw.startswith(b"./"):
        raw = raw[2:]
    raw = raw.rstrip(b"/")
    if raw in (b"", b"."):
        return []
    if len(raw) > LIMITS.max_path:
        raise _Refused(f"the {what} is {len(raw)} bytes long, over PATH_MAX ({LIMITS.max_path})")
    comps = raw.split(b"/")
    for c in comps:
        if c == b"..":
            raise _Refused(f"the {what} has a '..' component (it would escape the root)")
        if c in (b"", b"."):
            raise _Refused(f"the {what} has an empty or '.' component")
        if len(c) > LIMITS.max_name:
            raise _Refused(f"a component of the {what} is {len(c)} bytes long, over NAME_MAX ({LIMITS.max_name})")
    return comps


_PAX_TIME = re.compile(r"(-?)([0-9]{1,19})(?:\.([0-9]*))?")


def _mtime_ns(m: tarfile.TarInfo) -> int:
    text = m.pax_headers.get("mtime")
    if text is None:
        ns = int(m.mtime) * 1_000_000_000
    else:
        t = _PAX_TIME.fullmatch(text)
        if t is None:
            raise _Refused(f"bad PAX mtime {show(text)}")
        ns = int(t.group(2)) * 1_000_000_000 + int((t.group(3) or "")[:9].ljust(9, "0"))
        ns = -ns if t.group(1) else ns
    lo, hi = LIMITS.mtime_range
    if not lo <= ns <= hi:
        raise _Refused("mtime out of range")
    return ns


def _xattrs(m: tarfile.TarInfo) -> tuple[tuple[bytes, bytes], ...]:
    """Extended attributes from PAX records: ``SCHILY.xattr.NAME`` (GNU tar, Go) and
    ``LIBARCHIVE.xattr.NAME`` (bsdtar: URL-encoded name, base64 value).  Values are binary
    (``security.capability``): tarfile decoded them with surrogateescape, which round-trips."""
    out: dict[bytes, bytes] = {}
    for key, value in m.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr.") :].encode("utf-8", "surrogateescape")
            data = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote_to_bytes(key[len("LIBARCHIVE.xattr.") :])
            try:
                data = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
            except (binascii.Error, ValueError):
                raise _Refused(f"xattr {show(name)}: bad base64 value") from None
        else:
            continue
        if not name or b"\0" in name or len(name) > LIMITS.max_xattr_name:
            raise _Refused(f"bad xattr name {show(name)}")
        if len(data) > LIMITS.max_xattr_value:
            raise _Refused(f"xattr {show(name)} is {len(data)} bytes, over {LIMITS.max_xattr_value}")
        out[name] = data
    if len(out) > LIMITS.max_xattrs:
        raise _Refused(f"{len(out)} xattrs, over {LIMITS.max_xattrs}")
    return tuple(sorted(out.items()))


def _owner(m: tarfile.TarInfo) -> tuple[int, int]:
    if not (0 <= m.uid <= _MAX_ID and 0 <= m.gid <= _MAX_ID):
        raise _Refused(f"owner {m.uid}:{m.gid} out of range")
    return m.uid, m.gid


class LayerTree:
    """The flattened tree of an image, built one layer at a time (see the module docstring).

    Not thread-safe: one worker thread applies layers in order.  ``abort`` (an Event) makes
    a running :meth:`apply` stop at its next read.  The caller owns ``spool_dir`` and
    removes it; files of names that were deleted or replaced are removed as that happens,
    so the spool holds about the flattened image's size, not the sum of its layers.
    """

    def __init__(self, spool_dir: str, limits: ImageLimits | None = None) -> None:
        self.limits = limits or ImageLimits()
        self.abort = threading.Event()
        self.root = _Node(_Inode(EntryType.DIR, 0o755, 0, 0, 0), -1, {})
        self.spooled_bytes = 0  # live spool files (deleted names excluded)
        self._spool_dir = spool_dir
        self._spool_seq = 0
        self._segment: _Segment | None = None
        self._segment_file: BinaryIO | None = None
        self._entries = 1
        self._layer = -1

    # -- applying a layer -------------------------------------------------------------------

    def apply(self, blob: Readable, layer: LayerRef, on_read: Callable[[int], None] | None = None) -> None:
        """Read the layer's blob (as stored) to its end and apply it.  Blocking: call it in a thread."""
        if layer.index <= self._layer:
            raise SeedError(f"{layer.label}: layers must be applied in order")
        self._layer = layer.index
        raw = VerifyingReader(blob, layer.digest or None, layer.size, f"{layer.label}: blob", on_read, self.abort)
        buffered = io.BufferedReader(raw, READ_SIZE)
        current: list[str | None] = [None]
        try:
            stream = open_decompressed(buffered, layer.media_type, layer.label)
            diff = VerifyingReader(stream, layer.diff_id or None, None, f"{layer.label}: uncompressed content")
            self._apply_tar(diff, layer, current)
            # Past the tar's end-of-archive blocks: the padding, then the rest of the blob.
            # Both digests are checked when their stream reaches its end.
            _drain(diff)
            _drain(buffered)
            if not raw.finished:
                raise SeedError(f"{layer.label}: the blob was not read to its end")
        except tarfile.TarError as exc:
            if current[0] is not None:
                raise SeedError(
                    f"{layer.label}: entry {show(current[0])}: the layer ends inside this entry's data ({exc})"
                ) from exc
            raise SeedError(f"{layer.label}: not a valid tar archive: {exc}") from exc
        except (EOFError, zlib.error, zstandard.ZstdError, gzip.BadGzipFile) as exc:
            raise SeedError(f"{layer.label}: corrupt compressed data: {exc or exc.__class__.__name__}") from exc
        except OSError as exc:
            raise SeedError(f"{layer.label}: cannot read: {exc.strerror or exc}") from exc

    def _apply_tar(self, stream: io.RawIOBase, layer: LayerRef, current: list[str | None]) -> None:
        # Not closed: closing would close ``stream``, which the caller still drains.
        tf = tarfile.open(  # noqa: SIM115
            fileobj=stream, mode="r|", bufsize=TAR_BUFSIZE, encoding="utf-8", errors="surrogateescape"
        )
        while True:
            current[0] = None
            member = tf.next()
            if member is None:
                return
            # Stream mode keeps every TarInfo for later lookups we never make: drop them.
            tf.members.clear()  # type: ignore[attr-defined]
            current[0] = member.name
            if self.abort.is_set():
                raise SeedError("cancelled")
            try:
                self._entry(tf, member)
            except _Refused as exc:
                raise SeedError(f"{layer.label}: entry {show(member.name)}: {exc}") from None

    def _entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        comps = _split(m.name)
        if m.name.endswith("/") and not m.isdir():
            raise _Refused("a name ending with '/' that is not a directory")
        base = comps[-1] if comps else b""
        if base.startswith(WHITEOUT):
            self._whiteout(comps)
            return
        if not comps:
            if not m.isdir():
                raise _Refused("the root of a layer must be a directory")
            self.root.inode = self._inode(m, EntryType.DIR)
            self.root.layer = self._layer
            return
        if m.islnk():
            self._hardlink(comps, m)
            return
        if m.isreg():
            if m.size < 0 or m.size > self.limits.max_file_size:
                raise _Refused(f"its size field says {m.size} bytes, over the limit of {self.limits.max_file_size}")
            inode = self._inode(m, EntryType.REG)
            parent = self._parent(comps)
            inode.size = m.size
            if m.size:
                self._spool(tf, m, inode)
                self.spooled_bytes += m.size
            self._put(parent, comps[-1], _Node(inode, self._layer))
            return
        if m.isdir():
            node = _Node(self._inode(m, EntryType.DIR), self._layer, {})
        elif m.issym():
            target = m.linkname.encode("utf-8", "surrogateescape")
            if not target or b"\0" in target or len(target) > LIMITS.max_path:
                raise _Refused("a symlink needs a target of 1 to 4096 bytes without NUL")
            inode = self._inode(m, EntryType.SYMLINK)
            inode.target, inode.size = target, len(target)
            node = _Node(inode, self._layer)
        elif m.ischr() or m.isblk():
            if not (0 <= m.devmajor <= _MAX_DEV and 0 <= m.devminor <= _MAX_DEV):
                raise _Refused(f"device number {m.devmajor},{m.devminor} out of range")
            inode = self._inode(m, EntryType.CHR if m.ischr() else EntryType.BLK)
            inode.rdev = os.makedev(m.devmajor, m.devminor)
            node = _Node(inode, self._layer)
        elif m.isfifo():
            node = _Node(self._inode(m, EntryType.FIFO), self._layer)
        else:
            raise _Refused(f"unsupported tar entry type {m.type!r}")
        self._put(self._parent(comps), comps[-1], node)

    def _inode(self, m: tarfile.TarInfo, et: EntryType) -> _Inode:
        uid, gid = _owner(m)
        return _Inode(et, m.mode & 0o7777, uid, gid, _mtime_ns(m), xattrs=_xattrs(m))

    def _new_spool_path(self) -> str:
        path = os.path.join(self._spool_dir, f"{self._spool_seq:09d}")
        self._spool_seq += 1
        return path

    def _spool(self, tf: tarfile.TarFile, m: tarfile.TarInfo, inode: _Inode) -> None:
        """Copy the member's data to the spool: a segment for small files, its own file otherwise."""
        src = tf.extractfile(m)
        assert src is not None  # a regular member always has a file object
        try:
            if m.size <= SMALL_FILE:
                seg, out = self._open_segment(m.size)
                inode.spool, inode.spool_offset, inode.segment = seg.path, seg.size, seg
                n = self._copy(src, out)
                seg.size += n
                seg.live += 1
            else:
                inode.spool = self._new_spool_path()
                with open(inode.spool, "xb") as own:
                    n = self._copy(src, own)
        except OSError as exc:
            raise SeedError(f"cannot spool a layer's file to {self._spool_dir}: {exc.strerror or exc}") from exc
        if n != m.size:  # tarfile raises first; a belt for its braces
            raise _Refused(f"the layer ends inside this entry's data ({n} of {m.size} bytes)")

    def _copy(self, src: Readable, out: BinaryIO) -> int:
        n = 0
        while True:
            if self.abort.is_set():
                raise SeedError("cancelled")
            buf = src.read(READ_SIZE)
            if not buf:
                return n
            out.write(buf)
            n += len(buf)

    def _open_segment(self, size: int) -> tuple[_Segment, BinaryIO]:
        seg, f = self._segment, self._segment_file
        if seg is None or f is None or seg.size + size > SEGMENT_SIZE:
            self._seal_segment()
            seg = self._segment = _Segment(self._new_spool_path())
            f = self._segment_file = open(seg.path, "xb")  # noqa: SIM115 - open across entries, closed by _seal_segment
        return seg, f

    def _seal_segment(self) -> None:
        """Close the segment being written; it goes now if none of its files is still named."""
        seg, f = self._segment, self._segment_file
        self._segment = self._segment_file = None
        if f is not None:
            f.close()
        if seg is not None:
            seg.sealed = True
            if seg.live == 0:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(seg.path)

    def close(self) -> None:
        """Close the open segment (idempotent); the spool directory itself is the caller's."""
        self._seal_segment()

    def _parent(self, comps: list[bytes]) -> _Node:
        """The directory that holds ``comps[-1]``; missing directories are created (0755, root)."""
        node = self.root
        for i, c in enumerate(comps[:-1]):
            assert node.children is not None
            child = node.children.get(c)
            if child is None:
                child = _implicit_dir(self._layer)
                self._add_name(node, c, child)
            elif child.children is None:
                where = show(b"/".join(comps[: i + 1]))
                if child.inode.type is EntryType.SYMLINK:
                    raise _Refused(f"its parent {where} is a symlink; entries are never written through a symlink")
                raise _Refused(f"its parent {where} is not a directory")
            node = child
        return node

    def _find(self, comps: list[bytes], what: str) -> _Node:
        node = self.root
        for i, c in enumerate(comps):
            if node.children is None:
                where = show(b"/".join(comps[:i]))
                kind = "a symlink" if node.inode.type is EntryType.SYMLINK else "not a directory"
                raise _Refused(f"{what}: {where} is {kind}")
            child = node.children.get(c)
            if child is None:
                raise _Refused(
                    f"{what} {show(b'/'.join(comps))} does not exist "
                    "(a link must name an earlier entry of its layer or a file of a lower layer)"
                )
            node = child
        return node

    def _add_name(self, parent: _Node, name: bytes, node: _Node) -> None:
        assert parent.children is not None
        if self._entries >= self.limits.max_entries:
            raise _Refused(f"the image has more than {self.limits.max_entries} entries")
        parent.children[name] = node
        self._entries += 1
        if node.children is None:
            node.inode.nlink += 1

    def _put(self, parent: _Node, name: bytes, node: _Node) -> None:
        assert parent.children is not None
        old = parent.children.get(name)
        if old is not None:
            if old.children is not None and node.children is not None:
                old.inode, old.layer = node.inode, node.layer  # a directory over a directory: merge
                return
            del parent.children[name]
            self._drop(old)
        self._add_name(parent, name, node)

    def _drop(self, node: _Node) -> None:
        """Forget ``node`` and everything below it; spool files go with their last name."""
        stack = [node]
        while stack:
            n = stack.pop()
            self._entries -= 1
            if n.children is not None:
                stack.extend(n.children.values())
                continue
            ino = n.inode
            ino.nlink -= 1
            if ino.nlink == 0 and ino.spool is not None:
                seg = ino.segment
                if seg is None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(ino.spool)
                else:
                    seg.live -= 1
                    if seg.live == 0 and seg.sealed:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(seg.path)
                self.spooled_bytes -= ino.size
                ino.spool, ino.segment = None, None

    def _purge_lower(self, directory: _Node) -> None:
        """Drop every descendant of ``directory`` that did not come from the current layer."""
        stack = [directory]
        while stack:
            d = stack.pop()
            assert d.children is not None
            for name, child in list(d.children.items()):
                if child.layer < self._layer:
                    del d.children[name]
                    self._drop(child)
                elif child.children is not None:
                    stack.append(child)

    def _whiteout(self, comps: list[bytes]) -> None:
        base = comps[-1]
        parent = self._parent(comps)
        if base == OPAQUE:
            self._purge_lower(parent)
            return
        if base.startswith(WHITEOUT + WHITEOUT):
            return  # aufs metadata (.wh..wh.plnk, .wh..wh.aufs): not part of the tree
        target = base[len(WHITEOUT) :]
        if target in (b"", b".", b".."):
            raise _Refused(f"a whiteout of {show(target)}")
        assert parent.children is not None
        node = parent.children.get(target)
        if node is None:
            return
        if node.layer < self._layer:
            del parent.children[target]
            self._drop(node)
        elif node.children is not None:
            # Re-declared by this layer: the whiteout still hides what lower layers had in it.
            self._purge_lower(node)

    def _hardlink(self, comps: list[bytes], m: tarfile.TarInfo) -> None:
        target = _split(m.linkname, "hardlink target")
        if not target:
            raise _Refused("a hardlink to the root directory")
        if target == comps:
            raise _Refused("a hardlink to itself")
        parent = self._parent(comps)
        # As runtimes do: the old name goes first, then link() must find its target.
        assert parent.children is not None
        old = parent.children.pop(comps[-1], None)
        if old is not None:
            self._drop(old)
        node = self._find(target, "hardlink target")
        if node.children is not None:
            raise _Refused(f"a hardlink to the directory {show(b'/'.join(target))}")
        self._add_name(parent, comps[-1], _Node(node.inode, self._layer))

    # -- the result ---------------------------------------------------------------------------

    def emit(self, builder: ManifestBuilder) -> list[SourceFile]:
        """Add the tree to ``builder``; returns the regular files to chunk, in tree order.

        Like :func:`lazyfs.seed.scan_tree`: the first name of a multiply-linked inode in
        tree order is its entry, the others are HARDLINK entries naming it.  The open segment
        is closed first, so every spooled byte is on disk for the chunker.
        """
        self._seal_segment()
        inodes: dict[int, tuple[_Inode, list[bytes]]] = {}
        stack: list[tuple[bytes, _Node]] = [(b"", self.root)]
        while stack:
            path, node = stack.pop()
            ino = node.inode
            if node.children is not None:
                builder.add(Entry(path, EntryType.DIR, ino.mode, ino.uid, ino.gid, ino.mtime_ns, xattrs=ino.xattrs))
                for name, child in node.children.items():
                    stack.append((path + b"/" + name if path else name, child))
            else:
                inodes.setdefault(id(ino), (ino, []))[1].append(path)
        files: list[SourceFile] = []
        for ino, names in inodes.values():
            names.sort(key=tree_key)
            primary = names[0]
            builder.add(
                Entry(
                    primary,
                    ino.type,
                    ino.mode,
                    ino.uid,
                    ino.gid,
                    ino.mtime_ns,
                    size=ino.size,
                    target=ino.target,
                    rdev=ino.rdev,
                    xattrs=ino.xattrs,
                )
            )
            for other in names[1:]:
                builder.add(Entry(other, EntryType.HARDLINK, ino.mode, ino.uid, ino.gid, ino.mtime_ns, target=primary))
            if ino.type is EntryType.REG:
                files.append(SourceFile(primary, ino.spool or os.devnull, ino.size, ino.spool_offset))
        files.sort(key=lambda f: tree_key(f.path))
        return files
