"""lazyfs: lazily mounted, content-addressed models and container images.

Public API (the loader, which needs torch, lives in :mod:`lazyfs.loader`).
"""

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
