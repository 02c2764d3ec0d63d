"""The agent beside other work on the host: what the lab showed under low-priority load.

On the real lab, with other jobs (nice 5 and 19) keeping pCPU1 busy, the agent logged
`balanced pcpus=0-1 sd=0.0 util=100/100` with all four 40% guests still pinned to pCPU0
(tests/e2e/test_faults.py::test_libvirtd_killed_and_restarted, 2026-12-01). A pCPU full of
host work and no vCPU is "full" to the policy, so nothing moves there; but under a fair
scheduler a vCPU moved there from a pCPU it shares with three others gets more time, not
less, whatever the priority of that host work. The policy now counts host work as sharing
the pCPU fairly with the vCPUs moved beside it, not as a wall.
"""

from __future__ import annotations

from vcpusched.config import Config
from vcpusched.model import HostSample
from vcpusched.service import Agent
from vcpusched_sim.host import DomainSpec, Load, SimHost, constant

HOST_WORK = {1: 100.0}  # percent of pCPU1 taken by work that is no guest's


class _BusyHost(SimHost):
    """A SimHost whose pCPUs also run host work: it shows in their busy time only."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.extra_ns = dict.fromkeys(self.pcpus, 0.0)

    def tick(self, seconds: float):  # type: ignore[no-untyped-def]
        stats = super().tick(seconds)
        for pcpu, share in HOST_WORK.items():
            self.extra_ns[pcpu] += share / 100 * seconds * 1e9
        return stats

    def sample(self) -> HostSample:
        sample = super().sample()
        busy = {p: ns + int(self.extra_ns[p]) for p, ns in sample.pcpu_busy_ns.items()}
        return HostSample(sample.clock, busy, sample.vcpus)


def test_vcpus_piled_on_one_pcpu_spread_beside_host_work() -> None:
    pcpu0 = frozenset({0})
    host = _BusyHost(2, [DomainSpec(f"vm{i}", (constant(40),), (pcpu0,)) for i in range(4)])
    agent = Agent(host, Config())
    for _ in range(30):
        host.tick(1.0)
        agent.step()
    # Four vCPUs of 40% share pCPU0 (25% each); one on pCPU1 would get half of it at worst.
    on_pcpu0 = sum(1 for ref in host.running() if host.affinity(ref) == pcpu0)
    assert on_pcpu0 < 4, "all four vCPUs left on pCPU0"


def test_a_known_vcpus_old_burst_does_not_hold_guesses_off_its_pcpu() -> None:
    """Four 40% guests piled on pCPU0 (each read short: its demand a bound, a guess) and an
    excluded guest on pCPU1 that burst to 100% in the first interval only. A guess must not
    push a known vCPU out of room; judged against that old burst, every move to pCPU1 was
    held for a whole window, and the agent logged `balanced sd=50.0 util=100/0`. A bound
    says what a vCPU may want now, so it is judged against the others' latest readings."""
    pcpu0, pcpu1 = frozenset({0}), frozenset({1})
    domains = [DomainSpec(f"vm{i}", (constant(40.0, noise=0.08),), (pcpu0,)) for i in range(4)]
    burst = Load(((0.0, 100.0),), pattern=((100.0, 2.0), (0.0, 1000.0)))
    domains.append(DomainSpec("other", (burst,), (pcpu1,)))
    host = SimHost(2, domains, seed=0)
    agent = Agent(host, Config(exclude=("other",)))
    agent.step()
    for _ in range(6):
        host.tick(2.0)
        agent.step()
    refs = [r for r in host.running() if r.domain != "other"]
    on_pcpu0 = sum(1 for r in refs if host.affinity(r) == pcpu0)
    assert on_pcpu0 == 2, {str(r): sorted(host.affinity(r)) for r in refs}
