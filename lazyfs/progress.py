"""Progress reporting for long operations (seed, prefetch).

Two reporters behind one small protocol: a rich progress bar (bytes, rate,
ETA) when stderr is a terminal, and quiet periodic lines otherwise, so logs
from CI or a DaemonSet stay readable.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Protocol, TextIO

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

__all__ = ["LineProgress", "NullProgress", "ProgressReporter", "RichProgress", "human_bytes", "open_progress"]


class ProgressReporter(Protocol):
    def start(self, total: int) -> None: ...

    def advance(self, n: int) -> None: ...

    def finish(self) -> None: ...


class NullProgress:
    def start(self, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class LineProgress:
    """One line at most every ``interval`` seconds, plus a final summary."""

    # A line every 5 s keeps a 10-minute seed under ~120 lines of log.
    def __init__(self, label: str, stream: TextIO | None = None, interval: float = 5.0) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.total = 0
        self.done = 0
        self._t0 = self._last = 0.0

    def start(self, total: int) -> None:
        self.total = total
        self._t0 = self._last = time.monotonic()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._line(now)

    def _line(self, now: float) -> None:
        rate = self.done / max(now - self._t0, 1e-9)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        print(
            f"{self.label}: {human_bytes(self.done)} / {human_bytes(self.total)} ({pct:.0f}%), "
            f"{human_bytes(rate)}/s",
            file=self.stream,
            flush=True,
        )

    def finish(self) -> None:
        self._line(time.monotonic())


class RichProgress:
    def __init__(self, label: str) -> None:
        self.label = label
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self._task: TaskID | None = None

    def start(self, total: int) -> None:
        self._progress.start()
        self._task = self._progress.add_task(self.label, total=total)

    def advance(self, n: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, n)

    def finish(self) -> None:
        self._progress.stop()

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()


def open_progress(label: str, *, quiet: bool = False, stream: TextIO | None = None) -> ProgressReporter:
    """A bar on a terminal, periodic lines otherwise, nothing when ``quiet``."""
    stream = stream if stream is not None else sys.stderr  # looked up now: sys.stderr may be replaced
    if quiet:
        return NullProgress()
    if stream.isatty():
        return RichProgress(label)
    return LineProgress(label, stream)
