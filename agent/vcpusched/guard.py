"""What the agent remembers of the host beyond loads, and the guardrails it draws from it.

`HostView` is fed every sample and every refused pin. It logs one line when pCPUs go offline
or come online, keeps the topology for the audit lines, keeps the policy off CPUs isolated from
the kernel's balancer unless `cpus` names them, and holds back a vCPU whose pin the host
refused (a parent cgroup's cpuset, typically) instead of retrying it every cycle.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from vcpusched.config import Config
from vcpusched.logs import event
from vcpusched.model import HostSample, Move, Snapshot, VcpuRef, format_cpus
from vcpusched.topology import Topology

log = logging.getLogger("vcpusched")


class HostView:
    def __init__(self) -> None:
        self.online: frozenset[int] | None = None
        self.topology = Topology()
        self.isolated: frozenset[int] = frozenset()
        self._isolated_logged: tuple[frozenset[int], frozenset[int]] | None = None
        # vCPUs whose last pin the host refused, and the pCPU it refused: left where they are
        # until the domain restarts, the online pCPUs change, or the config is reloaded.
        self.refused: dict[VcpuRef, int] = {}

    def see(self, sample: HostSample) -> None:
        """Take in a sample's online pCPUs, topology and isolated CPUs, logging changes."""
        online = frozenset(sample.pcpu_busy_ns)
        if self.online is None:
            log.info(event("topology", **sample.topology.summary()))
        elif online != self.online:
            # One line for the change; the topology that comes with it goes unsaid.
            if gone := self.online - online:
                log.warning(event("offline", cpus=format_cpus(gone)))
            if back := online - self.online:
                log.info(event("online", cpus=format_cpus(back)))
            # A refusal may have come from what changed (a cpuset losing an offline pCPU).
            self.refused.clear()
        elif sample.topology != self.topology:
            log.info(event("topology", **sample.topology.summary()))
        self.online = online
        self.topology = sample.topology
        self.isolated = sample.isolated

    def usable(self, config: Config) -> frozenset[int]:
        """The online pCPUs the policy may pin to: isolated ones only where `cpus` names them."""
        online = self.online or frozenset()
        named = config.cpus or frozenset()
        left_out = (self.isolated - named) & online
        if (self.isolated, left_out) != self._isolated_logged and self.isolated:
            self._isolated_logged = (self.isolated, left_out)
            log.info(
                event(
                    "isolated",
                    cpus=format_cpus(self.isolated),
                    unused=format_cpus(left_out) if left_out else None,
                )
            )
        return online - left_out

    def hold(self, snapshot: Snapshot, config: Config) -> Snapshot:
        """Mark excluded the vCPUs the policy must leave where they are: those whose pin was
        refused, and those pinned within isolated CPUs it may not use (someone put them
        there on purpose). Their load still counts where it runs."""
        unusable = self.isolated - (config.cpus or frozenset())

        def held(ref: VcpuRef, affinity: frozenset[int]) -> bool:
            return ref in self.refused or bool(affinity and affinity <= unusable)

        vcpus = tuple(
            replace(v, excluded=True) if not v.excluded and held(v.ref, v.affinity) else v
            for v in snapshot.vcpus
        )
        return replace(snapshot, vcpus=vcpus)

    def refuse(self, move: Move, error: str) -> None:
        """One line for a pin the host refused; the vCPU is held from now on."""
        if move.ref in self.refused:
            return
        self.refused[move.ref] = move.dst
        log.warning(
            event(
                "pin-failed",
                domain=move.ref.domain,
                vcpu=move.ref.vcpu,
                to=move.dst,
                error=error,
                excluded=1,
            )
        )

    def forget(self, domain: str | None = None) -> None:
        """Drop refusals: of one domain (gone, or restarted), or all (after a reload)."""
        if domain is None:
            self.refused.clear()
        else:
            for ref in [r for r in self.refused if r.domain == domain]:
                del self.refused[ref]

    def node_change(self, move: Move) -> str | None:
        """`0->1` when a move takes a vCPU to another node; None within a node, for a vCPU
        floating over several nodes, and wherever the topology does not know the nodes."""
        if not self.topology.multi_node:
            return None
        src = {self.topology.node_of(p) for p in move.src}
        dst = self.topology.node_of(move.dst)
        if len(src) != 1 or None in src or dst is None:
            return None
        (before,) = src
        return None if before == dst else f"{before}->{dst}"
