"""The daemon's reading of a loader's plan: which chunks, in which order, from untrusted ranges."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lazyfs.daemon import plan_chunks


def _naive(ranges: list[tuple[int, int]], size: int, cs: int) -> list[int]:
    order: dict[int, None] = {}
    for a, b in ranges:
        a, b = max(a, 0), min(b, size)
        for k in range(a // cs, (b - 1) // cs + 1 if b > a else a // cs):
            order.setdefault(k)
    return list(order)


@given(
    size=st.integers(0, 5000),
    cs=st.integers(1, 700),
    ranges=st.lists(st.tuples(st.integers(-100, 6000), st.integers(-100, 6000)), max_size=40),
)
def test_chunks_in_first_touch_order_each_once(size: int, cs: int, ranges: list[tuple[int, int]]) -> None:
    got = plan_chunks(ranges, size, cs)
    assert got == _naive(ranges, size, cs)
    assert len(set(got)) == len(got) and all(0 <= k < -(-size // cs) for k in got)


def test_examples() -> None:
    assert plan_chunks([(5, 25), (0, 3), (24, 31)], 30, 10) == [0, 1, 2]
    assert plan_chunks([(20, 30), (0, 10)], 30, 10) == [2, 0]
    assert plan_chunks([(10, 10), (31, 40), (-5, 0)], 30, 10) == []  # empty, past the end, before it
    assert plan_chunks([(0, 1 << 80)], 30, 10) == [0, 1, 2]


def test_overlapping_ranges_cost_each_chunk_once() -> None:
    """100,000 ranges that each cover all but the first of 40,000 chunks (a 156 GiB file of 4 MiB
    chunks): 4e9 steps if each range walks its chunks, some 140,000 like this."""
    n, cs = 40_000, 4 << 20
    ranges = [(cs, n * cs)] * 100_000 + [(0, 1)]
    assert plan_chunks(ranges, n * cs, cs) == [*range(1, n), 0]
