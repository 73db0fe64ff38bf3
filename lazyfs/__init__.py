"""lazyfs: lazily mounted, content-addressed models and container images.

Public API (the loader, which needs torch, lives in :mod:`lazyfs.loader`).

The names below are imported on first use, so ``import lazyfs.loader`` on a GPU node
that has torch but none of the daemon's dependencies (blake3, msgpack, lmdb, pyfuse3)
works for loading plain safetensors files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lazyfs._lazy import lazy_attributes

if TYPE_CHECKING:
    from lazyfs.config import OriginConfig, SeedConfig
    from lazyfs.errors import LazyfsError
    from lazyfs.manifest import Manifest, Ref, parse_ref

__version__ = "0.1.0"

__all__ = [
    "LazyfsError",
    "Manifest",
    "OriginConfig",
    "Ref",
    "SeedConfig",
    "__version__",
    "parse_ref",
]

_LAZY = {
    "LazyfsError": "lazyfs.errors",
    "Manifest": "lazyfs.manifest",
    "OriginConfig": "lazyfs.config",
    "Ref": "lazyfs.manifest",
    "SeedConfig": "lazyfs.config",
    "parse_ref": "lazyfs.manifest",
}


__getattr__ = lazy_attributes(__name__, _LAZY)
