"""The values that flow between the host, the estimates and the policy.

Every figure is a percentage of one pCPU: a vCPU that runs all the time has received 100. One
name per idea: a pCPU's measured `util`, the CPU time a vCPU `received`, and the `demand` it
(or a pCPU's vCPUs) would use with room.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from vcpusched.topology import MemoryPlacement, Topology
from vcpusched.topology import format_cpus as format_cpus  # one formatter, re-exported


class VcpuRef(NamedTuple):
    domain: str
    vcpu: int

    def __str__(self) -> str:
        return f"{self.domain}/{self.vcpu}"


@dataclass(frozen=True, slots=True)
class VcpuCounters:
    """Cumulative counters of one vCPU, as read from the host."""

    time_ns: int
    # Time spent runnable but waiting for a pCPU; None where the host cannot tell.
    wait_ns: int | None
    affinity: frozenset[int]


@dataclass(frozen=True, slots=True)
class HostSample:
    """One reading of the host: cumulative counters at a monotonic instant."""

    clock: float
    # Online pCPUs only: one that goes offline drops out, one that comes online appears.
    pcpu_busy_ns: Mapping[int, int]
    vcpus: Mapping[VcpuRef, VcpuCounters]
    # Each pCPU's idle time (iowait included), where the host counts it. With it, utilization
    # is busy over busy + idle: time stolen by a hypervisor below this host is neither, so a
    # pCPU that runs whenever it can reads full. Without it, busy over the wall clock.
    pcpu_idle_ns: Mapping[int, int] = field(default_factory=dict)
    # The host's CPUs as it reports them, and each running domain's memory placement (by
    # name); `Topology()` and no entry where the host does not say.
    topology: Topology = field(default_factory=Topology)
    memory: Mapping[str, MemoryPlacement] = field(default_factory=dict)
    # CPUs kept from the kernel's balancer (isolcpus, nohz_full), where the host can tell.
    isolated: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class Vcpu:
    """One vCPU as the policy sees it over the last interval.

    `received` is the CPU time it got; `demand` adds the time it waited for a pCPU, so two
    vCPUs that each want a whole pCPU but share one show received 50 and demand 100.
    """

    ref: VcpuRef
    received: float
    demand: float
    affinity: frozenset[int]
    excluded: bool = False
    # The pCPU it is pinned to, or None while it may run on several. Kept, not derived on
    # each read: a plan on a host of thousands of vCPUs asks it several times of each.
    pcpu: int | None = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        pinned = next(iter(self.affinity)) if len(self.affinity) == 1 else None
        object.__setattr__(self, "pcpu", pinned)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One interval: each pCPU's measured utilization and every vCPU."""

    util: Mapping[int, float]
    vcpus: tuple[Vcpu, ...]
    # The host's topology and each domain's memory placement, as sampled (none known by
    # default: a flat host).
    topology: Topology = field(default_factory=Topology)
    memory: Mapping[str, MemoryPlacement] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Move:
    """Pin one vCPU to one pCPU. `src` is its affinity before; the demands are the policy's
    estimates before the move (of the vCPU, and of the pCPUs it leaves and joins)."""

    ref: VcpuRef
    src: frozenset[int]
    dst: int
    demand: float
    src_demand: float | None
    dst_demand: float
    reason: str = ""

    @property
    def kind(self) -> str:
        return "move" if len(self.src) == 1 else "place"


@dataclass(frozen=True, slots=True)
class Plan:
    """What the policy decided in one cycle."""

    moves: tuple[Move, ...] = ()
    # Why moves were considered and held back this cycle: reason -> how many.
    held: Mapping[str, int] = field(default_factory=dict)
    # The policy's estimate of each pCPU's demand, before the moves.
    pcpu_demand: Mapping[int, float] = field(default_factory=dict)
    # Doubts learnt this cycle, from the readings after a step: pCPU -> (points, cycles kept).
    doubts: Mapping[int, tuple[float, int]] = field(default_factory=dict)


def excluded(patterns: Sequence[str], domain: str) -> bool:
    """Whether `domain` matches one of the `exclude` glob patterns: never re-pinned. The one
    definition, for the agent, `status` and the benchmark's baselines."""
    return any(fnmatch.fnmatchcase(domain, p) for p in patterns)


def parse_cpus(spec: str) -> frozenset[int]:
    """Parse "0-3,8,^2" into {0, 1, 3, 8}. Raises ValueError naming the bad part."""
    include: set[int] = set()
    exclude: set[int] = set()
    for raw in str(spec).split(","):
        part = raw.strip()
        if not part:
            continue
        target = include
        if part.startswith("^"):
            target = exclude
            part = part[1:].strip()
        lo, sep, hi = part.partition("-")
        try:
            first = int(lo)
            last = int(hi) if sep else first
        except ValueError:
            raise ValueError(f"invalid cpu range {raw.strip()!r}") from None
        if first < 0 or last < first:
            raise ValueError(f"invalid cpu range {raw.strip()!r}")
        target.update(range(first, last + 1))
    result = frozenset(include - exclude)
    if not result:
        raise ValueError(f"cpu list {spec!r} selects no pCPU")
    return result
