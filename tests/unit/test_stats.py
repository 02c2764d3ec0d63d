from __future__ import annotations

import pytest

from vcpusched.model import HostSample, VcpuCounters, VcpuRef
from vcpusched.stats import snapshot

A, B = VcpuRef("a", 0), VcpuRef("b", 0)
ONE = frozenset({1})


def sample(
    clock: float, busy: dict[int, int], vcpus: dict[VcpuRef, tuple[int, int | None]]
) -> HostSample:
    return HostSample(
        clock=clock,
        pcpu_busy_ns=busy,
        vcpus={r: VcpuCounters(t, w, ONE) for r, (t, w) in vcpus.items()},
    )


def test_loads_over_the_interval() -> None:
    before = sample(10.0, {0: 0, 1: 5_000_000_000}, {A: (0, 0), B: (100, None)})
    after = sample(
        12.0,
        {0: 1_000_000_000, 1: 7_000_000_000},
        {A: (1_000_000_000, 1_000_000_000), B: (400_000_100, None)},
    )
    snap = snapshot(before, after)
    assert snap is not None
    assert snap.util == {0: pytest.approx(50.0), 1: pytest.approx(100.0)}
    a, b = snap.vcpus
    assert (a.received, a.demand) == (pytest.approx(50.0), pytest.approx(100.0))
    assert (b.received, b.demand) == (pytest.approx(20.0), pytest.approx(20.0))


def test_utilization_is_of_the_time_the_pcpu_was_there() -> None:
    # 2 s of wall clock; pCPU 0 ran 1.5 s, idled 0.2 s and lost 0.3 s to a hypervisor below
    # (counted as neither). /proc/stat reads it 1.5 / 1.7 busy; so must the agent.
    # pCPU 1 has no idle counter and falls back to the wall clock.
    before = HostSample(clock=0.0, pcpu_busy_ns={0: 0, 1: 0}, vcpus={}, pcpu_idle_ns={0: 0})
    after = HostSample(
        clock=2.0,
        pcpu_busy_ns={0: 1_500_000_000, 1: 1_500_000_000},
        vcpus={},
        pcpu_idle_ns={0: 200_000_000},
    )
    snap = snapshot(before, after)
    assert snap is not None
    assert snap.util == {0: pytest.approx(100 * 1.5 / 1.7), 1: pytest.approx(75.0)}


def test_new_and_restarted_vcpus_wait_a_cycle() -> None:
    before = sample(0.0, {0: 0}, {A: (5_000, 0)})
    after = sample(1.0, {0: 0}, {A: (1_000, 0), B: (10, 0)})
    snap = snapshot(before, after)
    assert snap is not None
    assert snap.vcpus == ()


def test_counters_out_of_range_are_clamped() -> None:
    before = sample(0.0, {0: 10}, {A: (0, 0)})
    after = sample(1.0, {0: 0}, {A: (3_000_000_000, 0)})
    snap = snapshot(before, after)
    assert snap is not None
    assert snap.util[0] == 0.0
    assert snap.vcpus[0].received == 100.0


def test_clock_not_advancing_skips() -> None:
    s = sample(5.0, {0: 0}, {})
    assert snapshot(s, s) is None


def test_excluded_flag() -> None:
    before = sample(0.0, {0: 0}, {A: (0, 0), B: (0, 0)})
    after = sample(1.0, {0: 0}, {A: (0, 0), B: (0, 0)})
    snap = snapshot(before, after, lambda d: d == "b")
    assert snap is not None
    assert [v.excluded for v in snap.vcpus] == [False, True]


def test_wait_counts_as_demand_as_far_as_the_vcpu_never_idled() -> None:
    C = VcpuRef("c", 0)
    before = sample(0.0, {0: 0, 1: 0}, {A: (0, 0), B: (0, 0), C: (0, 0)})
    after = sample(
        1.0,
        {0: 1_000_000_000, 1: 800_000_000},
        {
            A: (500_000_000, 500_000_000),  # ran or waited all the time: wants all of it
            B: (300_000_000, 470_000_000),  # idled 23 points: got all it wanted
            C: (470_000_000, 480_000_000),  # idled 5 points: half its wait counts
        },
    )
    snap = snapshot(before, after)
    assert snap is not None
    a, b, c = snap.vcpus
    assert a.demand == pytest.approx(100.0)
    assert b.demand == pytest.approx(30.0)
    assert c.demand == pytest.approx(47.0 + 48.0 * 0.5)
