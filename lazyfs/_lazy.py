"""Lazy package attributes: a name is imported from its module the first time it is used.

Start-up time is part of what lazyfs sells (a mount is ready in about a second), so packages
whose attributes pull in heavy modules (aiohttp, obstore, msgpack, blake3) resolve them on
first use instead of at import.  Type checkers see the names through ``TYPE_CHECKING``
imports in each package.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``table`` maps each lazy name to its module.

    The value is cached in the package's namespace, so each name is resolved once.
    """

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
