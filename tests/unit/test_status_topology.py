"""`vcpusched status` by node and core, each domain's home node, and `node=` in move lines,
on a two-socket capabilities fixture (threads N and N+16) and on libvirt's test driver."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from vcpusched import state, stats
from vcpusched.config import Config
from vcpusched.libvirt_host import LibvirtHost
from vcpusched.model import VcpuRef
from vcpusched.service import Agent
from vcpusched.state import DomainHome, LiveState, OffHome
from vcpusched.topology import parse_capabilities
from vcpusched_sim.host import DomainSpec, SimHost, constant

FIXTURES = Path(__file__).parent / "fixtures"
SPLIT = parse_capabilities((FIXTURES / "caps-2s8c2t-split.xml").read_text())


def one(p: int) -> frozenset[int]:
    return frozenset({p})


def two_socket_state(
    pins: dict[str, list[frozenset[int]]], excluded: tuple[str, ...] = ()
) -> LiveState:
    host = SimHost(
        32,
        [DomainSpec(n, tuple(constant(20) for _ in a), tuple(a)) for n, a in pins.items()],
    )
    host.topology = SPLIT
    first = host.sample()
    host.tick(1.0)
    second = host.sample()
    snapshot = stats.snapshot(first, second)
    assert snapshot is not None
    pcpus, vcpus = state.measured(
        second, snapshot, {}, frozenset(range(32)), lambda d: d in excluded
    )
    return LiveState(
        version="0",
        pid=os.getpid(),
        written=time.time(),
        interval=1.0,
        generation=1,
        running=True,
        connected=True,
        disconnected_since=None,
        error=None,
        last_reload=None,
        last_cycle=time.time(),
        pcpus=pcpus,
        vcpus=vcpus,
        moves=(),
        held={},
        dry_run=False,
    )


PINS = {
    "web": [one(1), one(17), one(9)],  # two on node 0 (core 1's two threads), one on node 1
    "db": [one(24), one(8)],  # node 1
    "tie": [one(2), one(10)],  # one on each: the lower node is home
    "idle": [frozenset(range(32))],  # floating: no home
}


def test_each_domain_has_a_home_node_and_its_vcpus_off_it_are_named() -> None:
    live = two_socket_state(PINS, excluded=("db",))
    assert live.homes() == (
        DomainHome("db", 1, (), True),
        DomainHome("tie", 0, (OffHome(1, 10, 1),), False),
        DomainHome("web", 0, (OffHome(2, 9, 1),), False),
    )
    doc = json.loads(json.dumps(live.as_json()))  # as the state file and --json hold it
    assert doc["homes"][2] == {
        "domain": "web",
        "node": 0,
        "off": [{"vcpu": 2, "pcpu": 9, "node": 1}],
        "excluded": False,
    }
    by_pcpu = {p["pcpu"]: p for p in doc["pcpus"]}
    assert (by_pcpu[1]["node"], by_pcpu[1]["core"]) == (0, "1,17")
    assert (by_pcpu[24]["node"], by_pcpu[24]["core"]) == (1, "8,24")


def test_status_lists_pcpus_by_node_then_core() -> None:
    text = state.render(two_socket_state(PINS, excluded=("db",)))
    lines = text.splitlines()
    node0 = lines.index("node 0: pcpus 0-7,16-23")
    node1 = lines.index("node 1: pcpus 8-15,24-31")
    assert node0 < node1
    # Within a node each core's two threads follow each other, under the core's line.
    core1 = lines.index("  core 1,17")
    assert lines[core1 + 1].split()[0] == "1"
    assert lines[core1 + 2].split()[0] == "17"
    assert "web/0:20" in lines[core1 + 1]
    assert "web/1:20" in lines[core1 + 2]
    assert lines[lines.index("  core 8,24") + 2].split()[0] == "24"
    homes = lines[lines.index("home nodes (where most of a domain's vCPUs run):") :]
    assert homes[1:4] == [
        "  db* node 1",
        "  tie node 0  off: 1@10(node 1)",
        "  web node 0  off: 2@9(node 1)",
    ]
    assert "unpinned: idle/0:20" in lines


def test_the_state_file_reads_back_with_nodes_and_cores(tmp_path: Path) -> None:
    pidfile = tmp_path / "vcpusched.pid"
    pidfile.write_text(f"{os.getpid()}\n")
    written = two_socket_state(PINS)
    state.write(state.state_path(pidfile), written)
    read, _ = state.read_running(pidfile)
    assert read == written
    assert read.homes() == written.homes()
    # A document from before nodes and cores still reads.
    doc = json.loads(state.state_path(pidfile).read_text())
    for p in doc["pcpus"]:
        del p["node"], p["core"]
    assert LiveState.from_json(doc).pcpus[0].node is None


def test_a_host_that_does_not_say_its_topology_shows_no_home() -> None:
    live = two_socket_state(PINS)
    flat = replace(
        live, pcpus=tuple(state.PcpuState(p.pcpu, p.util, p.demand, p.allowed) for p in live.pcpus)
    )
    assert flat.homes() == ()
    text = state.render(flat)
    assert "node" not in text
    assert text.splitlines()[1].split()[0] == "0"


def lines(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().split(" ")[0] == event]


def test_move_lines_carry_the_node_only_when_it_changes(caplog: pytest.LogCaptureFixture) -> None:
    # Three busy vCPUs piled on pCPU 0 of the two-socket host, with pCPU 1 (node 0) and 8
    # (node 1) to spread to: one move within the node, one across.
    host = SimHost(32, [DomainSpec(f"vm{i}", (constant(40),), (one(0),)) for i in range(3)])
    host.topology = SPLIT
    agent = Agent(host, Config(cpus=frozenset({0, 1, 8})))
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        for _ in range(12):
            agent.step()
            host.tick(1.0)
    moves = lines(caplog, "move")
    assert {m.split(" to=")[1].split()[0] for m in moves} == {"1", "8"}, moves
    for line in moves:
        fields = dict(f.split("=", 1) for f in line.split()[1:])
        src, dst = SPLIT.node_of(int(fields["from"])), SPLIT.node_of(int(fields["to"]))
        if src == dst:
            assert "node" not in fields, line
        else:
            assert fields["node"] == f"{src}->{dst}", line


def test_test_driver_moves_within_its_first_node_carry_no_node(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # test:///default has two cells, but only CPUs 0, 2 and 4 (all on node 0) are online:
    # every pin stays within node 0, and no move line names a node.
    import libvirt

    conn = libvirt.open("test:///default")
    dom = conn.lookupByName("test")
    every = tuple(True for _ in range(conn.getCPUMap()[0]))
    host = LibvirtHost("test:///default")
    try:
        host.pin(VcpuRef("test", 0), one(0))
        host.pin(VcpuRef("test", 1), one(0))
        sample = host.sample()
        assert sample.topology.multi_node
        agent = Agent(host, Config(interval=0.1))
        with caplog.at_level(logging.INFO, logger="vcpusched"):
            for _ in range(4):
                agent.step()
                time.sleep(0.15)
        for line in lines(caplog, "move"):
            assert "node=" not in line, line
    finally:
        for vcpu in range(2):
            dom.pinVcpu(vcpu, every)
        host.close()
        conn.close()
