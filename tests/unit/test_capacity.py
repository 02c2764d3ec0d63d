"""Topology as terms of the policy's objective: nodes, SMT threads, memory placement.

Pure logic on the agent's own topology values (`capacity`, and `policy.Balancer` fed
snapshots that carry a topology); the hosts are built by the simulator's capabilities
generator and read by the agent's parser, as libvirt's would be.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace

import libvirt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.snapshots import snapshot, vcpu
from tests.unit.test_policy import hosts
from vcpusched import capacity, stats
from vcpusched.capacity import DomainLoad, home_nodes, node_capacity, threads_to_use
from vcpusched.config import Config
from vcpusched.estimate import Estimator
from vcpusched.libvirt_host import LibvirtHost
from vcpusched.model import Move, Plan, Snapshot, Vcpu, VcpuRef
from vcpusched.policy import Balancer, decide
from vcpusched.topology import (
    CacheBank,
    MemoryPlacement,
    Topology,
    parse_memory_placement,
)
from vcpusched_sim.topo import host_topology

CFG = Config()


def plans(snaps: Sequence[Snapshot], cfg: Config = CFG) -> list[Plan]:
    balancer = Balancer(cfg)
    return [balancer.plan(s, frozenset(s.util)) for s in snaps]


def strict(nodes: str) -> MemoryPlacement:
    return parse_memory_placement(
        f"<domain><numatune><memory mode='strict' nodeset='{nodes}'/></numatune></domain>"
    )


def on(
    topology: Topology, vcpus: list[Vcpu], memory: dict[str, MemoryPlacement] | None = None
) -> Snapshot:
    snap = snapshot(vcpus, len(topology.cpus))
    return replace(snap, topology=topology, memory=memory or {})


def steady_plan(snap: Snapshot, cfg: Config = CFG, readings: int = 3) -> Plan:
    return plans([snap] * readings, cfg)[-1]


def after(snap: Snapshot, moves: Sequence[Move]) -> dict[VcpuRef, frozenset[int]]:
    where = {v.ref: v.affinity for v in snap.vcpus}
    for m in moves:
        where[m.ref] = frozenset((m.dst,))
    return where


# -- the safety property: a flat host is planned exactly as before ---------------------------


@st.composite
def flat_topologies(draw: st.DrawFn, pcpus: int) -> Topology:
    kind = draw(st.sampled_from(["none", "flat", "llc", "nodeless"]))
    if kind == "none":
        return Topology()
    flat = Topology.flat(range(pcpus))
    if kind == "llc":
        return replace(flat, caches=(CacheBank(3, 0, frozenset(range(pcpus)), 1 << 25),))
    if kind == "nodeless":
        return replace(flat, node_list=())
    return flat


@given(case=hosts(), data=st.data())
@settings(max_examples=200, deadline=None)
def test_property_a_flat_host_is_planned_exactly_as_the_flat_policy_plans(
    case: tuple[Snapshot, Config], data: st.DataObject
) -> None:
    snap, cfg = case
    topology = data.draw(flat_topologies(len(snap.util)))
    domains = sorted({v.ref.domain for v in snap.vcpus})
    memory = {d: strict("0") for d in domains if data.draw(st.booleans(), label=f"strict {d}")}
    seen = replace(snap, topology=topology, memory=memory)
    assert capacity.flat(topology)
    rounds = data.draw(st.integers(1, 4), label="readings")
    with_topology = plans([seen] * rounds, cfg)
    estimator = Estimator()
    for got in with_topology:
        want = decide(snap, estimator.update(snap), cfg, frozenset(snap.util))
        assert got == want


# -- memory placement: strict nodesets, home nodes ------------------------------------------

T = host_topology(2, 4, 2, "adjacent")  # 16 CPUs: node 0 = 0-7, node 1 = 8-15; N, N+1 threads
T_SPLIT = host_topology(2, 4, 2, "split")  # node 0 = 0-3,8-11; threads N and N+8


def test_a_strict_vcpu_pinned_on_the_other_node_is_moved_home() -> None:
    vcpus = [vcpu("a", 50, 2, index=0, pcpus=16), vcpu("a", 50, 4, index=1, pcpus=16)]
    plan = steady_plan(on(T, vcpus, {"a": strict("1")}))
    assert {m.ref.vcpu for m in plan.moves} == {0, 1}
    assert all(T.node_of(m.dst) == 1 for m in plan.moves)
    assert all(m.reason == "node" for m in plan.moves)


def test_floating_vcpus_are_placed_within_their_nodeset_one_per_core() -> None:
    vcpus = [vcpu("a", 90, None, index=i, pcpus=16) for i in range(4)]
    plan = steady_plan(on(T_SPLIT, vcpus, {"a": strict("1")}))
    dsts = [m.dst for m in plan.moves]
    assert len(dsts) == 4
    assert all(T_SPLIT.node_of(p) == 1 for p in dsts)
    assert len({T_SPLIT.siblings_of(p) for p in dsts}) == 4


def test_floating_vcpus_go_to_the_node_that_holds_their_memory() -> None:
    """No numatune, memory read on node 1: the domain is placed there though node 0 has as
    much room; the same domain with its memory unknown goes to node 0, the first with most."""
    vcpus = [vcpu("a", 40, None, index=i, pcpus=16) for i in range(2)]
    known = steady_plan(on(T, vcpus, {"a": MemoryPlacement(resident=1)}))
    unknown = steady_plan(on(T, vcpus, {"a": MemoryPlacement()}))
    assert len(known.moves) == len(unknown.moves) == 2
    assert {T.node_of(m.dst) for m in known.moves} == {1}
    assert {T.node_of(m.dst) for m in unknown.moves} == {0}


def test_a_domain_running_on_a_node_stays_there_whatever_its_memory() -> None:
    """Where its vCPUs run is the home: memory elsewhere is no reason to move a domain whose
    node is not overloaded (the move would cost more than it brings)."""
    vcpus = [vcpu("a", 40, 0, index=0, pcpus=16), vcpu("a", 40, 2, index=1, pcpus=16)]
    plan = steady_plan(on(T, vcpus, {"a": MemoryPlacement(resident=1)}))
    assert plan.moves == ()


def test_memory_node_is_the_one_node_nodeset_else_the_resident_one() -> None:
    assert capacity.memory_node(None) is None
    assert capacity.memory_node(MemoryPlacement()) is None
    assert capacity.memory_node(strict("1")) == 1
    assert capacity.memory_node(replace(strict("0-1"), resident=0)) == 0
    assert capacity.memory_node(MemoryPlacement(resident=1)) == 1


def test_a_domain_that_fits_in_a_node_is_not_split() -> None:
    # Two vCPUs of one domain, one on each node, nothing else: they end on one node.
    vcpus = [vcpu("a", 60, 1, index=0, pcpus=16), vcpu("a", 60, 9, index=1, pcpus=16)]
    plan = steady_plan(on(T, vcpus))
    where = after(on(T, vcpus), plan.moves)
    nodes = {T.node_of(next(iter(a))) for a in where.values()}
    assert len(nodes) == 1


def test_an_overloaded_node_sheds_a_whole_free_domain_and_keeps_strict_ones() -> None:
    # Node 0 (4 cores x 2 threads, capacity 500) holds 8 vCPUs at 90 (720); node 1 is idle.
    vcpus = []
    memory = {}
    for d in range(4):
        name = f"vm{d}"
        if d < 2:
            memory[name] = strict("0")
        for i in range(2):
            vcpus.append(vcpu(name, 90, 2 * d + i, index=i, pcpus=16))
    snap = on(T, vcpus, memory)
    plan = steady_plan(snap)
    where = after(snap, plan.moves)
    node = {ref: T.node_of(next(iter(a))) for ref, a in where.items()}
    for ref, n in node.items():
        if ref.domain in memory:
            assert n == 0
    for d in ("vm2", "vm3"):
        assert node[VcpuRef(d, 0)] == node[VcpuRef(d, 1)]
    assert {node[VcpuRef(d, 0)] for d in ("vm2", "vm3")} & {1}
    # What moved across nodes moved as whole domains.
    crossed = {m.ref.domain for m in plan.moves if m.reason == "node"}
    assert crossed
    assert all({m.ref.vcpu for m in plan.moves if m.ref.domain == d} == {0, 1} for d in crossed)


def test_a_node_with_room_keeps_its_domains() -> None:
    # Node 0 at 2 x 2 x 60 = 240 of its 500: nothing crosses to the idle node.
    vcpus = [vcpu(f"vm{d}", 60, 2 * d + i, index=i, pcpus=16) for d in range(2) for i in range(2)]
    plan = steady_plan(on(T, vcpus))
    assert all(T.node_of(m.dst) == 0 for m in plan.moves)


@given(
    demands=st.lists(st.floats(0, 100), min_size=1, max_size=14),
    pins=st.lists(st.one_of(st.none(), st.integers(0, 15)), min_size=14, max_size=14),
    bindings=st.lists(st.sampled_from([None, "0", "1", "0-1"]), min_size=5, max_size=5),
    numbering=st.sampled_from(["adjacent", "split"]),
    llc=st.sampled_from([1, 2]),
)
@settings(max_examples=150, deadline=None)
def test_property_no_vcpu_is_planned_outside_its_nodeset_nor_a_fitting_domain_split(
    demands: list[float],
    pins: list[int | None],
    bindings: list[str | None],
    numbering: str,
    llc: int,
) -> None:
    """Nor, with two cache groups a socket, split over groups (a domain of 1 to 3 vCPUs
    here, a group of 4 threads: every domain fits in one)."""
    topology = host_topology(2, 4, 2, numbering, llc)
    vcpus = [
        vcpu(f"d{i % 5}", d, pins[i], demand=d, index=i, pcpus=16) for i, d in enumerate(demands)
    ]
    memory = {f"d{k}": strict(b) for k, b in enumerate(bindings) if b is not None}
    snap = on(topology, vcpus, memory)
    plan = steady_plan(snap)
    where = after(snap, plan.moves)
    for m in plan.moves:
        placement = memory.get(m.ref.domain)
        allowed = None if placement is None else placement.allowed_cpus(m.ref.vcpu, topology)
        assert allowed is None or m.dst in allowed
    by_domain: dict[str, set[int | None]] = {}
    groups: dict[str, set[frozenset[int] | None]] = {}
    for v in snap.vcpus:
        affinity = where[v.ref]
        if len(affinity) == 1:
            cpu = next(iter(affinity))
            by_domain.setdefault(v.ref.domain, set()).add(topology.node_of(cpu))
            groups.setdefault(v.ref.domain, set()).add(topology.cache_group_of(cpu))
    for d, nodes in by_domain.items():
        assert len(nodes) == 1, (d, nodes)
        assert len(groups[d]) == 1, (d, groups[d])


# -- SMT ------------------------------------------------------------------------------------


def test_busy_vcpus_on_sibling_threads_spread_over_idle_cores() -> None:
    # Four busy vCPUs of four domains on the two threads of cores 0 and 1 of node 0.
    vcpus = [vcpu(f"vm{i}", 90, i, pcpus=16) for i in range(4)]
    snap = on(T, vcpus)
    plan = steady_plan(snap)
    where = after(snap, plan.moves)
    cores = [T.siblings_of(next(iter(a))) for a in where.values()]
    assert len(set(cores)) == 4
    assert len(plan.moves) == 2  # one vCPU of each shared core moves


def test_one_domains_vcpus_share_a_core_only_when_they_must() -> None:
    vcpus = [vcpu("a", 70, None, index=i, pcpus=16) for i in range(4)]
    snap = on(T_SPLIT, vcpus)
    plan = steady_plan(snap)
    cores = [T_SPLIT.siblings_of(m.dst) for m in plan.moves]
    assert len(cores) == 4
    assert len(set(cores)) == 4


def test_more_busy_vcpus_than_cores_use_second_threads() -> None:
    # Six busy vCPUs of one domain on a node of four cores: two cores are shared, no thread.
    vcpus = [vcpu("a", 90, None, index=i, pcpus=16) for i in range(6)]
    snap = on(T, vcpus, {"a": strict("0")})
    plan = steady_plan(snap)
    dsts = [m.dst for m in plan.moves]
    assert len(dsts) == len(set(dsts)) == 6
    assert len({T.siblings_of(p) for p in dsts}) == 4


def test_a_domain_is_placed_within_one_cache_group_when_it_fits() -> None:
    # Node 0's cores (0,1) and (4,5) share one L3, (2,3) and (6,7) another: not by number.
    banks = (
        CacheBank(3, 0, frozenset({0, 1, 4, 5}), 1 << 24),
        CacheBank(3, 1, frozenset({2, 3, 6, 7}), 1 << 24),
        CacheBank(3, 2, frozenset(range(8, 16)), 1 << 25),
    )
    topology = replace(T, caches=banks)
    vcpus = [vcpu("a", 90, None, index=i, pcpus=16) for i in range(2)]
    plan = steady_plan(on(topology, vcpus, {"a": strict("0")}))
    dsts = [m.dst for m in plan.moves]
    assert len(dsts) == 2
    assert len({topology.siblings_of(p) for p in dsts}) == 2
    assert len({topology.cache_group_of(p) for p in dsts}) == 1


# One socket of four two-thread cores, two L3 groups: CPUs 0-3 and 4-7 (threads N, N+1).
T_LLC = host_topology(1, 4, 2, "adjacent", 2)


def test_a_domain_split_over_cache_groups_is_brought_into_one() -> None:
    # a's vCPUs run on cores of both groups; b's fill neither: a's second vCPU joins the first.
    vcpus = [
        vcpu("a", 60, 0, index=0, pcpus=8),
        vcpu("a", 60, 4, index=1, pcpus=8),
        vcpu("b", 30, 6, index=0, pcpus=8),
    ]
    snap = on(T_LLC, vcpus)
    plan = steady_plan(snap)
    assert [(m.ref, m.reason) for m in plan.moves] == [(VcpuRef("a", 1), "cache")]
    assert T_LLC.cache_group_of(plan.moves[0].dst) == T_LLC.cache_group_of(0)
    assert T_LLC.siblings_of(plan.moves[0].dst) != T_LLC.siblings_of(0)
    assert steady_plan(replace(snap, vcpus=tuple(_moved(snap, plan.moves)))).moves == ()


def test_a_cache_group_with_no_idle_core_sheds_a_whole_domain_to_one_that_has() -> None:
    # Three busy two-vCPU domains in group 0-3 (two cores): one goes whole to 4-7.
    vcpus = [
        vcpu(d, 80, p, index=i, pcpus=8)
        for d, ps in (("a", (0, 1)), ("b", (2, 3)), ("c", (0, 2)))
        for i, p in enumerate(ps)
    ]
    snap = on(T_LLC, vcpus)
    plan = steady_plan(snap)
    moved = {m.ref.domain for m in plan.moves if m.reason == "cache"}
    assert len(moved) == 1
    where = after(snap, plan.moves)
    for name in ("a", "b", "c"):
        groups = {T_LLC.cache_group_of(next(iter(a))) for r, a in where.items() if r.domain == name}
        assert len(groups) == 1, (name, groups)
    # Then no two busy vCPUs share a core: four cores, and the six sit on distinct ones but two.
    cores = [T_LLC.siblings_of(next(iter(a))) for a in where.values()]
    assert len(set(cores)) == 4


def _moved(snap: Snapshot, moves: Sequence[Move]) -> list[Vcpu]:
    where = after(snap, moves)
    return [replace(v, affinity=where[v.ref]) for v in snap.vcpus]


def test_node_capacity_counts_a_pair_of_threads_at_smt_pair_capacity() -> None:
    assert node_capacity(T, T.nodes[0], 1.25) == pytest.approx(500)
    assert node_capacity(T, T.nodes[0], 1.5) == pytest.approx(600)
    # One thread of each core usable: a core each.
    assert node_capacity(T, {0, 2, 4, 6}, 1.25) == pytest.approx(400)


def test_threads_to_use_first_threads_then_as_many_second_as_needed() -> None:
    node = T_SPLIT.nodes[0]  # cores (0,8) (1,9) (2,10) (3,11)
    assert threads_to_use(T_SPLIT, node, [90, 90, 90, 30], (), 80, 70) == [0, 1, 2, 3]
    assert threads_to_use(T_SPLIT, node, [90] * 6, (), 80, 70) == [0, 1, 2, 3, 8, 9]
    assert threads_to_use(T_SPLIT, node, [40] * 8, (), 80, 70) == [0, 1, 2, 3]
    # Small vCPUs at target% a thread: 330 needs 5 threads at 80%...
    assert threads_to_use(T_SPLIT, node, [30] * 11, (), 80, 70) == [0, 1, 2, 3, 8]
    # ...a second thread in use is kept while the demand needs it at `low`...
    small = [25] * 12  # 300: 4 threads at 80%, 5 at 70%
    assert threads_to_use(T_SPLIT, node, small, (), 80, 70) == [0, 1, 2, 3]
    assert threads_to_use(T_SPLIT, node, small, (0, 1, 2, 3, 10), 80, 70) == [0, 1, 2, 3, 10]
    # ...but not while a first thread stands idle.
    assert threads_to_use(T_SPLIT, node, small, (0, 1, 2, 10), 80, 70) == [0, 1, 2, 3]


def test_home_nodes_keep_where_they_run_and_pack_the_rest_by_room() -> None:
    cap = {0: 500.0, 1: 500.0}
    sizes = {0: 8, 1: 8}
    domains = [
        DomainLoad("a", 300, 4, {0: 4}, None),
        DomainLoad("b", 100, 2, {}, None),
        DomainLoad("c", 100, 2, {}, frozenset({0})),
        DomainLoad("big", 100, 12, {}, None),
    ]
    homes = home_nodes(domains, cap, sizes, bar=10)
    assert homes == {"a": 0, "b": 1, "c": 0, "big": None}


def test_config_key_reaches_the_capacity() -> None:
    # With threads worth nothing extra, a node of 4 two-thread cores holds 400, not 500.
    vcpus = [vcpu(f"vm{d}", 90, 2 * d + i, index=i, pcpus=16) for d in range(3) for i in range(2)]
    snap = on(T, vcpus)  # 540 on node 0
    low = steady_plan(snap, replace(CFG, smt_pair_capacity=1.0))
    high = steady_plan(snap, replace(CFG, smt_pair_capacity=2.0))
    assert any(m.reason == "node" for m in low.moves)
    assert not any(m.reason == "node" for m in high.moves)


# -- through the real libvirt module, on libvirt's test driver ------------------------------

NUMA_GUEST = """<domain type='test'>
  <name>{name}</name><memory unit='MiB'>256</memory>
  <vcpu placement='static'>2</vcpu>
  {numatune}
  <os><type arch='x86_64'>hvm</type></os>
</domain>"""


def test_two_node_test_driver_host_plans_by_node_through_the_libvirt_module() -> None:
    """`test:///default` is a host of two cells of 8 CPUs (0, 2 and 4 online, all in cell 0),
    shared by every connection of this process: guests started on one are seen by the agent's
    own libvirt module. What it samples is planned node by node (not the flat path), and
    every pin lands, through libvirt, on the strict guest's node."""
    conn = libvirt.open("test:///default")
    names = ("numa-strict", "numa-free")
    try:
        conn.createXML(
            NUMA_GUEST.format(
                name=names[0], numatune="<numatune><memory mode='strict' nodeset='0'/></numatune>"
            )
        )
        conn.createXML(NUMA_GUEST.format(name=names[1], numatune=""))
        host = LibvirtHost("test:///default")
        balancer = Balancer(CFG)
        before = host.sample()
        assert before.memory[names[0]].nodes_for(0) == {0}
        assert before.topology.multi_node
        assert not capacity.flat(before.topology)
        for _ in range(8):
            after = host.sample()
            snap = stats.snapshot(before, after)
            assert snap is not None
            assert snap.topology == after.topology
            plan = balancer.plan(snap, frozenset(after.pcpu_busy_ns))
            for m in plan.moves:
                host.pin(m.ref, frozenset((m.dst,)))
            balancer.applied(plan.moves)
            before = after
        final = host.sample()
        host.close()
        node0 = final.topology.nodes[0]
        ours = {r: c for r, c in final.vcpus.items() if r.domain in names}
        assert len(ours) == 4
        for ref, counters in ours.items():
            assert len(counters.affinity) == 1, ref
            assert counters.affinity <= node0, ref
    finally:
        for name in names:
            with contextlib.suppress(libvirt.libvirtError):
                conn.lookupByName(name).destroy()
        conn.close()


def test_reasons_say_node_core_or_outside_cpus() -> None:
    cfg = replace(CFG, cpus=frozenset(range(16)) - {3})
    vcpus = [
        vcpu("a", 90, 1, pcpus=16),  # a second thread beside an idle first one: core
        vcpu("b", 90, 3, pcpus=16),  # outside `cpus`: outside-cpus
        vcpu("c", 90, 9, pcpus=16),  # node 1, bound to node 0: node
    ]
    plan = steady_plan(on(T, vcpus, {"c": strict("0")}), cfg)
    reasons = {m.ref.domain: m.reason for m in plan.moves}
    assert reasons == {"a": "core", "b": "outside-cpus", "c": "node"}
