"""The host's CPU topology and each domain's memory placement, parsed from libvirt's XML.

Pure: XML text in, frozen values out. Sources:
- the host: `virConnectGetCapabilities` (`host/topology/cells` for NUMA cells, their memory,
  distances and per-CPU socket, die, cluster, core and sibling threads; `host/cache/bank` for
  the cache groups). libvirt reads these per CPU from sysfs; its `host/cpu/topology` summary
  counts are not used, and nothing is ever derived from CPU numbers: the threads of a core are
  N and N+1 on some machines and N and N+cores on others, and only the per-CPU entries say.
- a domain: its XML (`<vcpu placement=>`, `<numatune>` with `<memory>` and `<memnode>`, and the
  guest NUMA cells of `<cpu><numa>`).

Units: CPU and node numbers are the kernel's (/sys/devices/system/cpu/cpuN, .../node/nodeN);
memory in KiB; cache sizes in bytes; distances as the firmware's SLIT gives them (10 = local).
libvirt 9.0 still lists an offline CPU, with made-up ids (core 0, itself its only sibling:
sysfs has no topology for it), so the host keeps only the online ones (`Topology.restricted`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property

# Memory modes that confine a domain's memory to its nodeset: its vCPUs belong on those nodes'
# CPUs ('restrictive' binds through the cgroup cpuset only, but binds all the same).
BINDING_MODES = frozenset({"strict", "restrictive"})
MEMORY_MODES = BINDING_MODES | {"preferred", "interleave"}

_SIZE_UNITS = {
    "b": 1,
    "bytes": 1,
    "kib": 1 << 10,
    "k": 1 << 10,
    "mib": 1 << 20,
    "m": 1 << 20,
    "gib": 1 << 30,
    "g": 1 << 30,
    "tib": 1 << 40,
    "t": 1 << 40,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}


class TopologyError(ValueError):
    """The XML does not say what libvirt's would; the message is one line naming the part."""


def parse_cpulist(text: str, what: str = "cpu list") -> frozenset[int]:
    """libvirt's and the kernel's list syntax: "0-3,8,^2" -> {0, 1, 3, 8}; "" -> empty."""
    include: set[int] = set()
    exclude: set[int] = set()
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        target = exclude if part.startswith("^") else include
        lo, sep, hi = part.lstrip("^").partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise TopologyError(f"{what}: invalid range {part!r} in {text.strip()!r}") from None
        if first < 0 or last < first:
            raise TopologyError(f"{what}: invalid range {part!r} in {text.strip()!r}")
        target.update(range(first, last + 1))
    return frozenset(include - exclude)


@dataclass(frozen=True, slots=True)
class Cpu:
    """One logical CPU (a hardware thread). Ids other than `id` are None where libvirt gave
    none; `core` is unique only within its socket and die, `siblings` is the whole core."""

    id: int
    node: int
    siblings: frozenset[int]
    socket: int | None = None
    die: int | None = None
    cluster: int | None = None
    core: int | None = None


@dataclass(frozen=True, slots=True)
class CacheBank:
    """One cache shared by `cpus` (`host/cache/bank`): libvirt lists level 3 and above."""

    level: int
    id: int
    cpus: frozenset[int]
    size: int  # bytes
    type: str = "both"


@dataclass(frozen=True, slots=True)
class Node:
    """One NUMA cell: its CPUs (the online ones libvirt lists), memory and distances."""

    id: int
    cpus: frozenset[int]
    memory_kib: int | None = None
    # Distance to each node, this one included (10 = local); empty where libvirt gave none.
    distances: Mapping[int, int] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Topology:
    """The host's CPUs grouped by node, core and last-level cache, as libvirt reports them.

    A CPU it does not list (offline, or a host that did not say) is unknown: `node_of` and
    `cache_group_of` give None for it and `siblings_of` the CPU alone. `Topology()` knows
    nothing; `Topology.flat(cpus)` is one node of single-thread cores sharing no cache.
    """

    cpu_list: tuple[Cpu, ...] = ()
    node_list: tuple[Node, ...] = ()
    caches: tuple[CacheBank, ...] = ()

    @classmethod
    def flat(cls, cpus: Iterable[int]) -> Topology:
        ids = frozenset(cpus)
        return cls(
            cpu_list=tuple(Cpu(id=c, node=0, siblings=frozenset((c,))) for c in sorted(ids)),
            node_list=(Node(id=0, cpus=ids),),
        )

    def restricted(self, cpus: Iterable[int]) -> Topology:
        """The same host seen through `cpus` (the online ones): every other CPU unknown."""
        keep = frozenset(cpus)
        return Topology(
            cpu_list=tuple(
                replace(c, siblings=c.siblings & keep) for c in self.cpu_list if c.id in keep
            ),
            node_list=tuple(replace(n, cpus=n.cpus & keep) for n in self.node_list),
            caches=tuple(replace(b, cpus=b.cpus & keep) for b in self.caches if b.cpus & keep),
        )

    @cached_property
    def cpus(self) -> Mapping[int, Cpu]:
        return {c.id: c for c in self.cpu_list}

    @cached_property
    def nodes(self) -> Mapping[int, frozenset[int]]:
        """Node id -> its CPUs."""
        return {n.id: n.cpus for n in self.node_list}

    @cached_property
    def cores(self) -> tuple[frozenset[int], ...]:
        """The hardware threads of each core, one set per core, in order of their first CPU."""
        seen: dict[frozenset[int], None] = {}
        for cpu in sorted(self.cpu_list, key=lambda c: min(c.siblings)):
            seen.setdefault(cpu.siblings, None)
        return tuple(seen)

    @cached_property
    def _llc(self) -> Mapping[int, frozenset[int]]:
        out: dict[int, tuple[int, frozenset[int]]] = {}
        for bank in self.caches:
            for cpu in bank.cpus:
                if cpu not in out or bank.level > out[cpu][0]:
                    out[cpu] = (bank.level, bank.cpus)
        return {cpu: cpus for cpu, (_, cpus) in out.items()}

    @property
    def multi_node(self) -> bool:
        return len(self.node_list) > 1

    @property
    def threads_per_core(self) -> int:
        return max((len(c) for c in self.cores), default=1)

    def node_of(self, cpu: int) -> int | None:
        known = self.cpus.get(cpu)
        return None if known is None else known.node

    def siblings_of(self, cpu: int) -> frozenset[int]:
        """The threads of `cpu`'s core, `cpu` included."""
        known = self.cpus.get(cpu)
        return frozenset((cpu,)) if known is None else known.siblings

    def cache_group_of(self, cpu: int) -> frozenset[int] | None:
        """The CPUs sharing `cpu`'s last-level cache; None where no cache bank lists it."""
        return self._llc.get(cpu)

    def distance(self, a: int, b: int) -> int | None:
        for node in self.node_list:
            if node.id == a:
                return node.distances.get(b)
        return None

    def cpus_of_nodes(self, nodes: Iterable[int]) -> frozenset[int]:
        out: set[int] = set()
        for n in nodes:
            out |= self.nodes.get(n, frozenset())
        return frozenset(out)

    def summary(self) -> dict[str, object]:
        """Fields for one log line: "nodes=0:0-7,16-23/1:8-15,24-31 cores=16 threads=2 llc=2"."""
        return {
            "nodes": "/".join(f"{n.id}:{format_cpus(n.cpus)}" for n in self.node_list) or "unknown",
            "cores": len(self.cores),
            "threads": self.threads_per_core,
            "llc": len({frozenset(g) for g in self._llc.values()}) or None,
        }


def format_cpus(cpus: frozenset[int] | set[int]) -> str:
    """Render a pCPU set the way libvirt and taskset do: "0-3,8"."""
    out: list[str] = []
    ordered = sorted(cpus)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out) if out else "none"


def _xml(text: str, what: str) -> ET.Element:
    try:
        return ET.fromstring(text)
    except ET.ParseError as exc:
        raise TopologyError(f"{what}: not XML ({exc})") from None


def _int(elem: ET.Element, attr: str, where: str, default: int | None = None) -> int:
    raw = elem.get(attr)
    if raw is None:
        if default is not None:
            return default
        raise TopologyError(f"{where}: missing {attr}")
    try:
        return int(raw)
    except ValueError:
        raise TopologyError(f"{where}: {attr} must be an integer, got {raw!r}") from None


def _opt_int(elem: ET.Element, attr: str, where: str) -> int | None:
    return None if elem.get(attr) is None else _int(elem, attr, where)


def _size(value: str, unit: str, where: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise TopologyError(f"{where}: size must be an integer, got {value!r}") from None
    scale = _SIZE_UNITS.get(unit.lower())
    if scale is None:
        raise TopologyError(f"{where}: unknown unit {unit!r}")
    return number * scale


def parse_capabilities(text: str) -> Topology:
    """The topology in a `virConnectGetCapabilities` document. Raises TopologyError."""
    root = _xml(text, "capabilities")
    if root.tag != "capabilities":
        raise TopologyError(f"capabilities: root element is <{root.tag}>, not <capabilities>")
    host = root.find("host")
    if host is None:
        raise TopologyError("capabilities: no <host> element")
    cpus: dict[int, Cpu] = {}
    nodes: list[Node] = []
    for cell in host.findall("topology/cells/cell"):
        node_id = _int(cell, "id", "capabilities: <cell>")
        where = f"capabilities: cell {node_id}"
        if any(n.id == node_id for n in nodes):
            raise TopologyError(f"{where}: listed twice")
        members: set[int] = set()
        for entry in cell.findall("cpus/cpu"):
            cpu_id = _int(entry, "id", f"{where}: <cpu>")
            cwhere = f"{where}: cpu {cpu_id}"
            if cpu_id in cpus:
                raise TopologyError(f"{cwhere}: also in cell {cpus[cpu_id].node}")
            raw = entry.get("siblings")
            siblings = frozenset((cpu_id,)) if raw is None else parse_cpulist(raw, cwhere)
            if cpu_id not in siblings:
                raise TopologyError(f"{cwhere}: siblings {raw!r} do not include it")
            cpus[cpu_id] = Cpu(
                id=cpu_id,
                node=node_id,
                siblings=siblings,
                socket=_opt_int(entry, "socket_id", cwhere),
                die=_opt_int(entry, "die_id", cwhere),
                cluster=_opt_int(entry, "cluster_id", cwhere),
                core=_opt_int(entry, "core_id", cwhere),
            )
            members.add(cpu_id)
        memory = cell.find("memory")
        memory_kib = None
        if memory is not None and memory.text:
            memory_kib = _size(memory.text.strip(), memory.get("unit", "KiB"), where) // 1024
        distances = {
            _int(s, "id", f"{where}: distance"): _int(s, "value", f"{where}: distance")
            for s in cell.findall("distances/sibling")
        }
        nodes.append(Node(node_id, frozenset(members), memory_kib, distances))
    for cpu in cpus.values():
        # A sibling listed in another cell, or with other siblings, is not libvirt's output.
        for other in cpu.siblings & cpus.keys():
            if cpus[other].node != cpu.node or cpus[other].siblings != cpu.siblings:
                raise TopologyError(
                    f"capabilities: cpu {cpu.id} and its sibling {other} disagree about their core"
                )
    caches = []
    for bank in host.findall("cache/bank"):
        where = f"capabilities: cache bank {bank.get('id')!r} level {bank.get('level')!r}"
        caches.append(
            CacheBank(
                level=_int(bank, "level", where),
                id=_int(bank, "id", where),
                cpus=parse_cpulist(bank.get("cpus", ""), where),
                size=_size(bank.get("size", "0"), bank.get("unit", "B"), where),
                type=bank.get("type", "both"),
            )
        )
    return Topology(
        cpu_list=tuple(sorted(cpus.values(), key=lambda c: c.id)),
        node_list=tuple(sorted(nodes, key=lambda n: n.id)),
        caches=tuple(caches),
    )


def parse_isolated(isolated: str, nohz_full: str | None = None) -> frozenset[int]:
    """CPUs kept from the kernel's load balancer, from the text of sysfs `cpu/isolated`
    (`isolcpus=`) and `cpu/nohz_full` (`nohz_full=`; absent without CONFIG_NO_HZ_FULL, and
    "(null)" on some kernels built with it but booted without)."""
    cpus = parse_cpulist(isolated, "isolated")
    text = (nohz_full or "").strip()
    if text and text != "(null)":
        cpus |= parse_cpulist(text, "nohz_full")
    return cpus


@dataclass(frozen=True, slots=True)
class MemNode:
    """A `<memnode>`: where the memory of one guest NUMA cell is bound."""

    cell: int
    mode: str
    nodeset: frozenset[int]


@dataclass(frozen=True)
class MemoryPlacement:
    """Where a domain's memory is (may be) placed, from its XML.

    `mode` is the `<numatune><memory>` mode, None without one; `nodeset` its host nodes, None
    when libvirt chooses them at start (`placement='auto'`, also implied by `<vcpu
    placement='auto'>`) and they are not yet known. `cells` maps each guest NUMA cell to its
    vCPUs, for the `memnodes` that bind one cell's memory elsewhere. `resident` is not in the
    XML: it is read from the QEMU process (`parse_numa_maps`).
    """

    mode: str | None = None
    nodeset: frozenset[int] | None = None
    auto: bool = False
    memnodes: tuple[MemNode, ...] = ()
    cells: tuple[tuple[int, frozenset[int]], ...] = ()
    # The node that holds most of its memory, as the kernel reports it (`resident_node`),
    # where no one-node nodeset says; None when unknown or spread over nodes.
    resident: int | None = None

    @property
    def binding(self) -> bool:
        """Whether some of its memory cannot follow its vCPUs to another node."""
        return (self.mode in BINDING_MODES and self.nodeset is not None) or any(
            m.mode in BINDING_MODES for m in self.memnodes
        )

    def nodes_for(self, vcpu: int) -> frozenset[int] | None:
        """The host nodes a vCPU's memory is bound to (strict or restrictive), else None."""
        for cell, vcpus in self.cells:
            if vcpu in vcpus:
                for memnode in self.memnodes:
                    if memnode.cell == cell and memnode.mode in BINDING_MODES:
                        return memnode.nodeset
        if self.mode in BINDING_MODES:
            return self.nodeset
        return None

    def allowed_cpus(self, vcpu: int, topology: Topology) -> frozenset[int] | None:
        """The pCPUs a vCPU may be pinned to without leaving its bound memory; None when its
        memory does not bind it, or the topology knows no CPU of those nodes (unknown nodes,
        or memory-only ones: then no pCPU is nearer to it than another)."""
        nodes = self.nodes_for(vcpu)
        if nodes is None:
            return None
        return topology.cpus_of_nodes(nodes) or None


def parse_memory_placement(text: str) -> MemoryPlacement:
    """The memory placement in a domain's XML (`virDomainGetXMLDesc`). Raises TopologyError."""
    root = _xml(text, "domain XML")
    if root.tag != "domain":
        raise TopologyError(f"domain XML: root element is <{root.tag}>, not <domain>")
    vcpu = root.find("vcpu")
    auto = vcpu is not None and vcpu.get("placement") == "auto"
    mode: str | None = None
    nodeset: frozenset[int] | None = None
    memnodes: list[MemNode] = []
    numatune = root.find("numatune")
    if numatune is not None:
        memory = numatune.find("memory")
        if memory is not None:
            mode = _mode(memory.get("mode"), "numatune memory")
            raw = memory.get("nodeset")
            # Without one, the placement is static when a nodeset is given, else the vCPUs'.
            placement = memory.get("placement") or (
                "static" if raw is not None or not auto else "auto"
            )
            if placement not in ("static", "auto"):
                raise TopologyError(f"numatune memory: unknown placement {placement!r}")
            if placement == "static" and raw is None:
                raise TopologyError("numatune memory: no nodeset and placement is not 'auto'")
            auto = placement == "auto"
            if raw is not None:
                nodeset = parse_cpulist(raw, "numatune memory nodeset")
        for entry in numatune.findall("memnode"):
            cell = _int(entry, "cellid", "numatune memnode")
            where = f"numatune memnode {cell}"
            raw = entry.get("nodeset")
            if raw is None:
                raise TopologyError(f"{where}: missing nodeset")
            memnodes.append(
                MemNode(cell, _mode(entry.get("mode"), where), parse_cpulist(raw, where))
            )
    if auto and mode is None:
        mode = "strict"  # libvirt's default for placement='auto' without a <memory> mode
    cells: list[tuple[int, frozenset[int]]] = []
    for guest_cell in root.findall("cpu/numa/cell"):
        cell_id = _int(guest_cell, "id", "guest NUMA cell", default=len(cells))
        vcpus = parse_cpulist(guest_cell.get("cpus", ""), f"guest NUMA cell {cell_id} cpus")
        cells.append((cell_id, vcpus))
    return MemoryPlacement(
        mode=mode, nodeset=nodeset, auto=auto, memnodes=tuple(memnodes), cells=tuple(cells)
    )


def _mode(raw: str | None, where: str) -> str:
    mode = raw or "strict"  # libvirt's default mode
    if mode not in MEMORY_MODES:
        raise TopologyError(f"{where}: unknown mode {mode!r}")
    return mode


# A node holds a domain's memory when it has more than this share of it; below, the memory is
# spread (interleaved, or split by a guest's own NUMA cells) and no node is nearer.
RESIDENT_SHARE = 0.5


def parse_numa_maps(text: str) -> dict[int, int]:
    """KiB of a process's memory on each node, from `/proc/PID/numa_maps`: every mapping's
    `N<node>=<pages>` times its `kernelpagesize_kB` (4 unless it says: huge pages say 2048)."""
    out: dict[int, int] = {}
    for line in text.splitlines():
        pages: list[tuple[int, int]] = []
        size = 4
        for token in line.split()[2:]:
            key, sep, value = token.partition("=")
            if not sep or not value.isdigit():
                continue
            if key == "kernelpagesize_kB":
                size = int(value)
            elif key[:1] == "N" and key[1:].isdigit():
                pages.append((int(key[1:]), int(value)))
        for node, count in pages:
            out[node] = out.get(node, 0) + count * size
    return out


def resident_node(kib: Mapping[int, int]) -> int | None:
    """The node holding more than RESIDENT_SHARE of this memory, else None."""
    total = sum(kib.values())
    if total <= 0:
        return None
    node, most = max(kib.items(), key=lambda item: (item[1], -item[0]))
    return node if most > RESIDENT_SHARE * total else None
