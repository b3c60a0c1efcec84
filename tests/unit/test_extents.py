"""Byte ranges as failback merges and copies them: ``coalesce`` and ``align``."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmreplica._internal.extents import align, coalesce

K = 1024


@pytest.mark.parametrize(
    ("ranges", "merged"),
    [
        ([], []),
        ([(0, 0), (5, -1)], []),
        ([(10, 5)], [(10, 5)]),
        ([(20, 5), (0, 5)], [(0, 5), (20, 5)]),  # sorted
        ([(0, 10), (5, 10)], [(0, 15)]),  # overlapping
        ([(0, 10), (10, 5)], [(0, 15)]),  # adjacent
        ([(0, 10), (11, 5)], [(0, 10), (11, 5)]),  # one byte apart
        ([(0, 100), (10, 5)], [(0, 100)]),  # contained
        ([(10, 5), (10, 5)], [(10, 5)]),  # twice
        ([(10, 5), (10, 20), (10, 1)], [(10, 20)]),  # same start, the longest wins
        ([(30, 5), (0, 0), (15, 0), (0, 10), (35, 1), (5, 10)], [(0, 15), (30, 6)]),
        ([[0, 10], (10, 1)], [(0, 11)]),  # lists, as they come back from JSON
    ],
)
def test_coalesce(ranges: list[tuple[int, int]], merged: list[tuple[int, int]]) -> None:
    assert coalesce(ranges) == merged


@pytest.mark.parametrize(
    ("ranges", "size", "aligned"),
    [
        ([], 1024 * K, []),
        ([(0, 0)], 1024 * K, []),
        ([(0, 64 * K)], 1024 * K, [(0, 64 * K)]),
        ([(1, 1)], 1024 * K, [(0, 64 * K)]),  # unaligned start and end
        ([(64 * K - 1, 2)], 1024 * K, [(0, 128 * K)]),  # across a boundary
        ([(64 * K, 64 * K + 1)], 1024 * K, [(64 * K, 128 * K)]),  # one byte into the next
        ([(10, 1), (200 * K, 1)], 1024 * K, [(0, 64 * K), (192 * K, 64 * K)]),
        ([(10, 1), (100 * K, 1)], 1024 * K, [(0, 128 * K)]),  # adjacent once widened
        ([(5, 1), (6, 1), (60 * K, 8 * K)], 1024 * K, [(0, 128 * K)]),  # same cluster
        ([(1000 * K, 100 * K)], 1024 * K, [(960 * K, 64 * K)]),  # clipped at the disk's end
        ([(1000 * K, 1)], 1000 * K + 5, [(960 * K, 40 * K + 5)]),  # a partial last cluster
        ([(2048 * K, 10)], 1024 * K, []),  # wholly past the end
        ([(0, 10), (2048 * K, 10)], 1024 * K, [(0, 64 * K)]),
    ],
)
def test_align_to_64k_clusters(
    ranges: list[tuple[int, int]], size: int, aligned: list[tuple[int, int]]
) -> None:
    assert align(ranges, 64 * K, size) == aligned


def test_align_to_other_granularities() -> None:
    assert align([(300 * K, 4 * K), (600 * K, 4 * K)], 256 * K, 4096 * K) == [(256 * K, 512 * K)]
    assert align([(3, 2), (9, 1)], 4, 100) == [(0, 12)]
    assert align([(3, 2)], 1, 100) == [(3, 2)]


def covered(ranges: list[tuple[int, int]]) -> set[int]:
    return {byte for offset, length in ranges for byte in range(offset, offset + length)}


small_ranges = st.lists(st.tuples(st.integers(0, 300), st.integers(-5, 60)), max_size=12)


@given(small_ranges)
def test_coalesce_covers_the_same_bytes_with_sorted_separate_ranges(
    ranges: list[tuple[int, int]],
) -> None:
    merged = coalesce(ranges)
    assert covered(merged) == covered(ranges)
    assert all(length > 0 for _, length in merged)
    # Sorted, and neither overlapping nor touching: each gap at least one byte.
    assert all(a + n < b for (a, n), (b, _) in itertools.pairwise(merged))
    assert coalesce(merged) == merged


@given(small_ranges, st.sampled_from([1, 4, 16, 64]), st.integers(0, 400))
def test_align_covers_the_whole_units_touched_within_the_size(
    ranges: list[tuple[int, int]], unit: int, size: int
) -> None:
    aligned = align(ranges, unit, size)
    units = {byte // unit for byte in covered(ranges)}
    expected = {b for b in range(size) if b // unit in units}
    assert covered(aligned) == expected
    assert aligned == coalesce(aligned)
    assert all(offset % unit == 0 for offset, _ in aligned)
    assert all(o + n == size or (o + n) % unit == 0 for o, n in aligned)
