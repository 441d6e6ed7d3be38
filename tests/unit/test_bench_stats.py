"""Benchmark statistics: percentiles, summaries, ratios."""

from __future__ import annotations

import pytest

from hack.benchmarks.stats import percentile, ratio, summarize


def test_percentile_interpolates_between_closest_ranks() -> None:
    samples = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(samples, 0) == 1.0
    assert percentile(samples, 100) == 4.0
    assert percentile(samples, 50) == pytest.approx(2.5)
    assert percentile(samples, 95) == pytest.approx(3.85)  # pos 2.85 between 3 and 4


def test_percentile_of_one_sample_is_that_sample() -> None:
    assert percentile([7.5], 50) == 7.5
    assert percentile([7.5], 95) == 7.5


def test_percentile_matches_the_median_for_odd_counts() -> None:
    assert percentile([5, 1, 9, 3, 7], 50) == 5


@pytest.mark.parametrize("q", [-1, 101])
def test_percentile_rejects_out_of_range(q: float) -> None:
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], q)


def test_percentile_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)


def test_summarize() -> None:
    s = summarize([float(x) for x in range(1, 21)])
    assert s is not None
    assert (s.n, s.min, s.max, s.mean) == (20, 1.0, 20.0, 10.5)
    assert s.p50 == pytest.approx(10.5)
    assert s.p95 == pytest.approx(19.05)
    assert s.to_json()["n"] == 20
    assert summarize([]) is None


def test_ratio() -> None:
    assert ratio(1.0, 4.0) == 0.25
    assert ratio(None, 4.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None
