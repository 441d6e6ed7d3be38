"""Small statistics for benchmark samples: percentiles, summaries, ratios."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks.

    The same definition as numpy's default ("linear"): for sorted samples x[0..n-1]
    the position is (n - 1) * q / 100.
    """
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q!r} is outside 0..100")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    frac = pos - lo
    return ordered[lo] + (ordered[hi] - ordered[lo]) * frac


@dataclass(frozen=True)
class Summary:
    """p50/p95/mean/min/max of one series of samples."""

    n: int
    p50: float
    p95: float
    mean: float
    min: float
    max: float

    def to_json(self) -> dict[str, float | int]:
        return {"n": self.n, "p50": self.p50, "p95": self.p95, "mean": self.mean,
                "min": self.min, "max": self.max}


def summarize(samples: Sequence[float]) -> Summary | None:
    """A Summary, or None for an empty series."""
    if not samples:
        return None
    return Summary(n=len(samples), p50=percentile(samples, 50), p95=percentile(samples, 95),
                   mean=sum(samples) / len(samples), min=min(samples), max=max(samples))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator
