"""Optional event trace of the peer tier, for finding pipeline stalls.

Off unless ``LAZYFS_P2P_TRACE`` names a file: then every peer request sent and
served is appended there as one JSON line (wall-clock time, event, fields).
The bench (bench/bench_p2p.py ``--trace DIR``) sets it per node and writes, next
to the traces, each reader's per-read times and the link counters (run.json).
"""

from __future__ import annotations

import json
import os
import time
from typing import IO, Any

__all__ = ["enabled", "event"]

_path = os.environ.get("LAZYFS_P2P_TRACE")
_file: IO[str] | None = None


def enabled() -> bool:
    return bool(_path)


def event(name: str, **fields: Any) -> None:
    global _file
    if not _path:
        return
    if _file is None:
        _file = open(_path, "a", buffering=1)  # noqa: SIM115 - kept open for the daemon's life
    _file.write(json.dumps({"t": round(time.time(), 4), "ev": name, **fields}) + "\n")
