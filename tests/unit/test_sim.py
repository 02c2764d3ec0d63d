"""The simulated host: CPU-sharing arithmetic, counters, time, pins and domain lifecycle."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vcpusched.host import DomainGone, PinError
from vcpusched.model import VcpuRef
from vcpusched_sim.host import (
    NS,
    DomainSpec,
    SimHost,
    allocate,
    constant,
    fair_shares,
    phased,
    queue_wait,
    water_level,
)

ALL4 = frozenset(range(4))


def one(p: int) -> frozenset[int]:
    return frozenset({p})


def vm(name: str, demand: float, affinity: frozenset[int], **kw: float) -> DomainSpec:
    return DomainSpec(name, (constant(demand),), (affinity,), **kw)


@pytest.mark.parametrize(
    ("demands", "shares"),
    [
        ([100, 60], [50, 50]),
        ([100, 20], [80, 20]),
        ([30, 20], [30, 20]),  # room for both: each gets what it wants
        ([100, 100, 100, 100], [25, 25, 25, 25]),
        ([10, 50, 90], [10, 45, 45]),
        ([0, 100], [0, 100]),
        ([100], [100]),
    ],
)
def test_saturated_pcpu_is_shared_max_min_fair(demands: list[float], shares: list[float]) -> None:
    assert fair_shares(demands) == pytest.approx(shares)


def test_water_level_is_infinite_when_everything_fits() -> None:
    assert water_level([40, 60], 100) == float("inf")
    assert water_level([40, 61], 100) == pytest.approx(60)  # 40 fits, 61 gets the rest
    assert water_level([70, 61], 100) == pytest.approx(50)


@pytest.mark.parametrize(
    ("demands", "busy"),
    [
        ([40, 30], 70),
        ([60, 60], 100),
        ([100, 100, 100], 100),
        ([], 0),
    ],
)
def test_pinned_pcpu_utilization_is_total_demand_capped_at_100(
    demands: list[float], busy: float
) -> None:
    _, load = allocate([0, 1], [(d, one(0)) for d in demands])
    assert load == pytest.approx({0: busy, 1: 0})


@pytest.mark.parametrize(
    ("vcpus", "received", "busy"),
    [
        # Eight whole-pCPU vCPUs over four pCPUs: half a pCPU each, every pCPU full.
        ([(100, ALL4)] * 8, [50] * 8, [100] * 4),
        # Everything fits: all demand is met and spread evenly.
        ([(40, ALL4)] * 8, [40] * 8, [80] * 4),
        ([(10, ALL4)], [10], [2.5] * 4),
        # An unpinned vCPU uses the spare pCPU beside a pinned one.
        ([(100, one(0)), (30, frozenset({0, 1}))], [100, 30], [100, 30, 0, 0]),
        # Two pinned and one unpinned, all wanting a whole pCPU, on two pCPUs: 2/3 each.
        (
            [(100, one(0)), (100, one(1)), (100, frozenset({0, 1}))],
            [200 / 3] * 3,
            [100, 100, 0, 0],
        ),
        # Nested sets: pinned, a pair, and the whole host, filled inner first.
        (
            [
                (100, one(0)),
                (100, one(0)),
                (50, frozenset({0, 1})),
                (50, ALL4),
                (80, frozenset({2, 3})),
            ],
            [50, 50, 50, 50, 80],
            [100, 60, 60, 60],
        ),
        # Unpinned light vCPUs are not starved by a saturated pinned pCPU.
        ([(100, one(0)), (100, one(0)), (20, ALL4)], [50, 50, 20], [100, 20 / 3, 20 / 3, 20 / 3]),
    ],
)
def test_unpinned_vcpus_share_like_an_ideal_balancer(
    vcpus: list[tuple[float, frozenset[int]]], received: list[float], busy: list[float]
) -> None:
    got, load = allocate([0, 1, 2, 3], vcpus)
    assert got == pytest.approx(received)
    assert [load[p] for p in range(4)] == pytest.approx(busy)


def _laminar_affinity(draw: st.DrawFn) -> frozenset[int]:
    # Singletons, the halves {0,1}/{2,3}, and the whole host form a laminar family.
    return draw(
        st.sampled_from(
            [one(0), one(1), one(2), one(3), frozenset({0, 1}), frozenset({2, 3}), ALL4]
        )
    )


@st.composite
def _workloads(draw: st.DrawFn) -> list[tuple[float, frozenset[int]]]:
    count = draw(st.integers(min_value=0, max_value=12))
    return [
        (draw(st.floats(min_value=0, max_value=100)), _laminar_affinity(draw)) for _ in range(count)
    ]


@settings(max_examples=300, deadline=None)
@given(_workloads())
def test_allocation_is_feasible_and_work_conserving(
    vcpus: list[tuple[float, frozenset[int]]],
) -> None:
    received, busy = allocate([0, 1, 2, 3], vcpus)
    tol = 1e-6
    for (demand, _), got in zip(vcpus, received, strict=True):
        assert -tol <= got <= demand + tol
    assert all(-tol <= b <= 100 + tol for b in busy.values())
    assert sum(busy.values()) == pytest.approx(sum(received), abs=1e-6)
    for (demand, affinity), got in zip(vcpus, received, strict=True):
        if got < demand - 1e-6:
            # Anyone left wanting must be blocked by full pCPUs everywhere it may run.
            assert all(busy[p] >= 100 - 1e-6 for p in affinity)
    # Max-min fairness among vCPUs pinned to one pCPU: nobody left wanting gets less than
    # another vCPU there.
    for p in range(4):
        here = [(d, g) for (d, a), g in zip(vcpus, received, strict=True) if a == one(p)]
        for demand, got in here:
            if got < demand - 1e-6:
                assert all(got >= other - 1e-6 for _, other in here)


def test_tick_accumulates_time_wait_and_busy_counters() -> None:
    host = SimHost(2, [vm("a", 100, one(0)), vm("b", 60, one(0)), vm("c", 30, one(1))])
    before = host.sample()
    assert before.clock == 0.0
    stats = host.tick(1.0)
    after = host.sample()
    assert after.clock == 1.0
    a, b, c = (after.vcpus[VcpuRef(n, 0)] for n in "abc")
    # 100 and 60 on one pCPU receive 50 and 50: both fall behind, so neither ever idles and
    # each waits all the time it does not run. 30 alone gets all it wants and never waits.
    assert (a.time_ns, a.wait_ns) == (NS // 2, NS // 2)
    assert (b.time_ns, b.wait_ns) == (NS // 2, NS // 2)
    assert (c.time_ns, c.wait_ns) == (3 * NS // 10, 0)
    assert after.pcpu_busy_ns == {0: NS, 1: 3 * NS // 10}
    assert stats.util == pytest.approx({0: 100, 1: 30})
    assert stats.demanded == pytest.approx(1.9)
    assert stats.received == pytest.approx(1.3)


def test_with_queueing_a_satisfied_vcpu_waits_behind_the_others() -> None:
    """Off, a vCPU that gets all it wants never waits; on, it waits behind the others' load
    on its pCPU (nothing with a pCPU to itself), and a starved one still waits all it does
    not run."""
    guests = [vm("a", 50, one(0)), vm("b", 40, one(0)), vm("c", 30, one(1)), vm("d", 100, one(1))]
    for queueing, wait_a in ((False, 0.0), (True, queue_wait(50, 40))):
        host = SimHost(2, guests, queueing=queueing)
        host.tick(1.0)
        sample = host.sample()
        a, b, c, d = (sample.vcpus[VcpuRef(n, 0)] for n in "abcd")
        assert a.wait_ns == pytest.approx(wait_a / 100 * NS, abs=1)
        assert b.wait_ns == pytest.approx(queue_wait(40, 50) / 100 * NS if queueing else 0, abs=1)
        # On pCPU 1: 30 gets all it wants beside 100, which gets 70 and waits the other 30.
        assert c.wait_ns == pytest.approx(queue_wait(30, 70) / 100 * NS if queueing else 0, abs=1)
        assert d.wait_ns == pytest.approx(0.3 * NS, abs=1)
    assert queue_wait(50, 0) == 0.0
    assert queue_wait(50, 48) == pytest.approx(1.2 * 50 * 0.48)
    assert queue_wait(60, 90) == pytest.approx(40.0)  # never more than the time it does not run


def test_sample_does_not_advance_time() -> None:
    host = SimHost(2, [vm("a", 50, one(0))])
    host.tick(2.0)
    assert host.sample() == host.sample()


def test_pin_takes_effect_from_the_next_tick() -> None:
    host = SimHost(2, [vm("a", 100, one(0)), vm("b", 100, one(0))])
    host.tick(1.0)
    host.pin(VcpuRef("b", 0), one(1))
    assert host.pin_changes == 1
    host.pin(VcpuRef("b", 0), one(1))  # no change: counted as a call only
    assert (host.pin_calls, host.pin_changes) == (2, 1)
    host.tick(1.0)
    sample = host.sample()
    assert sample.vcpus[VcpuRef("b", 0)].affinity == one(1)
    assert sample.vcpus[VcpuRef("b", 0)].time_ns == NS // 2 + NS
    assert sample.vcpus[VcpuRef("b", 0)].wait_ns == NS // 2
    assert sample.pcpu_busy_ns == {0: 2 * NS, 1: NS}


def test_pin_refuses_pcpus_the_host_lacks_and_overlapping_sets() -> None:
    host = SimHost(4, [vm("a", 10, ALL4), vm("b", 10, frozenset({0, 1}))])
    with pytest.raises(PinError):
        host.pin(VcpuRef("a", 0), one(4))
    with pytest.raises(PinError):
        host.pin(VcpuRef("a", 0), frozenset())
    with pytest.raises(PinError):
        host.pin(VcpuRef("a", 0), frozenset({1, 2}))  # overlaps {0,1} without nesting


def test_domains_start_and_stop_on_time() -> None:
    host = SimHost(2, [vm("early", 50, one(0), stop=1.5), vm("late", 40, one(1), start=0.5)])
    assert set(host.sample().vcpus) == {VcpuRef("early", 0)}
    with pytest.raises(DomainGone):
        host.pin(VcpuRef("late", 0), one(0))  # not started yet
    host.tick(1.0)
    sample = host.sample()
    assert set(sample.vcpus) == {VcpuRef("early", 0), VcpuRef("late", 0)}
    # Started half-way through the tick: half a second of 40%.
    assert sample.vcpus[VcpuRef("late", 0)].time_ns == int(0.2 * NS)
    host.tick(1.0)
    sample = host.sample()
    assert set(sample.vcpus) == {VcpuRef("late", 0)}
    assert sample.pcpu_busy_ns[0] == int(0.75 * NS)  # 1.5 s of 50%
    with pytest.raises(DomainGone):
        host.pin(VcpuRef("early", 0), one(1))
    with pytest.raises(DomainGone):
        host.pin(VcpuRef("nobody", 0), one(1))


def test_phase_change_within_a_tick_is_integrated_exactly() -> None:
    load = phased((0.0, 100.0), (0.5, 20.0))
    host = SimHost(1, [DomainSpec("a", (load,), (one(0),))])
    host.tick(1.0)
    assert host.sample().vcpus[VcpuRef("a", 0)].time_ns == int(0.6 * NS)
    assert host.nominal_demand(VcpuRef("a", 0)) == 20.0
    assert host.change_times() == [0.5]


def _noisy_host(seed: int, pinned_other: int) -> SimHost:
    domains = [
        DomainSpec("a", (constant(50.0, noise=0.05),), (one(0),)),
        DomainSpec("b", (constant(30.0, noise=0.05),), (one(pinned_other),)),
    ]
    return SimHost(2, domains, seed=seed)


def test_noise_is_bounded_seeded_and_independent_of_placement() -> None:
    runs = []
    for seed, other in [(1, 1), (1, 1), (2, 1), (1, 0)]:
        host = _noisy_host(seed, other)
        received = []
        for _ in range(50):
            before = host.sample().vcpus[VcpuRef("a", 0)].time_ns
            host.tick(1.0)
            received.append((host.sample().vcpus[VcpuRef("a", 0)].time_ns - before) / NS * 100)
        runs.append(received)
    same, again, other_seed, other_pin = runs
    assert same == again
    assert same != other_seed
    # vCPU "a" never waits (80% total on pCPU 0 at most 84%), so b's pin leaves it unchanged.
    assert same == pytest.approx(other_pin)
    assert all(47.5 - 1e-6 <= r <= 52.5 + 1e-6 for r in same)
    assert max(same) - min(same) > 2.0  # the noise is really there


def test_constructor_rejects_bad_specs() -> None:
    with pytest.raises(ValueError, match="unique"):
        SimHost(2, [vm("a", 10, one(0)), vm("a", 10, one(1))])
    with pytest.raises(ValueError, match="first phase"):
        phased((1.0, 10.0))
    with pytest.raises(ValueError, match="outside"):
        constant(120.0)
    with pytest.raises(ValueError, match="stops before"):
        vm("a", 10, one(0), start=5.0, stop=1.0)
    with pytest.raises(PinError):
        SimHost(2, [vm("a", 10, one(2))])
