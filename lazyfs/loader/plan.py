"""The read plan: which byte ranges to read, in which order, into which tensors.  No torch here.

Tensors are taken in file order and merged into *read units*: contiguous
ranges of at least ``min_read`` bytes (small tensors are batched), at most
``max_read`` (a large tensor is split), so every read is one large ``preadv``
and, on a GPU, every host-to-device copy is large enough not to be
launch-bound.  A unit lists its *pieces*: which slice of which tensor each part
of the unit fills.

With ``align`` (the lazyfs chunk size, when the loader reads from the cache),
units are cut only at multiples of ``align`` (or where the wanted bytes stop), so
one reader reads each chunk whole and can check it in one go; otherwise a unit
ends where a tensor ends once it holds ``min_read`` bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lazyfs.loader.header import TensorInfo

__all__ = ["MAX_READ", "MIN_READ", "Piece", "ReadUnit", "plan_reads"]

MiB = 1024 * 1024
# >= 4 MiB per read: large enough for full-speed disk and network reads and for
# host-to-device copies that are bandwidth-, not launch-bound (28 GB/s at 1 MiB, 55 at >= 4 MiB).
MIN_READ = 4 * MiB
# <= 16 MiB per read: several reads stay in flight per thread without big buffers.
MAX_READ = 16 * MiB
# Skipping at most this many unwanted bytes between wanted tensors is cheaper than a new read.
MAX_GAP = 256 * 1024


@dataclass(frozen=True, slots=True)
class Piece:
    tensor: int  # index into the plan's tensor list
    tensor_offset: int  # byte offset inside the tensor
    unit_offset: int  # byte offset inside the read unit
    length: int


@dataclass(frozen=True, slots=True)
class ReadUnit:
    start: int  # absolute file offset
    end: int
    pieces: tuple[Piece, ...]

    @property
    def length(self) -> int:
        return self.end - self.start


def plan_reads(
    tensors: Sequence[TensorInfo],
    min_read: int = MIN_READ,
    max_read: int = MAX_READ,
    max_gap: int = MAX_GAP,
    align: int = 0,
) -> list[ReadUnit]:
    """Units covering every byte of ``tensors`` (given in file order), in file order."""
    units: list[ReadUnit] = []
    start = end = limit = -1
    pieces: list[Piece] = []

    def flush() -> None:
        nonlocal start, pieces
        if pieces:
            units.append(ReadUnit(start, end, tuple(pieces)))
        pieces = []
        start = -1

    def open_unit(at: int) -> None:
        nonlocal start, end, limit
        start = end = at
        limit = at + max_read
        if align and limit % align and limit - limit % align > at:
            limit -= limit % align  # the last chunk boundary within reach

    for ti, t in enumerate(tensors):
        if t.nbytes == 0:
            continue
        if pieces and (t.start - end > max_gap or t.start < end):
            flush()
        elif pieces and end - start >= min_read:
            # Big enough: end the unit with the tensor before, or (aligned) at the chunk boundary after it.
            boundary = end if not align or end % align == 0 else end + align - end % align
            if boundary - start > max_read or boundary == end:
                flush()
            else:
                limit = min(limit, boundary)
        off = 0
        while off < t.nbytes:
            if not pieces:
                open_unit(t.start + off)
            elif limit <= t.start + off:  # the unit's boundary fell in the gap before this tensor
                flush()
                continue
            n = min(limit - (t.start + off), t.nbytes - off)
            pieces.append(Piece(ti, off, t.start + off - start, n))
            end = t.start + off + n
            off += n
            if end >= limit:
                flush()
    flush()
    return units
