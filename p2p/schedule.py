"""Ordering a home's work so that the chunk needed first arrives first.

Every node reads a model in file order, and every node's read-ahead asks for a
window of chunks at once (32 x 4 MiB).  Started all together, those transfers
share the link evenly (TCP is fair) and all finish together, late: the
measured 4-node, 200 Mbit/s run had a reader wait 7.7 s for chunk 4 while the
links carried chunks 5-36.  So a home does its two kinds of work a few at a
time, in order of need, instead of all at once:

* :class:`HomeFetches` — origin fetches of the chunks this node is home for
  (asked by peers or by this node's own reads), at most ``slots`` at a time
  (:func:`p2p.tier.origin_slots`);
* the peer server sends replies through a :class:`PrioritySlots` of its own.

"Need" is :func:`urgency`: a blocked reader (``DEMAND``) first, then the
lowest chunk index — readers move through a file front to back, so the lower
index is wanted sooner by everybody.  A demand request never waits for a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from lazyfs.errors import DeadlineError, LazyfsError
from lazyfs.fetch import Data, Priority
from p2p import trace

__all__ = ["HomeFetches", "PrioritySlots", "urgency"]

log = logging.getLogger(__name__)

Key = tuple[int, int]


def urgency(priority: Priority, index: int) -> Key:
    """Sort key of a piece of work: demand, then read-ahead, then background (warming); within
    each, file order (lower chunk index).  A node warming its cache never queues ahead of another
    node's read-ahead."""
    return (int(priority), index)


class PrioritySlots:
    """A semaphore whose waiters are admitted lowest key first; ``bypass`` never waits."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self.busy = 0
        self._waiters: list[tuple[Key, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for _, _, f in self._waiters if not f.done())

    async def acquire(self, key: Key, bypass: bool = False) -> None:
        if bypass or (self.busy < self.slots and not self.waiting):
            self.busy += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (key, next(self._seq), fut))
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # admitted and cancelled at once: pass the slot on
            else:
                fut.cancel()
            raise

    def release(self) -> None:
        self.busy -= 1
        while self._waiters and self.busy < self.slots:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                self.busy += 1
                fut.set_result(None)

    @asynccontextmanager
    async def hold(self, key: Key, bypass: bool = False) -> AsyncIterator[None]:
        await self.acquire(key, bypass)
        try:
            yield
        finally:
            self.release()


class Provider(Protocol):
    async def get(
        self, index: int, priority: Priority = ..., deadline: float | None = ..., *, use_sources: bool = ...
    ) -> Data: ...


@dataclass(eq=False)
class _Entry:
    index: int
    priority: Priority
    own: bool = False  # this node's own fetcher has a flight for it (waiting in turn())
    admitted: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    done: asyncio.Future[Data] | None = None


class HomeFetches:
    """The origin fetches of this node's home chunks, ``slots`` at a time, most urgent first.

    :meth:`get` (the peer server) waits its turn, then fetches the chunk with
    ``use_sources=False`` and returns it; :meth:`turn` (this node's own read of a
    home chunk, from the peer source) only waits its turn: the fetcher then goes
    to the origin itself.  Either way one slot is held until the chunk has
    arrived.  Chunks fetched once skip the queue afterwards (memory or cache).
    """

    def __init__(self, provider: Provider, slots: int | Callable[[], int]) -> None:
        self.provider = provider
        self._limit = slots if callable(slots) else lambda: slots
        self.slots = PrioritySlots(self._limit())
        self._entries: dict[int, _Entry] = {}
        self._fetched: set[int] = set()

    def _entry(self, index: int, priority: Priority, own: bool) -> _Entry:
        e = self._entries.get(index)
        if e is None:
            e = _Entry(index, priority, own)
            self._entries[index] = e
            e.task = asyncio.create_task(self._run(e))
        e.own = e.own or own
        if priority < e.priority:
            e.priority = priority
            if priority is Priority.DEMAND and not e.admitted.is_set():
                # A blocked reader: restart the wait without one.
                assert e.task is not None
                e.task.cancel()
                e.task = asyncio.create_task(self._run(e))
        return e

    async def _run(self, e: _Entry) -> None:
        self.slots.slots = max(1, self._limit())  # follows the cluster's size
        try:
            await self.slots.acquire(urgency(e.priority, e.index), bypass=e.priority is Priority.DEMAND)
        except asyncio.CancelledError:
            return  # replaced by a demand entry (or shutdown)
        loop = asyncio.get_running_loop()
        e.done = loop.create_future()
        e.admitted.set()
        try:
            trace.event("admit", i=e.index, prio=int(e.priority), own=e.own, busy=self.slots.busy)
            # Joining this node's own flight must not stop it asking peers for cached copies
            # should the origin fail; a flight started here must never ask peers (see server).
            data = await self.provider.get(e.index, e.priority, use_sources=e.own)
        except LazyfsError as exc:
            e.done.set_exception(exc)
            e.done.exception()  # nobody may be waiting
        except BaseException as exc:
            e.done.set_exception(LazyfsError(f"fetch of chunk {e.index} ended: {exc!r}"))
            e.done.exception()
            raise
        else:
            e.done.set_result(data)
            self._fetched.add(e.index)
            trace.event("landed", i=e.index)
        finally:
            self.slots.release()
            if self._entries.get(e.index) is e:
                del self._entries[e.index]

    async def get(self, index: int, priority: Priority, deadline: float) -> Data:
        if index in self._fetched:
            return await self.provider.get(index, priority, deadline, use_sources=False)
        e = self._entry(index, priority, own=False)
        try:
            async with asyncio.timeout_at(deadline):
                await e.admitted.wait()
                assert e.done is not None
                return await asyncio.shield(e.done)
        except TimeoutError:
            raise DeadlineError(f"chunk {index} was not fetched from the origin in time") from None

    async def turn(self, index: int, priority: Priority, deadline: float) -> None:
        if index in self._fetched:
            return
        e = self._entry(index, priority, own=True)
        with contextlib.suppress(TimeoutError):  # past the deadline: the fetcher gives up anyway
            async with asyncio.timeout_at(deadline):
                await e.admitted.wait()

    def aclose(self) -> None:
        for e in list(self._entries.values()):
            if e.task is not None:
                e.task.cancel()
            if not e.admitted.is_set():
                # Still queued: its waiters learn now, not at their deadlines.
                closed = asyncio.get_running_loop().create_future()
                closed.set_exception(LazyfsError(f"chunk {e.index}: the peer tier is closing"))
                closed.exception()  # nobody may be waiting
                e.done = closed
                e.admitted.set()
        self._entries.clear()
