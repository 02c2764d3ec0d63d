"""Each domain's emulator thread and iothreads follow its vCPUs to their NUMA nodes.

With `pin_emulator: node`, once a domain's vCPUs are placed (each pinned to one pCPU), its
emulator thread and iothreads are pinned to the CPUs of the nodes those vCPUs run on, within
the pCPUs the agent may use (`cpus`, online, not isolated). The agent remembers the set it
settled for each domain and acts again only when that set changes: it costs one read when it
does, and a pin only where the threads are elsewhere; and a pin someone else gives the threads
meanwhile is not undone every cycle. The libvirt calls are in `vcpusched.libvirt_host`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from vcpusched.host import DomainGone, PinError, ThreadHost, ThreadPins
from vcpusched.logs import event
from vcpusched.model import VcpuRef, format_cpus
from vcpusched.topology import Topology

log = logging.getLogger("vcpusched")


def home_cpus(
    affinities: list[frozenset[int]], topology: Topology, allowed: frozenset[int]
) -> tuple[frozenset[int], frozenset[int]] | None:
    """The nodes a placed domain's vCPUs run on and the allowed CPUs of those nodes; None while
    a vCPU floats, or where the topology does not know a pCPU's node."""
    if not affinities or any(len(a) != 1 for a in affinities):
        return None
    nodes = {topology.node_of(p) for a in affinities for p in a}
    known = frozenset(n for n in nodes if n is not None)
    if len(known) != len(nodes):
        return None
    cpus = topology.cpus_of_nodes(known) & allowed
    return (known, cpus) if cpus else None


class EmulatorPins:
    """What the agent did to emulator threads: the set settled per domain, and the pins the
    threads had before its first change (for `restore_on_exit`)."""

    def __init__(self) -> None:
        self.settled: dict[str, frozenset[int]] = {}
        self.original: dict[str, ThreadPins] = {}

    def forget(self, domain: str | None = None) -> None:
        """Settle again (after a reload), or drop a domain that is gone."""
        if domain is None:
            self.settled.clear()
            return
        self.settled.pop(domain, None)
        self.original.pop(domain, None)

    def follow(
        self,
        host: ThreadHost,
        pins: Mapping[VcpuRef, frozenset[int]],
        topology: Topology,
        allowed: frozenset[int],
        excluded: Callable[[str], bool],
        dry_run: bool = False,
    ) -> int:
        """Pin the threads of every managed domain whose nodes' CPUs changed, given its vCPUs'
        pins after this cycle. Returns how many pins the host refused (one line each)."""
        by_domain: dict[str, list[frozenset[int]]] = {}
        for ref, affinity in pins.items():
            by_domain.setdefault(ref.domain, []).append(affinity)
        refused = 0
        for domain, affinities in sorted(by_domain.items()):
            home = None if excluded(domain) else home_cpus(affinities, topology, allowed)
            if home is None or self.settled.get(domain) == home[1]:
                continue
            nodes, cpus = home
            # Settled before the calls: a refusal is not tried again every cycle.
            self.settled[domain] = cpus
            try:
                now = host.thread_pins(domain)
                if now.all_on(cpus):
                    continue
                if not dry_run:
                    host.pin_threads(domain, now.moved_to(cpus))
                    self.original.setdefault(domain, now)
            except DomainGone:
                continue
            except PinError as exc:
                refused += 1
                log.error(
                    event("emulator-failed", domain=domain, to=format_cpus(cpus), error=str(exc))
                )
                continue
            log.info(
                event(
                    "emulator",
                    domain=domain,
                    **{"from": format_cpus(now.emulator)},
                    to=format_cpus(cpus),
                    node=format_cpus(nodes),
                    iothreads=len(now.iothreads) or None,
                    dry_run=1 if dry_run else None,
                )
            )
        return refused

    def restore(self, host: ThreadHost) -> int:
        """Put back the pins the threads had before the agent's first change; returns how
        many the host refused."""
        refused = 0
        for domain, pins in sorted(self.original.items()):
            try:
                host.pin_threads(domain, pins)
            except DomainGone:
                continue
            except PinError as exc:
                refused += 1
                log.error(event("restore-failed", domain=domain, emulator=1, error=str(exc)))
                continue
            log.info(
                event(
                    "emulator",
                    domain=domain,
                    to=format_cpus(pins.emulator),
                    iothreads=len(pins.iothreads) or None,
                    reason="restore",
                )
            )
        self.original.clear()
        self.settled.clear()
        return refused
