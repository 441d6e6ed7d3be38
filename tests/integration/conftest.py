"""Fixtures: a real crib daemon per test, checked for leftovers on teardown."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.daemon import Daemon, assert_clean_exit, new_daemon


@pytest.fixture
def crib_factory(tmp_path: Path) -> Iterator[list[Daemon]]:
    """Daemons a test starts itself; each is stopped and checked at teardown."""
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            assert_clean_exit(d, d.stop())


@pytest.fixture
def crib(tmp_path: Path) -> Iterator[Daemon]:
    d = new_daemon(tmp_path / "crib")
    d.start()
    yield d
    code = d.stop()
    assert_clean_exit(d, code)
