"""The small interface between the agent and a hypervisor, and its errors.

`vcpusched.libvirt_host` implements it over libvirt; the simulator implements it in memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from vcpusched.model import HostSample, VcpuRef


class HostError(Exception):
    """The hypervisor cannot be reached; the agent reconnects and carries on."""


class DomainGone(Exception):
    """The domain vanished between sampling and acting on it."""

    def __init__(self, ref: VcpuRef | str) -> None:
        self.domain = ref if isinstance(ref, str) else ref.domain
        super().__init__(f"domain {self.domain!r} is gone")
        self.ref = ref


class PinError(Exception):
    """The hypervisor refused a pin for a reason other than a lost connection or domain."""


@dataclass(frozen=True, slots=True)
class ThreadPins:
    """Where a domain's emulator thread and its iothreads (by id) may run."""

    emulator: frozenset[int]
    iothreads: Mapping[int, frozenset[int]] = field(default_factory=dict)

    def all_on(self, pcpus: frozenset[int]) -> bool:
        return self.emulator == pcpus and all(p == pcpus for p in self.iothreads.values())

    def moved_to(self, pcpus: frozenset[int]) -> ThreadPins:
        """The same threads, every one on `pcpus`."""
        return ThreadPins(pcpus, {iothread: pcpus for iothread in self.iothreads})


class Host(Protocol):
    def sample(self) -> HostSample:
        """Read the cumulative counters of every online pCPU and every running vCPU, with
        what the host says of its topology, isolated CPUs and domains' memory placement."""
        ...

    def pin(self, ref: VcpuRef, pcpus: frozenset[int]) -> None:
        """Restrict one vCPU to `pcpus`; raise DomainGone, PinError or HostError."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class ThreadHost(Host, Protocol):
    """A host that also pins a domain's emulator thread and iothreads (`pin_emulator`): the
    libvirt one and the simulator's flat host; the agent leaves them alone on any other."""

    def thread_pins(self, domain: str) -> ThreadPins:
        """Read where the domain's emulator thread and iothreads may run; raise DomainGone,
        PinError (the host cannot tell) or HostError."""
        ...

    def pin_threads(self, domain: str, pins: ThreadPins) -> None:
        """Pin the domain's emulator thread, and each iothread `pins` names, as it says;
        raise DomainGone, PinError or HostError."""
        ...
