"""The read plan: which byte ranges to read, in which order, into which tensors.  No torch here.

Tensors are taken in file order and merged into *read units*: contiguous
ranges of at least ``min_read`` bytes (small tensors are batched), at most
``max_read`` (a large tensor is split), so every read is one large ``preadv``
and, on a GPU, every host-to-device copy is large enough not to be
launch-bound.  A unit lists its *pieces*: which slice of which tensor each part
of the unit fills.
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
    tensors: Sequence[TensorInfo], min_read: int = MIN_READ, max_read: int = MAX_READ, max_gap: int = MAX_GAP
) -> list[ReadUnit]:
    """Units covering every byte of ``tensors`` (given in file order), in file order."""
    units: list[ReadUnit] = []
    start = -1
    end = -1
    pieces: list[Piece] = []

    def flush() -> None:
        nonlocal start, pieces
        if pieces:
            units.append(ReadUnit(start, end, tuple(pieces)))
        pieces = []
        start = -1

    for ti, t in enumerate(tensors):
        if t.nbytes == 0:
            continue
        if pieces and (t.start - end > max_gap or t.start < end or end - start >= min_read):
            flush()
        off = 0
        while off < t.nbytes:
            if not pieces:
                start = end = t.start + off
            room = max_read - (t.start + off - start)
            if room <= 0:
                flush()
                continue
            n = min(room, t.nbytes - off)
            pieces.append(Piece(ti, off, t.start + off - start, n))
            end = t.start + off + n
            off += n
            if end - start >= max_read:
                flush()
    flush()
    return units
