"""Demand estimates from a window of readings: bounds, exact readings, levels and bursts."""

from __future__ import annotations

import pytest

from vcpusched.estimate import PLACE_SAMPLES, WINDOW, Estimator, short
from vcpusched.model import Snapshot, Vcpu, VcpuRef

A, B = VcpuRef("a", 0), VcpuRef("b", 0)
ON0 = frozenset({0})


def reading(ref: VcpuRef, received: float, demand: float, affinity: frozenset[int] = ON0) -> Vcpu:
    return Vcpu(ref, received, demand, affinity)


def feed(estimator: Estimator, *readings: list[Vcpu]) -> dict[VcpuRef, tuple[float, ...]]:
    out = {}
    for vcpus in readings:
        out = {r: e.series for r, e in estimator.update(Snapshot({0: 100.0}, tuple(vcpus))).items()}
    return out


def test_short_is_one_predicate_for_bounds() -> None:
    assert short(reading(A, 50, 100))  # waited: wanted more than it got
    assert short(reading(A, 100, 100))  # a whole pCPU: never idled either
    assert not short(reading(A, 40, 40.5))  # idled: got what it wanted


def test_an_exact_reading_is_remembered_and_reads_later_bounds() -> None:
    est = Estimator()
    feed(est, [reading(A, 40, 40)])
    # Now it shares a full pCPU: it got 30 and reads as wanting up to 100.
    series = feed(est, [reading(A, 30, 100)])[A]
    assert series == (40.0, 40.0)
    estimate = est.update(Snapshot({0: 100.0}, (reading(A, 30, 100),)))[A]
    assert estimate.guess  # still a bound: its value is a guess


def test_a_bound_no_exact_reading_explains_is_taken_at_its_top() -> None:
    est = Estimator()
    feed(est, [reading(A, 30, 30)])
    # It got 50 and waited the rest: the old 30 cannot be it any more.
    assert feed(est, [reading(A, 50, 100)])[A][-1] == 100.0


def test_a_top_has_a_floor_of_what_was_received() -> None:
    est = Estimator()
    first = est.update(Snapshot({0: 100.0}, (reading(A, 40, 40), reading(B, 47, 57))))
    assert first[A].floor is None  # exact: its series says all
    assert first[B].series == (57.0,)
    assert first[B].floor == (47.0,)
    # A's bound is read from its exact 40, so it holds no top; B's are tops again.
    later = est.update(Snapshot({0: 100.0}, (reading(A, 39.5, 70), reading(B, 40, 87))))
    assert later[A].series == (40.0, 40.0)
    assert later[A].floor is None
    assert later[B].series == (57.0, 87.0)
    assert later[B].floor == (47.0, 40.0)


def test_a_steady_vcpu_that_jumps_starts_a_new_level() -> None:
    est = Estimator()
    for _ in range(10):
        feed(est, [reading(A, 40, 40)])
    series = feed(est, [reading(A, 80, 80)])[A]
    assert len(series) == 11
    assert set(series) == {80.0}  # the old level says nothing of the new one


def test_a_drop_one_outlier_hides_is_a_new_level_within_three_readings() -> None:
    # A lab guest whose load went from 40 to 20 (read 42 then 28: the host's speed), with
    # one outlier of 56 in its window. That outlier widens the spread so far that the first
    # reading of the new level stays within it; the old estimator then kept the old level
    # until the window forgot it, 16 cycles, and the plan judged a mix of both.
    est = Estimator()
    old = [45, 41, 37, 42, 44, 43, 45, 56, 41, 40, 38, 38, 39, 38, 42]
    for x in old:
        feed(est, [reading(A, x, x)])
    first = feed(est, [reading(A, 28, 28)])[A]
    assert first[:-1] == tuple(float(x) for x in old)  # one reading is not enough here
    feed(est, [reading(A, 28, 28)])
    third = feed(est, [reading(A, 28.5, 28.5)])[A]
    assert set(third) == {28.0, 28.5}  # the three readings of the new level stand alone


def test_bursts_within_what_the_window_has_seen_are_not_new_levels() -> None:
    est = Estimator()
    for i in range(WINDOW):
        series = feed(est, [reading(A, 100 if i % 2 else 0, 100 if i % 2 else 0)])[A]
    assert sum(series) / len(series) == pytest.approx(50.0)
    assert sorted(set(series)) == [0.0, 100.0]


def test_series_are_aligned_and_a_newcomer_is_padded() -> None:
    est = Estimator()
    feed(est, [reading(A, 10, 10)], [reading(A, 12, 12)])
    out = feed(est, [reading(A, 14, 14), reading(B, 30, 30)])
    assert out[A] == (10.0, 12.0, 14.0)
    assert out[B] == (30.0, 30.0, 30.0)


def test_a_floating_vcpu_short_of_time_is_measured_before_it_is_placed() -> None:
    est = Estimator()
    floating = frozenset({0, 1})
    seen = []
    for _ in range(PLACE_SAMPLES):
        e = est.update(Snapshot({0: 100.0, 1: 100.0}, (reading(A, 50, 90, floating),)))[A]
        seen.append(e.measuring)
    assert seen == [True] * (PLACE_SAMPLES - 1) + [False]


def test_a_floating_vcpu_with_room_is_not_held() -> None:
    est = Estimator()
    e = est.update(Snapshot({0: 40.0, 1: 0.0}, (reading(A, 40, 40, frozenset({0, 1})),)))[A]
    assert not e.measuring


def test_forget_drops_every_reading() -> None:
    est = Estimator()
    feed(est, [reading(A, 40, 40)], [reading(A, 40, 40)])
    est.forget()
    assert feed(est, [reading(A, 20, 20)])[A] == (20.0,)


def host(util: dict[int, float], vcpus: list[Vcpu]) -> Snapshot:
    return Snapshot(util, tuple(vcpus))


def test_host_work_reads_its_window_median_through_a_burst() -> None:
    est = Estimator()
    guest = [reading(A, 40, 40)]
    for _ in range(5):
        est.smooth_host_work(host({0: 45.0, 1: 5.0}, guest))
    burst = est.smooth_host_work(host({0: 45.0, 1: 85.0}, guest))
    assert burst.util == {0: pytest.approx(45.0), 1: pytest.approx(5.0)}
    assert burst.vcpus == tuple(guest)


def test_host_work_that_falls_is_read_at_once_and_a_lasting_rise_within_the_window() -> None:
    est = Estimator()
    guest = [reading(A, 40, 40)]
    for _ in range(5):
        est.smooth_host_work(host({0: 70.0}, guest))  # 30 points of host work beside the guest
    assert est.smooth_host_work(host({0: 42.0}, guest)).util[0] == pytest.approx(42.0)
    rise = [est.smooth_host_work(host({0: 90.0}, guest)).util[0] for _ in range(WINDOW)]
    assert rise[0] < 90.0  # one reading of 50 points is a burst
    assert rise[-1] == pytest.approx(90.0)  # most of the window: it is the host's work now
    assert rise.index(pytest.approx(90.0)) <= WINDOW // 2 + 1


def test_forget_drops_host_work_too() -> None:
    est = Estimator()
    guest = [reading(A, 40, 40)]
    for _ in range(5):
        est.smooth_host_work(host({0: 45.0}, guest))
    est.forget()
    assert est.smooth_host_work(host({0: 95.0}, guest)).util[0] == pytest.approx(95.0)


def test_a_floating_vcpu_is_no_host_work() -> None:
    est = Estimator()
    floating = [reading(A, 80, 80, frozenset({0, 1}))]
    for _ in range(8):  # measured while it floats: 40 points on each pCPU are the vCPU's
        est.smooth_host_work(host({0: 45.0, 1: 42.0}, floating))
    placed = [reading(A, 80, 80)]
    assert est.smooth_host_work(host({0: 85.0, 1: 2.0}, placed)).util == pytest.approx(
        {0: 85.0, 1: 2.0}
    )
    burst = est.smooth_host_work(host({0: 85.0, 1: 40.0}, placed)).util
    assert burst == pytest.approx({0: 85.0, 1: 2.0})  # the window's median: 2 points
