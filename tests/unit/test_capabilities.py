from __future__ import annotations

from pathlib import Path

import pytest

from cri.errors import InvalidArgument
from runtimeservice import capabilities as caps


def test_table_is_complete_and_dense() -> None:
    assert sorted(caps.CAPABILITIES.values()) == list(range(41))
    assert caps.CAPABILITIES["CAP_SYS_ADMIN"] == 21
    assert caps.CAPABILITIES["CAP_CHECKPOINT_RESTORE"] == 40


def test_default_set_is_containerds_fourteen() -> None:
    assert len(caps.DEFAULT_CAPABILITIES) == 14
    assert set(caps.DEFAULT_CAPABILITIES) <= set(caps.CAPABILITIES)
    assert "CAP_SYS_ADMIN" not in caps.DEFAULT_CAPABILITIES


@pytest.mark.parametrize("name", ["CAP_CHOWN", "chown", "Cap_Chown", " CHOWN "])
def test_normalize_accepts_any_spelling(name: str) -> None:
    assert caps.normalize(name) == "CAP_CHOWN"


@pytest.mark.parametrize("name", ["CAP_NOPE", "", "ALL", "CAP_"])
def test_normalize_refuses_unknown_names(name: str) -> None:
    with pytest.raises(InvalidArgument, match="unknown capability"):
        caps.normalize(name)


def test_parse_mask_round_trips() -> None:
    host = caps.parse_mask("000001fffeffffff")
    assert "CAP_SYS_RESOURCE" not in host
    assert len(host) == 40
    assert caps.to_mask(host) == 0x1FFFEFFFFFF
    assert caps.parse_mask(0x400) == {"CAP_NET_BIND_SERVICE"}
    # Bits a newer kernel may define are ignored.
    assert caps.parse_mask(1 << 50) == frozenset()
    with pytest.raises(InvalidArgument):
        caps.parse_mask("xyz")


def test_read_bounding_set(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapBnd:\t0000000000000003\n")
    assert caps.read_bounding_set(str(status)) == {"CAP_CHOWN", "CAP_DAC_OVERRIDE"}
    status.write_text("Name:\tx\n")
    with pytest.raises(InvalidArgument):
        caps.read_bounding_set(str(status))


def test_sort_by_number() -> None:
    assert caps.sort_caps(["CAP_KILL", "CAP_CHOWN", "CAP_KILL"]) == ["CAP_CHOWN", "CAP_KILL"]


BOUNDING = frozenset(caps.CAPABILITIES) - {"CAP_SYS_RESOURCE"}


def test_resolve_defaults() -> None:
    assert caps.resolve([], [], BOUNDING) == set(caps.DEFAULT_CAPABILITIES)


def test_resolve_drop_all_then_add() -> None:
    assert caps.resolve(["net_bind_service"], ["ALL"], BOUNDING) == {"CAP_NET_BIND_SERVICE"}


def test_resolve_add_all_then_drop() -> None:
    got = caps.resolve(["all"], ["CHOWN"], BOUNDING)
    assert got == BOUNDING - {"CAP_CHOWN"}


def test_resolve_drop_wins_over_add() -> None:
    got = caps.resolve(["SYS_ADMIN"], ["CAP_SYS_ADMIN", "KILL"], BOUNDING)
    assert got == set(caps.DEFAULT_CAPABILITIES) - {"CAP_KILL"}


def test_resolve_refuses_unknown() -> None:
    with pytest.raises(InvalidArgument, match="CAP_BOGUS"):
        caps.resolve(["CAP_BOGUS"], [], BOUNDING)
