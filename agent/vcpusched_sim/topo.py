"""A simulated host with a topology: NUMA nodes, cores, sibling threads and cache groups.

The host is described by a capabilities document like libvirt's (`capabilities_xml`), parsed
by the agent's own reader (`vcpusched.topology.parse_capabilities`), so the policy is fed the
very `Topology` it would get from libvirt, sibling numbering included.

What the kernel reports is CPU time; what a guest gets done depends on where that time ran.
The model (`Speed`):
- Sibling threads share their core: a thread alone on its core runs at full speed; with its
  sibling busy all the time the two deliver `smt_pair` cores between them (1.25 by default:
  each runs at 0.625). In between, a thread runs at full speed while its sibling idles and at
  the shared speed while it is busy, the two busy at independent times. (With more threads
  per core, the siblings' busy time is summed, capped at all of it.)
- Work done on a node that does not hold the domain's memory runs at `remote` speed (0.7).
  A domain's memory is where its `<numatune>` binds it, or where it first ran without one:
  the simulator does not migrate memory (the kernel's automatic NUMA balancing, which the
  kernel's docs say to disable for workloads bound to nodes, is not modelled).
- A vCPU's demand is CPU time, as everywhere in vcpusched; a slowed vCPU does not ask for
  more. So CPU time is what the agent sees, and work done (CPU time x speed) is the truth.

`predict` and `score` are pure: they take a placement and give its work done and its counts
(vCPUs off their memory node, split domains, shared cores while free ones exist, vCPUs
outside a strict nodeset), for the benchmark and for a policy that wants to judge a plan
(`placed_from` builds their input from a snapshot). They need only the agent's types and
`vcpusched_sim.host.allocate`: the daemon never imports the simulator, so a policy that uses
them takes them, with `allocate`, into its own package.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from vcpusched.host import DomainGone, PinError
from vcpusched.model import HostSample, Vcpu, VcpuCounters, VcpuRef
from vcpusched.topology import (
    MemoryPlacement,
    Topology,
    format_cpus,
    parse_capabilities,
    resident_node,
)
from vcpusched_sim.host import FULL, NS, STARVED_BY, DomainSpec, Load, allocate, spread

# A vCPU wanting at least this much (% of a pCPU) counts as busy for the shared-core count.
BUSY = 50.0
NUMATUNE = ("strict", "none", "auto")
# The model's defaults: two busy threads of a core deliver 1.25 cores (numad values a
# hyperthread at 0.2 of a core), and work off the memory's node runs at 0.7 (published guest
# STREAM losses are 2-7x on bandwidth alone; most work is not all memory traffic).
SMT_PAIR = 1.25
REMOTE = 0.7


@dataclass(frozen=True, slots=True)
class Speed:
    """The model's two parameters (see the module's docstring)."""

    smt_pair: float = SMT_PAIR  # cores' worth delivered by two busy sibling threads together
    remote: float = REMOTE  # speed of work run off the domain's memory node

    def __post_init__(self) -> None:
        if not 1.0 <= self.smt_pair <= 2.0:
            raise ValueError(f"smt_pair {self.smt_pair} outside 1..2")
        if not 0.0 < self.remote <= 1.0:
            raise ValueError(f"remote {self.remote} outside (0, 1]")


# -- the host's description ------------------------------------------------------------------


def capabilities_xml(
    sockets: int, cores: int, threads: int, numbering: str = "adjacent", llc_per_socket: int = 1
) -> str:
    """A capabilities document of a host with one NUMA node per socket, as libvirt writes it.

    `numbering` says how the kernel numbered the threads: "adjacent" gives the threads of a
    core consecutive numbers (N, N+1), "split" numbers every core's first thread first
    (N, N + sockets*cores). Each socket's cores are split into `llc_per_socket` level-3 cache
    groups of consecutive cores.
    """
    if min(sockets, cores, threads, llc_per_socket) < 1 or cores % llc_per_socket:
        raise ValueError("sockets, cores, threads >= 1 and cores a multiple of llc_per_socket")
    if numbering not in ("adjacent", "split"):
        raise ValueError(f"numbering {numbering!r}: 'adjacent' or 'split'")
    total = sockets * cores

    def cpu(socket: int, core: int, thread: int) -> int:
        if numbering == "adjacent":
            return (socket * cores + core) * threads + thread
        return thread * total + socket * cores + core

    cells: list[str] = []
    banks: list[str] = []
    per_llc = cores // llc_per_socket
    for s in range(sockets):
        distances = "".join(
            f"<sibling id='{o}' value='{10 if o == s else 21}'/>" for o in range(sockets)
        )
        entries = []
        for c in range(cores):
            siblings = format_cpus({cpu(s, c, t) for t in range(threads)})
            for t in range(threads):
                entries.append(
                    (
                        cpu(s, c, t),
                        f"<cpu id='{cpu(s, c, t)}' socket_id='{s}' die_id='0' core_id='{c}'"
                        f" siblings='{siblings}'/>",
                    )
                )
        body = "".join(text for _, text in sorted(entries))
        cells.append(
            f"<cell id='{s}'><memory unit='KiB'>67108864</memory>"
            f"<distances>{distances}</distances><cpus num='{cores * threads}'>{body}</cpus></cell>"
        )
        for g in range(llc_per_socket):
            members = {
                cpu(s, c, t) for c in range(g * per_llc, (g + 1) * per_llc) for t in range(threads)
            }
            banks.append(
                f"<bank id='{s * llc_per_socket + g}' level='3' type='both' size='32'"
                f" unit='MiB' cpus='{format_cpus(members)}'/>"
            )
    return (
        "<capabilities><host><topology>"
        f"<cells num='{sockets}'>{''.join(cells)}</cells></topology>"
        f"<cache>{''.join(banks)}</cache></host></capabilities>"
    )


def host_topology(
    sockets: int, cores: int, threads: int, numbering: str = "adjacent", llc_per_socket: int = 1
) -> Topology:
    """The `Topology` the agent would read from such a host's libvirt."""
    return parse_capabilities(capabilities_xml(sockets, cores, threads, numbering, llc_per_socket))


# -- the model's arithmetic ------------------------------------------------------------------


def thread_speed(sibling_busy: float, speed: Speed) -> float:
    """Work per CPU second on a thread whose siblings are busy `sibling_busy` of the time
    (a fraction; summed over the siblings, capped at 1)."""
    shared = speed.smt_pair / 2.0
    return 1.0 - min(max(sibling_busy, 0.0), 1.0) * (1.0 - shared)


def node_factor(node: int | None, memory: Mapping[int, float], speed: Speed) -> float:
    """Speed of work run on `node` for a domain whose memory is `memory` (node -> fraction).
    Unknown nodes and unknown memory count as local: nothing is nearer than anything else."""
    if node is None or not memory:
        return 1.0
    local = memory.get(node, 0.0)
    return local + (1.0 - local) * speed.remote


@dataclass(frozen=True, slots=True)
class Placed:
    """One vCPU in a placement: what it wants, where it may run, where its memory is, and the
    pCPUs its memory binds it to (None where it does not)."""

    ref: VcpuRef
    demand: float
    affinity: frozenset[int]
    memory: Mapping[int, float] = field(default_factory=dict, hash=False)
    bound: frozenset[int] | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a placement delivers over a steady interval, per vCPU (same order) and in total;
    figures in % of one pCPU."""

    received: tuple[float, ...]
    work: tuple[float, ...]
    busy: Mapping[int, float]

    @property
    def total_work(self) -> float:
        return sum(self.work)

    @property
    def total_received(self) -> float:
        return sum(self.received)


def predict(topology: Topology, vcpus: Sequence[Placed], speed: Speed | None = None) -> Outcome:
    """CPU time and work done of every vCPU of a placement, at steady demands.

    CPU time follows the simulator's max-min fair sharing (`vcpusched_sim.host.allocate`); a
    vCPU allowed on several pCPUs runs where an ideal balancer spreads it, blind to nodes and
    cores. Work is each slice of CPU time at the speed of the thread it ran on.
    """
    speed = speed or Speed()
    # A CPU the topology does not list (offline since, or never reported) still runs what is
    # pinned there, on no known node or core.
    pcpus = sorted(set(topology.cpus).union(*(v.affinity for v in vcpus)))
    received, _ = allocate(pcpus, [(v.demand, v.affinity) for v in vcpus])
    busy = {p: 0.0 for p in pcpus}
    where: list[dict[int, float]] = [{} for _ in vcpus]
    wide: dict[frozenset[int], list[int]] = defaultdict(list)
    for i, v in enumerate(vcpus):
        if len(v.affinity) == 1:
            (p,) = v.affinity
            busy[p] = busy.get(p, 0.0) + received[i]
            where[i][p] = received[i]
        else:
            wide[v.affinity].append(i)
    for cpuset in sorted(wide, key=len):
        members = wide[cpuset]
        amount = sum(received[i] for i in members)
        took = spread(busy, sorted(cpuset & busy.keys()), amount)
        for i in members:
            share = received[i] / amount if amount > 0 else 0.0
            where[i] = {p: t * share for p, t in took.items() if t > 0}
    work = []
    for i, v in enumerate(vcpus):
        done = 0.0
        for p, t in where[i].items():
            others = sum(busy.get(s, 0.0) for s in topology.siblings_of(p) if s != p) / FULL
            done += (
                t * thread_speed(others, speed) * node_factor(topology.node_of(p), v.memory, speed)
            )
        work.append(done)
    return Outcome(tuple(received), tuple(work), busy)


# -- the counts ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Score:
    """A placement judged: predicted work done and CPU time (% of one pCPU, summed), and the
    counts the topology targets are about."""

    work: float
    received: float
    demand: float
    cross_node: int  # vCPUs that may run on a node holding none of their domain's memory
    split: int  # domains that fit in one node but whose vCPUs may run on several
    shared: int  # cores holding two busy vCPUs that could have had a free core of their own
    outside_strict: int  # vCPUs allowed outside the CPUs their memory binds them to
    # Domains that fit in one last-level cache group but whose vCPUs may run in several.
    llc_split: int = 0


def score(
    topology: Topology,
    vcpus: Sequence[Placed],
    speed: Speed | None = None,
    cpus: Iterable[int] | None = None,
    busy_at: float = BUSY,
) -> Score:
    """Judge a placement. `cpus` are the pCPUs a vCPU may be moved to (default: all known);
    a shared core counts only while a free core (no busy vCPU) exists that one of its busy
    vCPUs may use, so sharing that a strict nodeset forces is not counted."""
    outcome = predict(topology, vcpus, speed)
    managed = frozenset(topology.cpus if cpus is None else cpus) & frozenset(topology.cpus)
    largest_node = max((len(c & managed) for c in topology.nodes.values()), default=0)
    cross = 0
    outside = 0
    nodes_of: dict[str, set[int]] = defaultdict(set)
    count: dict[str, int] = defaultdict(int)
    for v in vcpus:
        nodes = {n for p in v.affinity if (n := topology.node_of(p)) is not None}
        nodes_of[v.ref.domain] |= nodes
        count[v.ref.domain] += 1
        home = {n for n, w in v.memory.items() if w > 0}
        if home and nodes - home:
            cross += 1
        if v.bound is not None and not v.affinity <= v.bound:
            outside += 1
    split = sum(
        1 for domain, nodes in nodes_of.items() if len(nodes) > 1 and count[domain] <= largest_node
    )
    groups_of: dict[str, set[frozenset[int]]] = defaultdict(set)
    for v in vcpus:
        for p in v.affinity:
            if (group := topology.cache_group_of(p)) is not None:
                groups_of[v.ref.domain].add(group)
    groups = {g for p in managed if (g := topology.cache_group_of(p)) is not None}
    largest_group = max((len(g & managed) for g in groups), default=0)
    llc_split = sum(1 for d, g in groups_of.items() if len(g) > 1 and count[d] <= largest_group)
    return Score(
        work=outcome.total_work,
        received=outcome.total_received,
        demand=sum(min(max(v.demand, 0.0), FULL) for v in vcpus),
        cross_node=cross,
        split=split,
        shared=shared_cores(topology, vcpus, managed, busy_at),
        outside_strict=outside,
        llc_split=llc_split,
    )


def shared_cores(
    topology: Topology, vcpus: Sequence[Placed], cpus: frozenset[int], busy_at: float = BUSY
) -> int:
    """Cores holding two or more busy pinned vCPUs, as far as free cores (no busy vCPU, within
    `cpus`) exist that one of them may use. Floating vCPUs are on no core in particular."""
    on_core: dict[frozenset[int], list[Placed]] = defaultdict(list)
    for v in vcpus:
        if len(v.affinity) == 1 and v.demand >= busy_at:
            (p,) = v.affinity
            on_core[topology.siblings_of(p)].append(v)
    free = [c for c in topology.cores if c & cpus and c not in on_core]
    if not free:
        return 0
    free_cpus = frozenset().union(*free) & cpus
    avoidable = 0
    for members in on_core.values():
        if len(members) < 2:
            continue
        if any(free_cpus & (cpus if v.bound is None else v.bound) for v in members):
            avoidable += 1
    return min(avoidable, len(free))


def memory_of(placement: MemoryPlacement | None, where: Iterable[int | None]) -> dict[int, float]:
    """Where a domain's memory is, as the agent can tell it: spread over a binding or preferred
    nodeset; else on the node the kernel says holds it (`resident`); else (no `numatune` and
    not read, or a nodeset not known) on the node where most of its vCPUs run (`where`: the
    node of each vCPU, None when it floats over several)."""
    if placement is not None and placement.nodeset and placement.mode is not None:
        nodes = sorted(placement.nodeset)
        return {n: 1.0 / len(nodes) for n in nodes}
    if placement is not None and placement.resident is not None:
        return {placement.resident: 1.0}
    counts: dict[int, int] = defaultdict(int)
    for node in where:
        if node is not None:
            counts[node] += 1
    if not counts:
        return {}
    home = min(counts, key=lambda n: (-counts[n], n))
    return {home: 1.0}


def placed_from(
    vcpus: Iterable[Vcpu], topology: Topology, memory: Mapping[str, MemoryPlacement]
) -> list[Placed]:
    """The policy's view of a placement, ready to `score`: each vCPU's demand and affinity
    from a snapshot, its domain's memory (`memory_of`) and binding from its numatune."""
    listed = list(vcpus)
    where: dict[str, list[int | None]] = defaultdict(list)
    for v in listed:
        nodes = {topology.node_of(p) for p in v.affinity}
        where[v.ref.domain].append(nodes.pop() if len(nodes) == 1 else None)
    homes = {d: memory_of(memory.get(d), w) for d, w in where.items()}
    out = []
    for v in listed:
        placement = memory.get(v.ref.domain)
        bound = None if placement is None else placement.allowed_cpus(v.ref.vcpu, topology)
        out.append(Placed(v.ref, v.demand, v.affinity, homes[v.ref.domain], bound))
    return out


# -- the simulated host ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TopoDomain:
    """One guest on the topology host: its vCPUs (`spec`), its `<numatune>` ("strict": memory
    bound to `nodes`; "auto": bound to `nodes`, chosen by libvirt at start; "none": first
    touched on `nodes`, not bound)."""

    spec: DomainSpec
    numatune: str
    nodes: frozenset[int]

    def __post_init__(self) -> None:
        if self.numatune not in NUMATUNE:
            raise ValueError(f"domain {self.spec.name}: numatune {self.numatune!r}")
        if not self.nodes:
            raise ValueError(f"domain {self.spec.name}: its memory must be on some node")

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def binding(self) -> bool:
        return self.numatune != "none"

    def placement(self) -> MemoryPlacement:
        """What the agent reads of it: the XML's numatune, with the nodeset libvirt chose for
        placement='auto' (`numaParameters` of the running domain gives it); without one, the
        node holding its memory, as the QEMU process's numa_maps tells it."""
        if self.numatune == "none":
            return MemoryPlacement(resident=resident_node({n: 1 for n in self.nodes}))
        return MemoryPlacement(mode="strict", nodeset=self.nodes, auto=self.numatune == "auto")

    def memory(self) -> dict[int, float]:
        nodes = sorted(self.nodes)
        return {n: 1.0 / len(nodes) for n in nodes}


@dataclass(slots=True)
class _Vcpu:
    load: Load
    affinity: frozenset[int]
    memory: dict[int, float]
    bound: frozenset[int] | None
    time_ns: float = 0.0
    wait_ns: float = 0.0


@dataclass(slots=True)
class TopoTick:
    """The last tick, in pCPU-seconds (100% for 1 s = 1.0), summed over all vCPUs."""

    seconds: float = 0.0
    demanded: float = 0.0
    received: float = 0.0
    work: float = 0.0


class TopoHost:
    """An in-memory host with a topology; implements `vcpusched.host.Host`.

    `offline` lists (seconds since the start, CPU) events: from then on the CPU is gone from
    the samples and the topology, and a vCPU pinned only to it is let run on every online CPU,
    as the kernel does when a task's only CPU goes away.
    """

    def __init__(
        self,
        topology: Topology,
        domains: Sequence[TopoDomain],
        speed: Speed | None = None,
        offline: Sequence[tuple[float, int]] = (),
    ) -> None:
        names = [d.name for d in domains]
        if len(set(names)) != len(names):
            raise ValueError("domain names must be unique")
        if not topology.cpus:
            raise ValueError("a host needs at least one CPU")
        self.full_topology = topology
        self.speed = speed or Speed()
        self.online = frozenset(topology.cpus)
        self.topology = topology
        self.domains = {d.name: d for d in domains}
        self.now = 0.0
        self.pin_changes = 0
        self.last = TopoTick()
        self._offline = sorted(offline)
        self._busy_ns = {p: 0.0 for p in self.online}
        self._vcpus: dict[VcpuRef, _Vcpu] = {}
        for domain in domains:
            bound = topology.cpus_of_nodes(domain.nodes) if domain.binding else None
            for i, (load, affinity) in enumerate(
                zip(domain.spec.loads, domain.spec.affinity, strict=True)
            ):
                self._check(affinity)
                self._vcpus[VcpuRef(domain.name, i)] = _Vcpu(
                    load, frozenset(affinity), domain.memory(), bound
                )

    # -- Host protocol ---------------------------------------------------------------------

    def sample(self) -> HostSample:
        running = [r for r in self._vcpus if self._running(r.domain)]
        return HostSample(
            clock=self.now,
            pcpu_busy_ns={p: int(ns) for p, ns in self._busy_ns.items() if p in self.online},
            vcpus={
                r: VcpuCounters(
                    int(self._vcpus[r].time_ns),
                    int(self._vcpus[r].wait_ns),
                    self._vcpus[r].affinity,
                )
                for r in running
            },
            topology=self.topology,
            memory={name: d.placement() for name, d in self.domains.items() if self._running(name)},
        )

    def pin(self, ref: VcpuRef, pcpus: frozenset[int]) -> None:
        vcpu = self._vcpus.get(ref)
        if vcpu is None or not self._running(ref.domain):
            raise DomainGone(ref)
        self._check(pcpus)
        pcpus = frozenset(pcpus)
        if pcpus == vcpu.affinity:
            return
        if len(pcpus) > 1:
            for other, v in self._vcpus.items():
                a = v.affinity
                if other != ref and len(a) > 1 and a & pcpus and not (a <= pcpus or pcpus <= a):
                    raise PinError(
                        f"affinities {format_cpus(a)} and {format_cpus(pcpus)} overlap without"
                        " nesting; the simulator only models nested or disjoint sets"
                    )
        vcpu.affinity = pcpus
        self.pin_changes += 1

    def close(self) -> None:
        """Nothing to release."""

    # -- simulation ------------------------------------------------------------------------

    def tick(self, seconds: float) -> TopoTick:
        if seconds <= 0:
            raise ValueError("tick needs a positive duration")
        end = self.now + seconds
        stats = TopoTick(seconds=seconds)
        cuts = sorted({t for t in self._event_times() if self.now < t < end} | {end})
        for cut in cuts:
            self._apply_offline()
            span = cut - self.now
            placed = self.placed()
            outcome = predict(self.topology, placed, self.speed)
            for v, got, done in zip(placed, outcome.received, outcome.work, strict=True):
                state = self._vcpus[v.ref]
                state.time_ns += got / FULL * span * NS
                # As in vcpusched_sim.host: a vCPU short of time never idles.
                short = got < v.demand - STARVED_BY
                state.wait_ns += (FULL - got if short else 0.0) / FULL * span * NS
                stats.demanded += v.demand / FULL * span
                stats.received += got / FULL * span
                stats.work += done / FULL * span
            for p, b in outcome.busy.items():
                self._busy_ns[p] += b / FULL * span * NS
            self.now = cut
        self._apply_offline()
        self.last = stats
        return stats

    def placed(self, at: float | None = None, level: bool = False) -> list[Placed]:
        """The running vCPUs as they stand, with their demands at `at` (default now); with
        `level`, a bursting vCPU's mean over its pattern (`Load.level`)."""
        t = self.now if at is None else at
        return [
            Placed(
                ref,
                min(max(v.load.level(t) if level else v.load.nominal(t), 0.0), FULL),
                v.affinity,
                v.memory,
                None if v.bound is None else v.bound & self.online,
            )
            for ref, v in self._vcpus.items()
            if self.domains[ref.domain].spec.running(t)
        ]

    def affinity(self, ref: VcpuRef) -> frozenset[int]:
        return self._vcpus[ref].affinity

    def event_times(self) -> list[float]:
        return sorted(self._event_times())

    # -- internals -------------------------------------------------------------------------

    def _running(self, domain: str) -> bool:
        return self.domains[domain].spec.running(self.now)

    def _event_times(self) -> set[float]:
        times = {t for t, _ in self._offline}
        for d in self.domains.values():
            times.add(d.spec.start)
            if d.spec.stop is not None:
                times.add(d.spec.stop)
            for load in d.spec.loads:
                times.update(load.changes())
        return {t for t in times if t > 0}

    def _apply_offline(self) -> None:
        while self._offline and self._offline[0][0] <= self.now + 1e-9:
            _, cpu = self._offline.pop(0)
            if cpu not in self.online or len(self.online) == 1:
                continue
            self.online = self.online - {cpu}
            self.topology = self.full_topology.restricted(self.online)
            for v in self._vcpus.values():
                if cpu in v.affinity:
                    left = v.affinity - {cpu}
                    v.affinity = left or self.online

    def _check(self, pcpus: Iterable[int]) -> None:
        cpus = frozenset(pcpus)
        if not cpus or not cpus <= self.online:
            raise PinError(f"affinity {format_cpus(cpus)} not within online CPUs")


def capacity(topology: Topology, cpus: Iterable[int], received: float, speed: Speed) -> float:
    """The most work (% of one pCPU) the cores of `cpus` can deliver from `received` CPU time.

    A core whose two threads are busy a and b of the time delivers a + b - (2 - smt_pair) * ab
    cores, and ab >= a + b - 1: so its first 100 points of CPU time count fully and the next
    100 (a second online thread) at smt_pair - 1. Spread evenly is the most the cores can do.
    """
    members = frozenset(cpus)
    first = second = 0.0
    for core in topology.cores:
        threads = len(core & members)
        if threads:
            first += FULL
            if threads > 1:
                second += FULL
    taken = min(received, first)
    return taken + (speed.smt_pair - 1.0) * min(max(received - first, 0.0), second)


def upper_bound(topology: Topology, vcpus: Sequence[Placed], speed: Speed | None = None) -> float:
    """No placement does more work than this (% of one pCPU, summed): every vCPU's demand,
    within what the cores can deliver (`capacity`), and the vCPUs bound to some CPUs within
    what those CPUs' cores can deliver. Remote memory is not counted: it only lowers work."""
    speed = speed or Speed()
    groups: dict[frozenset[int], float] = defaultdict(float)
    free = 0.0
    total = 0.0
    for v in vcpus:
        demand = min(max(v.demand, 0.0), FULL)
        total += demand
        if v.bound is None:
            free += demand
        else:
            groups[v.bound] += demand
    everything = capacity(topology, topology.cpus, total, speed)
    split = free + sum(capacity(topology, cpus, d, speed) for cpus, d in groups.items())
    return min(everything, split)


__all__ = [
    "BUSY",
    "Outcome",
    "Placed",
    "Score",
    "Speed",
    "TopoDomain",
    "TopoHost",
    "capabilities_xml",
    "capacity",
    "host_topology",
    "memory_of",
    "node_factor",
    "placed_from",
    "predict",
    "score",
    "thread_speed",
    "upper_bound",
]
