"""RunPodSandbox's concurrent steps: both finish before an error is raised (pure logic)."""

from __future__ import annotations

import asyncio

import pytest

from runtimeservice.sandbox_run import _Steps, _together


async def slow(value: str, log: list[str], fail: bool = False) -> str:
    for _ in range(3):
        await asyncio.sleep(0)
    log.append(value)
    if fail:
        raise RuntimeError(f"{value} failed")
    return value


def test_both_results_and_absent_steps() -> None:
    log: list[str] = []
    assert asyncio.run(_together(slow("a", log), slow("b", log))) == ("a", "b")
    assert asyncio.run(_together(None, slow("b", log))) == (None, "b")
    assert asyncio.run(_together(slow("a", log), None)) == ("a", None)
    assert asyncio.run(_together(None, None)) == (None, None)


def test_a_failure_waits_for_the_other_step_then_raises_the_first() -> None:
    log: list[str] = []
    with pytest.raises(RuntimeError, match="fast failed"):
        asyncio.run(_together(slow("fast", log, fail=True), slow("other", log)))
    assert sorted(log) == ["fast", "other"]  # the other step ran to its end
    with pytest.raises(RuntimeError, match="a failed"):
        asyncio.run(_together(slow("a", log, fail=True), slow("b", log, fail=True)))
    with pytest.raises(RuntimeError, match="b failed"):
        asyncio.run(_together(slow("a", log), slow("b", log, fail=True)))


def test_timed_steps_appear_in_the_log_line() -> None:
    steps = _Steps()
    log: list[str] = []
    asyncio.run(_together(steps.timed("cni", slow("a", log)), steps.timed("infra", slow("b", log))))
    steps.skip()
    steps.done("ready")
    names = [part.rsplit(" ", 1)[0] for part in str(steps).split(", ")]
    assert sorted(names[:2]) == ["cni", "infra"] and names[2] == "ready"
