"""What the agent is compared with: fixed pinnings, a naive re-pinner and the optimum.

Every baseline is a controller driven like the agent: `step()` once per interval, acting on a
host through `sample()` and `pin()`. The optimum is an oracle that reads the simulator's
noise-free demands, so it is never late and never fooled by noise.

The partition functions balance *demand*: they minimize the sum of squares of the per-pCPU
demand totals, which is the same as minimizing their standard deviation. Balancing demand
rather than measured utilization matters on an overloaded host, where every pCPU reads 100%.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from vcpusched.host import DomainGone, Host
from vcpusched.model import HostSample, VcpuRef, excluded
from vcpusched_sim.host import SimHost

# Demand totals are sums of floats; two placements this close are equally good.
EPS = 1e-6
# Cases up to this size get the exact optimum; larger ones the greedy partition.
EXACT_VCPUS = 24
EXACT_PCPUS = 16


class Controller(Protocol):
    name: str

    def step(self) -> None:
        """One cycle: look at the host and pin what needs pinning."""
        ...


@dataclass(frozen=True, slots=True)
class Scope:
    """What a controller may touch: the pCPUs it manages and the domains it leaves alone."""

    pcpus: tuple[int, ...]
    exclude: tuple[str, ...] = ()

    def managed(self, domain: str) -> bool:
        return not excluded(self.exclude, domain)


# -- partitions ------------------------------------------------------------------------------


def sumsq(totals: Iterable[float]) -> float:
    return sum(t * t for t in totals)


def fluid_bound(totals: Sequence[float], remaining: float) -> float:
    """Least sum of squares reachable by adding `remaining`, were it infinitely divisible."""
    ordered = sorted(totals)
    left = remaining
    level = ordered[0] if ordered else 0.0
    n = 0
    while n < len(ordered) and left > 0:
        n += 1
        ceiling = ordered[n] if n < len(ordered) else math.inf
        room = (ceiling - level) * n
        if room >= left:
            level += left / n
            left = 0.0
        else:
            left -= room
            level = ceiling
    return sumsq(max(t, level) for t in ordered)


def lpt(loads: Sequence[float], background: Sequence[float]) -> list[int]:
    """Greedy partition: heaviest load first onto the bin with the least total."""
    totals = list(background)
    assign = [0] * len(loads)
    for i in sorted(range(len(loads)), key=lambda i: (-loads[i], i)):
        b = min(range(len(totals)), key=lambda b: (totals[b], b))
        assign[i] = b
        totals[b] += loads[i]
    return assign


def totals_of(
    loads: Sequence[float], assign: Sequence[int], background: Sequence[float]
) -> list[float]:
    totals = list(background)
    for load, b in zip(loads, assign, strict=True):
        totals[b] += load
    return totals


class _OutOfBudget(Exception):
    pass


def best_partition(
    loads: Sequence[float], background: Sequence[float], budget: int = 300_000
) -> tuple[list[int], bool]:
    """The partition with the least sum of squares of bin totals, by branch and bound.

    Returns the assignment (bin per load) and whether it is proven optimal; when the search
    exceeds `budget` nodes the best partition found so far (at worst the greedy one) is
    returned with False.
    """
    n, m = len(loads), len(background)
    order = sorted(range(n), key=lambda i: -loads[i])
    after = [sum(loads[i] for i in order[k:]) for k in range(n + 1)]
    best_assign = lpt(loads, background)
    best = [sumsq(totals_of(loads, best_assign, background))]
    totals = list(background)
    assign = [0] * n
    nodes = [0]

    def search(k: int) -> None:
        nodes[0] += 1
        if nodes[0] > budget:
            raise _OutOfBudget
        if k == n:
            value = sumsq(totals)
            if value < best[0] - EPS:
                best[0] = value
                best_assign[:] = assign
            return
        if fluid_bound(totals, after[k]) >= best[0] - EPS:
            return
        item = order[k]
        seen: set[float] = set()
        # Bins with the same total are interchangeable: only the first is tried.
        for b in sorted(range(m), key=lambda b: totals[b]):
            key = round(totals[b], 6)
            if key in seen:
                continue
            seen.add(key)
            totals[b] += loads[item]
            assign[item] = b
            search(k + 1)
            totals[b] -= loads[item]

    try:
        search(0)
    except _OutOfBudget:
        return best_assign, False
    return best_assign, True


def min_moves(
    loads: Sequence[float],
    home: Sequence[int | None],
    background: Sequence[float],
    target: float,
    budget: int = 300_000,
) -> list[int] | None:
    """The partition reaching sum of squares `target` that moves the fewest loads.

    `home[i]` is the bin load i sits on now, or None when it is not pinned yet (it costs one
    pin wherever it goes). Returns None when the search exceeds `budget` nodes.
    """
    n, m = len(loads), len(background)
    order = sorted(range(n), key=lambda i: (-loads[i], -1 if home[i] is None else home[i]))
    after = [sum(loads[i] for i in order[k:]) for k in range(n + 1)]
    # A bin that is nobody's home from position k on is interchangeable with any other such
    # bin of equal total.
    homes_after = [{home[i] for i in order[k:] if home[i] is not None} for k in range(n + 1)]
    forced = sum(1 for h in home if h is None)
    totals = list(background)
    assign = [0] * n
    choice = [0] * n
    nodes = [0]

    def search(k: int, moves: int, limit: int) -> bool:
        nodes[0] += 1
        if nodes[0] > budget:
            raise _OutOfBudget
        if k == n:
            return sumsq(totals) <= target + EPS * max(1.0, target)
        if fluid_bound(totals, after[k]) > target + EPS * max(1.0, target):
            return False
        item = order[k]
        h = home[item]
        twin = k > 0 and loads[order[k - 1]] == loads[item] and home[order[k - 1]] == h
        options: list[int] = []
        if h is not None:
            options.append(h)
        seen: set[float] = set()
        for b in sorted(range(m), key=lambda b: totals[b]):
            if b == h:
                continue
            if b not in homes_after[k + 1]:
                key = round(totals[b], 6)
                if key in seen:
                    continue
                seen.add(key)
            options.append(b)
        for b in options:
            cost = 0 if b == h else 1
            if moves + cost > limit:
                continue
            # Identical loads from the same home are interchangeable: keep their choices in
            # order (staying first, then by bin) so each set of choices is tried once.
            rank = -1 if b == h else b
            if twin and rank < choice[k - 1]:
                continue
            choice[k] = rank
            totals[b] += loads[item]
            assign[item] = b
            found = search(k + 1, moves + cost, limit)
            totals[b] -= loads[item]
            if found:
                return True
        return False

    try:
        for limit in range(forced, n + 1):
            if search(0, 0, limit):
                return list(assign)
    except _OutOfBudget:
        return None
    return None


def pins_to_level(
    loads: Sequence[float], home: Sequence[int | None], bins: int, level: float
) -> int:
    """A lower bound on the pins that bring every bin's total down to `level`.

    Each bin above `level` must shed at least its excess, which takes at least as many loads
    as shedding its heaviest ones first; every load with no home needs one pin.
    """
    held: list[list[float]] = [[] for _ in range(bins)]
    pins = 0
    for load, h in zip(loads, home, strict=True):
        if h is None:
            pins += 1
        else:
            held[h].append(load)
    for items in held:
        excess = sum(items) - level
        for load in sorted(items, reverse=True):
            if excess <= EPS:
                break
            excess -= load
            pins += 1
    return pins


# -- measuring like the agent does -------------------------------------------------------


class _Meter:
    """Loads over the last interval from two consecutive samples, as the agent computes them."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.previous: HostSample | None = None

    def read(self) -> tuple[dict[int, float], dict[VcpuRef, float], HostSample] | None:
        now = self.host.sample()
        before, self.previous = self.previous, now
        if before is None or now.clock <= before.clock:
            return None
        span = (now.clock - before.clock) * 1e9
        pcpu = {
            p: 100.0 * (ns - before.pcpu_busy_ns.get(p, 0)) / span
            for p, ns in now.pcpu_busy_ns.items()
        }
        demand: dict[VcpuRef, float] = {}
        for ref, counters in now.vcpus.items():
            old = before.vcpus.get(ref)
            if old is None:
                continue
            used = counters.time_ns - old.time_ns
            waited = (counters.wait_ns or 0) - (old.wait_ns or 0)
            demand[ref] = 100.0 * (used + waited) / span
        return pcpu, demand, now


def _pin(host: Host, ref: VcpuRef, pcpus: frozenset[int]) -> None:
    # A domain that stopped since the sample needs no pinning.
    with contextlib.suppress(DomainGone):
        host.pin(ref, pcpus)


# -- baselines ---------------------------------------------------------------------------


class StaticRoundRobin:
    """Pins each vCPU once, round-robin over the managed pCPUs, as it first appears."""

    name = "static"

    def __init__(self, host: Host, scope: Scope) -> None:
        self.host = host
        self.scope = scope
        self.placed: set[VcpuRef] = set()

    def step(self) -> None:
        sample = self.host.sample()
        for ref in sorted(sample.vcpus):
            if ref in self.placed or not self.scope.managed(ref.domain):
                continue
            pcpu = self.scope.pcpus[len(self.placed) % len(self.scope.pcpus)]
            self.placed.add(ref)
            if sample.vcpus[ref].affinity != {pcpu}:
                _pin(self.host, ref, frozenset({pcpu}))


class NoPinning:
    """Lets every managed vCPU run on any managed pCPU: the kernel balancer does the rest."""

    name = "no-pin"

    def __init__(self, host: Host, scope: Scope) -> None:
        self.host = host
        self.scope = scope

    def step(self) -> None:
        everywhere = frozenset(self.scope.pcpus)
        for ref, counters in self.host.sample().vcpus.items():
            if self.scope.managed(ref.domain) and counters.affinity != everywhere:
                _pin(self.host, ref, everywhere)


class GreedyRepin:
    """Re-pins everything by the greedy partition whenever pCPU loads spread by SD > 5."""

    name = "greedy"
    threshold = 5.0

    def __init__(self, host: Host, scope: Scope) -> None:
        self.host = host
        self.scope = scope
        self.meter = _Meter(host)

    def step(self) -> None:
        reading = self.meter.read()
        if reading is None:
            return
        pcpu_load, demand, sample = reading
        if statistics.pstdev(pcpu_load[p] for p in self.scope.pcpus) <= self.threshold:
            return
        index = {p: b for b, p in enumerate(self.scope.pcpus)}
        background = [0.0] * len(self.scope.pcpus)
        managed: list[VcpuRef] = []
        for ref, load in sorted(demand.items()):
            if self.scope.managed(ref.domain):
                managed.append(ref)
                continue
            affinity = sample.vcpus[ref].affinity
            if len(affinity) == 1 and next(iter(affinity)) in index:
                background[index[next(iter(affinity))]] += load
        assign = lpt([demand[r] for r in managed], background)
        for ref, b in zip(managed, assign, strict=True):
            pcpu = frozenset({self.scope.pcpus[b]})
            if sample.vcpus[ref].affinity != pcpu:
                _pin(self.host, ref, pcpu)


@dataclass(frozen=True, slots=True)
class Target:
    """The oracle's plan for one set of demands."""

    placement: dict[VcpuRef, int]
    exact: bool
    # Pins needed from the placement the plan was made from (None: unknown).
    moves: int | None


def plan_optimum(host: SimHost, scope: Scope, at: float | None = None) -> Target:
    """Best placement of the managed vCPUs for the noise-free demands at `at` (default now)."""
    index = {p: b for b, p in enumerate(scope.pcpus)}
    background = [0.0] * len(scope.pcpus)
    refs: list[VcpuRef] = []
    for ref in host.running():
        if scope.managed(ref.domain):
            refs.append(ref)
            continue
        affinity = host.affinity(ref)
        if len(affinity) == 1 and next(iter(affinity)) in index:
            background[index[next(iter(affinity))]] += host.nominal_demand(ref, at)
    loads = [host.nominal_demand(r, at) for r in refs]
    home: list[int | None] = []
    for ref in refs:
        affinity = host.affinity(ref)
        home.append(index.get(next(iter(affinity))) if len(affinity) == 1 else None)
    if len(refs) <= EXACT_VCPUS and len(scope.pcpus) <= EXACT_PCPUS:
        assign, exact = best_partition(loads, background)
        if exact:
            target = sumsq(totals_of(loads, assign, background))
            fewest = min_moves(loads, home, background, target)
            if fewest is not None:
                placement = {r: scope.pcpus[b] for r, b in zip(refs, fewest, strict=True)}
                moves = sum(1 for b, h in zip(fewest, home, strict=True) if b != h)
                return Target(placement, True, moves)
    else:
        assign, exact = lpt(loads, background), False
    assign = _keep_homes(assign, home, len(scope.pcpus))
    placement = {r: scope.pcpus[b] for r, b in zip(refs, assign, strict=True)}
    moves = sum(1 for b, h in zip(assign, home, strict=True) if b != h)
    return Target(placement, exact, moves if exact else None)


def _keep_homes(assign: Sequence[int], home: Sequence[int | None], bins: int) -> list[int]:
    """Relabel the bins of a partition so that as many loads as possible stay where they are."""
    overlap: dict[tuple[int, int], int] = {}
    for b, h in zip(assign, home, strict=True):
        if h is not None:
            overlap[b, h] = overlap.get((b, h), 0) + 1
    relabel: dict[int, int] = {}
    taken: set[int] = set()
    for (b, h), _ in sorted(overlap.items(), key=lambda kv: -kv[1]):
        if b not in relabel and h not in taken:
            relabel[b] = h
            taken.add(h)
    spare = iter(sorted(set(range(bins)) - taken))
    for b in range(bins):
        if b not in relabel:
            relabel[b] = next(spare)
    return [relabel[b] for b in assign]


class Optimum:
    """Oracle: before each interval, pins to the best placement for the coming demands."""

    name = "optimum"

    def __init__(self, host: SimHost, scope: Scope) -> None:
        self.host = host
        self.scope = scope
        self.key: tuple[tuple[VcpuRef, float], ...] | None = None
        self.exact = True

    def step(self) -> None:
        key = tuple((r, self.host.nominal_demand(r)) for r in self.host.running())
        if key == self.key:
            return
        self.key = key
        target = plan_optimum(self.host, self.scope)
        self.exact = self.exact and target.exact
        for ref, pcpu in target.placement.items():
            if self.host.affinity(ref) != {pcpu}:
                _pin(self.host, ref, frozenset({pcpu}))


BASELINES: dict[str, Callable[[Host, Scope], Controller]] = {
    StaticRoundRobin.name: StaticRoundRobin,
    NoPinning.name: NoPinning,
    GreedyRepin.name: GreedyRepin,
}
