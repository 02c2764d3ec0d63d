"""Emulator threads and iothreads follow their domain's vCPUs (`pin_emulator: node`).

On the simulator with a two-socket host read from a capabilities fixture (the lab has one
node), and through the real libvirt module on libvirt's test driver, whose default host has
two cells; the real lab's e2e test reads emulatorPinInfo from outside the agent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from vcpusched.config import Config, validate
from vcpusched.emulator import home_cpus
from vcpusched.host import PinError, ThreadPins
from vcpusched.libvirt_host import LibvirtHost
from vcpusched.model import VcpuRef
from vcpusched.service import Agent
from vcpusched.topology import Topology, parse_capabilities
from vcpusched_sim.host import DomainSpec, SimHost, constant

FIXTURES = Path(__file__).parent / "fixtures"
# Two sockets of 8 cores x 2 threads: node 0 is 0-7,16-23, node 1 is 8-15,24-31.
SPLIT = parse_capabilities((FIXTURES / "caps-2s8c2t-split.xml").read_text())
NODE0 = frozenset(range(8)) | frozenset(range(16, 24))
NODE1 = frozenset(range(8, 16)) | frozenset(range(24, 32))
ALL = frozenset(range(32))


def lines(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().split(" ")[0] == event]


class Host(SimHost):
    """32 pCPUs on two nodes; light guests, so that the policy moves nothing by itself."""

    def __init__(self, pins: dict[str, list[frozenset[int]]]) -> None:
        domains = [
            DomainSpec(name, tuple(constant(10) for _ in affinity), tuple(affinity))
            for name, affinity in pins.items()
        ]
        super().__init__(32, domains)
        self.topology = SPLIT
        self.reads = 0
        self.thread_pin_calls = 0
        self.refuse = False

    def thread_pins(self, domain: str) -> ThreadPins:
        self.reads += 1
        return super().thread_pins(domain)

    def pin_threads(self, domain: str, pins: ThreadPins) -> None:
        self.thread_pin_calls += 1
        if self.refuse:
            raise PinError(f"{domain}: Unable to write to 'cpuset.cpus': Permission denied")
        super().pin_threads(domain, pins)


def one(p: int) -> frozenset[int]:
    return frozenset({p})


def run(agent: Agent, host: SimHost, cycles: int) -> None:
    for _ in range(cycles):
        agent.step()
        host.tick(1.0)


@pytest.fixture
def host() -> Host:
    return Host(
        {
            "a": [one(1), one(3)],  # node 0
            "b": [one(9)],  # node 1
            "both": [one(2), one(10)],  # on both nodes: the policy brings it home to one
            "skip": [one(5)],  # excluded
            "floating": [ALL],  # not placed yet
        }
    )


def test_the_threads_follow_the_nodes_of_the_vcpus_once(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    agent = Agent(host, Config(pin_emulator="node", exclude=("skip", "floating")))
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        run(agent, host, 3)
    # `both` fits in one node, so the policy moves its vCPU home (node 0) and the threads
    # follow it there, in the same cycle.
    (moved,) = lines(caplog, "move")
    assert "domain=both vcpu=1 from=10" in moved
    assert "reason=node" in moved
    assert host.emulator == {"a": NODE0, "b": NODE1, "both": NODE0}
    assert sorted(lines(caplog, "emulator")) == [
        "emulator domain=a from=0-31 to=0-7,16-23 node=0",
        "emulator domain=b from=0-31 to=8-15,24-31 node=1",
        "emulator domain=both from=0-31 to=0-7,16-23 node=0",
    ]
    calls, reads = host.thread_pin_calls, host.reads
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        run(agent, host, 10)
    # No churn: nothing read or pinned again while the vCPUs stay where they are.
    assert (host.thread_pin_calls, host.reads) == (calls, reads)
    assert len(lines(caplog, "emulator")) == 3


def test_a_domain_whose_vcpus_change_node_takes_its_threads_along(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    agent = Agent(host, Config(pin_emulator="node", exclude=("skip", "floating")))
    run(agent, host, 2)
    # Someone else gives a's emulator a pin of its own: not undone while a stays on node 0.
    host.emulator["a"] = frozenset({0})
    host.pin(VcpuRef("b", 0), one(4))  # b's only vCPU goes to node 0
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        run(agent, host, 3)
    assert host.emulator["a"] == {0}
    assert host.emulator["b"] == NODE0
    assert lines(caplog, "emulator") == ["emulator domain=b from=8-15,24-31 to=0-7,16-23 node=0"]


def test_the_threads_stay_within_the_agents_cpus(host: Host) -> None:
    cpus = frozenset(range(4)) | frozenset(range(8, 12))
    agent = Agent(host, Config(pin_emulator="node", cpus=cpus, exclude=("skip", "floating")))
    run(agent, host, 2)
    assert host.emulator == {"a": {0, 1, 2, 3}, "b": {8, 9, 10, 11}, "both": {0, 1, 2, 3}}


def test_off_reads_and_pins_no_thread(host: Host) -> None:
    agent = Agent(host, Config())
    run(agent, host, 3)
    assert (host.reads, host.thread_pin_calls, host.emulator) == (0, 0, {})


def test_a_dry_run_says_what_it_would_pin_once(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    agent = Agent(host, Config(pin_emulator="node", dry_run=True, exclude=("skip", "floating")))
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        run(agent, host, 5)
    assert host.thread_pin_calls == 0
    assert sorted(lines(caplog, "emulator")) == [
        "emulator domain=a from=0-31 to=0-7,16-23 node=0 dry_run=1",
        "emulator domain=b from=0-31 to=8-15,24-31 node=1 dry_run=1",
        "emulator domain=both from=0-31 to=0-7,16-23 node=0 dry_run=1",
    ]


def test_a_refused_thread_pin_is_one_line_and_not_retried(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    host.refuse = True
    agent = Agent(host, Config(pin_emulator="node", exclude=("b", "both", "skip", "floating")))
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        run(agent, host, 6)
    (failed,) = lines(caplog, "emulator-failed")
    assert failed.startswith("emulator-failed domain=a to=0-7,16-23 error=")
    assert host.thread_pin_calls == 1
    assert agent.failures == {"emulator": 1}
    assert not lines(caplog, "emulator")


def test_restore_on_exit_puts_the_threads_back(host: Host) -> None:
    host.emulator["a"] = frozenset({0, 1})  # pinned by its XML, say
    agent = Agent(host, Config(pin_emulator="node", exclude=("skip", "floating")))
    run(agent, host, 2)
    assert host.emulator["a"] == NODE0
    agent.restore()
    assert host.emulator == {"a": {0, 1}, "b": ALL, "both": ALL}


def test_home_cpus_needs_placed_vcpus_and_known_nodes() -> None:
    assert home_cpus([one(1), one(17)], SPLIT, ALL) == ({0}, NODE0)
    assert home_cpus([one(1), ALL], SPLIT, ALL) is None  # one vCPU still floats
    assert home_cpus([one(1), one(9)], SPLIT, ALL) == ({0, 1}, ALL)  # split: both nodes
    assert home_cpus([one(1)], Topology(), ALL) is None  # the host did not say
    assert home_cpus([one(1)], SPLIT, NODE1) is None  # no allowed CPU on its node


@pytest.mark.parametrize(
    ("value", "expected"),
    [("node", "node"), ("off", "off"), ("NODE", "node"), (False, "off")],
)
def test_pin_emulator_values(value: object, expected: str) -> None:
    assert validate({"pin_emulator": value}).pin_emulator == expected


@pytest.mark.parametrize("value", [True, "nodes", None, 1])
def test_pin_emulator_bad_values_are_one_line(value: object) -> None:
    with pytest.raises(Exception, match=r"pin_emulator: expected off or node, got "):
        validate({"pin_emulator": value})


def test_a_reload_names_the_change() -> None:
    assert Config().changes(Config(pin_emulator="node")) == ["pin_emulator:off->node"]


# -- libvirt's test driver, through the real libvirt module ---------------------------------


@pytest.fixture
def default_host() -> Iterator[libvirt.virConnect]:
    """test:///default's state lives as long as the process: put back what a test changed."""
    conn = libvirt.open("test:///default")
    dom = conn.lookupByName("test")
    every = tuple(True for _ in range(conn.getCPUMap()[0]))
    dom.addIOThread(7, 0)
    try:
        yield conn
    finally:
        for vcpu in range(dom.vcpusFlags(0)):
            dom.pinVcpu(vcpu, every)
        dom.pinEmulator(every, 0)
        dom.delIOThread(7, 0)
        conn.close()


def _cpus(cpumap: tuple[bool, ...] | list[bool]) -> frozenset[int]:
    return frozenset(i for i, on in enumerate(cpumap) if on)


def test_test_driver_threads_follow_the_vcpus_node(default_host: libvirt.virConnect) -> None:
    # The driver's host has two cells (0-7 and 8-15), but only CPUs 0, 2 and 4 are online,
    # all on node 0: the threads go to node 0's online CPUs, within `cpus`.
    host = LibvirtHost("test:///default")
    try:
        before = host.thread_pins("test")
        assert before.emulator == frozenset(range(8))
        assert set(before.iothreads) == {7}
        host.pin(VcpuRef("test", 0), one(0))
        host.pin(VcpuRef("test", 1), one(2))
        agent = Agent(host, Config(interval=0.1, pin_emulator="node", cpus=frozenset({0, 4})))
        for _ in range(3):
            agent.step()
            time.sleep(0.15)  # a window of at least the interval
        dom = default_host.lookupByName("test")
        # Read from outside the agent: its own connection.
        assert _cpus(dom.emulatorPinInfo(0)) == {0, 4}
        assert {i: _cpus(m) for i, m in dom.ioThreadInfo(0)} == {7: {0, 4}}
        assert host.thread_pins("test") == ThreadPins(frozenset({0, 4}), {7: frozenset({0, 4})})
        agent.restore()
        assert _cpus(dom.emulatorPinInfo(0)) == frozenset(range(8))
    finally:
        host.close()


def test_test_driver_thread_pins_of_a_domain_gone_is_domain_gone(
    default_host: libvirt.virConnect,
) -> None:
    from vcpusched.host import DomainGone

    host = LibvirtHost("test:///default")
    try:
        with pytest.raises(DomainGone):
            host.thread_pins("no-such-domain")
        with pytest.raises(DomainGone):
            host.pin_threads("no-such-domain", ThreadPins(one(0)))
    finally:
        host.close()
