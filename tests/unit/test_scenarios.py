"""Each scenario's expected outcome with the agent's policy, the baselines, the optimum and
the benchmark's metrics. Timing targets live in the benchmark, not here."""

from __future__ import annotations

import dataclasses
import itertools
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vcpusched.estimate import PLACE_SAMPLES
from vcpusched.model import VcpuRef
from vcpusched.policy import DOUBT_CYCLES
from vcpusched_sim import bench
from vcpusched_sim.baselines import (
    best_partition,
    lpt,
    min_moves,
    pins_to_level,
    sumsq,
    totals_of,
)
from vcpusched_sim.bench import OURS, ScenarioRun, bench_scenario
from vcpusched_sim.host import DomainSpec, constant, phased
from vcpusched_sim.scenarios import SCENARIOS, Scenario, bursty

CLASSIC = sorted(name for name, s in SCENARIOS.items() if s.classic)


@cache
def ran(name: str, cycles: int = 30, policies: tuple[str, ...] = (OURS, "optimum")) -> ScenarioRun:
    return bench_scenario(SCENARIOS[name].resized(cycles), policies)


def per_pcpu(run: ScenarioRun, policy: str = OURS) -> dict[int, list[VcpuRef]]:
    where: dict[int, list[VcpuRef]] = {p: [] for p in run.scenario.managed_pcpus}
    for ref, affinity in run.traces[policy].final.items():
        assert len(affinity) == 1, f"{ref} left unpinned: {sorted(affinity)}"
        where.setdefault(next(iter(affinity)), []).append(ref)
    return where


def demand_of(scenario: Scenario, ref: VcpuRef) -> float:
    domain = next(d for d in scenario.domains if d.name == ref.domain)
    return domain.loads[ref.vcpu].nominal(0.0)


# -- the registry ----------------------------------------------------------------------------


def test_registry_holds_the_required_cases() -> None:
    for size in ("", "-16"):
        for case in ("pinned-pcpu0", "alternating", "round-robin", "unpinned"):
            assert f"{case}{size}" in SCENARIOS
        assert f"unpinned-heavy-light{size}" in SCENARIOS
    assert {(SCENARIOS[n].vcpus, SCENARIOS[n].pcpus) for n in CLASSIC} == {(8, 4), (16, 8)}
    for name in ("fewer-vcpus", "multi-vcpu", "noise", "phases", "phases-noise", "churn"):
        assert name in SCENARIOS
    assert SCENARIOS["fewer-vcpus"].vcpus < SCENARIOS["fewer-vcpus"].pcpus
    assert any(len(d.loads) > 1 for d in SCENARIOS["multi-vcpu"].domains)
    assert all(load.noise == 0.05 for d in SCENARIOS["noise"].domains for load in d.loads)
    assert SCENARIOS["excluded"].exclude == ("db-*",)
    assert SCENARIOS["restricted-cpus"].managed_pcpus == (2, 3, 4, 5, 6, 7)
    large = SCENARIOS["large"]
    assert (large.vcpus, large.pcpus) == (1000, 128)


def test_registry_holds_the_issue_10_classes() -> None:
    assert {s.name for s in SCENARIOS.values() if s.bursty} == {
        "bursty-50",
        "bursty-100",
        "bursty-duty",
        "bursty-slow",
    }
    assert all(load.noise == 0.20 for d in SCENARIOS["noise-20"].domains for load in d.loads)
    over = SCENARIOS["oversubscribed"]
    assert over.oversubscribed
    assert over.vcpus == 12
    assert over.pcpus == 4
    assert SCENARIOS["packing"].packing
    assert SCENARIOS["mixed-full"].from_full
    huge = SCENARIOS["huge"]
    assert (huge.vcpus, huge.pcpus) == (4000, 256)
    # A burst pattern is what the guest does, not a load change of the story: one epoch.
    assert SCENARIOS["bursty-100"].change_times() == []


def test_a_bursty_load_repeats_its_pattern() -> None:
    load = bursty(100.0, 0.0, 1, 3, offset=1)
    assert [load.nominal(t + 0.5) for t in range(8)] == [0, 100, 0, 0, 0, 100, 0, 0]
    assert load.changes() == ()


def test_the_worst_off_share_is_measured_from_outside() -> None:
    run = ran("oversubscribed-2", cycles=10, policies=(OURS, "optimum"))
    # Four to one: the four get a quarter each; three to two, the optimum gives a third.
    assert run.traces[OURS].worst[1] == pytest.approx(25.0)
    assert run.traces["optimum"].worst[-1] == pytest.approx(100 / 3)


def test_resized_scenario_scales_its_events() -> None:
    churn = SCENARIOS["churn"]
    short = churn.resized(60)
    assert short.cycles == 60
    assert churn.change_times() == [60.0, 150.0, 220.0]
    assert short.change_times() == [12.0, 30.0, 44.0]
    assert SCENARIOS["phases"].resized(30).change_times() == [10.0, 20.0]
    assert SCENARIOS["phases"].resized(600).change_times() == [200.0, 400.0]


# -- the classic cases ------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLASSIC)
def test_classic_case_converges_at_once_with_the_fewest_pins(name: str) -> None:
    result = ran(name).results[OURS]
    # Unpinned vCPUs short of time are measured over PLACE_SAMPLES intervals before placing.
    # Pinned ones that share a full pCPU read bounds: nothing is judged on one reading, and a
    # pCPU that takes a guess takes no more in that plan, so they spread over two plans.
    expected = {"round": 0, "unpinned": 1, "pinned": 3, "alternating": 3}[name.split("-")[0]]
    if name.startswith("unpinned-heavy-light"):
        expected = PLACE_SAMPLES
    assert result.converge == expected
    assert result.minimum is not None
    assert result.moves_to == result.minimum
    assert result.moves_after == 0


@pytest.mark.parametrize("name", ["round-robin", "round-robin-16"])
def test_balanced_round_robin_is_left_alone(name: str) -> None:
    assert sum(ran(name).traces[OURS].moves) == 0


@pytest.mark.parametrize(
    "name",
    ["pinned-pcpu0", "alternating", "unpinned", "pinned-pcpu0-16", "alternating-16", "unpinned-16"],
)
def test_equal_loads_end_two_per_pcpu(name: str) -> None:
    run = ran(name)
    assert {len(refs) for refs in per_pcpu(run).values()} == {2}


@pytest.mark.parametrize("name", ["unpinned", "unpinned-16"])
def test_unpinned_vcpus_are_each_placed_once(name: str) -> None:
    run = ran(name)
    assert sum(run.traces[OURS].moves) == run.scenario.vcpus


@pytest.mark.parametrize("name", ["unpinned-heavy-light", "unpinned-heavy-light-16"])
def test_heavy_and_light_are_paired_on_every_pcpu(name: str) -> None:
    run = ran(name)
    for pcpu, refs in per_pcpu(run).items():
        demands = sorted(demand_of(run.scenario, r) for r in refs)
        assert demands == [50.0, 100.0], f"pCPU {pcpu}: {refs}"


# -- beyond the course ----------------------------------------------------------------------


def test_fewer_vcpus_than_pcpus_get_a_pcpu_each() -> None:
    run = ran("fewer-vcpus")
    assert sorted(len(refs) for refs in per_pcpu(run).values()) == [0, 1, 1, 1]
    assert run.results[OURS].moves_to == run.results[OURS].minimum == 2


# Cycles to converge. Where a load rises past what its pCPU can give (phases), the vCPUs
# sharing it never idle and read as wanting a whole pCPU each, as on a real host: the first
# move gives one room, the next cycle shows what it really wants, and a last step may follow.
# Nothing is judged on one reading, and a gain's uncertainty is a prior until the third.
# excluded: 5, since a pCPU that sheds a known vCPU beside one read short waits a reading.
CYCLES = {"multi-vcpu": 3, "excluded": 5, "phases": 4, "churn": 2, "mixed-full": 4}


@pytest.mark.parametrize("name", sorted(CYCLES))
def test_balanced_like_the_optimum_within_a_few_cycles(name: str) -> None:
    run = ran(name, cycles=60)
    ours, best = run.results[OURS], run.results["optimum"]
    assert ours.converge is not None
    assert ours.converge <= CYCLES[name]
    assert ours.sd <= best.sd + 1.0
    assert ours.moves_after == 0


ONE = {p: frozenset({p}) for p in (0, 1)}


def _load_change(seed: int) -> Scenario:
    """The lab's load-change scenario with its queueing and QEMU's own threads: two guests on
    each pCPU at 40, then those of pCPU 0 go to 60 and those of pCPU 1 to 20."""
    guests = [
        DomainSpec(f"vm{i:02d}", (phased((0.0, 40.0), (18.0, later), noise=0.05),), (one,))
        for i, (later, one) in enumerate(
            [(60.0, ONE[0]), (60.0, ONE[0]), (20.0, ONE[1]), (20.0, ONE[1])]
        )
    ]
    host = [DomainSpec(f"qemu{p}", (constant(5.0, noise=0.6),), (ONE[p],)) for p in (0, 1)]
    return Scenario(
        "load-change",
        "",
        2,
        (*guests, *host),
        cycles=30,
        interval=2.0,
        exclude=("qemu*",),
        seed=seed,
        queueing=True,
    )


@pytest.mark.parametrize("seed", range(6))
def test_a_load_change_beside_waiting_guests_takes_two_pins(seed: int) -> None:
    # A pCPU that shed a known vCPU beside a guest read at its bound once sent the second known
    # vCPU after the first, on the bound, and one back the next cycle: four pins for two.
    trace = bench.run(_load_change(seed), OURS)
    assert [c for c, _ in trace.log if c <= 9] == []  # balanced at 40 each: left alone
    assert len(trace.log) == 2, [str(m) for _, m in trace.log]
    assert max(c for c, _ in trace.log) <= 9 + 4
    assert trace.nominal[-1] == pytest.approx([85.0, 85.0], abs=6)


@pytest.mark.parametrize(("load", "seed"), [(52, 0), (52, 1), (56, 2), (60, 3), (48, 4)])
def test_four_guests_from_one_pcpu_spread_in_two_pins(load: float, seed: int) -> None:
    # After the first move the guest moved reads exact and a little over half a pCPU, the ones
    # left read at their bound. Moving a second beside it costs the first a point or two and
    # gives the second a dozen: a gain, where a veto on any loss made an exchange of four pins.
    domains = tuple(
        DomainSpec(f"g{i}", (constant(load, 0.05),), (frozenset({0}),)) for i in range(4)
    )
    trace = bench.run(Scenario("four", "", 2, domains, cycles=30, seed=seed, queueing=True), OURS)
    assert len(trace.log) == 2, [str(m) for _, m in trace.log]
    assert sorted(len([r for r, a in trace.final.items() if a == {p}]) for p in (0, 1)) == [2, 2]


def test_changing_loads_open_new_epochs() -> None:
    result = ran("phases", cycles=60).results[OURS]
    assert [e.first for e in result.epochs] == [1, 21, 41]
    assert all(e.moves_to > 0 for e in result.epochs[1:])


def test_churn_places_newcomers_and_forgets_the_departed() -> None:
    run = ran("churn", cycles=60)
    final = run.traces[OURS].final
    assert {r.domain for r in final} == {"vm00", "vm02", "new0", "new1", "new3", "late"}
    assert all(len(a) == 1 for a in final.values())


def test_excluded_domain_is_never_moved() -> None:
    run = ran("excluded")
    assert run.traces[OURS].final[VcpuRef("db-main", 0)] == frozenset({0})
    # The optimum treats it as fixed too: both need the same pins.
    assert run.results[OURS].moves_to == run.results["optimum"].moves_to == 8


def test_restricted_cpus_are_the_only_ones_used() -> None:
    run = ran("restricted-cpus")
    where = per_pcpu(run)
    assert set(where) == {2, 3, 4, 5, 6, 7}
    assert {len(refs) for refs in where.values()} == {2}
    # pCPUs 0 and 1 end idle: nothing of the guests runs there any more.
    assert run.traces[OURS].util[-1] == pytest.approx([80.0] * 6)


def test_large_host_is_balanced_like_the_greedy_bound() -> None:
    run = ran("large", cycles=24)
    ours, best = run.results[OURS], run.results["optimum"]
    assert not best.exact  # too large for the exact search
    assert ours.converge is not None
    # Half its vCPUs start starved (see CYCLES) and each plan judges a bounded number of steps.
    assert ours.converge <= 9
    assert ours.sd <= best.sd + 1.0


@pytest.mark.parametrize("name", ["bursty-50", "bursty-100", "bursty-duty", "bursty-slow"])
def test_bursty_guests_are_never_worse_off_than_left_alone(name: str) -> None:
    run = ran(name, cycles=120, policies=(OURS, "static"))
    ours, alone = run.results[OURS], run.results["static"]
    assert ours.sd <= alone.sd + 0.05
    assert ours.unmet <= alone.unmet + 0.2  # the first cycles may guess (see docs/benchmark.md)
    assert sum(run.traces[OURS].moves[31:]) <= 2  # pins hold once the window has seen it


def test_a_pcpu_that_runs_its_guests_slower_is_tried_not_chased() -> None:
    # Equal guests read higher on the slow pCPU, so the host looks 72/92. One swap tells the
    # readings follow the pCPU; before this was learnt the agent swapped every few cycles.
    trace = bench.run(SCENARIOS["slow-pcpu"], OURS)
    tries = sorted({c for c, _ in trace.log})
    moved = [str(m) for _, m in trace.log]
    assert len(tries) <= 3, moved
    assert len(trace.log) == 2 * len(tries), moved  # one swap per try
    assert all(b - a >= DOUBT_CYCLES for a, b in itertools.pairwise(tries))
    assert trace.nominal[-1] == pytest.approx([72.0, 92.2], abs=0.5)


def test_twenty_percent_noise_on_a_balanced_host_moves_nothing() -> None:
    assert sum(ran("noise-20", cycles=300).traces[OURS].moves) == 0


@pytest.mark.parametrize("name", ["oversubscribed", "oversubscribed-2"])
def test_more_demand_than_the_host_has_ends_max_min_fair(name: str) -> None:
    run = ran(name, cycles=20)
    ours, best = run.traces[OURS].worst, run.traces["optimum"].worst
    assert all(ours[c] >= best[c] - 2.0 for c in range(5, len(ours)))


@pytest.mark.parametrize("name", ["mixed-full", "mixed-full-2"])
def test_from_one_full_pcpu_at_most_one_pin_more_than_the_minimum(name: str) -> None:
    result = ran(name).results[OURS]
    assert result.minimum is not None
    assert result.moves_to <= result.minimum + 1


@pytest.mark.parametrize("name", ["noise", "round-robin-noise", "phases-noise"])
def test_noise_causes_no_move_after_convergence(name: str) -> None:
    result = ran(name, cycles=300).results[OURS]
    assert result.converge is not None
    assert result.moves_after == 0


def test_a_run_is_deterministic_for_its_seed() -> None:
    scenario = SCENARIOS["noise"].resized(40)
    first = bench.run(scenario, OURS)
    again = bench.run(scenario, OURS)
    assert (first.moves, first.util) == (again.moves, again.util)
    other = bench.run(dataclasses.replace(scenario, seed=99), OURS)
    assert other.util != first.util


# -- baselines ------------------------------------------------------------------------------


def test_baselines_do_what_they_promise() -> None:
    run = ran("pinned-pcpu0", 20, ("static", "no-pin", "greedy", "optimum"))
    static = run.traces["static"].final
    assert {r.domain: next(iter(a)) for r, a in static.items()} == {
        f"vm{i:02d}": i % 4 for i in range(8)
    }
    assert set(run.traces["no-pin"].final.values()) == {frozenset(range(4))}
    assert run.results["greedy"].converge == 1
    assert run.results["optimum"].converge == 0
    assert run.results["optimum"].moves_to == 6


def test_greedy_leaves_a_balanced_host_alone_and_static_never_adapts() -> None:
    assert sum(ran("round-robin", 20, ("greedy",)).traces["greedy"].moves) == 0
    static = ran("phases", 60, ("static", "optimum")).results["static"]
    assert static.converge is None


def test_no_pin_leaves_excluded_domains_alone() -> None:
    final = ran("excluded", 10, ("no-pin",)).traces["no-pin"].final
    assert final[VcpuRef("db-main", 0)] == frozenset({0})
    assert final[VcpuRef("vm00", 0)] == frozenset(range(4))


# -- the optimum ----------------------------------------------------------------------------


def _brute(loads: list[float], background: list[float]) -> float:
    bins = range(len(background))
    return min(
        sumsq(totals_of(loads, a, background)) for a in itertools.product(bins, repeat=len(loads))
    )


_loads = st.lists(st.sampled_from([10.0, 20.0, 25.0, 40.0, 50.0, 100.0]), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(_loads, st.integers(min_value=1, max_value=4), st.data())
def test_best_partition_matches_exhaustive_search(
    loads: list[float], bins: int, data: st.DataObject
) -> None:
    background = data.draw(st.lists(st.sampled_from([0.0, 15.0]), min_size=bins, max_size=bins))
    assign, exact = best_partition(loads, background)
    assert exact
    assert sumsq(totals_of(loads, assign, background)) == pytest.approx(_brute(loads, background))


@settings(max_examples=150, deadline=None)
@given(_loads, st.integers(min_value=1, max_value=4), st.data())
def test_min_moves_matches_exhaustive_search(
    loads: list[float], bins: int, data: st.DataObject
) -> None:
    background = [0.0] * bins
    home = data.draw(
        st.lists(
            st.none() | st.integers(min_value=0, max_value=bins - 1),
            min_size=len(loads),
            max_size=len(loads),
        )
    )
    target = _brute(loads, background)
    fewest = min(
        sum(1 for b, h in zip(a, home, strict=True) if b != h)
        for a in itertools.product(range(bins), repeat=len(loads))
        if sumsq(totals_of(loads, a, background)) <= target + 1e-6
    )
    found = min_moves(loads, home, background, target)
    assert found is not None
    assert sumsq(totals_of(loads, found, background)) == pytest.approx(target)
    assert sum(1 for b, h in zip(found, home, strict=True) if b != h) == fewest


def test_min_moves_handles_the_large_classic_cases_quickly() -> None:
    loads = [40.0] * 16
    assert min_moves(loads, [0] * 16, [0.0] * 8, 8 * 80.0**2) is not None
    found = min_moves(loads, [0, 7] * 8, [0.0] * 8, 8 * 80.0**2)
    assert found is not None
    assert sum(1 for b, h in zip(found, [0, 7] * 8, strict=True) if b != h) == 12


def test_greedy_partition_and_pin_bound() -> None:
    assert lpt([7.0, 5.0, 4.0, 3.0, 3.0], [0.0, 0.0]) == [0, 1, 1, 0, 1]
    # Bin 0 holds 50+30+20 and must get down to 60: shedding the 50 is enough.
    assert pins_to_level([50.0, 30.0, 20.0, 10.0], [0, 0, 0, None], 2, 60.0) == 2
    assert pins_to_level([50.0, 30.0, 20.0], [0, 0, 0], 2, 30.0) == 2


# -- metrics and the command ----------------------------------------------------------------


def test_balance_allows_the_optimum_plus_a_point() -> None:
    assert bench.balanced([80.0, 80.4], [80.0, 80.0])  # SD 0.2: within 1% of the mean
    assert not bench.balanced([70.0, 90.0], [80.0, 80.0])
    assert bench.balanced([60.0, 60.0, 60.0, 0.0], [60.0, 60.0, 60.0, 0.0])


def test_settling_needs_balance_for_good_and_a_quiet_cycle() -> None:
    ok = [True, False, True, False, True, True, True]
    none = [0] * 7
    assert bench._settled(ok, [0, 3, 0, 2, 0, 0, 0], none, 1, 6) == 4
    assert bench._settled(ok, [0, 3, 0, 2, 1, 1, 0], none, 1, 6) == 6
    assert bench._settled([True, True, False], [0, 0, 0], none, 1, 2) is None
    # Balanced from the start, but vCPUs held back for measuring until cycle 3 placed them.
    assert bench._settled([True] * 7, [0, 0, 0, 4, 0, 0, 0], [2, 2, 2, 0, 0, 0, 0], 1, 6) == 4


def test_command_lists_and_rejects_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--list"]) == 0
    assert "pinned-pcpu0" in capsys.readouterr().out
    assert bench.main(["--scenario", "nope"]) == 2
    assert "unknown scenario nope" in capsys.readouterr().err


def test_command_writes_table_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = bench.main(["--scenario", "alternating", "--cycles", "12", "--docs", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "alternating  vcpusched" in out
    doc = (tmp_path / "benchmark.md").read_text()
    assert "| alternating | vcpusched |" in doc
    assert "![alternating](img/alternating.png)" in doc
    png = tmp_path / "img" / "alternating.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size < 100_000
