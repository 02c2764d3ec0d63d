"""The simulator's topology model: its host descriptions, its arithmetic (sibling threads,
remote memory, work done beside CPU time), the counts, and the optimum against brute force."""

from __future__ import annotations

import itertools
from pathlib import Path
from random import Random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vcpusched.host import PinError
from vcpusched.model import Vcpu, VcpuRef
from vcpusched.topology import MemoryPlacement, Topology, parse_capabilities
from vcpusched_sim.host import DomainSpec, constant
from vcpusched_sim.topo import (
    Placed,
    Speed,
    TopoDomain,
    TopoHost,
    capacity,
    host_topology,
    memory_of,
    node_factor,
    placed_from,
    predict,
    score,
    thread_speed,
    upper_bound,
)
from vcpusched_sim.topo_bench import FlatView, main, run
from vcpusched_sim.topo_optimum import core_work, keep_in_place, optimum
from vcpusched_sim.topo_scenarios import TOPO_SCENARIOS

FIXTURES = Path(__file__).parent / "fixtures"


def _v(
    domain: str,
    i: int,
    demand: float,
    cpus: set[int] | frozenset[int],
    memory: dict[int, float] | None = None,
    bound: frozenset[int] | None = None,
) -> Placed:
    return Placed(VcpuRef(domain, i), demand, frozenset(cpus), memory or {0: 1.0}, bound)


# -- the host's description ------------------------------------------------------------------


@pytest.mark.parametrize(("numbering", "llc"), [("adjacent", 2), ("split", 1)])
def test_generated_hosts_read_like_the_real_two_socket_hosts(numbering: str, llc: int) -> None:
    # The fixtures are capabilities documents modelled on real 2 x 8 x 2 hosts.
    real = parse_capabilities((FIXTURES / f"caps-2s8c2t-{numbering}.xml").read_text())
    sim = host_topology(2, 8, 2, numbering, llc_per_socket=llc)
    assert sim.nodes == real.nodes
    assert {c.id: c.siblings for c in sim.cpu_list} == {c.id: c.siblings for c in real.cpu_list}
    assert sim.cores == real.cores
    if real.caches:
        assert {b.cpus for b in sim.caches} == {b.cpus for b in real.caches}


def test_sibling_numbering_both_ways() -> None:
    adjacent = host_topology(2, 8, 2, "adjacent")
    split = host_topology(2, 8, 2, "split")
    assert adjacent.siblings_of(4) == {4, 5}
    assert split.siblings_of(4) == {4, 20}
    assert split.nodes[1] == frozenset(range(8, 16)) | frozenset(range(24, 32))
    assert host_topology(2, 32, 2, "split").siblings_of(63) == {63, 127}


def test_bad_host_descriptions_are_refused() -> None:
    with pytest.raises(ValueError, match="numbering"):
        host_topology(2, 8, 2, "diagonal")
    with pytest.raises(ValueError, match="multiple"):
        host_topology(2, 6, 2, llc_per_socket=4)
    with pytest.raises(ValueError, match="smt_pair"):
        Speed(smt_pair=2.5)
    with pytest.raises(ValueError, match="remote"):
        Speed(remote=0.0)


# -- the arithmetic --------------------------------------------------------------------------


def test_thread_speed_and_node_factor() -> None:
    speed = Speed()
    assert thread_speed(0.0, speed) == 1.0
    assert thread_speed(1.0, speed) == pytest.approx(0.625)
    assert thread_speed(0.5, speed) == pytest.approx(0.8125)
    assert thread_speed(3.0, speed) == pytest.approx(0.625)  # capped: the core is only so busy
    assert thread_speed(1.0, Speed(smt_pair=1.2)) == pytest.approx(0.6)
    assert node_factor(0, {0: 1.0}, speed) == 1.0
    assert node_factor(1, {0: 1.0}, speed) == pytest.approx(0.7)
    assert node_factor(1, {0: 0.5, 1: 0.5}, speed) == pytest.approx(0.85)
    assert node_factor(None, {0: 1.0}, speed) == 1.0
    assert node_factor(1, {}, speed) == 1.0


def test_sibling_threads_share_a_core() -> None:
    t = host_topology(1, 2, 2)  # cores {0,1} and {2,3}
    alone = predict(t, [_v("a", 0, 100, {0})])
    assert alone.work == (100.0,)
    pair = predict(t, [_v("a", 0, 100, {0}), _v("a", 1, 100, {1})])
    assert pair.received == (100.0, 100.0)  # what the kernel reports: both threads 100% busy
    assert pair.total_work == pytest.approx(125.0)  # what they got done: 1.25 cores
    apart = predict(t, [_v("a", 0, 100, {0}), _v("a", 1, 100, {2})])
    assert apart.total_work == pytest.approx(200.0)
    # A half-busy sibling: the busy thread runs shared half the time.
    half = predict(t, [_v("a", 0, 100, {0}), _v("a", 1, 50, {1})])
    assert half.work[0] == pytest.approx(100 * (0.5 + 0.5 * 0.625))
    assert half.work[1] == pytest.approx(50 * 0.625)
    assert predict(t, [_v("a", 0, 100, {0}), _v("a", 1, 100, {1})], Speed(1.5)).total_work == (
        pytest.approx(150.0)
    )


def test_work_off_the_memory_node_is_discounted() -> None:
    t = host_topology(2, 2, 1)  # node 0: 0-1, node 1: 2-3
    out = predict(t, [_v("a", 0, 80, {0}), _v("b", 0, 80, {2}), _v("c", 0, 80, {3}, {1: 1.0})])
    assert out.received == (80.0, 80.0, 80.0)
    assert out.work == pytest.approx((80.0, 56.0, 80.0))
    assert predict(t, [_v("b", 0, 80, {2})], Speed(remote=0.5)).work == pytest.approx((40.0,))


def test_floating_vcpus_are_spread_over_their_cpus() -> None:
    t = host_topology(2, 1, 2)  # node 0: core {0,1}; node 1: core {2,3}
    out = predict(t, [_v("a", 0, 100, {0, 1, 2, 3})])
    # A quarter on each thread, siblings busy a quarter of the time, half remote.
    pace = 1.0 - 0.25 * 0.375
    assert out.busy == pytest.approx({0: 25.0, 1: 25.0, 2: 25.0, 3: 25.0})
    assert out.work[0] == pytest.approx(50 * pace + 50 * pace * 0.7)


topologies = st.sampled_from(
    [host_topology(1, 2, 2), host_topology(2, 2, 2, "split"), host_topology(2, 3, 1)]
)


@st.composite
def placements(draw: st.DrawFn) -> tuple[Topology, list[Placed]]:
    t = draw(topologies)
    cpus = sorted(t.cpus)
    n = draw(st.integers(1, 7))
    vcpus = []
    for i in range(n):
        demand = draw(st.floats(0, 100))
        pinned = draw(st.booleans())
        affinity = {draw(st.sampled_from(cpus))} if pinned else set(cpus)
        node = draw(st.sampled_from(sorted(t.nodes)))
        vcpus.append(_v(f"d{i % 3}", i, demand, affinity, {node: 1.0}))
    return t, vcpus


@settings(max_examples=80, deadline=None)
@given(placements(), st.floats(1.0, 2.0), st.floats(0.1, 1.0))
def test_work_is_cpu_time_at_a_speed_no_faster_than_full(
    case: tuple[Topology, list[Placed]], smt: float, remote: float
) -> None:
    t, vcpus = case
    speed = Speed(smt, remote)
    out = predict(t, vcpus, speed)
    slowest = min(remote, 1.0) * smt / 2
    for v, got, done in zip(vcpus, out.received, out.work, strict=True):
        assert got <= v.demand + 1e-9
        assert got * slowest - 1e-6 <= done <= got + 1e-6
    assert out.total_work <= upper_bound(t, vcpus, speed) + 1e-6
    for p, b in out.busy.items():
        assert b <= 100.0 + 1e-9, p


def test_capacity_counts_a_second_thread_at_smt_pair_minus_one() -> None:
    t = host_topology(2, 32, 2)
    assert capacity(t, t.cpus, 6400.0, Speed()) == pytest.approx(6400.0)
    assert capacity(t, t.cpus, 11000.0, Speed()) == pytest.approx(6400 + 0.25 * 4600)
    assert capacity(t, t.cpus, 20000.0, Speed()) == pytest.approx(8000.0)
    half = host_topology(1, 2, 2).restricted({0, 1, 2})  # one core lost a thread
    assert capacity(half, half.cpus, 300.0, Speed()) == pytest.approx(225.0)


# -- the simulated host ----------------------------------------------------------------------


def _host(offline: tuple[tuple[float, int], ...] = ()) -> TopoHost:
    t = host_topology(2, 2, 2)  # node 0: 0-3 (cores {0,1},{2,3}); node 1: 4-7
    everywhere = frozenset(t.cpus)
    domains = [
        TopoDomain(
            DomainSpec("strict", (constant(100.0), constant(100.0)), (frozenset({0}),) * 2),
            "strict",
            frozenset({0}),
        ),
        TopoDomain(DomainSpec("free", (constant(50.0),), (everywhere,)), "none", frozenset({1})),
        TopoDomain(
            DomainSpec("auto", (constant(40.0),), (frozenset({1}),)), "auto", frozenset({0})
        ),
    ]
    return TopoHost(t, domains, offline=offline)


def test_host_reports_cpu_time_and_knows_the_work() -> None:
    host = _host()
    host.pin(VcpuRef("strict", 1), frozenset({1}))
    host.pin(VcpuRef("free", 0), frozenset({4}))
    host.pin(VcpuRef("auto", 0), frozenset({2}))
    before = host.sample()
    tick = host.tick(1.0)
    after = host.sample()
    used = {r: after.vcpus[r].time_ns - before.vcpus[r].time_ns for r in after.vcpus}
    # The kernel's view: every vCPU got all the time it wanted.
    assert used[VcpuRef("strict", 0)] == used[VcpuRef("strict", 1)] == 1_000_000_000
    assert used[VcpuRef("auto", 0)] == 400_000_000
    assert tick.received == pytest.approx(2.9)
    # The truth: strict's two vCPUs share core {0,1} (1.25 cores of work for 2 of CPU time);
    # auto and free run alone on their cores, near their memory.
    assert tick.work == pytest.approx(1.25 + 0.4 + 0.5)
    assert tick.work == pytest.approx(predict(host.topology, host.placed()).total_work / 100)
    assert host.pin_changes == 3
    assert after.memory["strict"] == MemoryPlacement(mode="strict", nodeset=frozenset({0}))
    assert after.memory["auto"].auto
    assert after.memory["auto"].nodeset == {0}
    # Without numatune, the node that holds its memory, as numa_maps would tell it.
    assert after.memory["free"] == MemoryPlacement(resident=1)
    assert after.topology.multi_node


def test_cpu_going_offline_frees_what_was_pinned_to_it() -> None:
    host = _host(offline=((2.0, 0),))
    host.tick(1.0)
    assert 0 in host.sample().pcpu_busy_ns
    host.tick(1.0)
    sample = host.sample()
    assert 0 not in sample.pcpu_busy_ns
    assert 0 not in sample.topology.cpus
    assert sample.topology.siblings_of(1) == {1}
    assert sample.vcpus[VcpuRef("strict", 0)].affinity == frozenset(range(1, 8))
    with pytest.raises(PinError, match="online"):
        host.pin(VcpuRef("free", 0), frozenset({0}))
    assert host.pin_changes == 0  # the kernel's doing, not a pin


def test_flat_view_hides_the_topology() -> None:
    sample = FlatView(_host()).sample()
    assert not sample.topology.multi_node
    assert sample.topology.threads_per_core == 1
    assert sample.memory == {}


# -- the counts ------------------------------------------------------------------------------


def test_score_counts() -> None:
    t = host_topology(2, 2, 2)  # node 0: 0-3, node 1: 4-7
    node0 = t.nodes[0]
    vcpus = [
        _v("a", 0, 90, {0}, bound=node0),
        _v("a", 1, 90, {1}, bound=node0),  # shares core {0,1} with a/0 while {2,3} is free
        _v("b", 0, 90, {4}),  # memory on 0, runs on 1: cross-node
        _v("b", 1, 90, {5}),  # ... and shares core {4,5}
        _v("c", 0, 20, {6}, bound=node0),  # outside its strict nodeset, and cross-node
        _v("d", 0, 20, {0, 4}),  # floating over both nodes: split, cross-node
    ]
    s = score(t, vcpus)
    assert (s.cross_node, s.split, s.outside_strict) == (4, 1, 1)
    # Both cores with two busy vCPUs could spare one: a/1 to {2,3}, b/1 to {6,7} (c is not busy).
    assert s.shared == 2
    # Busy c: {6,7} is no longer free, and node 0's strict pair can still use {2,3}.
    busier = [*vcpus[:4], _v("c", 0, 90, {6}, bound=node0), vcpus[5]]
    assert score(t, busier).shared == 1
    assert s.demand == 400
    assert s.work == pytest.approx(predict(t, vcpus).total_work)


def test_sharing_forced_by_a_strict_nodeset_is_not_counted() -> None:
    t = host_topology(2, 1, 2)  # node 0: core {0,1}; node 1: core {2,3}, free
    node0 = t.nodes[0]
    forced = [_v("a", 0, 90, {0}, bound=node0), _v("a", 1, 90, {1}, bound=node0)]
    assert score(t, forced).shared == 0
    free = [_v("a", 0, 90, {0}), _v("a", 1, 90, {1})]
    assert score(t, free).shared == 1
    assert score(t, free, busy_at=95).shared == 0


def test_memory_as_the_agent_can_tell_it() -> None:
    assert memory_of(MemoryPlacement(mode="strict", nodeset=frozenset({1})), []) == {1: 1.0}
    assert memory_of(MemoryPlacement(mode="interleave", nodeset=frozenset({0, 1})), []) == {
        0: 0.5,
        1: 0.5,
    }
    assert memory_of(MemoryPlacement(), [1, 1, 0, None]) == {1: 1.0}
    # Read from the process, it holds wherever the vCPUs run.
    assert memory_of(MemoryPlacement(resident=0), [1, 1, 0, None]) == {0: 1.0}
    assert memory_of(None, [None]) == {}


# -- the optimum -----------------------------------------------------------------------------


def test_core_work_by_hand() -> None:
    speed = Speed()
    assert core_work([[(100, 1.0)], [(100, 1.0)]], speed) == pytest.approx(125.0)
    assert core_work([[(100, 0.7)], []], speed) == pytest.approx(70.0)
    # Two on one thread share it 50/50; the idle sibling costs nothing.
    assert core_work([[(100, 1.0), (100, 1.0)], []], speed) == pytest.approx(100.0)


def test_optimum_moves_a_whole_domain_to_the_idle_node_by_hand() -> None:
    t = host_topology(2, 2, 2)  # 2 cores per node
    everywhere = frozenset(t.cpus)
    vcpus = [_v(d, i, 100, everywhere) for d in ("a", "b") for i in range(2)]
    best = optimum(t, vcpus)
    # a keeps node 0 (one core each: 200); b runs remote on node 1 (0.7 x 200) rather than
    # sharing node 0's cores (4 x 62.5 = 250 for all four).
    assert best.exact
    assert best.work == pytest.approx(340.0)
    nodes = {d: {t.node_of(best.placement[VcpuRef(d, i)]) for i in range(2)} for d in "ab"}
    assert sorted(map(sorted, nodes.values())) == [[0], [1]]
    cores = {t.siblings_of(p) for p in best.placement.values()}
    assert len(cores) == 4
    # Bound to node 0, b must share: 4 vCPUs on node 0's 2 cores.
    bound = [_v(d, i, 100, everywhere, bound=t.nodes[0]) for d in ("a", "b") for i in range(2)]
    assert optimum(t, bound).work == pytest.approx(250.0)


def _brute_force(t: Topology, vcpus: list[Placed]) -> float:
    """The best work over every pinning that keeps the rules, by trying them all."""
    cpus = sorted(t.cpus)
    largest = max(len(c) for c in t.nodes.values())
    best = 0.0
    for choice in itertools.product(cpus, repeat=len(vcpus)):
        nodes: dict[str, set[int | None]] = {}
        ok = True
        for v, p in zip(vcpus, choice, strict=True):
            if v.bound is not None and p not in v.bound:
                ok = False
                break
            nodes.setdefault(v.ref.domain, set()).add(t.node_of(p))
        if not ok:
            continue
        counts = {d: sum(1 for v in vcpus if v.ref.domain == d) for d in nodes}
        if any(len(n) > 1 and counts[d] <= largest for d, n in nodes.items()):
            continue
        pinned = [
            Placed(v.ref, v.demand, frozenset({p}), v.memory, v.bound)
            for v, p in zip(vcpus, choice, strict=True)
        ]
        best = max(best, predict(t, pinned).total_work)
    return best


@st.composite
def small_cases(draw: st.DrawFn) -> tuple[Topology, list[Placed]]:
    t = draw(
        st.sampled_from(
            [
                host_topology(2, 1, 2),
                host_topology(2, 2, 1),
                host_topology(1, 2, 2, "split"),
                host_topology(2, 2, 2, "split"),
            ]
        )
    )
    n = draw(st.integers(1, 4))
    vcpus = []
    for i in range(n):
        domain = draw(st.sampled_from(["a", "b", "c"]))
        demand = draw(st.sampled_from([10.0, 40.0, 60.0, 100.0]))
        node = draw(st.sampled_from(sorted(t.nodes)))
        strict = draw(st.booleans())
        vcpus.append(_v(domain, i, demand, t.cpus, {node: 1.0}, t.nodes[node] if strict else None))
    # One memory node and one binding per domain, as a domain has.
    first: dict[str, Placed] = {}
    out = []
    for v in vcpus:
        f = first.setdefault(v.ref.domain, v)
        out.append(Placed(v.ref, v.demand, v.affinity, f.memory, f.bound))
    return t, out


@settings(max_examples=40, deadline=None)
@given(small_cases())
def test_optimum_equals_brute_force_on_small_hosts(case: tuple[Topology, list[Placed]]) -> None:
    t, vcpus = case
    best = optimum(t, vcpus)
    assert best.exact
    assert best.work == pytest.approx(_brute_force(t, vcpus), abs=1e-6)
    # What it says it found is what its placement does.
    pinned = [
        Placed(v.ref, v.demand, frozenset({best.placement[v.ref]}), v.memory, v.bound)
        for v in vcpus
    ]
    assert predict(t, pinned).total_work == pytest.approx(best.work)
    assert best.work <= upper_bound(t, vcpus) + 1e-6
    # It keeps the rules it is searched under.
    judged = score(t, pinned)
    assert (judged.outside_strict, judged.split) == (0, 0)


def test_optimum_reaches_the_bound_on_a_large_host() -> None:
    scenario = TOPO_SCENARIOS["t128-large"]
    host = scenario.host()
    placed = host.placed()
    best = optimum(host.topology, placed, exact=False)
    assert best.work == pytest.approx(upper_bound(host.topology, placed))
    assert best.exact  # proven by the bound, not by search


# -- the benchmark ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["t32-adjacent", "t32-offline"])
def test_no_policy_beats_the_optimum(name: str) -> None:
    scenario = TOPO_SCENARIOS[name]
    runs = {p: run(scenario, p) for p in ("flat", "no-pin", "optimum")}
    best = runs["optimum"]
    assert best.exact
    assert best.final is not None
    assert (best.final.outside_strict, best.final.split, best.final.shared) == (0, 0, 0)
    assert best.final.llc_split == 0
    for r in runs.values():
        assert r.mean_work <= best.mean_work + 1e-6
        assert r.mean_work <= r.mean_received + 1e-6
    floating = runs["no-pin"].final
    assert floating is not None
    assert floating.cross_node == scenario.vcpus


def test_command_line_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--scenario", "nope"]) == 2
    assert "unknown scenario nope" in capsys.readouterr().err
    assert main(["--remote", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "remote" in err
    assert main(["--list"]) == 0
    assert "t128-large" in capsys.readouterr().out


def test_docs_written_or_one_line_why_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--scenario", "t32-split", "--docs", str(tmp_path)]) == 0
    doc = (tmp_path / "benchmark-topology.md").read_text()
    assert "## t32-split" in doc
    assert "| optimum |" in doc
    capsys.readouterr()
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert main(["--scenario", "t32-split", "--docs", str(blocked)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"topo_bench: cannot write {blocked}")


@settings(max_examples=30, deadline=None)
@given(small_cases(), st.randoms(use_true_random=False))
def test_keep_in_place_changes_no_figure_and_no_more_pins(
    case: tuple[Topology, list[Placed]], rng: Random
) -> None:
    t, vcpus = case
    cpus = sorted(t.cpus)
    current = {v.ref: frozenset({rng.choice(cpus)}) for v in vcpus}
    best = optimum(t, vcpus)
    kept = keep_in_place(t, best.placement, current)

    def pinned(placement: dict[VcpuRef, int]) -> list[Placed]:
        return [
            Placed(v.ref, v.demand, frozenset({placement[v.ref]}), v.memory, v.bound) for v in vcpus
        ]

    assert predict(t, pinned(kept)).total_work == pytest.approx(best.work)
    assert score(t, pinned(kept)) == score(t, pinned(best.placement))

    def moves(placement: dict[VcpuRef, int]) -> int:
        return sum(1 for r, p in placement.items() if current[r] != {p})

    assert moves(kept) <= moves(best.placement)


def test_keep_in_place_leaves_an_optimal_placement_alone() -> None:
    t = host_topology(2, 2, 2)  # node 0: cores {0,1}, {2,3}
    vcpus = [_v("a", 0, 100, t.cpus), _v("a", 1, 100, t.cpus)]
    current = {VcpuRef("a", 0): frozenset({3}), VcpuRef("a", 1): frozenset({0})}
    best = optimum(t, vcpus)
    assert keep_in_place(t, best.placement, current) == {VcpuRef("a", 0): 3, VcpuRef("a", 1): 0}


def test_a_policy_can_score_its_snapshot() -> None:
    t = host_topology(2, 2, 2)  # node 0: 0-3, node 1: 4-7
    memory = {"s": MemoryPlacement(mode="strict", nodeset=frozenset({1}))}
    vcpus = [
        Vcpu(VcpuRef("s", 0), received=80, demand=80, affinity=frozenset({0})),
        Vcpu(VcpuRef("n", 0), received=80, demand=80, affinity=frozenset({4})),
        Vcpu(VcpuRef("n", 1), received=80, demand=80, affinity=frozenset({5})),
        Vcpu(VcpuRef("n", 2), received=80, demand=80, affinity=frozenset({0})),
    ]
    placed = placed_from(vcpus, t, memory)
    assert placed[0].bound == t.nodes[1]
    assert placed[0].memory == {1: 1.0}
    assert placed[1].memory == {1: 1.0}  # no numatune: home where most of its vCPUs run
    s = score(t, placed)
    assert (s.outside_strict, s.cross_node, s.split) == (1, 2, 1)
    # Two busy vCPUs on CPU 0 itself and two on core {4,5}, with {2,3} and {6,7} free.
    assert s.shared == 2


def test_cache_groups_and_unknown_cpus() -> None:
    t = host_topology(1, 4, 2, llc_per_socket=2)  # L3 groups: cores 0-1 (CPUs 0-3), 2-3 (4-7)
    together = [_v("a", 0, 50, {0}), _v("a", 1, 50, {2})]
    apart = [_v("a", 0, 50, {0}), _v("a", 1, 50, {4})]
    assert score(t, together).llc_split == 0
    assert score(t, apart).llc_split == 1
    big = [_v("b", i, 10, {i}) for i in range(6)]  # more vCPUs than a group has CPUs
    assert score(t, big).llc_split == 0
    # A CPU the topology does not list (gone offline since the snapshot) runs its vCPUs all
    # the same, on no known node or core.
    gone = [_v("a", 0, 50, {9})]
    assert predict(t, gone).work == (50.0,)
    assert score(t, gone).cross_node == 0
