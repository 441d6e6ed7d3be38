"""Benchmark scenario runner: interleaving, warm-up, per-side failure notes."""

from __future__ import annotations

from typing import cast

import grpc
import pytest

from hack.benchmarks.cri_client import CriClient, describe_error, is_unimplemented
from hack.benchmarks.runtime import BenchRuntime
from hack.benchmarks.scenarios import Series, Side, interleave, run_interleaved


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class FakeClient:
    def __init__(self) -> None:
        self.released = 0

    def release_all(self) -> list[str]:
        self.released += 1
        return []


def side(name: str, image: str = "img") -> Side:
    return Side(name, cast(BenchRuntime, None), cast(CriClient, FakeClient()), image=image)


def test_interleave_alternates_sides_per_iteration() -> None:
    assert list(interleave(3, ["a", "b"])) == [(0, "a"), (0, "b"), (1, "a"), (1, "b"),
                                               (2, "a"), (2, "b")]
    assert list(interleave(0, ["a", "b"])) == []


def test_run_interleaved_calls_in_order_and_drops_warmup() -> None:
    calls: list[tuple[str, int]] = []

    def op(s: Side, i: int) -> dict[str, float | list[float]]:
        calls.append((s.name, i))
        return {"t": float(i), "many": [float(i), float(i) + 0.5]}

    series = run_interleaved([side("crib"), side("containerd")], ("t", "many"), 2, 1, op)
    assert calls == [("crib", 0), ("containerd", 0), ("crib", 1), ("containerd", 1),
                     ("crib", 2), ("containerd", 2)]
    assert series.of("t") == {"crib": [1.0, 2.0], "containerd": [1.0, 2.0]}
    assert series.of("many")["crib"] == [1.0, 1.5, 2.0, 2.5]
    assert not series.notes


def test_unimplemented_side_gets_a_note_and_the_other_carries_on() -> None:
    crib, ctd = side("crib"), side("containerd")
    calls: list[str] = []

    def op(s: Side, i: int) -> dict[str, float | list[float]]:
        calls.append(s.name)
        if s.name == "crib":
            raise FakeRpcError(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        return {"t": 1.0}

    series = run_interleaved([crib, ctd], ("t",), 3, 0, op)
    assert calls == ["crib", "containerd", "containerd", "containerd"]
    assert series.notes == {"crib": "n/a (UNIMPLEMENTED)"}
    assert series.of("t") == {"containerd": [1.0, 1.0, 1.0]}
    assert cast(FakeClient, crib.client).released == 1  # its pods were given back
    assert cast(FakeClient, ctd.client).released == 0


def test_other_errors_keep_their_code_and_first_line() -> None:
    def op(s: Side, i: int) -> dict[str, float | list[float]]:
        raise FakeRpcError(grpc.StatusCode.NOT_FOUND, "no such image\nmore detail")

    series = run_interleaved([side("crib")], ("t",), 1, 0, op)
    assert series.notes["crib"] == "error (NOT_FOUND): no such image"


def test_a_side_without_image_is_skipped_when_the_scenario_needs_one() -> None:
    called: list[str] = []
    no_image = side("crib", image="")
    no_image.image_note = "n/a (UNIMPLEMENTED)"

    def op(s: Side, i: int) -> dict[str, float | list[float]]:
        called.append(s.name)
        return {"t": 1.0}

    series = run_interleaved([no_image, side("containerd")], ("t",), 2, 0, op,
                             needs_image=True)
    assert called == ["containerd", "containerd"]
    assert series.notes == {"crib": "n/a (UNIMPLEMENTED)"}


def test_series_keeps_the_first_failure() -> None:
    s = Series(("t",))
    s.fail("crib", "first")
    s.fail("crib", "second")
    assert s.notes["crib"] == "first" and not s.ok("crib") and s.ok("containerd")


@pytest.mark.parametrize(("exc", "text"), [
    (FakeRpcError(grpc.StatusCode.UNIMPLEMENTED, ""), "n/a (UNIMPLEMENTED)"),
    (FakeRpcError(grpc.StatusCode.UNAVAILABLE, ""), "error (UNAVAILABLE): "),
    (RuntimeError("boom"), "error: RuntimeError: boom"),
])
def test_describe_error(exc: BaseException, text: str) -> None:
    assert describe_error(exc) == text
    assert is_unimplemented(exc) == text.startswith("n/a")
