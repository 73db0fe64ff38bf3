"""Public test helpers: an in-memory origin, a fault injector, and the origin contract suite.

* :class:`MemoryOrigin` — a complete in-memory :class:`~lazyfs.origin.base.Origin`
  that counts what it serves (:meth:`MemoryOrigin.statistics`).  It can pose as a
  read-only or non-listing origin (like a static HTTP server).
* :class:`FaultyOrigin` — wraps any origin and injects faults on demand: errors
  (the next N calls, or each call with a probability drawn from a seeded RNG),
  truncated or corrupted reads, delays, and calls that hang until released.
* :class:`OriginContract` — the tests every origin passes.  Subclass it in a test
  module (the subclass name must start with ``Test``) and provide a fixture named
  ``origin_subject`` that yields a fresh, empty :class:`OriginSubject` and closes
  the origin afterwards::

      class TestMyOrigin(OriginContract):
          @pytest.fixture
          async def origin_subject(self, tmp_path: Path) -> AsyncIterator[OriginSubject]:
              origin = MyOrigin(tmp_path)
              yield OriginSubject.of(origin)
              await origin.aclose()

  The contract's test methods are plain ``async def`` methods that take that one
  fixture: they run under pytest-asyncio (``asyncio_mode = "auto"``) or any runner
  that awaits coroutine tests, and this module imports neither pytest nor a plugin.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, ClassVar

from lazyfs.errors import NotFoundError, OriginError, ReadOnlyError, UnavailableError, UsageError
from lazyfs.origin._common import check_prefix, check_range, clip
from lazyfs.origin.base import Origin, check_key

__all__ = [
    "FaultStatistics",
    "FaultyOrigin",
    "MemoryOrigin",
    "OriginContract",
    "OriginStatistics",
    "OriginSubject",
]

MiB = 1024 * 1024


# --- MemoryOrigin ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OriginStatistics:
    """What a :class:`MemoryOrigin` was asked: every call counts, bytes only when served."""

    reads: int = 0
    bytes_read: int = 0
    writes: int = 0
    bytes_written: int = 0
    exists_calls: int = 0
    lists: int = 0


class MemoryOrigin:
    """An in-memory origin, for tests.

    Each call yields to the event loop once before answering, so concurrent callers
    really interleave.  ``writable=False`` makes ``write`` raise
    :class:`~lazyfs.errors.ReadOnlyError` and ``listable=False`` does the same for
    ``list`` (a static HTTP server); :meth:`put_nowait` still fills such an origin.
    Writes are atomic: an object is replaced by a new ``bytes`` object in one step.
    """

    def __init__(
        self,
        objects: Mapping[str, bytes] | None = None,
        *,
        url: str = "memory://",
        writable: bool = True,
        listable: bool = True,
    ) -> None:
        self._objects: dict[str, bytes] = {}
        for key, data in (objects or {}).items():
            self.put_nowait(key, data)
        self._url = url
        self._writable = writable
        self._listable = listable
        self._stats = OriginStatistics()
        self._closed = False

    @property
    def url(self) -> str:
        return self._url

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def objects(self) -> Mapping[str, bytes]:
        """A read-only live view of the stored objects."""
        return MappingProxyType(self._objects)

    def put_nowait(self, key: str, data: bytes) -> None:
        """Store an object directly (even in a read-only origin); not counted as a write."""
        self._objects[check_key(key)] = bytes(data)

    def statistics(self) -> OriginStatistics:
        return self._stats

    def reset_statistics(self) -> None:
        self._stats = OriginStatistics()

    def _count(self, **deltas: int) -> None:
        s = self._stats
        self._stats = replace(s, **{k: getattr(s, k) + v for k, v in deltas.items()})

    async def _enter(self) -> None:
        await asyncio.sleep(0)
        if self._closed:
            raise UnavailableError(f"{self._url}: the origin is closed")

    async def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        check_range(key, start, length)
        self._count(reads=1)
        await self._enter()
        try:
            data = self._objects[key]
        except KeyError:
            raise NotFoundError(f"{self._url}{key}: no such object") from None
        out = clip(data, start, length)
        self._count(bytes_read=len(out))
        return out

    async def write(self, key: str, data: bytes | memoryview) -> None:
        check_key(key)
        self._count(writes=1)
        await self._enter()
        if not self._writable:
            raise ReadOnlyError(f"{self._url} is read-only")
        self._objects[key] = bytes(data)
        self._count(bytes_written=len(data))

    async def exists(self, key: str) -> bool:
        check_key(key)
        self._count(exists_calls=1)
        await self._enter()
        return key in self._objects

    async def list(self, prefix: str) -> list[str]:
        check_prefix(prefix)
        self._count(lists=1)
        await self._enter()
        if not self._listable:
            raise ReadOnlyError(f"{self._url} cannot list its keys")
        return sorted(k for k in self._objects if k.startswith(prefix))

    async def aclose(self) -> None:
        self._closed = True


# --- FaultyOrigin ---------------------------------------------------------------------------------

ALL_OPERATIONS = frozenset({"read", "write", "exists", "list"})


@dataclass(frozen=True, slots=True)
class FaultStatistics:
    """What a :class:`FaultyOrigin` did: calls seen and faults injected."""

    calls: int = 0
    errors: int = 0
    truncations: int = 0
    corruptions: int = 0
    delays: int = 0
    hangs: int = 0


class FaultyOrigin:
    """Wraps ``inner`` and injects faults; with no fault set it is a transparent proxy.

    Knobs (keyword arguments, and attributes of the same names to change at any time):

    * ``error_rate``: each call raises ``error_type`` with this probability.
    * ``truncate_rate`` / ``corrupt_rate``: each non-empty read returns a strict prefix
      of its bytes / its bytes with one byte changed, with this probability.
    * ``delay``: seconds to sleep before each call is answered.
    * ``hang``: while True, calls wait forever (until cancelled, or until ``hang``
      is set back to False, when they go on normally).
    * ``operations``: which calls errors, delays and hangs apply to (default: all).

    Counted faults, consumed before the rates: :meth:`fail_next`,
    :meth:`truncate_next`, :meth:`corrupt_next`.  All randomness comes from one
    ``random.Random(seed)``, so a test run is reproducible.
    """

    def __init__(
        self,
        inner: Origin,
        *,
        seed: int = 0,
        error_rate: float = 0.0,
        error_type: type[OriginError] = UnavailableError,
        truncate_rate: float = 0.0,
        corrupt_rate: float = 0.0,
        delay: float = 0.0,
        operations: Collection[str] = ALL_OPERATIONS,
    ) -> None:
        self.inner = inner
        self.error_rate = error_rate
        self.error_type = error_type
        self.truncate_rate = truncate_rate
        self.corrupt_rate = corrupt_rate
        self.delay = delay
        self.operations = operations
        self._rng = random.Random(seed)
        self._fail_next = 0
        self._fail_next_type: type[OriginError] = UnavailableError
        self._truncate_next = 0
        self._corrupt_next = 0
        self._hang = False
        self._released = asyncio.Event()
        self._released.set()
        self._stats = FaultStatistics()

    @property
    def url(self) -> str:
        return self.inner.url

    @property
    def writable(self) -> bool:
        return self.inner.writable

    @property
    def hang(self) -> bool:
        return self._hang

    @hang.setter
    def hang(self, value: bool) -> None:
        self._hang = value
        if value:
            self._released.clear()
        else:
            self._released.set()

    def fail_next(self, n: int = 1, error_type: type[OriginError] = UnavailableError) -> None:
        """The next ``n`` calls (among ``operations``) raise ``error_type``."""
        self._fail_next, self._fail_next_type = n, error_type

    def truncate_next(self, n: int = 1) -> None:
        """The next ``n`` non-empty reads return a strict prefix of their bytes."""
        self._truncate_next = n

    def corrupt_next(self, n: int = 1) -> None:
        """The next ``n`` non-empty reads return their bytes with one byte changed."""
        self._corrupt_next = n

    def heal(self) -> None:
        """Turn every fault off and release hung calls."""
        self.error_rate = self.truncate_rate = self.corrupt_rate = self.delay = 0.0
        self._fail_next = self._truncate_next = self._corrupt_next = 0
        self.hang = False

    def statistics(self) -> FaultStatistics:
        return self._stats

    def _count(self, **deltas: int) -> None:
        s = self._stats
        self._stats = replace(s, **{k: getattr(s, k) + v for k, v in deltas.items()})

    async def _before(self, op: str, key: str) -> None:
        self._count(calls=1)
        if op not in self.operations:
            return
        if self._hang:
            self._count(hangs=1)
            await self._released.wait()
        if self.delay > 0:
            self._count(delays=1)
            await asyncio.sleep(self.delay)
        if self._fail_next > 0:
            self._fail_next -= 1
            self._count(errors=1)
            raise self._fail_next_type(f"injected fault: {op} {key!r} at {self.url}")
        if self.error_rate > 0 and self._rng.random() < self.error_rate:
            self._count(errors=1)
            raise self.error_type(f"injected fault: {op} {key!r} at {self.url}")

    def _damage(self, data: bytes) -> bytes:
        if not data:
            return data
        if self._truncate_next > 0 or (self.truncate_rate > 0 and self._rng.random() < self.truncate_rate):
            self._truncate_next = max(0, self._truncate_next - 1)
            self._count(truncations=1)
            data = data[: self._rng.randrange(len(data))]
            if not data:
                return data
        if self._corrupt_next > 0 or (self.corrupt_rate > 0 and self._rng.random() < self.corrupt_rate):
            self._corrupt_next = max(0, self._corrupt_next - 1)
            self._count(corruptions=1)
            damaged = bytearray(data)
            damaged[self._rng.randrange(len(data))] ^= self._rng.randrange(1, 256)
            data = bytes(damaged)
        return data

    async def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        await self._before("read", key)
        return self._damage(await self.inner.read(key, start, length))

    async def write(self, key: str, data: bytes | memoryview) -> None:
        await self._before("write", key)
        await self.inner.write(key, data)

    async def exists(self, key: str) -> bool:
        await self._before("exists", key)
        return await self.inner.exists(key)

    async def list(self, prefix: str) -> list[str]:
        await self._before("list", prefix)
        return await self.inner.list(prefix)

    async def aclose(self) -> None:
        await self.inner.aclose()


# --- the origin contract --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OriginSubject:
    """An origin under test, and how the contract stores objects in it.

    ``put`` is ``origin.write`` for writable origins; for a read-only one (HTTP) it
    writes where the origin reads from (the served directory).  ``lists`` says
    whether ``origin.list`` works or must raise :class:`~lazyfs.errors.ReadOnlyError`.
    """

    origin: Origin
    put: Callable[[str, bytes], Awaitable[None]]
    lists: bool = True

    @classmethod
    def of(cls, origin: Origin, *, lists: bool = True) -> OriginSubject:
        """A subject for a writable origin: objects are stored with ``origin.write``."""
        return cls(origin, origin.write, lists)


async def _raises(exc_type: type[BaseException], awaitable: Awaitable[Any]) -> BaseException:
    """Await ``awaitable`` and return the ``exc_type`` it raised (fail if it raised none)."""
    try:
        result = await awaitable
    except exc_type as exc:
        return exc
    raise AssertionError(f"expected {exc_type.__name__}, got a result: {result!r:.80}")


def _data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


BAD_KEYS = ("", "/abs", "a/../b", "..", ".", "a//b", "./a", "a/", "a/./b", "nul\0key")


class OriginContract:
    """The behaviour every :class:`~lazyfs.origin.base.Origin` must show (see the module docstring).

    Subclasses may shrink the class attributes for slow test servers, never below
    what still exercises the property (large objects cross several 4 MiB chunks).
    """

    # Larger than two 4 MiB chunks and not a multiple of anything: ranges straddle boundaries.
    large_size: ClassVar[int] = 9 * MiB + 12345
    # Big enough that a non-atomic write (open, write in pieces, close) would be caught mid-way.
    atomic_size: ClassVar[int] = 1 * MiB
    atomic_rounds: ClassVar[int] = 6
    concurrent_reads: ClassVar[int] = 32

    async def test_is_an_origin(self, origin_subject: OriginSubject) -> None:
        origin = origin_subject.origin
        assert isinstance(origin, Origin)
        assert isinstance(origin.url, str) and origin.url
        assert isinstance(origin.writable, bool)

    async def test_read_whole_object(self, origin_subject: OriginSubject) -> None:
        data = _data(1000)
        await origin_subject.put("a/obj", data)
        assert await origin_subject.origin.read("a/obj") == data
        assert await origin_subject.origin.read("a/obj", 0, None) == data

    async def test_read_ranges(self, origin_subject: OriginSubject) -> None:
        data = _data(1000)
        await origin_subject.put("obj", data)
        origin = origin_subject.origin
        for start, length in [(0, 1), (0, 999), (0, 1000), (1, 10), (500, 250), (999, 1), (123, 877)]:
            assert await origin.read("obj", start, length) == data[start : start + length], (start, length)
        for start in (1, 500, 999):
            assert await origin.read("obj", start) == data[start:], start

    async def test_read_is_clipped_at_end(self, origin_subject: OriginSubject) -> None:
        data = _data(1000)
        await origin_subject.put("obj", data)
        origin = origin_subject.origin
        assert await origin.read("obj", 990, 100) == data[990:]
        assert await origin.read("obj", 0, 5000) == data
        assert await origin.read("obj", 999, 2) == data[999:]

    async def test_read_past_end_is_empty(self, origin_subject: OriginSubject) -> None:
        await origin_subject.put("obj", _data(1000))
        origin = origin_subject.origin
        assert await origin.read("obj", 1000, 10) == b""
        assert await origin.read("obj", 5000, 10) == b""
        assert await origin.read("obj", 1000) == b""
        assert await origin.read("obj", 1 << 40, 1) == b""

    async def test_read_zero_length(self, origin_subject: OriginSubject) -> None:
        await origin_subject.put("obj", _data(100))
        assert await origin_subject.origin.read("obj", 10, 0) == b""
        assert await origin_subject.origin.read("obj", 0, 0) == b""

    async def test_empty_object(self, origin_subject: OriginSubject) -> None:
        await origin_subject.put("empty", b"")
        origin = origin_subject.origin
        assert await origin.exists("empty")
        assert await origin.read("empty") == b""
        assert await origin.read("empty", 0, 10) == b""
        assert await origin.read("empty", 5, 10) == b""

    async def test_missing_key_raises_not_found(self, origin_subject: OriginSubject) -> None:
        await origin_subject.put("present", b"x")
        origin = origin_subject.origin
        await _raises(NotFoundError, origin.read("missing"))
        await _raises(NotFoundError, origin.read("missing", 10, 10))
        await _raises(NotFoundError, origin.read("missing", 0, 0))
        await _raises(NotFoundError, origin.read("deeper/missing/key", 3))
        await _raises(NotFoundError, origin.read("present/below"))

    async def test_exists(self, origin_subject: OriginSubject) -> None:
        await origin_subject.put("dir/obj", b"x")
        await origin_subject.put("empty", b"")
        origin = origin_subject.origin
        assert await origin.exists("dir/obj") is True
        assert await origin.exists("empty") is True
        assert await origin.exists("missing") is False
        assert await origin.exists("dir/missing") is False
        assert await origin.exists("dir/obj/below") is False

    async def test_a_key_prefix_is_not_an_object(self, origin_subject: OriginSubject) -> None:
        await origin_subject.put("refs/llama/8b", b"digest\n")
        origin = origin_subject.origin
        assert await origin.exists("refs/llama") is False
        assert await origin.exists("refs") is False
        await _raises(NotFoundError, origin.read("refs/llama"))
        await _raises(NotFoundError, origin.read("refs", 0, 10))

    async def test_binary_data_round_trips(self, origin_subject: OriginSubject) -> None:
        data = bytes(range(256)) * 4 + b"\0\r\n\r\n\0" + "é😀".encode() + b"\xff" * 100
        await origin_subject.put("bin", data)
        assert await origin_subject.origin.read("bin") == data
        assert await origin_subject.origin.read("bin", 250, 20) == data[250:270]

    async def test_unusual_key_characters(self, origin_subject: OriginSubject) -> None:
        keys = ["name with space", "percent%20sign", "q?mark#hash", "plus+and=eq", "ünïcode/ключ", "a.b-c_d~e"]
        for i, key in enumerate(keys):
            await origin_subject.put(key, _data(10, i))
        for i, key in enumerate(keys):
            assert await origin_subject.origin.read(key) == _data(10, i), key
            assert await origin_subject.origin.exists(key), key

    async def test_list(self, origin_subject: OriginSubject) -> None:
        keys = ["refs/llama/8b", "refs/llama/70b", "refs/lm/x", "refs/zz", "manifests/ab", "packs/cd", "top"]
        for key in keys:
            await origin_subject.put(key, b"x")
        origin = origin_subject.origin
        if not origin_subject.lists:
            await _raises(ReadOnlyError, origin.list("refs/"))
            return
        assert await origin.list("refs/") == sorted(k for k in keys if k.startswith("refs/"))
        assert await origin.list("refs/ll") == ["refs/llama/70b", "refs/llama/8b"]
        assert await origin.list("refs/llama/") == ["refs/llama/70b", "refs/llama/8b"]
        assert await origin.list("") == sorted(keys)
        assert await origin.list("t") == ["top"]
        assert await origin.list("nothing/") == []
        assert await origin.list("refs/llama/8b") == ["refs/llama/8b"]

    async def test_list_is_sorted_and_complete(self, origin_subject: OriginSubject) -> None:
        if not origin_subject.lists:
            await _raises(ReadOnlyError, origin_subject.origin.list(""))
            return
        keys = [f"k/{random.Random(i).randrange(10**6):07d}/{i}" for i in range(60)]
        await asyncio.gather(*(origin_subject.put(k, b"") for k in keys))
        assert await origin_subject.origin.list("k/") == sorted(keys)

    async def test_overwrite_replaces(self, origin_subject: OriginSubject) -> None:
        await origin_subject.put("obj", b"first version, longer")
        await origin_subject.put("obj", b"second")
        assert await origin_subject.origin.read("obj") == b"second"
        if origin_subject.lists:
            assert await origin_subject.origin.list("") == ["obj"]

    async def test_overwrite_is_atomic(self, origin_subject: OriginSubject) -> None:
        """Readers racing a writer see one whole version, never a mix or a prefix."""
        size = self.atomic_size
        versions = [bytes([v]) * size for v in (0x41, 0x42)]
        await origin_subject.put("obj", versions[0])
        done = asyncio.Event()

        async def writer() -> None:
            try:
                for i in range(self.atomic_rounds):
                    await origin_subject.put("obj", versions[(i + 1) % 2])
            finally:
                done.set()

        async def reader() -> None:
            while not done.is_set():
                data = await origin_subject.origin.read("obj")
                assert data in versions, f"torn read: {len(data)} bytes, {len(set(data))} distinct values"
                await asyncio.sleep(0)

        await asyncio.gather(writer(), reader(), reader())
        assert await origin_subject.origin.read("obj") == versions[self.atomic_rounds % 2]

    async def test_write(self, origin_subject: OriginSubject) -> None:
        origin = origin_subject.origin
        if not origin.writable:
            await _raises(ReadOnlyError, origin.write("obj", b"data"))
            return
        await origin.write("new/deep/obj", b"data")
        assert await origin.read("new/deep/obj") == b"data"
        await origin.write("new/deep/obj", b"replaced")
        assert await origin.read("new/deep/obj") == b"replaced"

    async def test_large_object(self, origin_subject: OriginSubject) -> None:
        data = _data(self.large_size, 7)
        await origin_subject.put("packs/large", data)
        origin = origin_subject.origin
        assert await origin.read("packs/large") == data
        four = 4 * MiB
        for start, length in [(four - 100, 200), (0, four), (four, four), (2 * four, four), (123, 3 * four)]:
            assert await origin.read("packs/large", start, length) == data[start : start + length], start
        assert await origin.read("packs/large", self.large_size - 10) == data[-10:]

    async def test_concurrent_reads(self, origin_subject: OriginSubject) -> None:
        data = _data(256 * 1024, 3)
        await origin_subject.put("obj", data)
        await origin_subject.put("other", data[::-1])
        origin = origin_subject.origin
        step = len(data) // self.concurrent_reads
        ranges = [(i * step, step + i) for i in range(self.concurrent_reads)]
        results = await asyncio.gather(
            *(origin.read("obj" if i % 2 else "other", s, n) for i, (s, n) in enumerate(ranges))
        )
        for i, ((s, n), got) in enumerate(zip(ranges, results, strict=True)):
            src = data if i % 2 else data[::-1]
            assert got == src[s : s + n], i

    async def test_bad_keys_are_rejected(self, origin_subject: OriginSubject) -> None:
        origin = origin_subject.origin
        for key in BAD_KEYS:
            await _raises(UsageError, origin.read(key))
            await _raises(UsageError, origin.read(key, 0, 10))
            await _raises(UsageError, origin.exists(key))
            await _raises(UsageError, origin.write(key, b"x"))
        for prefix in ("/", "/abs", "../", "a/../b", "a//"):
            await _raises(UsageError, origin.list(prefix))

    async def test_bad_ranges_are_rejected(self, origin_subject: OriginSubject) -> None:
        await origin_subject.put("obj", b"0123456789")
        origin = origin_subject.origin
        await _raises(UsageError, origin.read("obj", -1, 5))
        await _raises(UsageError, origin.read("obj", 0, -1))

    async def test_aclose_is_final_and_idempotent(self, origin_subject: OriginSubject) -> None:
        await origin_subject.put("obj", b"x")
        origin = origin_subject.origin
        assert await origin.read("obj") == b"x"
        await origin.aclose()
        await origin.aclose()
        await _raises(OriginError, origin.read("obj"))
