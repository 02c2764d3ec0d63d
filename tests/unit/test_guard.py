"""The agent's guardrails on the simulator and on a scripted libvirt connection: pCPUs going
offline and back, refused pins, isolated CPUs, and the node in audit lines. The same paths
run on the real lab in tests/e2e/test_hotplug.py and tests/lab/test_topology.py."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import libvirt
import pytest

from vcpusched import libvirt_host
from vcpusched.config import Config
from vcpusched.guard import HostView
from vcpusched.host import HostError, PinError
from vcpusched.libvirt_host import LibvirtHost, read_isolated
from vcpusched.model import HostSample, Move, VcpuRef
from vcpusched.service import Agent
from vcpusched.topology import Topology, TopologyError, parse_capabilities, parse_isolated
from vcpusched_sim.host import DomainSpec, SimHost, constant

FIXTURES = Path(__file__).parent / "fixtures"
TWO_NODES = parse_capabilities(
    "<capabilities><host><topology><cells>"
    "<cell id='0'><cpus><cpu id='0' socket_id='0' core_id='0' siblings='0'/></cpus></cell>"
    "<cell id='1'><cpus><cpu id='1' socket_id='1' core_id='0' siblings='1'/></cpus></cell>"
    "</cells></topology></host></capabilities>"
)


def lines(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().split(" ")[0] == event]


class Host(SimHost):
    """The simulator, with pCPU 1 able to go offline, refuse pins, or be isolated."""

    def __init__(self, domains: list[DomainSpec], topology: Topology | None = None) -> None:
        super().__init__(2, domains)
        self.offline: set[int] = set()
        self.refuse: set[int] = set()
        self.isolated: frozenset[int] = frozenset()
        self.attempts: Counter[VcpuRef] = Counter()
        if topology is not None:
            self.topology = topology

    def sample(self) -> HostSample:
        s = super().sample()
        busy = {p: ns for p, ns in s.pcpu_busy_ns.items() if p not in self.offline}
        return replace(s, pcpu_busy_ns=busy, isolated=self.isolated)

    def pin(self, ref: VcpuRef, pcpus: frozenset[int]) -> None:
        self.attempts[ref] += 1
        if pcpus & self.refuse:
            raise PinError(f"{ref}: Unable to write to 'cpuset.cpus': Permission denied")
        super().pin(ref, pcpus)


def guests(*pins: int, load: float = 20) -> list[DomainSpec]:
    return [DomainSpec(f"vm{i}", (constant(load),), (frozenset({p}),)) for i, p in enumerate(pins)]


def run(agent: Agent, host: Host, cycles: int) -> None:
    for _ in range(cycles):
        agent.step()
        host.tick(1.0)


def test_a_pcpu_offline_and_back_is_one_line_each_and_its_vcpus_move(
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = Host(guests(0, 0, 1, 1))
    agent = Agent(host, Config())
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        run(agent, host, 3)
        assert not lines(caplog, "move")
        host.offline.add(1)
        run(agent, host, 6)
        assert all(host.affinity(r) == {0} for r in host.running())
        host.offline.clear()
        run(agent, host, 4)
    assert lines(caplog, "offline") == ["offline cpus=1"]
    assert lines(caplog, "online") == ["online cpus=1"]
    moved = [m for m in lines(caplog, "move") if " from=1 to=0 " in m]
    assert sorted(m.split()[1] for m in moved) == ["domain=vm2", "domain=vm3"]
    assert lines(caplog, "topology") == ["topology nodes=0:0-1 cores=2 threads=1"]


def test_a_refused_pin_is_one_line_and_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    host = Host(guests(0, 0, 0, 0, load=40))
    host.refuse = {1}
    agent = Agent(host, Config())
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        run(agent, host, 30)
    failed = lines(caplog, "pin-failed")
    assert failed, "the policy never tried pCPU 1"
    assert all(m.endswith("excluded=1") and "Permission denied" in m for m in failed)
    assert len(failed) == len(set(failed)) == len(host.attempts)
    assert all(n == 1 for n in host.attempts.values()), host.attempts
    assert all(host.affinity(r) == {0} for r in host.running())
    # A reload lifts the exclusion: the host may allow it now (here it does).
    host.refuse = set()
    agent.reconfigure(Config())
    run(agent, host, 6)
    assert {host.affinity(r) for r in host.running()} == {frozenset({0}), frozenset({1})}


def test_a_refusal_is_forgotten_when_the_online_pcpus_change() -> None:
    host = Host(guests(0, 0, 0, 0, load=40))
    host.refuse = {1}
    agent = Agent(host, Config())
    run(agent, host, 30)
    assert agent.host_view.refused
    host.offline.add(1)
    run(agent, host, 1)
    assert not agent.host_view.refused


def test_isolated_cpus_are_used_only_when_cpus_names_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = Host(guests(0, 0, 0, 0, load=40))
    host.isolated = frozenset({1})
    agent = Agent(host, Config())
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        run(agent, host, 12)
    assert all(host.affinity(r) == {0} for r in host.running())
    assert lines(caplog, "isolated") == ["isolated cpus=1 unused=1"]
    assert not lines(caplog, "move")
    named = Agent(host, Config(cpus=frozenset({0, 1})))
    run(named, host, 6)
    assert any(host.affinity(r) == {1} for r in host.running())


def test_a_vcpu_pinned_within_isolated_cpus_stays_there() -> None:
    host = Host(guests(1, 0, 0, 0, load=40))
    host.isolated = frozenset({1})
    agent = Agent(host, Config())
    run(agent, host, 12)
    assert host.affinity(VcpuRef("vm0", 0)) == {1}
    assert host.pin_calls == 0


def test_moves_across_nodes_carry_the_node(caplog: pytest.LogCaptureFixture) -> None:
    host = Host(guests(0, 0, 0, 0, load=40), topology=TWO_NODES)
    agent = Agent(host, Config())
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        run(agent, host, 6)
    moves = lines(caplog, "move")
    assert moves
    assert all(" to=1 node=0->1 demand=" in m for m in moves), moves
    flat = Host(guests(0, 0, 0, 0, load=40))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        run(Agent(flat, Config()), flat, 6)
    assert lines(caplog, "move")
    assert not any("node=" in m for m in lines(caplog, "move"))


def test_node_change() -> None:
    view = HostView()
    split = parse_capabilities((FIXTURES / "caps-2s8c2t-split.xml").read_text())
    view.topology = split

    def move(src: set[int], dst: int) -> Move:
        return Move(VcpuRef("g", 0), frozenset(src), dst, 10.0, None, 10.0)

    assert view.node_change(move({0}, 8)) == "0->1"
    assert view.node_change(move({24}, 16)) == "1->0"
    assert view.node_change(move({0}, 16)) is None  # the sibling thread: same node
    assert view.node_change(move(set(range(32)), 8)) is None  # floating over both nodes
    assert view.node_change(move({40}, 8)) is None  # a CPU the topology does not know
    view.topology = Topology.flat(range(32))
    assert view.node_change(move({0}, 8)) is None


# -- isolated CPUs from sysfs ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("isolated", "nohz_full", "expected"),
    [
        ("\n", None, set()),
        ("2-3\n", None, {2, 3}),
        ("\n", "(null)\n", set()),
        ("", " (null)", set()),
        ("2\n", "4-5\n", {2, 4, 5}),
        ("", "\n", set()),
    ],
)
def test_parse_isolated(isolated: str, nohz_full: str | None, expected: set[int]) -> None:
    assert parse_isolated(isolated, nohz_full) == expected


def test_read_isolated(tmp_path: Path) -> None:
    assert read_isolated(tmp_path) == frozenset()  # no such files: nothing isolated
    (tmp_path / "isolated").write_text("1,3\n")
    assert read_isolated(tmp_path) == {1, 3}
    (tmp_path / "nohz_full").write_text("5\n")
    assert read_isolated(tmp_path) == {1, 3, 5}
    (tmp_path / "isolated").write_text("x\n")
    assert read_isolated(tmp_path) == frozenset()
    with pytest.raises(TopologyError, match="isolated: invalid range 'x'"):
        parse_isolated("x")


# -- LibvirtHost on a scripted connection ---------------------------------------------------

CAPS = (FIXTURES / "caps-2s8c2t-adjacent.xml").read_text()


class Conn:
    """Just what LibvirtHost.sample calls, with a CPU map the test changes."""

    def __init__(self) -> None:
        self.online = [True] * 32
        self.offline_during_stats: int | None = None
        self.caps_reads = 0

    def getCPUMap(self) -> tuple[int, list[bool], int]:
        return 32, list(self.online), sum(self.online)

    def getCapabilities(self) -> str:
        self.caps_reads += 1
        return CAPS

    def getCPUStats(self, cpu: int, flags: int) -> dict[str, int]:
        if cpu == self.offline_during_stats:
            self.online[cpu] = False
        if not self.online[cpu]:
            raise libvirt.libvirtError("Invalid cpuNum in virHostCPUGetStatsLinux")
        return {"kernel": 1, "user": 1}

    def getAllDomainStats(self, *args: Any) -> list[Any]:
        return []

    def isAlive(self) -> int:
        return 1

    def close(self) -> None:
        pass


def test_libvirt_host_follows_the_online_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    conn = Conn()
    monkeypatch.setattr(libvirt_host.libvirt, "open", lambda uri: conn)
    host = LibvirtHost("qemu+tcp://elsewhere/system")  # remote: no local sysfs read
    first = host.sample()
    assert set(first.pcpu_busy_ns) == set(range(32))
    assert first.topology.siblings_of(16) == {16, 17}
    assert conn.caps_reads == 1
    host.sample()
    assert conn.caps_reads == 1  # unchanged CPUs: the topology is not read again
    conn.online[17] = False
    second = host.sample()
    assert conn.caps_reads == 2
    assert 17 not in second.pcpu_busy_ns
    assert second.topology.siblings_of(16) == {16}
    assert second.topology.node_of(17) is None
    # A pCPU going offline between the map and its stats is skipped, not an outage.
    conn.offline_during_stats = 20
    third = host.sample()
    assert 20 not in third.pcpu_busy_ns
    assert host.connected
    assert third.isolated == frozenset()
    # A pCPU the map says is online but whose stats fail is a real failure.
    conn.offline_during_stats = None
    monkeypatch.setattr(conn, "getCPUStats", lambda cpu, flags: _raise())
    with pytest.raises(HostError, match="sampling failed"):
        host.sample()
    assert not host.connected


def _raise() -> dict[str, int]:
    raise libvirt.libvirtError("connection reset by peer")


def test_libvirt_host_without_a_readable_topology_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    conn = Conn()
    monkeypatch.setattr(conn, "getCapabilities", lambda: "<capabilities><host>")
    monkeypatch.setattr(libvirt_host.libvirt, "open", lambda uri: conn)
    host = LibvirtHost("qemu+tcp://elsewhere/system")
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        first = host.sample()
        conn.online[3] = False
        host.sample()
    assert first.topology == Topology()
    assert len(lines(caplog, "topology-unreadable")) == 1
