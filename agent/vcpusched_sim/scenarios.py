"""Named workloads for the simulator: who runs where, wanting how much, and when.

The first five are the classic cases of the vCPU-scheduling course (8 one-vCPU guests on 4
pCPUs); the rest stretch the policy: more pCPUs, multi-vCPU guests, noise, load changes,
guests coming and going, excluded guests, a restricted pCPU set, large hosts, guests that
burst on and off, more demand than the host has, guests that pack exactly, and mixed loads
starting from one full pCPU.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from vcpusched_sim.baselines import Scope
from vcpusched_sim.host import DomainSpec, Load, SimHost, constant, phased

CYCLES = 300


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    summary: str
    pcpus: int
    domains: tuple[DomainSpec, ...]
    cycles: int = CYCLES
    interval: float = 1.0
    exclude: tuple[str, ...] = ()
    cpus: frozenset[int] | None = None
    seed: int = 0
    # One of the course's cases, where the agent must reach balance in the fewest pin changes.
    classic: bool = False
    # The classes the targets single out (see bench.checks).
    bursty: bool = False
    oversubscribed: bool = False
    packing: bool = False
    from_full: bool = False
    # Satisfied vCPUs wait behind the others, as on a real host (`SimHost.queueing`).
    queueing: bool = False
    # pCPUs that run their guests slower, by how much (`SimHost.slowdown`).
    slowdown: tuple[tuple[int, float], ...] = ()

    @property
    def managed_pcpus(self) -> tuple[int, ...]:
        return tuple(sorted(self.cpus)) if self.cpus is not None else tuple(range(self.pcpus))

    @property
    def vcpus(self) -> int:
        return sum(len(d.loads) for d in self.domains)

    def host(self) -> SimHost:
        return SimHost(
            self.pcpus,
            self.domains,
            seed=self.seed,
            queueing=self.queueing,
            slowdown=dict(self.slowdown),
        )

    def scope(self) -> Scope:
        return Scope(self.managed_pcpus, self.exclude)

    def change_times(self) -> list[float]:
        """Instants (s) within the run at which demands change or guests start or stop."""
        return [t for t in self.host().change_times() if t < self.cycles * self.interval]

    def resized(self, cycles: int) -> Scenario:
        """The same story told in `cycles` intervals: every event time scaled alike."""
        if cycles == self.cycles:
            return self
        ratio = cycles / self.cycles

        def at(t: float) -> float:
            return float(round(t * ratio / self.interval)) * self.interval

        def load(old: Load) -> Load:
            # A burst pattern keeps its own timing: it is what the guest does, not the story.
            return dataclasses.replace(
                old, phases=tuple((at(t), demand) for t, demand in old.phases)
            )

        domains = tuple(
            dataclasses.replace(
                d,
                loads=tuple(load(x) for x in d.loads),
                start=at(d.start),
                stop=None if d.stop is None else at(d.stop),
            )
            for d in self.domains
        )
        return dataclasses.replace(self, domains=domains, cycles=cycles)


def _vm(
    name: str, load: Load, pcpus: frozenset[int], start: float = 0.0, stop: float | None = None
) -> DomainSpec:
    return DomainSpec(name, (load,), (pcpus,), start=start, stop=stop)


def _one(p: int) -> frozenset[int]:
    return frozenset({p})


def _all(pcpus: int) -> frozenset[int]:
    return frozenset(range(pcpus))


def _names(count: int) -> list[str]:
    return [f"vm{i:02d}" for i in range(count)]


# -- the course's cases, at any size -------------------------------------------------------


def pinned_pcpu0(vms: int, pcpus: int, load: float = 40.0) -> tuple[DomainSpec, ...]:
    return tuple(_vm(n, constant(load), _one(0)) for n in _names(vms))


def alternating(vms: int, pcpus: int, load: float = 40.0) -> tuple[DomainSpec, ...]:
    return tuple(
        _vm(n, constant(load), _one(0 if i % 2 == 0 else pcpus - 1))
        for i, n in enumerate(_names(vms))
    )


def round_robin(
    vms: int, pcpus: int, load: float = 40.0, noise: float = 0.0
) -> tuple[DomainSpec, ...]:
    return tuple(_vm(n, constant(load, noise), _one(i % pcpus)) for i, n in enumerate(_names(vms)))


def unpinned(vms: int, pcpus: int, load: float = 40.0) -> tuple[DomainSpec, ...]:
    return tuple(_vm(n, constant(load), _all(pcpus)) for n in _names(vms))


def unpinned_heavy_light(vms: int, pcpus: int) -> tuple[DomainSpec, ...]:
    return tuple(
        _vm(n, constant(100.0 if i % 2 == 0 else 50.0), _all(pcpus))
        for i, n in enumerate(_names(vms))
    )


def _classic(suffix: str, vms: int, pcpus: int) -> list[Scenario]:
    size = f"{vms} one-vCPU guests of 40% on {pcpus} pCPUs"
    return [
        Scenario(
            f"pinned-pcpu0{suffix}",
            f"{size}, all pinned to pCPU 0",
            pcpus,
            pinned_pcpu0(vms, pcpus),
            classic=True,
        ),
        Scenario(
            f"alternating{suffix}",
            f"{size}, pinned alternately to pCPU 0 and pCPU {pcpus - 1}",
            pcpus,
            alternating(vms, pcpus),
            classic=True,
        ),
        Scenario(
            f"round-robin{suffix}",
            f"{size}, already pinned round-robin: nothing to do",
            pcpus,
            round_robin(vms, pcpus),
            classic=True,
        ),
        Scenario(
            f"unpinned{suffix}",
            f"{size}, none pinned",
            pcpus,
            unpinned(vms, pcpus),
            classic=True,
        ),
        Scenario(
            f"unpinned-heavy-light{suffix}",
            f"{vms} unpinned one-vCPU guests on {pcpus} pCPUs, alternately 100% and 50%",
            pcpus,
            unpinned_heavy_light(vms, pcpus),
            classic=True,
        ),
    ]


# -- beyond the course ---------------------------------------------------------------------


def _fewer_vcpus() -> Scenario:
    return Scenario(
        "fewer-vcpus",
        "3 one-vCPU guests of 60% on 4 pCPUs, all pinned to pCPU 0: one pCPU stays idle",
        4,
        pinned_pcpu0(3, 4, load=60.0),
    )


def _multi_vcpu() -> Scenario:
    # Each guest starts with all its vCPUs on one pCPU, as a per-guest cpuset would do.
    guests = [("web", 4, 25.0, 0), ("db", 2, 60.0, 1), ("batch", 3, 30.0, 2), ("dns", 1, 10.0, 3)]
    domains = tuple(
        DomainSpec(name, (constant(load),) * count, (_one(p),) * count)
        for name, count, load, p in guests
    )
    return Scenario(
        "multi-vcpu",
        "guests of 4, 2, 3 and 1 vCPUs (25, 60, 30, 10%) on 4 pCPUs, each guest on its own pCPU",
        4,
        domains,
    )


def _noise() -> Scenario:
    loads = [50.0, 45.0, 40.0, 35.0, 35.0, 40.0, 45.0, 50.0]
    domains = tuple(
        _vm(n, constant(load, noise=0.05), _one(i % 2))
        for i, (n, load) in enumerate(zip(_names(8), loads, strict=True))
    )
    return Scenario(
        "noise",
        "8 guests of 35-50% with ±5% noise on 4 pCPUs, all on pCPUs 0 and 1",
        4,
        domains,
        seed=1,
    )


def _round_robin_noise() -> Scenario:
    return Scenario(
        "round-robin-noise",
        "8 guests of 40% ±5% noise on 4 pCPUs, already balanced: nothing to do",
        4,
        round_robin(8, 4, noise=0.05),
        seed=2,
    )


def _phases(noise: float = 0.0) -> Scenario:
    # Round-robin puts vm00/vm04 on pCPU 0, vm01/vm05 on 1, vm02/vm06 on 2, vm03/vm07 on 3.
    shapes: dict[str, tuple[tuple[float, float], ...]] = {
        "vm00": ((0.0, 40.0), (100.0, 80.0), (200.0, 20.0)),
        "vm04": ((0.0, 40.0), (100.0, 80.0), (200.0, 20.0)),
        "vm02": ((0.0, 40.0), (100.0, 10.0), (200.0, 40.0)),
        "vm06": ((0.0, 40.0), (100.0, 10.0), (200.0, 40.0)),
        "vm01": ((0.0, 40.0), (200.0, 70.0)),
        "vm05": ((0.0, 40.0), (200.0, 70.0)),
    }
    domains = tuple(
        _vm(n, phased(*shapes.get(n, ((0.0, 40.0),)), noise=noise), _one(i % 4))
        for i, n in enumerate(_names(8))
    )
    if noise:
        return Scenario(
            "phases-noise",
            "the phases scenario with ±5% noise on every load",
            4,
            domains,
            seed=3,
        )
    return Scenario(
        "phases",
        "8 guests on 4 pCPUs, balanced at 40%; at 100 s and 200 s some guests change load",
        4,
        domains,
    )


def _churn() -> Scenario:
    first = [_vm(n, constant(40.0), _one(i % 4)) for i, n in enumerate(_names(4))]
    later = [
        _vm("new0", constant(40.0), _all(4), start=60.0),
        _vm("new1", constant(40.0), _all(4), start=60.0),
        _vm("new2", constant(40.0), _one(0), start=60.0, stop=150.0),
        _vm("new3", constant(40.0), _one(0), start=60.0),
        _vm("late", constant(60.0), _one(1), start=220.0),
    ]
    first[1] = dataclasses.replace(first[1], stop=150.0)
    first[3] = dataclasses.replace(first[3], stop=150.0)
    return Scenario(
        "churn",
        "4 guests on 4 pCPUs; 4 start at 60 s (two unpinned, two on pCPU 0), three stop at"
        " 150 s, one more starts on pCPU 1 at 220 s",
        4,
        tuple(first + later),
    )


def _excluded() -> Scenario:
    guests = [_vm(n, constant(30.0), _one(0)) for n in _names(8)]
    database = _vm("db-main", constant(70.0), _one(0))
    return Scenario(
        "excluded",
        "excluded guest db-main (70%) and 8 guests of 30%, all on pCPU 0 of 4; exclude: [db-*]",
        4,
        (database, *guests),
        exclude=("db-*",),
    )


def _restricted() -> Scenario:
    return Scenario(
        "restricted-cpus",
        "12 unpinned guests of 40% on 8 pCPUs, the agent limited to cpus: 2-7",
        8,
        unpinned(12, 8),
        cpus=frozenset(range(2, 8)),
    )


def bursty(high: float, low: float, on: int, off: int, offset: int = 0) -> Load:
    """`high` for `on` seconds, then `low` for `off`, repeating; shifted by `offset`."""
    return Load(((0.0, high),), pattern=((high, float(on)), (low, float(off))), offset=offset)


def _bursty(
    name: str, summary: str, steady: float, high: float, on: int, off: int, offsets: list[int]
) -> Scenario:
    # Round-robin: pCPU i holds steady guest i and bursty guest i.
    domains = [_vm(f"steady{i}", constant(steady), _one(i)) for i in range(4)]
    domains += [
        _vm(f"burst{i}", bursty(high, 0.0, on, off, offset), _one(i))
        for i, offset in enumerate(offsets)
    ]
    return Scenario(name, summary, 4, tuple(domains), bursty=True)


def _bursty_cases() -> list[Scenario]:
    return [
        _bursty(
            "bursty-50",
            "4 steady guests of 30% and 4 that alternate 50% and 0% every 3 intervals, in"
            " four phases, one of each per pCPU",
            30.0,
            50.0,
            3,
            3,
            [0, 1, 3, 4],
        ),
        _bursty(
            "bursty-100",
            "4 steady guests of 20% and 4 that alternate 100% and 0% every interval, two in"
            " each phase, one of each per pCPU",
            20.0,
            100.0,
            1,
            1,
            [0, 1, 0, 1],
        ),
        _bursty(
            "bursty-duty",
            "4 steady guests of 40% and 4 that burst to 80% one interval in four, in four"
            " phases, one of each per pCPU",
            40.0,
            80.0,
            1,
            3,
            [0, 1, 2, 3],
        ),
        _bursty(
            "bursty-slow",
            "4 steady guests of 25% and 4 that alternate 60% and 0% every 8 intervals, two in"
            " each phase, one of each per pCPU",
            25.0,
            60.0,
            8,
            8,
            [0, 8, 0, 8],
        ),
    ]


def _noise_20() -> Scenario:
    return Scenario(
        "noise-20",
        "8 guests of 40% ±20% noise on 4 pCPUs, already balanced: nothing to do",
        4,
        round_robin(8, 4, noise=0.20),
        seed=4,
    )


def _oversubscribed() -> Scenario:
    counts = [5, 4, 2, 1]
    homes = [p for p, n in enumerate(counts) for _ in range(n)]
    domains = tuple(
        _vm(n, constant(100.0), _one(p)) for n, p in zip(_names(12), homes, strict=True)
    )
    return Scenario(
        "oversubscribed",
        "12 guests each wanting a whole pCPU, pinned 5/4/2/1 on 4 pCPUs",
        4,
        domains,
        oversubscribed=True,
    )


def _oversubscribed_lab() -> Scenario:
    domains = tuple(
        _vm(n, constant(100.0), _one(0 if i < 4 else 1)) for i, n in enumerate(_names(5))
    )
    return Scenario(
        "oversubscribed-2",
        "5 guests each wanting a whole pCPU, pinned 4/1 on 2 pCPUs (the lab's case)",
        2,
        domains,
        oversubscribed=True,
    )


def _packing() -> Scenario:
    # Triples (15, 25, 35) and (20, 25, 30) fill every pCPU to 75 exactly.
    guests = [("a", 15.0), ("b", 20.0), ("c", 25.0), ("d", 25.0), ("e", 30.0), ("f", 35.0)]
    domains = tuple(
        DomainSpec(name, (constant(load),) * 4, (_one(i),) * 4)
        for i, (name, load) in enumerate(guests)
    )
    return Scenario(
        "packing",
        "6 guests of 4 vCPUs (15, 20, 25, 25, 30, 35%) on 8 pCPUs, each guest on its own pCPU;"
        " they pack to 75% everywhere",
        8,
        domains,
        packing=True,
    )


def _slow_pcpu() -> Scenario:
    # The lab's load-change scenario on a cloud host whose second pCPU ran its guests slower:
    # guests set to 40 read 35-36 on pCPU 0 and 45-47 on pCPU 1.
    return Scenario(
        "slow-pcpu",
        "4 guests of 36% on 2 pCPUs, two on each, the work taking 1.28 times as long on pCPU 1"
        " (72/92): no placement is better, one swap may try",
        2,
        round_robin(4, 2, load=36.0),
        slowdown=((1, 1.28),),
    )


def _mixed_full(name: str, loads: list[float], pcpus: int) -> Scenario:
    return Scenario(
        name,
        f"{len(loads)} guests of {'/'.join(f'{x:g}' for x in loads)}% on {pcpus} pCPUs,"
        " all on pCPU 0 (full)",
        pcpus,
        tuple(_vm(n, constant(x), _one(0)) for n, x in zip(_names(len(loads)), loads, strict=True)),
        from_full=True,
    )


def _large() -> Scenario:
    rng = random.Random(7)
    domains = []
    for d in range(250):
        loads = tuple(constant(round(rng.uniform(2.0, 16.0), 1)) for _ in range(4))
        # Everything crowded onto the first half of the host.
        affinity = tuple(_one((d * 4 + v) * 7 % 64) for v in range(4))
        domains.append(DomainSpec(f"guest{d:03d}", loads, affinity))
    return Scenario(
        "large",
        "1,000 vCPUs (250 guests of 4) of 2-16% on 128 pCPUs, all on the first 64",
        128,
        tuple(domains),
    )


def _huge() -> Scenario:
    rng = random.Random(11)
    domains = []
    for d in range(1000):
        loads = tuple(constant(round(rng.uniform(1.0, 11.0), 1)) for _ in range(4))
        affinity = tuple(_one((d * 4 + v) * 7 % 128) for v in range(4))
        domains.append(DomainSpec(f"guest{d:04d}", loads, affinity))
    return Scenario(
        "huge",
        "4,000 vCPUs (1,000 guests of 4) of 1-11% on 256 pCPUs, all on the first 128",
        256,
        tuple(domains),
        cycles=60,
        seed=5,
    )


def _build() -> dict[str, Scenario]:
    scenarios = [
        *_classic("", 8, 4),
        *_classic("-16", 16, 8),
        _fewer_vcpus(),
        _multi_vcpu(),
        _noise(),
        _round_robin_noise(),
        _phases(),
        _phases(noise=0.05),
        _churn(),
        _excluded(),
        _restricted(),
        _large(),
        *_bursty_cases(),
        _noise_20(),
        _oversubscribed(),
        _oversubscribed_lab(),
        _packing(),
        _slow_pcpu(),
        _mixed_full("mixed-full-2", [70.0, 50.0, 30.0, 10.0], 2),
        _mixed_full("mixed-full", [70.0, 60.0, 50.0, 40.0, 30.0, 20.0, 20.0, 10.0], 4),
        _huge(),
    ]
    return {s.name: s for s in scenarios}


SCENARIOS: dict[str, Scenario] = _build()
