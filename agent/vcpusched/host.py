"""The small interface between the agent and a hypervisor, and its errors.

`vcpusched.libvirt_host` implements it over libvirt; the simulator implements it in memory.
"""

from __future__ import annotations

from typing import Protocol

from vcpusched.model import HostSample, VcpuRef


class HostError(Exception):
    """The hypervisor cannot be reached; the agent reconnects and carries on."""


class DomainGone(Exception):
    """The domain vanished between sampling and acting on it."""

    def __init__(self, ref: VcpuRef) -> None:
        super().__init__(f"domain {ref.domain!r} is gone")
        self.ref = ref


class PinError(Exception):
    """The hypervisor refused a pin for a reason other than a lost connection or domain."""


class Host(Protocol):
    def sample(self) -> HostSample:
        """Read the cumulative counters of every online pCPU and every running vCPU, with
        what the host says of its topology, isolated CPUs and domains' memory placement."""
        ...

    def pin(self, ref: VcpuRef, pcpus: frozenset[int]) -> None:
        """Restrict one vCPU to `pcpus`; raise DomainGone, PinError or HostError."""
        ...

    def close(self) -> None: ...
