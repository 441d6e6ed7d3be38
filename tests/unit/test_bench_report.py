"""Benchmark report: rows from samples, the text table, the JSON document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hack.benchmarks.report import (
    CONTAINERD,
    CRIB,
    Metric,
    format_ratio,
    format_table,
    format_value,
    latency_metrics,
    write_json,
)


def test_latency_metrics_give_p50_and_p95_rows() -> None:
    rows = latency_metrics("run", "RunPodSandbox", {CRIB: [1.0, 2.0, 3.0],
                                                     CONTAINERD: [2.0, 4.0, 6.0]}, {})
    assert [r.key for r in rows] == ["run_p50", "run_p95"]
    assert [r.label for r in rows] == ["RunPodSandbox p50", "RunPodSandbox p95"]
    p50 = rows[0]
    assert p50.value(CRIB) == 2.0 and p50.value(CONTAINERD) == 4.0
    assert p50.ratio() == 0.5
    assert not p50.notes


def test_a_side_without_samples_gets_its_note_and_no_ratio() -> None:
    rows = latency_metrics("exec", "ExecSync", {CONTAINERD: [5.0]},
                           {CRIB: "n/a (UNIMPLEMENTED)"}, quantiles=("p50",))
    (row,) = rows
    assert row.value(CRIB) is None
    assert row.notes[CRIB] == "n/a (UNIMPLEMENTED)"
    assert row.ratio() is None


def test_a_side_with_neither_samples_nor_note_says_so() -> None:
    (row,) = latency_metrics("x", "X", {CRIB: [1.0]}, {}, quantiles=("p50",))
    assert row.notes[CONTAINERD] == "no samples"


@pytest.mark.parametrize(("value", "unit", "text"), [
    (None, "ms", "-"), (3.14159, "ms", "3.14 ms"), (123.456, "ms", "123.5 ms"),
    (55.25, "MiB", "55.2 MiB"), (1.5, "s", "1.50 s"), (4.0, "", "4"),
])
def test_format_value(value: float | None, unit: str, text: str) -> None:
    assert format_value(value, unit) == text


def test_format_ratio() -> None:
    assert format_ratio(None) == "-"
    assert format_ratio(0.456) == "0.46x"


def test_table_has_a_header_a_rule_and_aligned_rows() -> None:
    rows = [
        Metric("a", "idle RSS", "MiB", {CRIB: 50.0, CONTAINERD: 40.0}),
        Metric("b", "a much longer metric label", "ms", {CRIB: None, CONTAINERD: 2.0},
               {CRIB: "n/a (UNIMPLEMENTED)"}),
        Metric("c", "errors are cut", "ms", {CRIB: None, CONTAINERD: None},
               {CRIB: "error (UNKNOWN): " + "x" * 100, CONTAINERD: "error: y"}),
    ]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["metric", "crib", "containerd", "crib/containerd"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert len(lines) == 2 + len(rows)
    assert lines[2].startswith("idle RSS") and lines[2].endswith("1.25x")
    assert "n/a (UNIMPLEMENTED)" in lines[3] and lines[3].endswith("-")
    assert "..." in lines[4] and "x" * 30 not in lines[4]
    # right-aligned numeric columns end at the same place on every line
    widths = {len(line) for line in lines[:3]}
    assert len(widths) == 1


def test_json_document_carries_values_notes_ratio_and_samples(tmp_path: Path) -> None:
    rows = latency_metrics("run", "Run", {CRIB: [1.0, 3.0], CONTAINERD: [2.0]},
                           {}, quantiles=("p50",))
    rows.append(Metric("rss", "RSS", "MiB", {CRIB: None, CONTAINERD: 10.0},
                       {CRIB: "n/a (UNIMPLEMENTED)"}))
    out = tmp_path / "out.json"
    write_json(out, rows, {"kernel": "x"})
    doc = json.loads(out.read_text())
    assert doc["meta"] == {"kernel": "x"}
    run, rss = doc["metrics"]
    assert run["crib"] == 2.0 and run["containerd"] == 2.0
    assert run["ratio_crib_over_containerd"] == 1.0
    assert run["crib_samples"] == [1.0, 3.0]
    assert rss["crib"] is None and rss["crib_note"] == "n/a (UNIMPLEMENTED)"
    assert rss["ratio_crib_over_containerd"] is None
