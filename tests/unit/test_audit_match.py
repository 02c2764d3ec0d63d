"""The lab's audit check pairs a pin change with its line within the span the change is known
to lie in: a poll of libvirt that took seconds must not make a true pair miss."""

from __future__ import annotations

from tests.e2e.harness import check_audit, parse_line
from tests.lab.lab import PinChange

RAW = (
    "2026-12-01T09:00:00 vcpusched[1]: INFO move domain=vm vcpu=0 from=0 to=1 demand=40.0 "
    "from_demand=120.0 to_demand=40.0 reason=refine"
)


def _change(at: float, since: float | None) -> PinChange:
    return PinChange(at, "vm", 0, frozenset({0}), frozenset({1}), since)


def test_a_change_seen_by_a_slow_poll_still_matches_its_line() -> None:
    line = parse_line(RAW, at=100.0)
    assert line is not None
    # The poll that saw it began at 99.9 and ended 4 s after the move was logged.
    slow = _change(at=104.0, since=99.9)
    assert check_audit([slow], [line]).ok
    # Stamped with the poll's end alone, it would have missed by more than the slack.
    assert not check_audit([_change(at=104.0, since=None)], [line]).ok


def test_a_line_outside_the_span_does_not_match() -> None:
    line = parse_line(RAW, at=90.0)
    assert line is not None
    result = check_audit([_change(at=104.0, since=99.9)], [line])
    assert not result.ok
    assert result.unmatched_lines == [RAW]
