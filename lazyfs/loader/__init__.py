"""Stream safetensors tensors onto a device as their bytes arrive (needs the ``torch`` extra).

``header``, ``plan``, ``readers`` and ``errors`` need no torch; the API below imports it on
first use, so importing :mod:`lazyfs.loader.header` works in a daemon without torch.  Loading
plain files needs nothing but torch (no pyfuse3, lmdb, zstandard or blake3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lazyfs.loader.api import (
        HeaderError,
        LoaderError,
        LoaderIOError,
        LoadStatistics,
        free_pinned_memory,
        iter_tensors,
        last_statistics,
        load_file,
        safe_open,
    )

__all__ = [
    "HeaderError",
    "LoadStatistics",
    "LoaderError",
    "LoaderIOError",
    "free_pinned_memory",
    "iter_tensors",
    "last_statistics",
    "load_file",
    "safe_open",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lazyfs.loader import api

        return getattr(api, name)
    raise AttributeError(name)
