"""Named workloads on hosts with a topology (see `vcpusched_sim.topo`).

Two-socket hosts, one NUMA node per socket, two threads per core: 2 x 8 x 2 (32 logical CPUs)
with the threads of a core numbered both ways, and 2 x 32 x 2 (128) with 440 vCPUs. Some
domains bind their memory (`<numatune mode='strict'>`, or `placement='auto'`), the others
have none and keep their memory where they first ran.
"""

from __future__ import annotations

from dataclasses import dataclass

from vcpusched.topology import Topology
from vcpusched_sim.host import DomainSpec, Load, constant
from vcpusched_sim.topo import Speed, TopoDomain, TopoHost, host_topology

CYCLES = 60


@dataclass(frozen=True, slots=True)
class TopoScenario:
    name: str
    summary: str
    sockets: int
    cores: int
    threads: int
    numbering: str
    domains: tuple[TopoDomain, ...]
    llc_per_socket: int = 1
    cycles: int = CYCLES
    interval: float = 1.0
    # (seconds since the start, CPU) going offline.
    offline: tuple[tuple[float, int], ...] = ()

    def topology(self) -> Topology:
        return host_topology(
            self.sockets, self.cores, self.threads, self.numbering, self.llc_per_socket
        )

    def host(self, speed: Speed | None = None) -> TopoHost:
        return TopoHost(self.topology(), self.domains, speed, self.offline)

    @property
    def cpus(self) -> int:
        return self.sockets * self.cores * self.threads

    @property
    def vcpus(self) -> int:
        return sum(len(d.spec.loads) for d in self.domains)

    def change_times(self) -> list[float]:
        return [t for t in self.host().event_times() if t < self.cycles * self.interval]


def _domain(
    name: str,
    demands: list[float],
    numatune: str,
    node: int,
    affinity: list[frozenset[int]],
) -> TopoDomain:
    spec = DomainSpec(name, tuple(constant(d) for d in demands), tuple(affinity))
    return TopoDomain(spec, numatune, frozenset({node}))


def _floating(
    name: str,
    sockets: int,
    cores: int,
    threads: int,
    numbering: str,
    pairs: int,
    demand: float,
    llc: int = 1,
) -> TopoScenario:
    """Six two-vCPU guests wanting 90% each, none pinned: three bound to node 0, three whose
    memory is on node 1 without a numatune."""
    everywhere = frozenset(range(sockets * cores * threads))
    domains = tuple(
        _domain(
            f"vm{i:02d}",
            [demand, demand],
            "strict" if i % 2 == 0 else "none",
            i % 2,
            [everywhere, everywhere],
        )
        for i in range(pairs)
    )
    order = "N and N+1" if numbering == "adjacent" else f"N and N+{sockets * cores}"
    return TopoScenario(
        name,
        f"{sockets}x{cores}x{threads} (threads {order}); {pairs} guests x 2 vCPUs at {demand:g}%,"
        " unpinned; even ones strict on node 0, odd ones no numatune, memory on node 1"
        + (f"; {llc} L3 groups per socket" if llc > 1 else ""),
        sockets,
        cores,
        threads,
        numbering,
        domains,
        llc_per_socket=llc,
    )


def _overload() -> TopoScenario:
    """Node 0 holds every guest, pinned two vCPUs to a thread at worst; node 1 idles."""
    node0 = [frozenset({p}) for p in range(16)]  # adjacent numbering: node 0 is 0-15
    domains = []
    slot = 0
    for i in range(10):
        affinity = [node0[(slot + k) % 16] for k in range(2)]
        slot += 2
        domains.append(
            _domain(f"vm{i:02d}", [80.0, 80.0], "strict" if i < 4 else "none", 0, affinity)
        )
    return TopoScenario(
        "t32-node-overload",
        "2x8x2 (threads N and N+1); 10 guests x 2 vCPUs at 80%, all pinned on node 0 (20 vCPUs"
        " on its 16 threads); 4 strict on node 0, 6 without numatune; node 1 idle",
        2,
        8,
        2,
        "adjacent",
        tuple(domains),
    )


def _offline() -> TopoScenario:
    everywhere = frozenset(range(32))
    domains = tuple(
        _domain(f"vm{i:02d}", [60.0, 60.0], "strict" if i < 3 else "none", i % 2, [everywhere] * 2)
        for i in range(8)
    )
    return TopoScenario(
        "t32-offline",
        "2x8x2 (threads N and N+16); 8 guests x 2 vCPUs at 60%, unpinned, memory alternating"
        " between the nodes (3 strict); CPUs 2 and 9 go offline at cycle 20",
        2,
        8,
        2,
        "split",
        domains,
        offline=((20.0, 2), (20.0, 9)),
    )


def _noisy() -> TopoScenario:
    """Noise and bursts on a host with nodes and threads: what must not move pins there."""
    everywhere = frozenset(range(32))
    loads: list[Load] = []
    for i in range(28):
        if i % 4 == 3:
            # Bursting to 90% every other interval, in two phases.
            loads.append(Load(((0.0, 90.0),), pattern=((90.0, 1.0), (0.0, 1.0)), offset=i % 8 // 4))
        else:
            loads.append(constant(45.0 if i % 2 == 0 else 30.0, noise=0.20 if i % 4 == 0 else 0.05))
    domains = tuple(
        TopoDomain(
            DomainSpec(f"vm{i:02d}", (loads[2 * i], loads[2 * i + 1]), (everywhere, everywhere)),
            "strict" if i % 3 == 0 else "none",
            frozenset({i % 2}),
        )
        for i in range(14)
    )
    return TopoScenario(
        "t32-noisy",
        "2x8x2 (threads N and N+1); 14 guests x 2 vCPUs, unpinned: 45% with ±20% noise, 30% with"
        " ±5%, and 90% bursts every other interval; memory alternating, a third strict; 2 L3"
        " groups per socket",
        2,
        8,
        2,
        "adjacent",
        domains,
        llc_per_socket=2,
        cycles=120,
    )


def _large() -> TopoScenario:
    """440 vCPUs on 128 logical CPUs, a mix of loads and memory placements, none pinned."""
    everywhere = frozenset(range(128))
    levels = (10.0, 20.0, 60.0, 10.0)
    domains = []
    for i in range(110):
        numatune = ("strict", "auto", "none", "none", "strict", "none")[i % 6]
        demands = [levels[(i + k) % 4] for k in range(4)]
        domains.append(_domain(f"vm{i:03d}", demands, numatune, i % 2, [everywhere] * 4))
    return TopoScenario(
        "t128-large",
        "2x32x2 (threads N and N+64); 110 guests x 4 vCPUs (10/20/60/10%), unpinned; a third"
        " strict, a sixth placement='auto', half without numatune, memory alternating",
        2,
        32,
        2,
        "split",
        tuple(domains),
        cycles=30,
    )


def _build() -> dict[str, TopoScenario]:
    cases = [
        _floating("t32-adjacent", 2, 8, 2, "adjacent", 6, 90.0, llc=2),
        _floating("t32-split", 2, 8, 2, "split", 6, 90.0),
        _overload(),
        _offline(),
        _noisy(),
        _large(),
    ]
    return {c.name: c for c in cases}


TOPO_SCENARIOS: dict[str, TopoScenario] = _build()
