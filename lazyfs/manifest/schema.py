"""The manifest's data model (format 1).

A manifest is the whole published tree: every entry with its POSIX metadata,
the table of chunks that make up regular files, and the packs that hold those
chunks at the origin.  It is immutable and identified by the BLAKE3-256 digest
of its canonical encoding (see :mod:`lazyfs.manifest.codec`).

Canonical form (enforced by the decoder, produced by the builder):

* ``entries`` are sorted by :func:`tree_key` (component-wise byte order, so a
  directory precedes everything below it) and the root (``path == b""``) comes
  first;
* ``chunks`` are listed in the order regular files first reference them, each
  digest once (deduplicated);
* ``packs`` are listed in the order chunks first reference them;
* ``xattrs`` and ``annotations`` are sorted by key, keys unique.

File names are bytes: whatever the OS allows round-trips, including
non-UTF-8 names, spaces and newlines.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from lazyfs.errors import UsageError

__all__ = [
    "DIGEST_SIZE",
    "FORMAT_VERSION",
    "IMAGE_CONFIG_ANNOTATION",
    "Chunk",
    "Codec",
    "Entry",
    "EntryType",
    "Manifest",
    "Pack",
    "Ref",
    "parse_ref",
    "tree_key",
]

FORMAT_VERSION = 1
# The annotation holding a container image's config JSON (entrypoint, cmd, env, ...): written by
# ``lazyfs seed`` for images, shown by ``inspect``, applied by ``lazyfs run``.
IMAGE_CONFIG_ANNOTATION = "org.opencontainers.image.config"
# BLAKE3-256: peers and origins are untrusted, so identity must be cryptographic.
DIGEST_SIZE = 32


class EntryType(enum.IntEnum):
    DIR = 1
    REG = 2
    SYMLINK = 3
    HARDLINK = 4  # another name for the inode of the entry at ``target``
    CHR = 5
    BLK = 6
    FIFO = 7
    SOCK = 8


class Codec(enum.IntEnum):
    NONE = 0
    ZSTD = 1


@dataclass(frozen=True, slots=True)
class Pack:
    """One object ``packs/<digest>`` at the origin: stored chunks back to back."""

    digest: bytes
    size: int

    @property
    def key(self) -> str:
        return f"packs/{self.digest.hex()}"


@dataclass(frozen=True, slots=True)
class Chunk:
    """A slice of one or more identical files' bytes and where it is stored."""

    digest: bytes  # BLAKE3-256 of the raw bytes
    size: int  # raw size
    pack: int  # index into Manifest.packs
    offset: int  # byte offset of the stored bytes inside the pack
    stored_size: int
    codec: Codec


@dataclass(frozen=True, slots=True)
class Entry:
    """One name in the tree.  ``path`` is relative, components joined by ``/``; root is ``b""``."""

    path: bytes
    type: EntryType
    mode: int  # permission bits including setuid/setgid/sticky (mask 0o7777)
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0  # REG: byte length; SYMLINK: length of the target
    target: bytes = b""  # SYMLINK: target verbatim; HARDLINK: path of the linked entry
    rdev: int = 0  # CHR/BLK device number
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    chunks: tuple[int, ...] = ()  # REG: indices into Manifest.chunks, in file order

    @property
    def name(self) -> bytes:
        return self.path.rsplit(b"/", 1)[-1]

    @property
    def parent(self) -> bytes:
        return self.path.rsplit(b"/", 1)[0] if b"/" in self.path else b""


@dataclass(frozen=True)
class Manifest:
    chunk_size: int
    entries: tuple[Entry, ...]
    chunks: tuple[Chunk, ...]
    packs: tuple[Pack, ...]
    # Free-form published metadata (an image config, the source's name); sorted by key.
    annotations: tuple[tuple[str, str], ...] = ()
    _by_path: dict[bytes, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_path.update((e.path, i) for i, e in enumerate(self.entries))

    def entry(self, path: bytes) -> Entry | None:
        i = self._by_path.get(path)
        return None if i is None else self.entries[i]

    def resolve(self, entry: Entry) -> Entry:
        """The entry that holds the inode's data: itself, or a hardlink's target."""
        if entry.type is EntryType.HARDLINK:
            target = self.entry(entry.target)
            assert target is not None  # guaranteed by validation
            return target
        return entry

    def file_chunks(self, entry: Entry) -> list[Chunk]:
        return [self.chunks[i] for i in self.resolve(entry).chunks]

    @property
    def total_size(self) -> int:
        """Bytes of file data (each inode once)."""
        return sum(e.size for e in self.entries if e.type is EntryType.REG)

    @property
    def stored_size(self) -> int:
        return sum(c.stored_size for c in self.chunks)


def tree_key(path: bytes) -> list[bytes]:
    """Sort key giving depth-first tree order: a directory right before its contents."""
    return path.split(b"/") if path else []


# --- references ---------------------------------------------------------------

# Names follow the OCI distribution rules for repositories, tags likewise.  Always use fullmatch:
# with match(), '$' also matches before a trailing newline, so 'llama3\n' would pass.
_NAME_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST_RE = re.compile(r"^(?:blake3:)?([0-9a-f]{64})$")
DEFAULT_TAG = "latest"


@dataclass(frozen=True, slots=True)
class Ref:
    """``name:tag`` (a mutable pointer) or ``name@digest`` (an exact manifest)."""

    name: str
    tag: str | None = None
    digest: str | None = None

    @property
    def key(self) -> str:
        """Origin key of the ref object (tags only)."""
        assert self.tag is not None
        return f"refs/{self.name}/{self.tag}"

    def __str__(self) -> str:
        return f"{self.name}@{self.digest}" if self.digest else f"{self.name}:{self.tag}"


def parse_ref(text: str, *, allow_digest: bool = True) -> Ref:
    """Parse ``name[:tag]`` or ``name@digest``; raises :class:`UsageError` with the reason."""
    if "@" in text:
        if not allow_digest:
            raise UsageError(f"bad name {text!r}: a digest cannot be published to; use NAME[:TAG]")
        name, _, digest = text.partition("@")
        m = _DIGEST_RE.fullmatch(digest)
        if not m:
            raise UsageError(f"bad reference {text!r}: the digest must be 64 lowercase hex digits")
        _check_name(name, text)
        return Ref(name=name, digest=m.group(1))
    name, sep, tag = text.rpartition(":")
    if not sep or "/" in tag:
        name, tag = text, DEFAULT_TAG
    _check_name(name, text)
    if not _TAG_RE.fullmatch(tag):
        rule = "[A-Za-z0-9_][A-Za-z0-9._-]{0,127}"
        raise UsageError(f"bad reference {text!r}: tag {tag!r} must match {rule}")
    return Ref(name=name, tag=tag)


def _check_name(name: str, text: str) -> None:
    if len(name) > 255 or not _NAME_RE.fullmatch(name):
        raise UsageError(
            f"bad reference {text!r}: the name must be lowercase letters, digits and "
            "separators (. _ - /), like 'llama3' or 'org/model'"
        )
