"""What a host's topology lets the vCPUs get: node capacities, home nodes, threads to use.

Pure arithmetic over `topology.Topology` and each domain's `MemoryPlacement`, and
`plan_by_node`, which plans a host with a topology node by node with the flat policy's
`decide` (passed in: this module does not import the policy). Figures are in points (100 =
one pCPU's time for one interval), demands are the policy's mean estimates.

- A core with one thread delivers 100; a core whose threads are all busy delivers
  `smt_pair_capacity` x 100 between them (default 1.25, the simulator's figure: measured SMT
  gains on server loads run 10-30%, and numad values a hyperthread at 20% of a core).
- A domain's *home node* is the node its vCPUs run on. A strict or restrictive nodeset limits
  it to those nodes. A domain that fits in one node has exactly one; it changes only when its
  node is overloaded (demand above capacity) and another node has room, by a whole domain,
  against a higher bar than a move within a node (its memory stays behind).
- A node is planned on the first thread of every core, and on second threads only as far as
  its busy vCPUs or its demand need them (`threads_to_use`), first threads first: so busy
  vCPUs spread over idle cores before they share one.
- A node of several last-level cache groups is planned group by group, each domain in its
  home group (`_cache_regions`, chosen as home nodes are), where every domain fits in one.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from vcpusched.config import Config
from vcpusched.estimate import Estimate
from vcpusched.model import Move, Plan, Snapshot, Vcpu, VcpuRef
from vcpusched.topology import MemoryPlacement, Topology

CORE = 100.0
DEFAULT_SMT_PAIR_CAPACITY = 1.25
# The share of a domain's demand charged to a move across nodes: its memory stays behind, and
# work off its memory node runs at about 0.7 of the speed (the simulator's figure; published
# STREAM losses are larger).
REMOTE_COST = 0.3


def flat(topology: Topology) -> bool:
    """Whether the topology changes nothing: at most one node and one thread per core."""
    return len(topology.node_list) <= 1 and topology.threads_per_core <= 1


def core_capacity(threads: int, smt_pair_capacity: float) -> float:
    """What a core delivers with `threads` of its threads usable and busy."""
    if threads <= 0:
        return 0.0
    return CORE if threads == 1 else CORE * smt_pair_capacity


def node_capacity(topology: Topology, cpus: Iterable[int], smt_pair_capacity: float) -> float:
    """What the cores holding `cpus` deliver when every one of those threads is busy."""
    usable = frozenset(cpus)
    total = 0.0
    for core in topology.cores:
        total += core_capacity(len(core & usable), smt_pair_capacity)
    # CPUs the topology does not list count as cores of their own.
    total += CORE * len(usable - frozenset(topology.cpus))
    return total


def primary_threads(topology: Topology, cpus: Iterable[int]) -> list[int]:
    """The first usable thread of each core holding `cpus`, in core order."""
    usable = frozenset(cpus)
    out = []
    for core in topology.cores:
        inside = core & usable
        if inside:
            out.append(min(inside))
    return sorted(set(out) | (usable - frozenset(topology.cpus)))


def thread_order(topology: Topology, cpus: Iterable[int]) -> list[int]:
    """`cpus` with one thread of every core first, then the second threads, and so on, so that
    what fills the least loaded CPUs in order fills idle cores before it shares one; cores in
    order of their last-level cache group."""
    usable = frozenset(cpus)
    layers: list[list[int]] = []
    # Cores grouped by last-level cache: what fills CPUs in order fills one cache group
    # before the next, so a domain placed together stays in one group (a tie-breaker).
    for core in sorted(topology.cores, key=lambda c: (_group_key(topology, c), min(c))):
        for i, cpu in enumerate(sorted(core & usable)):
            if len(layers) <= i:
                layers.append([])
            layers[i].append(cpu)
    unknown = sorted(usable - frozenset(topology.cpus))
    return [*(layers[0] if layers else []), *unknown, *(c for layer in layers[1:] for c in layer)]


def _group_key(topology: Topology, core: frozenset[int]) -> int:
    group = topology.cache_group_of(min(core))
    return min(core) if group is None else min(group)


def threads_to_use(
    topology: Topology,
    cpus: Iterable[int],
    demands: Sequence[float],
    occupied: Iterable[int],
    target: float,
    low: float,
) -> list[int]:
    """The threads a node's vCPUs (of these mean `demands`) are planned on: the first thread
    of every core, then as many second threads as the node needs: one thread for each busy
    vCPU (more than half a pCPU: no two fit one thread), and the others' demand at `target`%
    a thread. Second threads in use
    (`occupied`) are kept while the demand needs them at `low`%, so a demand near the line
    does not toggle, but never while a first thread stands idle."""
    order = thread_order(topology, cpus)
    first = primary_threads(topology, cpus)
    seconds = order[len(first) :]
    taken = frozenset(occupied)

    busy = sum(1 for d in demands if d > CORE / 2)
    rest = sum(d for d in demands if d <= CORE / 2)

    def need(level: float) -> int:
        threads = busy + math.ceil(rest / (level / 100.0 * CORE) - 1e-9)
        return min(max(threads - len(first), 0), len(seconds))

    in_use = [c for c in seconds if c in taken]
    if all(c in taken for c in first):
        count = min(max(len(in_use), need(target)), need(low))
    else:
        count = need(target)
    chosen = frozenset((in_use + [c for c in seconds if c not in taken])[:count])
    return [*order[: len(first)], *(c for c in seconds if c in chosen)]


@dataclass(frozen=True, slots=True)
class DomainLoad:
    """A domain as the node choice sees it."""

    name: str
    demand: float  # sum of its vCPUs' mean demands, points
    vcpus: int
    # Node -> its vCPUs that run only there now (pinned, or allowed only on that node).
    running: Mapping[int, int]
    # The nodes its memory binds it to (strict or restrictive), None where it is free.
    bound: frozenset[int] | None
    # The node its memory is on (`memory_node`), else None.
    memory: int | None = None


def bound_nodes(placement: MemoryPlacement | None, vcpus: Sequence[int]) -> frozenset[int] | None:
    """The nodes every one of these vCPUs' memory binds them to; None where none binds;
    empty where their bindings have no node in common."""
    if placement is None:
        return None
    out: frozenset[int] | None = None
    for vcpu in vcpus:
        nodes = placement.nodes_for(vcpu)
        if nodes is not None:
            out = nodes if out is None else out & nodes
    return out


def memory_node(placement: MemoryPlacement | None) -> int | None:
    """The node a domain's memory is on: its one-node nodeset, else the node the kernel says
    holds most of it; None when neither tells."""
    if placement is None:
        return None
    if placement.nodeset is not None and len(placement.nodeset) == 1:
        return next(iter(placement.nodeset))
    return placement.resident


def home_nodes(
    domains: Sequence[DomainLoad],
    capacity: Mapping[int, float],
    sizes: Mapping[int, int],
    bar: float,
    cost: float = REMOTE_COST,
) -> dict[str, int | None]:
    """Each domain's home node; None for one that fits in no single node it may use (its
    vCPUs are then placed node by node). `capacity` and `sizes` (usable threads) per node;
    `cost`, the share of a domain's demand a move to another node costs. (The same serves
    cache groups within a node, whose moves leave no memory behind.)"""
    homes: dict[str, int | None] = {}
    load: dict[int, float] = defaultdict(float)
    pending: list[DomainLoad] = []
    choices: dict[str, list[int]] = {}
    for d in sorted(domains, key=lambda d: d.name):
        allowed = [n for n in sorted(capacity) if d.bound is None or n in d.bound]
        fitting = [n for n in allowed if sizes[n] >= d.vcpus]
        choices[d.name] = fitting
        if not fitting:
            homes[d.name] = None
            continue
        here = [n for n in fitting if d.running.get(n, 0) > 0]
        if here:
            home = max(here, key=lambda n: (d.running[n], -n))
        elif d.memory in fitting:
            home = d.memory
        else:
            pending.append(d)
            continue
        homes[d.name] = home
        load[home] += d.demand
    # Domains with no node yet, the largest first, each to the node with the most room.
    for d in sorted(pending, key=lambda d: (-d.demand, d.name)):
        home = max(choices[d.name], key=lambda n: (capacity[n] - load[n], -n))
        homes[d.name] = home
        load[home] += d.demand
    by_name = {d.name: d for d in domains}
    for _ in range(len(domains)):
        step = _relief(homes, load, capacity, choices, by_name, bar, cost)
        if step is None:
            break
        name, src, dst = step
        homes[name] = dst
        load[src] -= by_name[name].demand
        load[dst] += by_name[name].demand
    return homes


def _relief(
    homes: Mapping[str, int | None],
    load: Mapping[int, float],
    capacity: Mapping[int, float],
    choices: Mapping[str, list[int]],
    by_name: Mapping[str, DomainLoad],
    bar: float,
    cost: float,
) -> tuple[str, int, int] | None:
    """The whole-domain move off the most overloaded node that relieves most, beyond `bar`
    and what its memory left behind costs, onto a node it leaves with room."""
    best: tuple[float, str, int, int] | None = None
    for src in sorted(capacity, key=lambda n: (capacity[n] - load[n], n)):
        excess = load[src] - capacity[src]
        if excess <= 0:
            break
        for name, home in sorted(homes.items()):
            if home != src:
                continue
            d = by_name[name]
            for dst in choices[name]:
                if dst == src or load[dst] + d.demand > capacity[dst]:
                    continue
                # Nothing is gained by making dst the more loaded one of the two.
                if load[dst] + d.demand > load[src] - d.demand + bar:
                    continue
                gain = min(d.demand, excess) - cost * d.demand
                if gain >= bar and (best is None or gain > best[0]):
                    best = (gain, name, src, dst)
        if best is not None:
            return best[1], best[2], best[3]
    return None


# -- planning node by node ------------------------------------------------------------------

# (snapshot, estimates, config, online pCPUs, doubt per pCPU): the plan of one flat host.
Decide = Callable[
    [Snapshot, Mapping[VcpuRef, Estimate], Config, frozenset[int] | None, Mapping[int, float]],
    Plan,
]
# Labels of CPUs outside the node being planned: beyond any CPU number the kernel gives.
_OUTSIDE = 1 << 24


def _mean(v: Vcpu, estimates: Mapping[VcpuRef, Estimate]) -> float:
    e = estimates.get(v.ref)
    return sum(e.series) / len(e.series) if e is not None and e.series else v.demand


def plan_by_node(
    snapshot: Snapshot,
    estimates: Mapping[VcpuRef, Estimate],
    config: Config,
    online: frozenset[int],
    decide: Decide,
    doubt: Mapping[int, float],
) -> Plan:
    """The plan on a host with nodes or SMT threads: each domain gets a home node
    (`home_nodes`), and each node is planned by `decide` on its own, over the threads
    `threads_to_use` gives it, first threads first, with its home vCPUs only. So no vCPU is
    planned outside its bound nodes or away from its domain's home node."""
    topo = snapshot.topology
    allowed = (online if config.cpus is None else online & config.cpus) & frozenset(snapshot.util)
    node_cpus = {n: cpus & allowed for n, cpus in topo.nodes.items() if cpus & allowed}
    if not node_cpus:
        return decide(snapshot, estimates, config, online, doubt)
    pair = config.smt_pair_capacity
    cap = {n: node_capacity(topo, cpus, pair) for n, cpus in node_cpus.items()}
    sizes = {n: len(cpus) for n, cpus in node_cpus.items()}
    by_domain: dict[str, list[Vcpu]] = defaultdict(list)
    for v in snapshot.vcpus:
        if not v.excluded:
            by_domain[v.ref.domain].append(v)

    def running_on(v: Vcpu) -> int | None:
        # Where it runs now, even on a CPU it may no longer use (outside `cpus`).
        nodes = {topo.node_of(c) for c in v.affinity}
        node = nodes.pop() if len(nodes) == 1 else None
        return node if node in node_cpus else None

    loads = []
    for name, vcpus in sorted(by_domain.items()):
        running: Counter[int] = Counter()
        for v in vcpus:
            if (n := running_on(v)) is not None:
                running[n] += 1
        placement = snapshot.memory.get(name)
        loads.append(
            DomainLoad(
                name=name,
                demand=sum(_mean(v, estimates) for v in vcpus),
                vcpus=len(vcpus),
                running=running,
                bound=bound_nodes(placement, [v.ref.vcpu for v in vcpus]),
                memory=memory_node(placement),
            )
        )
    # A move across nodes must relieve twice what a move within one must gain.
    homes = home_nodes(loads, cap, sizes, bar=2 * max(config.min_gain, 1.0))
    assigned: dict[VcpuRef, int] = {}
    load: dict[int, float] = defaultdict(float)
    for name, vcpus in by_domain.items():
        home = homes[name]
        if home is not None:
            for v in vcpus:
                assigned[v.ref] = home
            load[home] += sum(_mean(v, estimates) for v in vcpus)
    # vCPUs of domains too big for one node (or bound to several), each within its nodes.
    for name, vcpus in sorted(by_domain.items()):
        if homes[name] is not None:
            continue
        placement = snapshot.memory.get(name)
        for v in sorted(vcpus, key=lambda v: v.ref):
            bound = None if placement is None else placement.nodes_for(v.ref.vcpu)
            nodes = [n for n in sorted(node_cpus) if bound is None or n in bound] or sorted(
                node_cpus
            )
            now = running_on(v)
            node = now if now in nodes else max(nodes, key=lambda n: (cap[n] - load[n], -n))
            assigned[v.ref] = node
            load[node] += _mean(v, estimates)

    moves: list[Move] = []
    held: Counter[str] = Counter()
    demand: dict[int, float] = {}
    for n in sorted(node_cpus):
        cpus = topo.nodes[n] & frozenset(snapshot.util)
        homed = {name: by_domain[name] for name in by_domain if homes[name] == n}
        spanning = any(
            homes[v.ref.domain] is None for v in snapshot.vcpus if assigned.get(v.ref) == n
        )
        regions = [(node_cpus[n], {r for r, home in assigned.items() if home == n})]
        if not spanning:
            regions = _cache_regions(topo, node_cpus[n], homed, estimates, config) or regions
        for usable, inside in regions:
            here = cpus if len(regions) == 1 else cpus & usable
            members = [
                v for v in snapshot.vcpus if v.ref in inside or (v.excluded and v.pcpu in here)
            ]
            demands = [_mean(v, estimates) for v in members if not v.excluded]
            occupied = {v.pcpu for v in members if v.pcpu is not None}
            use = threads_to_use(topo, usable, demands, occupied, config.target, config.low)
            mine = {r: (0 if r in inside else 1) for r in assigned}
            plan = _plan_node(
                snapshot, estimates, config, online, decide, doubt, here, use, members, mine, 0
            )
            for m in plan.moves:
                src = next(iter(m.src)) if len(m.src) == 1 else None
                if src is not None and topo.node_of(src) not in (n, None):
                    m = replace(m, reason="node")
                elif src in node_cpus[n] and src not in usable:
                    m = replace(m, reason="cache")  # to its domain's cache group
                elif src in node_cpus[n] and m.reason == "outside-cpus":
                    m = replace(m, reason="core")  # off a second thread the node no longer uses
                moves.append(m)
            held.update(plan.held)
            demand.update(plan.pcpu_demand)
    return Plan(moves=tuple(moves), held=dict(held), pcpu_demand=demand)


def _cache_regions(
    topo: Topology,
    usable: frozenset[int],
    domains: Mapping[str, Sequence[Vcpu]],
    estimates: Mapping[VcpuRef, Estimate],
    config: Config,
) -> list[tuple[frozenset[int], set[VcpuRef]]] | None:
    """A node's last-level cache groups, each with the vCPUs of the domains whose home it is,
    chosen as home nodes are: where a domain runs, else where there is room, and changed
    only while its group needs more than its cores (no idle core left) and another has room.
    None where the node has one group, or a domain fits in none."""
    groups: dict[frozenset[int], frozenset[int]] = {}
    for cpu in usable:
        group = topo.cache_group_of(cpu)
        if group is None:
            return None
        groups[group] = groups.get(group, frozenset()) | {cpu}
    if len(groups) < 2:
        return None
    order = sorted(groups.values(), key=min)
    index = {cpu: i for i, cpus in enumerate(order) for cpu in cpus}
    largest = max(len(cpus) for cpus in order)
    loads = []
    for name, vcpus in sorted(domains.items()):
        if len(vcpus) > largest:
            return None
        running: Counter[int] = Counter(
            index[v.pcpu] for v in vcpus if v.pcpu is not None and v.pcpu in index
        )
        demand = sum(_mean(v, estimates) for v in vcpus)
        loads.append(DomainLoad(name, demand, len(vcpus), running, None))
    # A group has room while it has idle cores: what fills it beyond shares cores.
    cap = {i: CORE * len(primary_threads(topo, cpus)) for i, cpus in enumerate(order)}
    sizes = {i: len(cpus) for i, cpus in enumerate(order)}
    homes = home_nodes(loads, cap, sizes, bar=max(config.min_gain, 1.0), cost=0.0)
    out: list[tuple[frozenset[int], set[VcpuRef]]] = [(cpus, set()) for cpus in order]
    for name, vcpus in domains.items():
        home = homes[name]
        if home is None:
            return None
        out[home][1].update(v.ref for v in vcpus)
    return out


def _plan_node(
    snapshot: Snapshot,
    estimates: Mapping[VcpuRef, Estimate],
    config: Config,
    online: frozenset[int],
    decide: Decide,
    doubt: Mapping[int, float],
    cpus: frozenset[int],
    use: Sequence[int],
    members: Sequence[Vcpu],
    assigned: Mapping[VcpuRef, int],
    node: int,
) -> Plan:
    """`decide` on one node: its CPUs relabelled 0.. in the order of `use` (so its ties go to
    first threads), the others beyond; the plan in the host's CPU numbers."""
    order = [*use, *sorted(cpus - frozenset(use))]
    label = {c: i for i, c in enumerate(order)}

    def unlabel(x: int) -> int:
        return order[x] if x < _OUTSIDE else x - _OUTSIDE

    # The time of vCPUs about to leave for another node is not this node's to share.
    leaving: dict[int, float] = defaultdict(float)
    for v in snapshot.vcpus:
        if v.pcpu in cpus and assigned.get(v.ref, node) != node:
            leaving[v.pcpu] += v.received
    sub = Snapshot(
        util={label[c]: max(0.0, snapshot.util[c] - leaving[c]) for c in order},
        vcpus=tuple(
            replace(v, affinity=frozenset(label.get(c, _OUTSIDE + c) for c in v.affinity))
            for v in members
        ),
    )
    sub_config = replace(config, cpus=frozenset(label[c] for c in use))
    online_here = frozenset(label[c] for c in order if c in online)
    doubt_here = {label[c]: d for c, d in doubt.items() if c in label}
    plan = decide(sub, estimates, sub_config, online_here, doubt_here)
    return Plan(
        moves=tuple(
            replace(m, src=frozenset(unlabel(c) for c in m.src), dst=unlabel(m.dst))
            for m in plan.moves
        ),
        held=plan.held,
        pcpu_demand={unlabel(x): d for x, d in plan.pcpu_demand.items()},
    )
