"""Benchmark results: one Metric per table row, the text table and the JSON document."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hack.benchmarks.stats import Summary, ratio, summarize

CRIB = "crib"
CONTAINERD = "containerd"
SIDES = (CRIB, CONTAINERD)
MISSING = "-"
NOTE_WIDTH = 26


@dataclass
class Metric:
    """One row: a value per runtime, or a note saying why there is none."""

    key: str
    label: str
    unit: str
    values: dict[str, float | None] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)

    def value(self, side: str) -> float | None:
        return self.values.get(side)

    def ratio(self) -> float | None:
        """crib / containerd (below 1 means crib uses less time or memory)."""
        return ratio(self.value(CRIB), self.value(CONTAINERD))

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"key": self.key, "label": self.label, "unit": self.unit,
                               "ratio_crib_over_containerd": self.ratio()}
        for side in SIDES:
            doc[side] = self.value(side)
            if side in self.notes:
                doc[f"{side}_note"] = self.notes[side]
            if side in self.samples:
                doc[f"{side}_samples"] = self.samples[side]
        return doc


def latency_metrics(key: str, label: str, samples: dict[str, list[float]],
                    notes: dict[str, str], quantiles: Sequence[str] = ("p50", "p95"),
                    unit: str = "ms") -> list[Metric]:
    """p50/p95 rows for one series of per-side latency samples (already in `unit`)."""
    summaries: dict[str, Summary | None] = {s: summarize(v) for s, v in samples.items()}
    rows = []
    for q in quantiles:
        values: dict[str, float | None] = {}
        for side, summary in summaries.items():
            values[side] = getattr(summary, q) if summary is not None else None
        row_notes = dict(notes)
        for side in SIDES:
            if values.get(side) is None and side not in row_notes:
                row_notes[side] = "no samples"
        rows.append(Metric(f"{key}_{q}", f"{label} {q}", unit, values, row_notes,
                           samples={s: list(v) for s, v in samples.items() if v}))
    return rows


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return MISSING
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "ms":
        return f"{value:.1f} ms" if value >= 10 else f"{value:.2f} ms"
    return f"{value:g} {unit}".strip()


def format_ratio(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}x"


def _cell(metric: Metric, side: str) -> str:
    value = metric.value(side)
    if value is None and side in metric.notes:
        note = metric.notes[side]
        return note if len(note) <= NOTE_WIDTH else note[:NOTE_WIDTH - 3] + "..."
    return format_value(value, metric.unit)


def format_table(metrics: Sequence[Metric]) -> str:
    """A fixed-width text table: metric, crib, containerd, crib/containerd."""
    header = ("metric", CRIB, CONTAINERD, "crib/containerd")
    rows = [(m.label, _cell(m, CRIB), _cell(m, CONTAINERD), format_ratio(m.ratio()))
            for m in metrics]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def to_document(metrics: Sequence[Metric], meta: dict[str, Any]) -> dict[str, Any]:
    return {"meta": meta, "metrics": [m.to_json() for m in metrics]}


def write_json(path: Path, metrics: Sequence[Metric], meta: dict[str, Any]) -> None:
    path.write_text(json.dumps(to_document(metrics, meta), indent=1) + "\n")
