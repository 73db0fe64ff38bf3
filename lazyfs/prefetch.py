"""Read-ahead policy: decides *what* to fetch early; the fetcher decides *how*.

One :class:`ReadAhead` per open file.  A reader whose requests continue where
the previous one ended is sequential: the window of chunks fetched ahead of it
starts small and doubles with every sequential read up to ``max_window``.  A
read elsewhere resets the window to zero, so a random reader causes no
read-ahead at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lazyfs.fetch import ChunkFetcher, Priority

__all__ = ["ReadAhead", "ReadAheadConfig"]

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ReadAheadConfig:
    # First window once two reads in a row are sequential: two 4 MiB chunks.
    initial_window: int = 8 * MiB
    # Largest window: 128 MiB is ~1 s at 1 Gbit/s and ~100 ms at 10 Gbit/s, enough to
    # hide request latency; it stays under the fetcher's in-flight byte budget.
    max_window: int = 128 * MiB
    # The kernel has several requests in flight and they can arrive slightly out of
    # order; a read starting this close to the previous end still counts as sequential.
    slack: int = 4 * MiB


class ReadAhead:
    def __init__(
        self,
        fetcher: ChunkFetcher,
        chunks: Sequence[int],
        chunk_size: int,
        size: int,
        config: ReadAheadConfig = ReadAheadConfig(),
    ) -> None:
        self.fetcher = fetcher
        self.chunks = chunks
        self.chunk_size = chunk_size
        self.size = size
        self.config = config
        self.window = 0
        self._next = -1  # where a sequential reader continues
        self._ahead = 0  # end offset (exclusive) of what was already requested

    def on_read(self, offset: int, length: int) -> None:
        end = min(offset + length, self.size)
        cfg = self.config
        if self._next >= 0 and self._next - cfg.slack <= offset <= self._next + cfg.slack:
            self.window = min(max(self.window * 2, cfg.initial_window), cfg.max_window)
            self._next = max(self._next, end)
        else:
            # A first read at offset 0 is very likely a whole-file read: start the window.
            self.window = cfg.initial_window if offset == 0 and self._next < 0 else 0
            self._ahead = 0
            self._next = end
        if not self.window:
            return
        first = max(end, self._ahead)
        last = min(end + self.window, self.size)
        if last <= first:
            return
        a = first // self.chunk_size
        b = (last - 1) // self.chunk_size + 1
        self.fetcher.prefetch_nowait(self.chunks[a:b], Priority.READAHEAD)
        self._ahead = b * self.chunk_size
