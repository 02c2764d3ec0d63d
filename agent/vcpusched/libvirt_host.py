"""The `Host` interface over libvirt: the only module that imports libvirt.

A sample costs one bulk call for every domain's vCPU counters, one node-stats call per pCPU,
and at most PINS_PER_SAMPLE pin reads, whatever the number of domains. libvirt has no bulk
call for pins: they are read when a domain starts, tracked from our own pinVcpu calls, and
re-read a few domains per sample, stalest first, so that a pin someone else changes is seen
within one sample on a small host and within domains / PINS_PER_SAMPLE samples on any host.
A domain's memory placement is read from its XML along with its pins. Where no one-node
nodeset says where its memory is, on a local host with several NUMA nodes, the node that holds
it is read from its QEMU process (`/proc/PID/numa_maps`, the PID from libvirt's pidfile) when
the domain is first seen and every RESIDENT_EVERY seconds after: the kernel walks the page
tables to answer, so it is read rarely.

The online pCPUs are read every sample (`getCPUMap`, about 0.07 ms), and the topology
(`getCapabilities`) at connect and whenever they change: a pCPU going offline or coming
online is seen within one sample, and only online pCPUs are sampled.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import libvirt

from vcpusched.host import DomainGone, HostError, PinError, ThreadPins
from vcpusched.logs import event
from vcpusched.model import HostSample, VcpuCounters, VcpuRef
from vcpusched.topology import (
    MemoryPlacement,
    Topology,
    TopologyError,
    parse_capabilities,
    parse_cpulist,
    parse_isolated,
    parse_memory_placement,
    parse_numa_maps,
    resident_node,
)

log = logging.getLogger(__name__)

PINS_PER_SAMPLE = 4
# Seconds between reads of where a domain's memory is: memory moves between nodes only when
# the kernel's NUMA balancing moves it, and then toward the vCPUs the agent placed.
RESIDENT_EVERY = 600.0
# Where the system libvirtd keeps each running QEMU guest's pidfile (NAME.pid).
QEMU_RUN = Path("/run/libvirt/qemu")
# Bytes of numa_maps read at most: a QEMU process has some hundreds of mappings, a line each.
NUMA_MAPS_LIMIT = 4 << 20

T = TypeVar("T")

# The domain is gone, or no longer running: skip it, the next sample will not list it.
_GONE = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)


def _ignore_libvirt_errors(_ctx: object, _err: object) -> None:
    # libvirt prints every error to stderr by default; ours are handled and logged once.
    pass


libvirt.registerErrorHandler(_ignore_libvirt_errors, None)


@dataclass(slots=True)
class _Domain:
    handle: Any
    run_id: int
    pins: list[frozenset[int]]
    memory: MemoryPlacement
    age: int = 0
    resident_at: float = -math.inf  # monotonic time of the last read of `memory.resident`


SYSFS_CPU = Path("/sys/devices/system/cpu")


def read_isolated(root: Path = SYSFS_CPU) -> frozenset[int]:
    """This machine's isolated CPUs (see `topology.parse_isolated`); none where unreadable."""
    try:
        isolated = (root / "isolated").read_text()
    except OSError:
        return frozenset()
    try:
        nohz_full: str | None = (root / "nohz_full").read_text()
    except OSError:
        nohz_full = None
    try:
        return parse_isolated(isolated, nohz_full)
    except TopologyError as exc:
        log.warning(event("isolated-unreadable", error=str(exc)))
        return frozenset()


def read_resident(name: str, run: Path = QEMU_RUN, proc: Path = Path("/proc")) -> int | None:
    """The node holding most of a running guest's memory (`topology.resident_node`), from its
    QEMU process; None where that cannot be read (not root, not the system libvirtd, gone)."""
    try:
        pid = int((run / f"{name}.pid").read_text().strip())
        with (proc / str(pid) / "numa_maps").open(encoding="ascii", errors="replace") as f:
            text = f.read(NUMA_MAPS_LIMIT)
    except (OSError, ValueError):
        return None
    return resident_node(parse_numa_maps(text))


def _cpuset(flags: tuple[bool, ...] | list[bool]) -> frozenset[int]:
    return frozenset(i for i, on in enumerate(flags) if on)


class LibvirtHost:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: Any = None
        self._host_cpus = 0
        self._online: frozenset[int] = frozenset()
        self._topology = Topology()
        self._topology_read = False
        self._topology_error: str | None = None
        # sysfs tells about this machine only: a remote libvirtd's isolated CPUs are unknown.
        self._local = not urlsplit(uri).netloc
        # Guests' memory is read from their QEMU processes on this machine's system libvirtd.
        self._own_guests = self._local and urlsplit(uri).path.rstrip("/") == "/system"
        self._isolated: frozenset[int] = frozenset()
        self._domains: dict[str, _Domain] = {}

    def _connect(self) -> Any:
        if self._conn is not None:
            return self._conn
        try:
            conn = libvirt.open(self.uri)
            # A restarted libvirtd may run on a changed host: read its topology afresh.
            self._topology_read = False
            self._read_cpus(conn)
        except libvirt.libvirtError as exc:
            raise HostError(f"cannot connect to {self.uri}: {exc.get_error_message()}") from None
        self._conn = conn
        self._domains.clear()
        return conn

    def _read_cpus(self, conn: Any) -> None:
        """The online pCPUs, and the topology when they changed since it was last read."""
        host_cpus, online, _ = conn.getCPUMap()
        now = _cpuset(online)
        if now != self._online or not self._topology_read:
            try:
                self._topology = parse_capabilities(conn.getCapabilities()).restricted(now)
                self._topology_error = None
            except TopologyError as exc:
                # Balancing does not need the topology: carry on without, and say so once.
                if str(exc) != self._topology_error:
                    log.warning(event("topology-unreadable", uri=self.uri, error=str(exc)))
                self._topology_error = str(exc)
                self._topology = Topology()
            self._topology_read = True
            if self._local:
                self._isolated = read_isolated()
        self._host_cpus = host_cpus
        self._online = now

    @property
    def topology(self) -> Topology:
        """The topology as of the last sample (or connect)."""
        return self._topology

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def close(self) -> None:
        conn, self._conn = self._conn, None
        self._domains.clear()
        if conn is not None:
            # Closing a connection whose daemon is gone cannot fail usefully.
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def _lost(self, what: str, exc: libvirt.libvirtError) -> HostError:
        self.close()
        return HostError(f"{what}: {exc.get_error_message()}")

    def sample(self) -> HostSample:
        conn = self._connect()
        try:
            self._read_cpus(conn)
            busy: dict[int, int] = {}
            idle: dict[int, int] = {}
            for pcpu in sorted(self._online):
                try:
                    stats = conn.getCPUStats(pcpu, 0)
                except libvirt.libvirtError:
                    # Gone offline since the map was read: sample the others.
                    self._read_cpus(conn)
                    if pcpu in self._online:
                        raise
                    continue
                busy[pcpu] = int(stats.get("kernel", 0)) + int(stats.get("user", 0))
                if "idle" in stats:
                    idle[pcpu] = int(stats["idle"]) + int(stats.get("iowait", 0))
            clock = time.monotonic()
            records = self._domain_stats(conn)
        except libvirt.libvirtError as exc:
            raise self._lost("sampling failed", exc) from None
        vcpus: dict[VcpuRef, VcpuCounters] = {}
        seen: set[str] = set()
        stalest = sorted(self._domains, key=lambda n: -self._domains[n].age)
        refresh = set(stalest[:PINS_PER_SAMPLE])
        for handle, stats in records:
            try:
                name = handle.name()
                domain = self._track(name, handle, name in refresh)
                if domain is None:
                    continue
                seen.add(name)
                counters = self._counters(handle, stats, domain)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() in _GONE:
                    continue
                raise self._lost("sampling failed", exc) from None
            for vcpu, value in enumerate(counters):
                vcpus[VcpuRef(name, vcpu)] = value
        for name in set(self._domains) - seen:
            del self._domains[name]
        return HostSample(
            clock=clock,
            pcpu_busy_ns=busy,
            pcpu_idle_ns=idle,
            vcpus=vcpus,
            topology=self._topology,
            memory={name: self._domains[name].memory for name in seen},
            isolated=self._isolated,
        )

    @staticmethod
    def _domain_stats(conn: Any) -> list[tuple[Any, dict[str, Any]]]:
        # A domain that stops while the bulk call walks the list can fail the whole call;
        # asking again gets the list without it.
        attempts = 3
        while True:
            try:
                records: list[tuple[Any, dict[str, Any]]] = conn.getAllDomainStats(
                    libvirt.VIR_DOMAIN_STATS_VCPU,
                    libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE,
                )
                return records
            except libvirt.libvirtError as exc:
                attempts -= 1
                if exc.get_error_code() not in _GONE or not attempts:
                    raise

    def _track(self, name: str, handle: Any, refresh: bool) -> _Domain | None:
        run_id = handle.ID()
        domain = self._domains.get(name)
        if domain is None or domain.run_id != run_id or refresh:
            pins = [_cpuset(p) for p in handle.vcpuPinInfo(0)]
            fresh = domain is None or domain.run_id != run_id
            memory = self._memory(name, handle, warn=fresh)
            resident_at = -math.inf
            if domain is not None and not fresh:
                memory = replace(memory, resident=domain.memory.resident)
                resident_at = domain.resident_at
            if self._reads_resident(memory) and time.monotonic() - resident_at >= RESIDENT_EVERY:
                memory = replace(memory, resident=read_resident(name))
                resident_at = time.monotonic()
            domain = _Domain(
                handle=handle, run_id=run_id, pins=pins, memory=memory, resident_at=resident_at
            )
            self._domains[name] = domain
        domain.handle = handle
        domain.age += 1
        return domain

    def _reads_resident(self, memory: MemoryPlacement) -> bool:
        """Whether where this domain's memory is matters and can be read: one node says
        nothing, and a one-node nodeset says it all."""
        one_node = memory.nodeset is not None and len(memory.nodeset) == 1
        return self._own_guests and self._topology.multi_node and not one_node

    @staticmethod
    def _memory(name: str, handle: Any, warn: bool) -> MemoryPlacement:
        """The domain's memory placement from its live XML (and, where libvirt chose the
        nodes at start, from its NUMA parameters)."""
        try:
            placement = parse_memory_placement(handle.XMLDesc(0))
        except TopologyError as exc:
            if warn:
                log.warning(event("memory-unreadable", domain=name, error=str(exc)))
            return MemoryPlacement()
        if placement.auto and placement.nodeset is None:
            try:
                chosen = str(handle.numaParameters(0).get("numa_nodeset", ""))
                nodeset = parse_cpulist(chosen, "numa_nodeset")
            except (libvirt.libvirtError, TopologyError):
                return placement  # not known yet: it binds nothing we can tell
            if nodeset:
                placement = replace(placement, nodeset=nodeset)
        return placement

    def _counters(self, handle: Any, stats: dict[str, Any], domain: _Domain) -> list[VcpuCounters]:
        count = stats.get("vcpu.current")
        if count is None:
            # Drivers without bulk vCPU stats (libvirt's test driver): ask the domain itself.
            info, maps = handle.vcpus()
            domain.pins = [_cpuset(m) for m in maps]
            return [
                VcpuCounters(time_ns=int(i[2]), wait_ns=None, affinity=domain.pins[i[0]])
                for i in info
            ]
        out = []
        for vcpu in range(int(count)):
            time_ns = stats.get(f"vcpu.{vcpu}.time")
            if time_ns is None or vcpu >= len(domain.pins):
                continue
            delay = stats.get(f"vcpu.{vcpu}.delay")
            out.append(
                VcpuCounters(
                    time_ns=int(time_ns),
                    wait_ns=None if delay is None else int(delay),
                    affinity=domain.pins[vcpu],
                )
            )
        return out

    def pin(self, ref: VcpuRef, pcpus: frozenset[int]) -> None:
        cpumap = tuple(i in pcpus for i in range(self._host_cpus))
        self._on_domain(ref.domain, lambda handle: handle.pinVcpu(ref.vcpu, cpumap), ref)
        domain = self._domains.get(ref.domain)
        if domain is not None and ref.vcpu < len(domain.pins):
            domain.pins[ref.vcpu] = pcpus

    def thread_pins(self, domain: str) -> ThreadPins:
        def read(handle: Any) -> ThreadPins:
            return ThreadPins(_cpuset(handle.emulatorPinInfo(0)), self._iothreads(handle))

        pins: ThreadPins = self._on_domain(domain, read)
        return pins

    def pin_threads(self, domain: str, pins: ThreadPins) -> None:
        def cpumap(pcpus: frozenset[int]) -> tuple[bool, ...]:
            return tuple(i in pcpus for i in range(self._host_cpus))

        def pin(handle: Any) -> None:
            handle.pinEmulator(cpumap(pins.emulator), 0)
            for iothread, pcpus in sorted(pins.iothreads.items()):
                handle.pinIOThread(iothread, cpumap(pcpus), 0)

        self._on_domain(domain, pin)

    @staticmethod
    def _iothreads(handle: Any) -> dict[int, frozenset[int]]:
        try:
            info = handle.ioThreadInfo(0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
                return {}  # a driver without iothreads
            raise
        return {int(iothread): _cpuset(cpumap) for iothread, cpumap in info}

    def _on_domain(self, name: str, call: Callable[[Any], T], ref: VcpuRef | None = None) -> T:
        """`call(handle)` on a running domain, its errors told apart: the domain gone, the
        connection lost, or a refusal (a cgroup cpuset, a driver that cannot)."""
        conn = self._connect()
        domain = self._domains.get(name)
        try:
            handle = domain.handle if domain else conn.lookupByName(name)
            return call(handle)
        except libvirt.libvirtError as exc:
            what = str(ref) if ref is not None else name
            code = exc.get_error_code()
            if code in _GONE:
                self._domains.pop(name, None)
                raise DomainGone(ref or name) from None
            if code in (
                libvirt.VIR_ERR_INVALID_ARG,
                libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
                libvirt.VIR_ERR_NO_SUPPORT,
            ):
                raise PinError(f"{what}: {exc.get_error_message()}") from None
            try:
                alive = conn.isAlive() == 1
            except libvirt.libvirtError:
                alive = False
            if not alive:
                raise self._lost("pinning failed", exc) from None
            raise PinError(f"{what}: {exc.get_error_message()}") from None
