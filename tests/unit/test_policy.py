"""The policy's objective and search, on snapshots measured as a host would measure them."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.snapshots import apply, snapshot, vcpu
from vcpusched.config import Config
from vcpusched.estimate import SHORT
from vcpusched.estimate import short as short_reading
from vcpusched.model import Move, Plan, Snapshot, Vcpu, VcpuRef
from vcpusched.policy import PRIOR_READINGS, Balancer, pcpu_demand, predicted_shares

CFG = Config()


def steady(snap: Snapshot, cfg: Config = CFG, readings: int = 3) -> Plan:
    """The plan once the same readings have come `readings` times (a steady host)."""
    balancer = Balancer(cfg)
    plan = Plan()
    for _ in range(readings):
        plan = balancer.plan(snap, frozenset(snap.util))
    return plan


def moved(snap: Snapshot, moves: Sequence[Move], cap: bool = True) -> Snapshot:
    """The host measured again with the same demands after the moves."""
    where = {m.ref: m.dst for m in moves}
    vcpus = [
        replace(v, affinity=frozenset((where[v.ref],))) if v.ref in where else v for v in snap.vcpus
    ]
    return snapshot(vcpus, len(snap.util), cap=cap)


def settle(
    snap: Snapshot, cfg: Config = CFG, rounds: int = 12, warm: int = 0
) -> tuple[Snapshot, list[Move]]:
    """Plan, pin, measure again, until a plan is empty; returns the host and every move.
    `warm` readings of the start come first, with nothing pinned."""
    balancer = Balancer(cfg)
    for _ in range(warm - 1):
        balancer.plan(snap, frozenset(snap.util))
    done: list[Move] = []
    quiet = 0
    for _ in range(rounds):
        plan = balancer.plan(snap, frozenset(snap.util))
        balancer.applied(plan.moves)
        done.extend(plan.moves)
        snap = moved(snap, plan.moves)
        quiet = quiet + 1 if not plan.moves else 0
        if quiet == 2:
            break
    return snap, done


def test_balanced_round_robin_makes_no_move() -> None:
    snap = snapshot([vcpu(f"vm{i}", 40, i % 2) for i in range(4)], pcpus=2)
    assert steady(snap).moves == ()


def test_nothing_is_judged_on_a_single_reading() -> None:
    snap = snapshot([vcpu(f"vm{i}", 40, 0) for i in range(8)], pcpus=4)
    assert steady(snap, readings=1).moves == ()
    assert steady(snap, readings=2).moves != ()


def test_all_on_one_pcpu_ends_even_with_minimum_moves() -> None:
    snap = snapshot([vcpu(f"vm{i}", 40, 0) for i in range(8)], pcpus=4)
    snap, done = settle(snap)
    assert len(done) == 6  # 8 vCPUs, 2 per pCPU: six must leave pCPU0
    assert sorted(pcpu_demand(snap).values()) == [80, 80, 80, 80]


def test_moving_work_onto_a_full_pcpu_that_only_moves_the_waiting_is_no_gain() -> None:
    # Heavy + heavy on pCPU0 and light + light on pCPU1: both 100% busy, every vCPU receives
    # 50. A swap leaves every share as it is (heavy + light on a full pCPU still get 50 each).
    vcpus = [
        vcpu("h0", 50, 0, demand=100),
        vcpu("h1", 50, 0, demand=100),
        vcpu("l0", 50, 1, demand=50),
        vcpu("l1", 50, 1, demand=50),
    ]
    assert steady(snapshot(vcpus, pcpus=2)).moves == ()


def test_a_full_pcpu_sheds_to_one_with_room() -> None:
    vcpus = [vcpu("h0", 50, 0, demand=100), vcpu("h1", 50, 0, demand=100)]
    (move,) = steady(snapshot(vcpus, pcpus=2)).moves
    assert move.dst == 1
    assert (move.src_demand, move.dst_demand) == (200, 0)


def test_more_vcpus_than_pcpus_pinned_unevenly_end_fair() -> None:
    # 12 vCPUs that each want a whole pCPU, pinned 5/4/2/1: everyone can have a third.
    counts = [5, 4, 2, 1]
    vcpus = [
        vcpu(f"vm{p}{i}", 100, p, demand=100, pcpus=4)
        for p, n in enumerate(counts)
        for i in range(n)
    ]
    snap, _ = settle(snapshot(vcpus, pcpus=4))
    per_pcpu = sorted(sum(1 for v in snap.vcpus if v.pcpu == p) for p in range(4))
    assert per_pcpu == [3, 3, 3, 3]


def test_unpinned_heavy_and_light_are_paired() -> None:
    loads = [100, 50, 100, 50]
    snap = snapshot([vcpu(f"vm{i}", load, None) for i, load in enumerate(loads)], pcpus=2)
    plan = steady(snap, readings=8)
    assert all(m.kind == "place" for m in plan.moves)
    assert len(plan.moves) == 4
    assert apply(snap, plan.moves) == {0: 150, 1: 150}


def test_floating_vcpus_wait_while_any_of_them_is_measured() -> None:
    loads = [100, 50, 100, 50]
    vcpus = [vcpu(f"vm{i}", 50, None, demand=load, pcpus=4) for i, load in enumerate(loads)]
    pinned_away = vcpu("out", 10, 3, pcpus=4)  # outside the managed pCPUs
    snap = Snapshot(util={0: 100.0, 1: 100.0, 2: 100.0, 3: 10.0}, vcpus=(*vcpus, pinned_away))
    config = dataclasses.replace(CFG, cpus=frozenset({0, 1, 2}))
    plan = steady(snap, config, readings=2)
    # One partition for all four, later; the vCPU outside `cpus` is evicted meanwhile.
    assert [m.ref.domain for m in plan.moves] == ["out"]
    assert plan.held == {"measuring": 2}  # the two that read short


def test_idle_unpinned_vcpus_spread_evenly_by_count() -> None:
    snap = snapshot([vcpu(f"vm{i}", 0.3 * i, None, pcpus=4) for i in range(8)], pcpus=4)
    counts = [sum(1 for m in steady(snap).moves if m.dst == p) for p in range(4)]
    assert counts == [2, 2, 2, 2]


def test_domain_vcpus_spread_apart() -> None:
    snap = snapshot([vcpu("big", 10, None, index=i) for i in range(2)], pcpus=2)
    assert sorted(m.dst for m in steady(snap).moves) == [0, 1]


def test_high_sheds_the_vcpu_that_brings_low_closest_to_target() -> None:
    # pCPU0 wants 120 from four vCPUs, pCPU1 is at 45: the 35 lifts it to 80 exactly.
    vcpus = [
        vcpu("a", 40, 0, demand=50),
        vcpu("b", 30, 0, demand=35),
        vcpu("c", 17, 0, demand=20),
        vcpu("f", 13, 0, demand=15),
        vcpu("d", 45, 1),
    ]
    moves = steady(snapshot(vcpus, pcpus=2)).moves
    assert (moves[0].ref.domain, moves[0].dst, moves[0].reason) == ("b", 1, "high")
    assert moves[0].src_demand == pytest.approx(120)
    assert moves[0].dst_demand == pytest.approx(45)


def test_high_prefers_a_fit_that_does_not_overshoot() -> None:
    # 95 beside 50: taking 30 lifts pCPU1 to 80 but drops pCPU0 to 65; 20 gives 75 and 70.
    vcpus = [vcpu("a", 45, 0), vcpu("b", 30, 0), vcpu("c", 20, 0), vcpu("d", 50, 1)]
    assert [(m.ref.domain, m.dst) for m in steady(snapshot(vcpus, pcpus=2)).moves] == [("c", 1)]


def test_thresholds_alone_would_strand_89_and_71() -> None:
    vcpus = [vcpu("a", 44.5, 0), vcpu("b", 35.5, 0), vcpu("c", 9, 0), vcpu("d", 71, 1)]
    snap = snapshot(vcpus, pcpus=2)
    moves = steady(snap).moves
    assert [(m.ref.domain, m.dst) for m in moves] == [("c", 1)]
    assert apply(snap, moves) == {0: 80, 1: 80}


def test_a_gain_below_min_gain_is_left_alone() -> None:
    vcpus = [vcpu("a", 42, 0), vcpu("b", 2, 0), vcpu("c", 38, 1)]
    assert steady(snapshot(vcpus, pcpus=2)).moves == ()  # moving b narrows 44-38 by only 2


def test_a_single_vcpu_on_a_busy_pcpu_stays() -> None:
    vcpus = [vcpu("hog", 100, 0), vcpu("idle", 5, 1)]
    assert steady(snapshot(vcpus, pcpus=2)).moves == ()


def test_excluded_vcpus_never_move_but_count() -> None:
    vcpus = [vcpu("db", 70, 0, excluded=True), vcpu("a", 40, 0), vcpu("b", 30, 1), vcpu("c", 30, 1)]
    moves = steady(snapshot(vcpus, pcpus=2)).moves
    # pCPU0 holds the excluded 70: it should shed `a`, and take nothing.
    assert [(m.ref.domain, m.dst) for m in moves] == [("a", 1)]


def test_excluded_unpinned_vcpu_is_not_placed() -> None:
    vcpus = [vcpu("db", 50, None, excluded=True), vcpu("a", 50, None)]
    assert [m.ref.domain for m in steady(snapshot(vcpus, pcpus=2)).moves] == ["a"]


def test_cpus_restricts_targets_and_evicts_from_outside() -> None:
    cfg = Config(cpus=frozenset({1, 2, 3}))
    vcpus = [vcpu("a", 30, 0, pcpus=4), vcpu("b", 30, None, pcpus=4)]
    moves = steady(snapshot(vcpus, pcpus=4), cfg).moves
    assert {m.ref.domain for m in moves} == {"a", "b"}
    assert all(m.dst in {1, 2, 3} for m in moves)
    assert len({m.dst for m in moves}) == 2


def test_background_load_counts() -> None:
    # pCPU0 carries 35 points of host work no vCPU explains: both vCPUs do better on pCPU1.
    vcpus = [vcpu("a", 30, 0), vcpu("b", 30, 0)]
    snap = snapshot(vcpus, pcpus=2, background={0: 35})
    assert pcpu_demand(snap) == {0: pytest.approx(95), 1: 0}
    assert apply(snap, steady(snap).moves) == {0: 0, 1: 60}


def test_a_burst_of_host_work_moves_nothing_and_lasting_host_work_counts() -> None:
    # 62/62 with two guests of 30 on each; then 35 points of host work on pCPU 1: one
    # interval of it is a burst, and the thresholds would have shed a guest toward pCPU 0.
    guests = [vcpu("a", 30, 0), vcpu("b", 30, 0), vcpu("c", 30, 1), vcpu("d", 30, 1)]
    quiet = snapshot(guests, 2, background={0: 2.0, 1: 2.0})
    busy = snapshot(guests, 2, background={0: 2.0, 1: 37.0})
    balancer = Balancer(CFG)
    for _ in range(4):
        assert not balancer.plan(quiet, frozenset(quiet.util)).moves
    assert steady(busy).moves  # read alone, the host work looks lasting
    assert not balancer.plan(busy, frozenset(busy.util)).moves
    plans = [balancer.plan(busy, frozenset(busy.util)) for _ in range(8)]
    assert any(p.moves for p in plans)  # most of the window: it is lasting


def test_a_vcpu_moved_twice_in_one_plan_is_one_move() -> None:
    vcpus = [vcpu(f"v{i}", load, 0, pcpus=3) for i, load in enumerate([60, 50, 40, 30, 20])]
    moves = steady(snapshot(vcpus, pcpus=3)).moves
    assert len({m.ref for m in moves}) == len(moves)
    assert all(m.dst not in m.src for m in moves)


def test_first_readings_of_a_balanced_pinning_are_not_taken_for_exact() -> None:
    # A freshly started agent finds two 40s on each pCPU; one interval reads 44 + 44 beside
    # 40 + 38, foreign work on pCPU0 adding 6 more. Taken for exact that is a swap of a 44
    # for the 38; until three readings tell how the gain varies, it is no reason to move.
    vcpus = [vcpu("a", 44, 0), vcpu("b", 44, 0), vcpu("c", 40, 1), vcpu("d", 38, 1)]
    snap = snapshot(vcpus, pcpus=2, background={0: 6})
    assert steady(snap, readings=2).moves == ()
    assert steady(snap, readings=3).moves != ()


def test_a_swap_within_the_noise_is_left_alone() -> None:
    # 46+40 beside 40+34: a 12-point swap when the numbers are exact, chasing noise when
    # each vCPU's demand wobbles by several points from one interval to the next.
    quiet = [vcpu("a", 46, 0), vcpu("b", 40, 0), vcpu("c", 40, 1), vcpu("d", 34, 1)]
    assert len(steady(snapshot(quiet, pcpus=2)).moves) == 2
    rng = random.Random(3)
    balancer = Balancer(CFG)
    plan = Plan()
    for _ in range(16):
        noisy = [replace(v, received=v.received + rng.uniform(-8, 8)) for v in quiet]
        noisy = [replace(v, demand=v.received) for v in noisy]
        plan = balancer.plan(snapshot(noisy, pcpus=2, cap=False), frozenset({0, 1}))
    assert plan.moves == ()


def test_the_demands_of_a_swap_are_from_before_it() -> None:
    # 45+40 beside 38+25: no single move narrows the gap by 5, a swap does.
    vcpus = [vcpu("a", 45, 0), vcpu("b", 40, 0), vcpu("c", 38, 1), vcpu("d", 25, 1)]
    out, back = steady(snapshot(vcpus, pcpus=2)).moves
    assert (out.src_demand, out.dst_demand) == (85, 63)
    assert (back.src_demand, back.dst_demand) == (63, 85)
    assert out.reason == back.reason == "swap"


def test_guests_of_equal_vcpus_stuck_for_single_steps_are_exchanged() -> None:
    # pCPU0 40+40, pCPU1 30+30+10+10, pCPU2 45+35: no single move or swap evens 80/80/80
    # from 80/80/80... so start from 100/60/80 where only two-for-one exchanges reach 80s.
    vcpus = [
        vcpu("a", 35, 0, pcpus=2),
        vcpu("a", 35, 0, index=1, pcpus=2),
        vcpu("a", 30, 0, index=2, pcpus=2),
        vcpu("b", 20, 1, pcpus=2),
        vcpu("b", 20, 1, index=1, pcpus=2),
        vcpu("b", 20, 1, index=2, pcpus=2),
    ]
    snap = snapshot(vcpus, pcpus=2)
    assert pcpu_demand(snap) == {0: 100, 1: 60}
    moves = steady(snap).moves
    after = apply(snap, moves)
    assert abs(after[0] - after[1]) < 60 - 5


# Where the packing scenario stood after its first plans: six guests of four vCPUs (15, 20,
# 25, 25, 30, 35) spread 85/85/90/90/85/35/65/65 over eight pCPUs. Single steps, swaps and
# exchanges walk to 80/70 and six 75s, where no four pins gain enough; every pCPU can hold 75.
PACKED = {
    0: [("a", 15), ("a", 15), ("b", 20), ("f", 35)],
    1: [("b", 20), ("b", 20), ("b", 20), ("d", 25)],
    2: [("a", 15), ("c", 25), ("c", 25), ("c", 25)],
    3: [("a", 15), ("d", 25), ("d", 25), ("d", 25)],
    4: [("c", 25), ("e", 30), ("e", 30)],
    5: [("f", 35)],
    6: [("e", 30), ("f", 35)],
    7: [("e", 30), ("f", 35)],
}


def packed(layout: dict[int, list[tuple[str, float]]]) -> Snapshot:
    count: dict[str, int] = {}
    vcpus = []
    for pcpu, guests in layout.items():
        for name, load in guests:
            index = count[name] = count.get(name, -1) + 1
            vcpus.append(vcpu(name, load, pcpu, index=index, pcpus=len(layout)))
    return snapshot(vcpus, pcpus=len(layout))


def test_where_steps_end_unbalanced_the_plan_repacks() -> None:
    snap = packed(PACKED)
    moves = steady(snap).moves
    assert {m.reason for m in moves} == {"repack"}
    assert set(apply(snap, moves).values()) == {75}
    assert len(moves) <= 11  # the steps made 10 pins to reach 80/70
    # And it holds: the plan on the repacked host is empty.
    assert steady(moved(snap, moves)).moves == ()


def test_a_repack_is_not_taken_where_the_steps_do_as_well() -> None:
    # Classic: 8 vCPUs of 40 on one pCPU. Steps reach 80s with the least pins.
    snap = snapshot([vcpu(f"vm{i}", 40, 0, pcpus=4) for i in range(8)], pcpus=4)
    _, done = settle(snap)
    assert len(done) == 6
    assert "repack" not in {m.reason for m in done}


def test_a_first_reading_spends_no_judging() -> None:
    # 640 vCPUs crowded on 64 of 128 pCPUs: nothing can be judged on one reading, so the plan
    # holds them all back for readings, and leaves its budget of judged steps to the next.
    vcpus = [vcpu(f"vm{i}", 10 + i % 7, i % 64, pcpus=128) for i in range(640)]
    snap = snapshot(vcpus, pcpus=128)
    first = Balancer(CFG).plan(snap, frozenset(snap.util))
    assert first.moves == ()
    assert first.held == {"readings": 640}


def test_a_plan_records_why_it_held_back() -> None:
    snap = snapshot([vcpu(f"vm{i}", 50, None, demand=100) for i in range(4)], pcpus=2)
    assert steady(snap, readings=2).held == {"measuring": 4}


def test_predicted_shares_are_max_min_fair() -> None:
    assert predicted_shares([100, 60]) == [0.5, pytest.approx(50 / 60)]
    assert predicted_shares([100, 20]) == [0.8, 1.0]
    assert predicted_shares([30, 30]) == [1.0, 1.0]


# -- properties over random hosts ------------------------------------------------------------


@st.composite
def hosts(draw: st.DrawFn, short: bool = True) -> tuple[Snapshot, Config]:
    pcpus = draw(st.integers(1, 5))
    n = draw(st.integers(0, 12))
    vcpus: list[Vcpu] = []
    for i in range(n):
        demand = draw(st.floats(0, 100, allow_nan=False))
        pin = draw(st.one_of(st.none(), st.integers(0, pcpus - 1)))
        vcpus.append(
            vcpu(
                f"d{i % 5}",
                demand,
                pin,
                demand=demand,
                index=i,
                excluded=draw(st.booleans()) and draw(st.booleans()),
                pcpus=pcpus,
            )
        )
    cpus = draw(st.one_of(st.none(), st.sets(st.integers(0, pcpus - 1), min_size=1)))
    cfg = Config(
        cpus=None if cpus is None else frozenset(cpus),
        min_gain=draw(st.sampled_from([1.0, 5.0, 10.0])),
    )
    snap = snapshot(vcpus, pcpus)
    if not short:
        # Every reading exact: each pCPU's demand fits (a host with room everywhere), with the
        # margin of SHORT the agent reads a vCPU by. (Dividing by four left 102 on a pCPU of
        # five: the readings came out 1.1 points short, and a later plan moved on them.)
        top = max([*pcpu_demand(snap).values(), *(v.demand for v in snap.vcpus)], default=0.0)
        if top > 100.0 - 2 * SHORT:
            scale = (100.0 - 2 * SHORT) / top
            snap = snapshot(
                [replace(v, received=v.received * scale, demand=v.demand * scale) for v in vcpus],
                pcpus,
            )
        assert not any(short_reading(v) for v in snap.vcpus), (snap, top)
    return snap, cfg


def worst_share(snap: Snapshot) -> float:
    """The worst-off pinned vCPU's predicted share, from each pCPU's demands."""
    worst = 1.0
    other = {
        p: u - sum(v.received for v in snap.vcpus if v.pcpu == p) for p, u in snap.util.items()
    }
    for p in snap.util:
        demands = [v.demand for v in snap.vcpus if v.pcpu == p]
        if demands:
            worst = min(worst, *predicted_shares(demands, 100.0 - max(other[p], 0.0)))
    return worst


@given(hosts())
@settings(max_examples=200, deadline=None)
def test_property_never_moves_excluded_nor_outside_cpus(case: tuple[Snapshot, Config]) -> None:
    snap, cfg = case
    excluded = {v.ref for v in snap.vcpus if v.excluded}
    allowed = set(snap.util) if cfg.cpus is None else cfg.cpus
    for move in steady(snap, cfg).moves:
        assert move.ref not in excluded
        assert move.dst in allowed
        assert move.dst not in move.src or len(move.src) > 1


@given(hosts())
@settings(max_examples=200, deadline=None)
def test_property_a_plan_never_lowers_the_worst_off_share(case: tuple[Snapshot, Config]) -> None:
    snap, cfg = case
    allowed = set(snap.util) if cfg.cpus is None else cfg.cpus
    placed = [v for v in snap.vcpus if v.pcpu is not None and v.pcpu in allowed]
    snap = snapshot(placed, len(snap.util))
    plan = steady(snap, cfg)
    assert worst_share(moved(snap, plan.moves)) >= worst_share(snap) - 0.005


@given(hosts(short=False))
@settings(max_examples=200, deadline=None)
def test_property_on_steady_loads_the_plan_after_a_plan_is_empty(
    case: tuple[Snapshot, Config],
) -> None:
    """With every reading exact, a plan applied leaves nothing to do: no cycle of moves."""
    snap, cfg = case
    balancer = Balancer(cfg)
    for _ in range(3):
        plan = balancer.plan(snap, frozenset(snap.util))
    balancer.applied(plan.moves)
    after = moved(snap, plan.moves)
    again = Plan()
    for _ in range(3):
        again = balancer.plan(after, frozenset(after.util))
    if any(v.pcpu is None for v in after.vcpus):
        return  # still placing: the kernel balances floating vCPUs meanwhile
    assert again.moves == ()


@given(hosts())
@settings(max_examples=150, deadline=None)
def test_property_repeated_plans_end(case: tuple[Snapshot, Config]) -> None:
    """Even where readings are bounds (a guess may be corrected once measured), plans end."""
    snap, cfg = case
    balancer = Balancer(cfg)
    quiet = 0
    for _ in range(12):
        plan = balancer.plan(snap, frozenset(snap.util))
        snap = moved(snap, plan.moves)
        quiet = quiet + 1 if not plan.moves else 0
    assert quiet >= 2


@given(hosts(short=False))
@settings(max_examples=150, deadline=None)
def test_property_no_vcpu_goes_back_where_it_was(case: tuple[Snapshot, Config]) -> None:
    """With readings that are exact (and enough of them for the prior to be gone), no pinned
    vCPU returns to a pCPU it left: no cycle of moves."""
    snap, cfg = case
    snap = snapshot([v for v in snap.vcpus if v.pcpu is not None], len(snap.util))
    snap, done = settle(snap, cfg, rounds=10, warm=PRIOR_READINGS)
    trail: dict[VcpuRef, list[frozenset[int]]] = {}
    for m in done:
        trail.setdefault(m.ref, [m.src]).append(frozenset((m.dst,)))
    for ref, pins in trail.items():
        assert len(pins) == len(set(pins)), f"{ref} went back: {pins}"


@given(
    amplitude=st.floats(5, 25),
    pattern=st.lists(st.booleans(), min_size=16, max_size=16),
    mean=st.floats(30, 45),
)
@settings(max_examples=150, deadline=None)
def test_property_bursts_around_a_steady_mean_move_nothing(
    amplitude: float, pattern: list[bool], mean: float
) -> None:
    """Two vCPUs per pCPU, balanced on their means; one of them bursts around its mean."""
    base = [vcpu(f"vm{i}", mean, i % 4, pcpus=4) for i in range(8)]
    balancer = Balancer(CFG)
    moves: list[Move] = []
    for up in pattern:
        burst = mean + (amplitude if up else -amplitude)
        vcpus = [replace(base[0], received=burst, demand=burst), *base[1:]]
        snap = snapshot(vcpus, pcpus=4)
        plan = balancer.plan(snap, frozenset(snap.util))
        moves.extend(plan.moves)
    assert moves == []


# -- a pCPU that runs its guests slower -------------------------------------------------------


def _on_a_slow_pcpu(seed: int, change_at: int | None, cycles: int) -> list[tuple[int, Move]]:
    """Four guests of 36, two per pCPU, on a host whose pCPU 1 takes 1.28 times as long for
    the same work (so they read 36 there and 46 here). At `change_at` the two guests on pCPU 0
    go to 54 and the two on pCPU 1 to 18, wherever the agent has put them by then."""
    rng = random.Random(seed)
    slow = {0: 1.0, 1: 1.28}
    where = {f"g{i}": i % 2 for i in range(4)}
    work = dict.fromkeys(where, 36.0)
    balancer = Balancer(Config())
    log: list[tuple[int, Move]] = []
    for cycle in range(cycles):
        if cycle == change_at:
            work = {g: 54.0 if p == 0 else 18.0 for g, p in where.items()}
        vcpus = [
            vcpu(g, 0.0, p, demand=work[g] * slow[p] * rng.uniform(0.98, 1.02))
            for g, p in where.items()
        ]
        plan = balancer.plan(snapshot(vcpus, 2), frozenset({0, 1}))
        for m in plan.moves:
            where[m.ref.domain] = m.dst
            log.append((cycle, m))
        balancer.applied(plan.moves)
    return log


@pytest.mark.parametrize("seed", range(4))
def test_equal_guests_are_not_chased_across_a_slow_pcpu(seed: int) -> None:
    # The lab's case: the host looked 72/92, one swap showed the readings follow the pCPU, and
    # before the policy checked the outcome of its steps it swapped again every few cycles.
    log = _on_a_slow_pcpu(seed, None, 60)
    assert len({c for c, _ in log}) <= 1, [f"{c}: {m}" for c, m in log]


@pytest.mark.parametrize("seed", range(4))
def test_a_load_change_beside_a_slow_pcpu_is_still_answered(seed: int) -> None:
    # The doubt the swap taught is about 20 points on each pCPU; the change (108 beside 46)
    # gains far more than that, and is answered as on an even host.
    log = _on_a_slow_pcpu(seed, 30, 50)
    later = [c for c, _ in log if c >= 30]
    assert later, [f"{c}: {m}" for c, m in log]
    assert min(later) <= 30 + 3, [f"{c}: {m}" for c, m in log]
    assert len({c for c, _ in log if c < 30}) <= 1


def test_a_step_the_doubt_alone_holds_is_counted_as_such() -> None:
    balancer = Balancer(Config())
    held: list[dict[str, int]] = []
    where = {f"g{i}": i % 2 for i in range(4)}
    slow = {0: 1.0, 1: 1.28}
    for _ in range(12):
        vcpus = [vcpu(g, 0.0, p, demand=36.0 * slow[p]) for g, p in where.items()]
        plan = balancer.plan(snapshot(vcpus, 2), frozenset({0, 1}))
        for m in plan.moves:
            where[m.ref.domain] = m.dst
        balancer.applied(plan.moves)
        held.append(dict(plan.held))
    # The swap back, and its twin, held by the doubt (the others by the pCPUs' speed).
    assert held[-1].get("doubt") == 2, held
