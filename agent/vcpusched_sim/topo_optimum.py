"""The topology-aware optimum: the pinning that gets the most work done, under the rules.

The rules are the topology issue's: a vCPU stays within the CPUs its memory binds it to, and
a domain that fits in one node is kept in one node. Within them the placement with the most
predicted work (`vcpusched_sim.topo.predict`) is searched.

Every vCPU is pinned to one CPU, so a core's work depends only on what its threads hold, and
cores of the same node with as many online threads are interchangeable. The search:
1. gives each domain that fits in a node one of the nodes it may use (every combination, up
   to `COMBOS`; beyond that, node by node greedily), then
2. packs each node's vCPUs onto its threads by branch and bound over interchangeable cores
   (a vCPU added to a thread never raises the others' work, so the work so far plus every
   remaining vCPU's demand at its node's speed bounds what a branch can reach), each distinct
   set of vCPUs once.
A search that exceeds its budget, or a host too large for it, keeps its best placement (at
worst the greedy one: heaviest first, each where it adds the most work) and says it is not
proven, unless it reaches `topo.upper_bound`, which otherwise states how far off it can be.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vcpusched.model import VcpuRef
from vcpusched.topology import Topology
from vcpusched_sim.host import FULL, fair_shares
from vcpusched_sim.topo import Placed, Speed, node_factor, thread_speed, upper_bound

COMBOS = 4096  # node choices tried exhaustively, at most
BUDGET = 200_000  # branch-and-bound nodes per node packing
EPS = 1e-6

_Key = tuple[float, float]  # (demand, speed factor on this node)


@dataclass(frozen=True, slots=True)
class Best:
    """The placement found (vCPU -> CPU), its predicted work, and whether it is proven best."""

    placement: dict[VcpuRef, int]
    work: float
    exact: bool


def core_work(threads: Sequence[Sequence[_Key]], speed: Speed) -> float:
    """Work done on one core whose threads hold vCPUs of (demand, node factor)."""
    received = [fair_shares([d for d, _ in items]) for items in threads]
    busy = [sum(r) / FULL for r in received]
    total = sum(busy)
    work = 0.0
    for items, got, b in zip(threads, received, busy, strict=True):
        pace = thread_speed(total - b, speed)
        work += sum(g * f for g, (_, f) in zip(got, items, strict=True)) * pace
    return work


class _Node:
    """One node's cores (CPU ids per thread) and the packing of vCPUs onto them."""

    def __init__(self, cores: Sequence[tuple[int, ...]], speed: Speed) -> None:
        self.cores = list(cores)
        self.speed = speed
        self.capacity = sum(FULL * (1.0 if len(c) == 1 else speed.smt_pair) for c in cores)
        self.memo: dict[tuple[tuple[_Key, ...], bool], tuple[float, list[tuple[int, int]], bool]]
        self.memo = {}

    def pack(self, keys: Sequence[_Key], exact: bool) -> tuple[float, list[tuple[int, int]], bool]:
        """Best (work, (core, thread) per key in the given order, proven) for these vCPUs."""
        order = sorted(range(len(keys)), key=lambda i: (-keys[i][0] * keys[i][1], i))
        ordered = tuple(keys[i] for i in order)
        memo_key = (ordered, exact)
        if memo_key in self.memo:
            work, slots, proven = self.memo[memo_key]
        else:
            work, slots, proven = self._search(ordered, exact)
            self.memo[memo_key] = (work, slots, proven)
        out: list[tuple[int, int]] = [(0, 0)] * len(keys)
        for position, i in enumerate(order):
            out[i] = slots[position]
        return work, out, proven

    def _greedy(self, keys: Sequence[_Key]) -> tuple[float, list[tuple[int, int]]]:
        fill = _Fill(self)
        gain, slots = fill.add(keys)
        return gain, slots

    def _search(
        self, keys: tuple[_Key, ...], exact: bool
    ) -> tuple[float, list[tuple[int, int]], bool]:
        best_work, best_slots = self._greedy(keys)
        if not exact:
            return best_work, best_slots, False
        reach = [0.0] * (len(keys) + 1)
        for i in range(len(keys) - 1, -1, -1):
            reach[i] = reach[i + 1] + min(keys[i][0], FULL) * keys[i][1]
        if best_work >= reach[0] - EPS:
            return best_work, best_slots, True  # every vCPU at full speed: nothing is better
        content: list[list[list[_Key]]] = [[[] for _ in core] for core in self.cores]
        works = [0.0] * len(self.cores)
        slots: list[tuple[int, int]] = []
        visited = [0]
        found: list[tuple[float, list[tuple[int, int]]]] = [(best_work, best_slots)]

        seen: set[tuple[object, ...]] = set()

        def search(k: int, done: float) -> None:
            visited[0] += 1
            if visited[0] > BUDGET:
                raise _OutOfBudget
            if done + reach[k] <= found[0][0] + EPS:
                return
            # The same cores filled alike, reached in another order: already searched.
            state = tuple(sorted(tuple(sorted(tuple(t) for t in core)) for core in content))
            if state in seen:
                return
            seen.add(state)
            if k == len(keys):
                found[0] = (done, list(slots))
                return
            for c, t in _options(content):
                content[c][t].append(keys[k])
                before = works[c]
                works[c] = core_work(content[c], self.speed)
                slots.append((c, t))
                search(k + 1, done - before + works[c])
                slots.pop()
                works[c] = before
                content[c][t].pop()

        try:
            search(0, 0.0)
        except _OutOfBudget:
            return found[0][0], found[0][1], False
        return found[0][0], found[0][1], True


class _OutOfBudget(Exception):
    pass


def _options(content: list[list[list[_Key]]]) -> list[tuple[int, int]]:
    """One (core, thread) per distinct situation: interchangeable ones are tried once."""
    seen: set[object] = set()
    out = []
    for c, threads in enumerate(content):
        shape = tuple(sorted(tuple(t) for t in threads))
        for t, items in enumerate(threads):
            sig = (shape, tuple(items))
            if sig not in seen:
                seen.add(sig)
                out.append((c, t))
    return out


class _Fill:
    """A node filled greedily: each vCPU onto the thread where it adds the most work."""

    def __init__(self, node: _Node) -> None:
        self.node = node
        self.content: list[list[list[_Key]]] = [[[] for _ in core] for core in node.cores]
        self.works = [0.0] * len(node.cores)

    def add(self, keys: Sequence[_Key]) -> tuple[float, list[tuple[int, int]]]:
        """Add vCPUs (in the given order); returns the work they add and where they went."""
        total = 0.0
        slots = []
        for key in keys:
            best: tuple[float, int, int] | None = None
            for c, t in _options(self.content):
                self.content[c][t].append(key)
                gain = core_work(self.content[c], self.node.speed) - self.works[c]
                self.content[c][t].pop()
                if best is None or gain > best[0] + EPS:
                    best = (gain, c, t)
            assert best is not None  # a node has at least one core
            gain, c, t = best
            self.content[c][t].append(key)
            self.works[c] += gain
            total += gain
            slots.append((c, t))
        return total, slots

    def remove(self, slots: Sequence[tuple[int, int]]) -> None:
        """Undo the last `add` that returned `slots`."""
        for c, t in reversed(slots):
            self.content[c][t].pop()
            self.works[c] = core_work(self.content[c], self.node.speed)


def optimum(
    topology: Topology,
    vcpus: Sequence[Placed],
    speed: Speed | None = None,
    cpus: frozenset[int] | None = None,
    exact: bool = True,
) -> Best:
    """The best pinning of `vcpus` onto `cpus` (default all) of `topology` under the rules."""
    speed = speed or Speed()
    managed = frozenset(topology.cpus) if cpus is None else cpus & frozenset(topology.cpus)
    nodes: dict[int, _Node] = {}
    for node_id, node_cpus in sorted(topology.nodes.items()):
        node_cores = []
        for core in topology.cores:
            threads = tuple(sorted(core & node_cpus & managed))
            if threads:
                node_cores.append(threads)
        if node_cores:
            nodes[node_id] = _Node(node_cores, speed)
    if not nodes:
        raise ValueError("no managed CPU with a known node")
    room = {n: sum(len(c) for c in node.cores) for n, node in nodes.items()}
    by_domain: dict[str, list[int]] = {}
    for i, v in enumerate(vcpus):
        by_domain.setdefault(v.ref.domain, []).append(i)

    def allowed(i: int) -> list[int]:
        v = vcpus[i]
        if v.bound is None:
            return list(nodes)
        return [n for n in nodes if topology.cpus_of_nodes((n,)) & v.bound] or list(nodes)

    # Domains that fit in a node choose one; the others' vCPUs choose one each.
    units: list[list[int]] = []
    for members in by_domain.values():
        if len(members) <= max(room.values()):
            units.append(members)
        else:
            units.extend([i] for i in members)
    choices = [
        [n for n in sorted(set.intersection(*(set(allowed(i)) for i in u))) if len(u) <= room[n]]
        or allowed(u[0])
        for u in units
    ]

    def keys(assign: Sequence[int]) -> dict[int, list[int]]:
        on: dict[int, list[int]] = {n: [] for n in nodes}
        for unit, n in zip(units, assign, strict=True):
            on[n].extend(unit)
        return on

    def evaluate(assign: Sequence[int], proven: bool) -> tuple[float, dict[int, int], bool]:
        placement: dict[int, int] = {}
        total = 0.0
        ok = proven
        for n, members in keys(assign).items():
            if not members:
                continue
            node_keys = [_key(vcpus[i], n, speed) for i in members]
            work, slots, done = nodes[n].pack(node_keys, proven)
            ok = ok and done
            total += work
            for i, (c, t) in zip(members, slots, strict=True):
                placement[i] = nodes[n].cores[c][t]
        return total, placement, ok

    def ceiling(assign: Sequence[int]) -> float:
        """No packing of this node choice does more work (see `topo.upper_bound`)."""
        total = 0.0
        for n, members in keys(assign).items():
            reach = sum(_key(vcpus[i], n, speed)[0] * _key(vcpus[i], n, speed)[1] for i in members)
            total += min(reach, nodes[n].capacity)
        return total

    combos = 1
    for options in choices:
        combos *= len(options)
    best: tuple[float, dict[int, int], bool] | None = None
    if exact and combos <= COMBOS:
        # The greedy packing of every combination first, then the exact one of each that
        # could still beat the best found, most promising first.
        every = list(itertools.product(*choices))
        for assign in every:
            result = evaluate(assign, False)
            if best is None or result[0] > best[0] + EPS:
                best = result
        assert best is not None
        proven = True
        for assign in sorted(every, key=lambda a: -ceiling(a)):
            if ceiling(assign) <= best[0] + EPS:
                break
            result = evaluate(assign, True)
            proven = proven and result[2]
            if result[0] > best[0] + EPS:
                best = result
        best = (best[0], best[1], proven)
    else:
        # Greedily, heaviest unit first: each onto the node where it adds the most work.
        fills = {n: _Fill(node) for n, node in nodes.items()}
        order = sorted(
            range(len(units)), key=lambda u: (-sum(vcpus[i].demand for i in units[u]), u)
        )
        greedy_placement: dict[int, int] = {}
        greedy_work = 0.0
        for u in order:
            unit_vcpus = sorted(units[u], key=lambda i: (-vcpus[i].demand, i))
            best_node: tuple[float, int] | None = None
            for n in choices[u]:
                node_keys = [_key(vcpus[i], n, speed) for i in unit_vcpus]
                gain, slots = fills[n].add(node_keys)
                fills[n].remove(slots)
                if best_node is None or gain > best_node[0] + EPS:
                    best_node = (gain, n)
            assert best_node is not None
            chosen = best_node[1]
            gain, slots = fills[chosen].add([_key(vcpus[i], chosen, speed) for i in unit_vcpus])
            greedy_work += gain
            for i, (c, t) in zip(unit_vcpus, slots, strict=True):
                greedy_placement[i] = nodes[chosen].cores[c][t]
        best = (greedy_work, greedy_placement, False)
    work, placement, proven = best
    # A placement that reaches the bound needs no search to be proven best.
    proven = proven or work >= upper_bound(topology, vcpus, speed) - 1e-3
    found = {vcpus[i].ref: p for i, p in placement.items()}
    return Best(by_cache(topology, found), work, proven)


def by_cache(topology: Topology, placement: Mapping[VcpuRef, int]) -> dict[VcpuRef, int]:
    """The same placement with each node's cores reordered so that a domain's cores sit side
    by side in the last-level cache groups (the model gives caches no cost, the rules do:
    keep a domain within one group where it fits). Cores with as many threads are exchanged
    whole, so no figure of the model changes."""
    planned: dict[int, list[VcpuRef]] = {}
    for ref, cpu in placement.items():
        planned.setdefault(cpu, []).append(ref)
    out = dict(placement)
    classes: dict[tuple[int | None, int], list[tuple[int, ...]]] = {}
    for core in topology.cores:
        classes.setdefault((topology.node_of(min(core)), len(core)), []).append(tuple(sorted(core)))
    for cores in classes.values():

        def group(core: tuple[int, ...]) -> tuple[int, int]:
            cache = topology.cache_group_of(core[0])
            return (min(cache) if cache else core[0], core[0])

        def holds(core: tuple[int, ...]) -> tuple[bool, str, tuple[int, ...]]:
            domains = sorted(r.domain for c in core for r in planned.get(c, ()))
            return (not domains, domains[0] if domains else "", core)

        for src, dst in zip(sorted(cores, key=holds), sorted(cores, key=group), strict=True):
            for a, b in zip(src, dst, strict=True):
                for ref in planned.get(a, ()):
                    out[ref] = b
    return out


def _key(vcpu: Placed, node: int, speed: Speed) -> _Key:
    return (min(vcpu.demand, FULL), node_factor(node, vcpu.memory, speed))


def keep_in_place(
    topology: Topology,
    placement: Mapping[VcpuRef, int],
    current: Mapping[VcpuRef, frozenset[int]],
) -> dict[VcpuRef, int]:
    """The same placement with its cores relabelled so that the most vCPUs stay where they are.

    Cores of one node and cache group with as many threads are interchangeable in the model,
    and so are the threads of a core: exchanging them changes no figure, only the pins needed.
    """
    classes: dict[tuple[int | None, frozenset[int] | None, int], list[tuple[int, ...]]] = {}
    for core in topology.cores:
        first = min(core)
        key = (topology.node_of(first), topology.cache_group_of(first), len(core))
        classes.setdefault(key, []).append(tuple(sorted(core)))
    planned: dict[int, list[VcpuRef]] = {}
    for ref, cpu in placement.items():
        planned.setdefault(cpu, []).append(ref)
    out: dict[VcpuRef, int] = {}
    for cores in classes.values():
        pairs: list[tuple[int, int, int, tuple[int, ...]]] = []
        for i, plan in enumerate(cores):
            if not any(planned.get(c) for c in plan):
                continue
            for j, target in enumerate(cores):
                for order in itertools.permutations(target):
                    stay = sum(
                        1
                        for src, dst in zip(plan, order, strict=True)
                        for ref in planned.get(src, ())
                        if current.get(ref) == frozenset({dst})
                    )
                    pairs.append((stay, i, j, order))
        # Most vCPUs kept first; a core kept as planned wins a tie.
        pairs.sort(key=lambda x: (-x[0], x[1] != x[2], x[1], x[2]))
        used_plan: set[int] = set()
        used_target: set[int] = set()
        for _, i, j, order in pairs:
            if i in used_plan or j in used_target:
                continue
            used_plan.add(i)
            used_target.add(j)
            for src, dst in zip(cores[i], order, strict=True):
                for ref in planned.get(src, ()):
                    out[ref] = dst
    for ref, cpu in placement.items():
        out.setdefault(ref, cpu)  # on a CPU the topology does not list: as planned
    return out
