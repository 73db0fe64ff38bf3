"""Local chunk cache: lmdb index + one raw file per chunk; LRU eviction; pins; verify.

See :mod:`lazyfs.store.cache` for the mechanism and its guarantees.
"""

from lazyfs.store.cache import FORMAT, ChunkStore, StoreStatistics, VerifyReport

__all__ = ["FORMAT", "ChunkStore", "StoreStatistics", "VerifyReport"]
