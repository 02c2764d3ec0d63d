from __future__ import annotations

import random

import pytest

from vcpusched.model import HostSample, Snapshot, Vcpu, VcpuCounters, VcpuRef
from vcpusched.stats import Smoother, snapshot

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
    assert snap.pcpu_load == {0: pytest.approx(50.0), 1: pytest.approx(100.0)}
    a, b = snap.vcpus
    assert (a.load, a.demand) == (pytest.approx(50.0), pytest.approx(100.0))
    assert (b.load, b.demand) == (pytest.approx(20.0), pytest.approx(20.0))


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
    assert snap.pcpu_load[0] == 0.0
    assert snap.vcpus[0].load == 100.0


def test_clock_not_advancing_skips() -> None:
    s = sample(5.0, {0: 0}, {})
    assert snapshot(s, s) is None


def test_excluded_flag() -> None:
    before = sample(0.0, {0: 0}, {A: (0, 0), B: (0, 0)})
    after = sample(1.0, {0: 0}, {A: (0, 0), B: (0, 0)})
    snap = snapshot(before, after, lambda d: d == "b")
    assert snap is not None
    assert [v.excluded for v in snap.vcpus] == [False, True]


def _snap(loads: dict[str, float], pins: dict[str, int]) -> Snapshot:
    vcpus = tuple(
        Vcpu(VcpuRef(n, 0), load, load, frozenset({pins[n]})) for n, load in loads.items()
    )
    util: dict[int, float] = {0: 0.0, 1: 0.0}
    for n, load in loads.items():
        util[pins[n]] += load
    return Snapshot(pcpu_load=util, vcpus=vcpus)


def test_smoother_estimates_noise_and_steadies_loads() -> None:
    rng = random.Random(3)
    smoother = Smoother()
    out = None
    raw = []
    for _ in range(200):
        value = 40 + rng.gauss(0, 2)
        raw.append(value)
        out = smoother.update(_snap({"a": value}, {"a": 0}), min_jump=5.0)
    assert out is not None
    (vcpu,) = out.vcpus
    # The noise estimate is of the steadied value: sigma 2 shrunk by sqrt(0.3 / 1.7).
    assert vcpu.noise == pytest.approx(2 * Smoother.SHRINK, rel=0.5)
    assert abs(vcpu.demand - 40) < 3
    assert out.pcpu_load[0] == pytest.approx(vcpu.load)


def test_smoother_follows_a_real_change_at_once() -> None:
    smoother = Smoother()
    for i in range(10):
        smoother.update(_snap({"a": 40 + (i % 2)}, {"a": 0}), min_jump=5.0)
    out = smoother.update(_snap({"a": 90}, {"a": 0}), min_jump=5.0)
    assert out.vcpus[0].demand == 90
    assert out.pcpu_load[0] == 90


def test_smoother_keeps_host_work_as_measured() -> None:
    smoother = Smoother()
    snap = _snap({"a": 30}, {"a": 0})
    with_host = Snapshot(pcpu_load={0: 50.0, 1: 0.0}, vcpus=snap.vcpus)
    smoother.update(with_host, min_jump=5.0)
    out = smoother.update(
        Snapshot(pcpu_load={0: 51.0, 1: 0.0}, vcpus=_snap({"a": 31}, {"a": 0}).vcpus),
        min_jump=5.0,
    )
    # 20 points of host work stay; the vCPU's part is the steadied 30.3.
    assert out.pcpu_load[0] == pytest.approx(51 - 31 + 30.3)


def test_wait_counts_as_demand_only_on_a_saturated_pcpu() -> None:
    before = sample(0.0, {0: 0, 1: 0}, {A: (0, 0), B: (0, 0)})
    after = HostSample(
        clock=1.0,
        pcpu_busy_ns={0: 999_000_000, 1: 800_000_000},
        vcpus={
            A: VcpuCounters(500_000_000, 500_000_000, frozenset({0})),
            B: VcpuCounters(400_000_000, 200_000_000, frozenset({1})),
        },
    )
    snap = snapshot(before, after)
    assert snap is not None
    a, b = snap.vcpus
    assert a.demand == pytest.approx(100.0)  # pCPU 0 is full: its wait is unmet demand
    assert b.demand == pytest.approx(40.0)  # pCPU 1 has time to spare: wait is overlap
