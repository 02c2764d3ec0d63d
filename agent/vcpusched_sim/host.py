"""A simulated hypervisor host, so the real agent can be run at any scale without guests.

`SimHost` implements `vcpusched.host.Host`. Time only moves when the caller says so
(`tick(seconds)`); `sample()` reads the cumulative counters at the current simulated instant.

CPU sharing follows the max-min fair ("water-filling") rule of the Linux scheduler: on a
saturated pCPU a vCPU that wants less than an equal share gets all it wants and the rest is
split equally among the others. A vCPU that gets less than it wants never idles (a workload
that falls behind stays runnable), so its wait is all the time it does not run: what it wanted
is not in the counters, as on a real host. A vCPU allowed on several pCPUs is placed the way
an ideal work-conserving balancer would: it may use any spare capacity of its allowed pCPUs.
Loads are percentages of one pCPU, as everywhere in vcpusched.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from vcpusched.host import DomainGone, PinError, ThreadPins
from vcpusched.model import HostSample, VcpuCounters, VcpuRef
from vcpusched.policy import water_level
from vcpusched.topology import Topology

NS = 1_000_000_000
FULL = 100.0
# Points a vCPU may receive below its demand and still count as keeping up.
STARVED_BY = 0.5


@dataclass(frozen=True, slots=True)
class Load:
    """The demand of one vCPU over time: piecewise constant, with optional noise.

    `phases` holds (start time in seconds since the host's origin, demand in %) pairs; the
    first starts at 0.
    `noise` is a relative amplitude: 0.05 draws each interval's demand uniformly within
    ±5% of the nominal one (clamped to 0..100).
    """

    phases: tuple[tuple[float, float], ...]
    noise: float = 0.0
    # A repeating pattern of (demand, seconds), shifted by `offset` seconds, that replaces the
    # phases: a guest that bursts. Its steps are not load changes of the scenario.
    pattern: tuple[tuple[float, float], ...] = ()
    offset: float = 0.0

    def __post_init__(self) -> None:
        if not self.phases or self.phases[0][0] != 0.0:
            raise ValueError("the first phase of a load must start at 0")
        starts = [start for start, _ in self.phases]
        if starts != sorted(starts):
            raise ValueError("load phases must be in time order")
        for _, demand in self.phases:
            if not 0.0 <= demand <= FULL:
                raise ValueError(f"demand {demand} outside 0..100")

    def nominal(self, t: float) -> float:
        """The noise-free demand at simulated time `t`."""
        if self.pattern:
            period = sum(seconds for _, seconds in self.pattern)
            at = (t - self.offset) % period
            for demand, seconds in self.pattern:
                if at < seconds:
                    return demand
                at -= seconds
            return self.pattern[-1][0]
        value = self.phases[0][1]
        for start, demand in self.phases:
            if start > t:
                break
            value = demand
        return value

    def level(self, t: float) -> float:
        """What a placement held through the pattern plans for: its mean over a period, else
        the noise-free demand at `t`."""
        if self.pattern:
            period = sum(seconds for _, seconds in self.pattern)
            return sum(demand * seconds for demand, seconds in self.pattern) / period
        return self.nominal(t)

    def changes(self) -> tuple[float, ...]:
        return tuple(start for start, _ in self.phases[1:])


def constant(demand: float, noise: float = 0.0) -> Load:
    return Load(((0.0, demand),), noise)


def phased(*phases: tuple[float, float], noise: float = 0.0) -> Load:
    return Load(tuple(phases), noise)


@dataclass(frozen=True, slots=True)
class DomainSpec:
    """One guest: a load and an initial affinity per vCPU, and when it runs."""

    name: str
    loads: tuple[Load, ...]
    affinity: tuple[frozenset[int], ...]
    start: float = 0.0
    stop: float | None = None

    def __post_init__(self) -> None:
        if not self.loads:
            raise ValueError(f"domain {self.name} has no vCPU")
        if len(self.affinity) != len(self.loads):
            raise ValueError(f"domain {self.name}: one affinity per vCPU expected")
        if self.stop is not None and self.stop <= self.start:
            raise ValueError(f"domain {self.name} stops before it starts")

    def running(self, t: float) -> bool:
        return self.start <= t and (self.stop is None or t < self.stop)


# How much longer than its own run time a vCPU that keeps up waits, per unit of the others'
# load on its pCPU: the lab's guests (10-50% beside 30-100% ones) waited 0.95 to 1.6 times
# got * others / 100, 1.2 on average (docs/reliability.md).
QUEUE_FACTOR = 1.2


def queue_wait(got: float, others: float) -> float:
    """The wait of a vCPU that gets all it wants, `got`, on a pCPU the others keep `others`
    busy: each time it has work it may find the pCPU taken, in proportion to their load, and
    it never waits more than the time it does not run."""
    return min(FULL - got, QUEUE_FACTOR * got * max(others, 0.0) / FULL)


def fair_shares(demands: Sequence[float], capacity: float = FULL) -> list[float]:
    """Max-min fair split of one pCPU among vCPUs pinned to it."""
    level = water_level(demands, capacity)
    return [min(d, level) for d in demands]


def allocate(
    pcpus: Sequence[int], vcpus: Sequence[tuple[float, frozenset[int]]]
) -> tuple[list[float], dict[int, float]]:
    """CPU received by each (demand, affinity) vCPU and the busy % of each pCPU.

    The affinity sets wider than one pCPU must form a laminar family (any two are disjoint or
    nested), which holds for any mix of "unpinned" and "pinned to one pCPU". Under that
    condition the max-min fair allocation is found by progressive filling over one capacity
    constraint per pCPU and one per wider affinity set.
    """
    caps = [min(max(d, 0.0), FULL) for d, _ in vcpus]
    pinned: dict[int, list[int]] = {}
    wide: dict[frozenset[int], list[int]] = {}
    for i, (_, affinity) in enumerate(vcpus):
        if len(affinity) == 1:
            pinned.setdefault(next(iter(affinity)), []).append(i)
        else:
            wide.setdefault(affinity, []).append(i)

    # A pCPU's own constraint only involves the vCPUs pinned to it, and they rise together
    # until it fills, so it acts as a cap on each of them.
    for members in pinned.values():
        level = water_level((caps[i] for i in members), FULL)
        for i in members:
            caps[i] = min(caps[i], level)

    received = list(caps)
    if wide:
        sets = sorted(wide, key=len)
        groups: list[tuple[float, list[int]]] = []
        for cpuset in sets:
            members = [i for p in cpuset for i in pinned.get(p, ())]
            members += [i for other in sets if other <= cpuset for i in wide[other]]
            groups.append((FULL * len(cpuset), members))
        frozen: dict[int, float] = {}
        while True:
            best = math.inf
            tight: list[int] = []
            for capacity, members in groups:
                free = [i for i in members if i not in frozen]
                if not free:
                    continue
                spare = capacity - sum(frozen[i] for i in members if i in frozen)
                level = water_level((caps[i] for i in free), max(spare, 0.0))
                if level < best:
                    best, tight = level, free
            if not tight:
                break
            for i in tight:
                frozen[i] = min(caps[i], best)
        for i, value in frozen.items():
            received[i] = value

    busy = {p: 0.0 for p in pcpus}
    for p, members in pinned.items():
        busy[p] += sum(received[i] for i in members)
    if wide:
        # Spread what each wider set receives over its least busy pCPUs, inner sets first so
        # that an outer set sees what the inner ones already use.
        for cpuset in sorted(wide, key=len):
            spread(busy, sorted(cpuset), sum(received[i] for i in wide[cpuset]))
    return received, busy


def spread(busy: dict[int, float], pcpus: Sequence[int], amount: float) -> dict[int, float]:
    """Raise the least busy of `pcpus` to a common level until `amount` is placed (as an
    ideal work-conserving balancer would); returns what each pCPU took."""
    took = {p: 0.0 for p in pcpus}
    if amount <= 0.0 or not pcpus:
        return took
    ordered = sorted(pcpus, key=lambda p: busy[p])
    remaining = amount
    level = busy[ordered[0]]
    n = 0
    while n < len(ordered):
        n += 1
        ceiling = min(busy[ordered[n]] if n < len(ordered) else FULL, FULL)
        room = (ceiling - level) * n
        if room >= remaining:
            level += remaining / n
            break
        remaining -= room
        level = ceiling
    for p in ordered[:n]:
        new = max(busy[p], min(level, FULL))
        took[p] = new - busy[p]
        busy[p] = new
    return took


@dataclass(slots=True)
class _Vcpu:
    load: Load
    affinity: frozenset[int]
    rng: random.Random
    time_ns: float = 0.0
    wait_ns: float = 0.0
    factor: float = 1.0


@dataclass(slots=True)
class TickStats:
    """What happened over the last `tick`, averaged over its length."""

    seconds: float = 0.0
    # Measured busy % per pCPU, and what it would have been with noise-free demands.
    util: dict[int, float] = field(default_factory=dict)
    nominal_util: dict[int, float] = field(default_factory=dict)
    # CPU time in pCPU-seconds (100% for 1 s = 1.0), summed over all vCPUs.
    demanded: float = 0.0
    received: float = 0.0
    # Each vCPU's CPU time received and demanded, in pCPU-seconds.
    vcpu_received: dict[VcpuRef, float] = field(default_factory=dict)
    vcpu_demanded: dict[VcpuRef, float] = field(default_factory=dict)

    def share(self, ref: VcpuRef) -> float:
        """The share of its demand a vCPU received over the tick (1.0 when it wanted none)."""
        want = self.vcpu_demanded.get(ref, 0.0)
        return 1.0 if want <= 1e-9 else min(1.0, self.vcpu_received.get(ref, 0.0) / want)


class SimHost:
    """An in-memory host: pCPUs 0..n-1 and the domains of `domains`, running on a clock."""

    def __init__(
        self,
        pcpus: int,
        domains: Sequence[DomainSpec],
        seed: int = 0,
        clock: float = 0.0,
        queueing: bool = False,
        slowdown: Mapping[int, float] | None = None,
    ) -> None:
        if pcpus < 1:
            raise ValueError("a host needs at least one pCPU")
        names = [d.name for d in domains]
        if len(set(names)) != len(names):
            raise ValueError("domain names must be unique")
        self.pcpus = tuple(range(pcpus))
        # Whether a vCPU that gets all it wants still waits behind the others on its pCPU, as
        # on a real host (see `queue_wait`); off, it never waits, and idling tells at once.
        self.queueing = queueing
        # How much longer a vCPU's work takes on each pCPU than its nominal demand says (1 by
        # default): a pCPU that runs its guests slower, as a cloud host's can (the lab's).
        self.slowdown = dict(slowdown or {})
        self.topology = Topology.flat(self.pcpus)  # one node, no SMT, no shared cache
        self.domains = {d.name: d for d in domains}
        self.now = clock
        self.origin = clock
        self.pin_calls = 0
        # Emulator threads pinned by the agent (`pin_emulator: node`); the others run anywhere.
        self.emulator: dict[str, frozenset[int]] = {}
        self.pin_changes = 0
        self.last = TickStats()
        self._busy_ns = {p: 0.0 for p in self.pcpus}
        self._vcpus: dict[VcpuRef, _Vcpu] = {}
        for domain in domains:
            for i, (load, affinity) in enumerate(zip(domain.loads, domain.affinity, strict=True)):
                self._check_affinity(affinity)
                ref = VcpuRef(domain.name, i)
                # String seeds hash deterministically, and one stream per vCPU keeps the noise
                # of a vCPU the same whatever the policy does to the others.
                rng = random.Random(f"{seed}/{domain.name}/{i}")
                self._vcpus[ref] = _Vcpu(load, frozenset(affinity), rng)
        self._check_laminar([v.affinity for v in self._vcpus.values()])
        self._events = sorted(self._event_times())

    # -- Host protocol -------------------------------------------------------------------

    def sample(self) -> HostSample:
        vcpus = {
            ref: VcpuCounters(int(v.time_ns), int(v.wait_ns), v.affinity)
            for ref, v in self._vcpus.items()
            if self._running(ref.domain)
        }
        return HostSample(
            clock=self.now,
            pcpu_busy_ns={p: int(ns) for p, ns in self._busy_ns.items()},
            vcpus=vcpus,
            topology=self.topology,
        )

    def pin(self, ref: VcpuRef, pcpus: frozenset[int]) -> None:
        vcpu = self._vcpus.get(ref)
        if vcpu is None or not self._running(ref.domain):
            raise DomainGone(ref)
        self._check_affinity(pcpus)
        pcpus = frozenset(pcpus)
        self.pin_calls += 1
        if pcpus == vcpu.affinity:
            return
        if len(pcpus) > 1:
            others = [v.affinity for r, v in self._vcpus.items() if r != ref]
            self._check_laminar([*others, pcpus])
        vcpu.affinity = pcpus
        self.pin_changes += 1

    def thread_pins(self, domain: str) -> ThreadPins:
        """The emulator thread's affinity (every pCPU until pinned); no iothreads."""
        if domain not in self.domains or not self._running(domain):
            raise DomainGone(domain)
        return ThreadPins(self.emulator.get(domain, frozenset(self.pcpus)))

    def pin_threads(self, domain: str, pins: ThreadPins) -> None:
        if domain not in self.domains or not self._running(domain):
            raise DomainGone(domain)
        self._check_affinity(pins.emulator)
        self.emulator[domain] = frozenset(pins.emulator)

    def close(self) -> None:
        """Nothing to release; present so the simulator is a complete Host."""

    # -- simulation ----------------------------------------------------------------------

    def tick(self, seconds: float) -> TickStats:
        """Advance the clock by `seconds`, running every vCPU; returns the interval's stats."""
        if seconds <= 0:
            raise ValueError("tick needs a positive duration")
        end = self.now + seconds
        for vcpu in self._vcpus.values():
            # Drawn for every vCPU, running or not, so the streams never depend on placement.
            noise = vcpu.load.noise
            vcpu.factor = 1.0 + vcpu.rng.uniform(-noise, noise) if noise else 1.0
        stats = TickStats(seconds=seconds)
        busy = {p: 0.0 for p in self.pcpus}
        nominal = {p: 0.0 for p in self.pcpus}
        # Split at load changes and domain starts/stops so each piece has fixed demands.
        cuts = [t for t in self._events if self.now < t < end] + [end]
        for cut in cuts:
            span = cut - self.now
            refs = [r for r in self._vcpus if self._running(r.domain)]
            demands = [self._demand(r, noisy=True) for r in refs]
            affinity = [self._vcpus[r].affinity for r in refs]
            received, pcpu_busy = allocate(self.pcpus, list(zip(demands, affinity, strict=True)))
            _, pcpu_nominal = allocate(
                self.pcpus,
                [(self._demand(r, noisy=False), a) for r, a in zip(refs, affinity, strict=True)],
            )
            for ref, want, got in zip(refs, demands, received, strict=True):
                vcpu = self._vcpus[ref]
                vcpu.time_ns += got / FULL * span * NS
                # A vCPU that gets less than it wants falls behind and never idles: it waits
                # whenever it is not running, as the lab's guests do. One that gets all it
                # wants is counted as never waiting (sharing costs it some latency on a real
                # host, but it idles, and the idling is what tells it was satisfied).
                short = got < want - STARVED_BY
                if short:
                    wait = FULL - got
                elif self.queueing and len(vcpu.affinity) == 1:
                    wait = queue_wait(got, pcpu_busy[next(iter(vcpu.affinity))] - got)
                else:
                    wait = 0.0
                vcpu.wait_ns += wait / FULL * span * NS
                stats.demanded += want / FULL * span
                stats.received += got / FULL * span
                stats.vcpu_demanded[ref] = stats.vcpu_demanded.get(ref, 0.0) + want / FULL * span
                stats.vcpu_received[ref] = stats.vcpu_received.get(ref, 0.0) + got / FULL * span
            for p in self.pcpus:
                self._busy_ns[p] += pcpu_busy[p] / FULL * span * NS
                busy[p] += pcpu_busy[p] * span
                nominal[p] += pcpu_nominal[p] * span
            self.now = cut
        stats.util = {p: busy[p] / seconds for p in self.pcpus}
        stats.nominal_util = {p: nominal[p] / seconds for p in self.pcpus}
        self.last = stats
        return stats

    def running(self) -> list[VcpuRef]:
        """The vCPUs of the domains running now."""
        return [r for r in self._vcpus if self._running(r.domain)]

    def affinity(self, ref: VcpuRef) -> frozenset[int]:
        return self._vcpus[ref].affinity

    def nominal_demand(self, ref: VcpuRef, at: float | None = None) -> float:
        """The noise-free demand of a vCPU at `at` (default: now), relative to the origin."""
        return self._vcpus[ref].load.nominal((self.now if at is None else at) - self.origin)

    def is_running(self, domain: str, at: float | None = None) -> bool:
        return self.domains[domain].running((self.now if at is None else at) - self.origin)

    def change_times(self) -> list[float]:
        """Simulated instants at which some demand changes or a domain starts or stops."""
        return list(self._events)

    # -- internals -----------------------------------------------------------------------

    def _running(self, domain: str) -> bool:
        return self.domains[domain].running(self.now - self.origin)

    def _demand(self, ref: VcpuRef, noisy: bool) -> float:
        vcpu = self._vcpus[ref]
        demand = vcpu.load.nominal(self.now - self.origin)
        if self.slowdown:
            demand *= statistics.fmean(self.slowdown.get(p, 1.0) for p in vcpu.affinity)
        if noisy:
            demand *= vcpu.factor
        return min(max(demand, 0.0), FULL)

    def _event_times(self) -> set[float]:
        times: set[float] = set()
        for domain in self.domains.values():
            times.add(domain.start)
            if domain.stop is not None:
                times.add(domain.stop)
            for load in domain.loads:
                times.update(load.changes())
        return {self.origin + t for t in times if t > 0}

    def _check_affinity(self, pcpus: frozenset[int]) -> None:
        if not pcpus or not pcpus <= set(self.pcpus):
            raise PinError(f"affinity {sorted(pcpus)} not within pCPUs 0-{len(self.pcpus) - 1}")

    @staticmethod
    def _check_laminar(affinities: Iterable[frozenset[int]]) -> None:
        wide = sorted({a for a in affinities if len(a) > 1}, key=len)
        for i, small in enumerate(wide):
            for big in wide[i + 1 :]:
                if small & big and not small <= big:
                    raise PinError(
                        f"affinities {sorted(small)} and {sorted(big)} overlap without nesting;"
                        " the simulator only models nested or disjoint pCPU sets"
                    )
