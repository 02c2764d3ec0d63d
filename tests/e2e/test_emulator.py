"""`pin_emulator: node` on the real lab: the emulator thread and iothreads of real guests
follow their vCPUs' node, once, and are read back from libvirt outside the agent.

The lab has one node (2 CPUs), so "the node's CPUs" is every online pCPU: threads that the
test pins to one pCPU beforehand must end on both, an excluded domain's must stay, and
nothing is pinned again afterwards (not even a thread the test re-pins meanwhile). Several
nodes are covered on libvirt's test driver and the simulator (tests/unit/test_emulator.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.e2e.harness import Agent, config_settings, sleep_until, write_config
from tests.lab.lab import URI, GuestSpec, Lab, format_cpus, online_pcpus

pytestmark = pytest.mark.lab

PCPUS = online_pcpus()
PREFIX = "lab-e2e-emulator-"
INTERVAL = 1.0


@pytest.fixture
def guests(vmlab: Lab) -> Iterator[str]:
    vmlab.destroy_prefix(PREFIX)
    try:
        yield PREFIX
    finally:
        vmlab.destroy_prefix(PREFIX)


def _cpus(cpumap: tuple[bool, ...] | list[bool]) -> frozenset[int]:
    return frozenset(i for i, on in enumerate(cpumap) if on)


def thread_pins(name: str) -> tuple[frozenset[int], dict[int, frozenset[int]]]:
    """Read from libvirt on a connection of the test's own."""
    conn = libvirt.open(URI)
    try:
        dom = conn.lookupByName(name)
        iothreads = {int(i): _cpus(m) for i, m in dom.ioThreadInfo(0)}
        return _cpus(dom.emulatorPinInfo(0)), iothreads
    finally:
        conn.close()


def pin_threads(vmlab: Lab, name: str, pcpu: int) -> None:
    dom = vmlab.conn.lookupByName(name)
    cpumap = tuple(i == pcpu for i in range(vmlab.conn.getCPUMap()[0]))
    dom.pinEmulator(cpumap, 0)
    for iothread, _ in dom.ioThreadInfo(0):
        dom.pinIOThread(iothread, cpumap, 0)


def test_emulator_threads_follow_the_vcpus_node_once(
    vmlab: Lab, guests: str, tmp_path: Path
) -> None:
    if len(PCPUS) < 2:
        pytest.fail("this test needs two online pCPUs")
    first, second = PCPUS[0], PCPUS[1]
    node = frozenset(PCPUS)  # the lab's one node, every online pCPU
    plain, with_io, skipped = f"{guests}0", f"{guests}1", f"{guests}skip"
    vmlab.start(
        [
            GuestSpec(plain, load=10, pin=first),
            GuestSpec(with_io, load=10, pin=second, extra_xml="<iothreads>1</iothreads>"),
            GuestSpec(skipped, load=10, pin=first),
        ]
    )
    for name, pcpu in ((plain, first), (with_io, second), (skipped, first)):
        pin_threads(vmlab, name, pcpu)
    assert thread_pins(with_io) == (frozenset({second}), {1: frozenset({second})})

    path = write_config(
        tmp_path / "vcpusched.yaml",
        **config_settings(
            tmp_path,
            interval=INTERVAL,
            pin_emulator="node",
            exclude=[skipped],
        ),
    )
    agent = Agent(path)
    try:
        lines = [
            agent.wait_for("emulator", timeout=10 * INTERVAL, domain=name)
            for name in (plain, with_io)
        ]
        settled = time.monotonic()
        after = {name: thread_pins(name) for name in (plain, with_io, skipped)}
        # A pin of the test's own, while the vCPUs stay put: the agent leaves it.
        pin_threads(vmlab, plain, second)
        sleep_until(settled + 5 * INTERVAL)
        later = thread_pins(plain)
        emulator_lines = agent.events("emulator")
    finally:
        code = agent.stop()
    assert code == 0, agent.transcript()
    assert after[plain] == (node, {})
    assert after[with_io] == (node, {1: node})
    assert after[skipped] == (frozenset({first}), {})
    assert later == (frozenset({second}), {})
    assert [line.fields for line in lines] == [
        {"domain": plain, "from": str(first), "to": format_cpus(node), "node": "0"},
        {
            "domain": with_io,
            "from": str(second),
            "to": format_cpus(node),
            "node": "0",
            "iothreads": "1",
        },
    ]
    assert len(emulator_lines) == 2, [str(line) for line in emulator_lines]
    assert not agent.problems(), agent.problems()
