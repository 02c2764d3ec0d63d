"""The topology and memory placement the agent reads from the real libvirtd equal what the
kernel says in sysfs, also with a pCPU offline; a real guest's numatune reaches the agent."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.lab import hotplug
from tests.lab.fixtures import record_result
from tests.lab.lab import URI, GuestSpec, Lab, online_pcpus
from vcpusched.libvirt_host import QEMU_RUN, LibvirtHost, read_resident
from vcpusched.model import HostSample
from vcpusched.topology import Topology, parse_numa_maps

pytestmark = pytest.mark.lab

NODE = Path("/sys/devices/system/node")


def cpulist(text: str) -> frozenset[int]:
    """Written here rather than imported from the agent: the judge shares no code with it."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(out)


def sysfs_view() -> dict[str, object]:
    """The online CPUs' topology as the kernel reports it."""
    online = cpulist((hotplug.CPU / "online").read_text())
    cpus = {}
    for cpu in sorted(online):
        topo = hotplug.CPU / f"cpu{cpu}" / "topology"
        llc = None
        caches = sorted((hotplug.CPU / f"cpu{cpu}" / "cache").glob("index*"))
        levels = [(int((c / "level").read_text()), c) for c in caches]
        if levels and max(levels)[0] >= 3:
            llc = cpulist((max(levels)[1] / "shared_cpu_list").read_text()) & online
        cpus[cpu] = {
            "socket": int((topo / "physical_package_id").read_text()),
            "core": int((topo / "core_id").read_text()),
            "siblings": cpulist((topo / "thread_siblings_list").read_text()) & online,
            "llc": llc,
        }
    nodes = {
        int(p.name[4:]): cpulist((p / "cpulist").read_text())
        for p in NODE.glob("node[0-9]*")
        if (p / "cpulist").exists()
    }
    return {"online": online, "cpus": cpus, "nodes": nodes}


def agent_view(t: Topology, sample: HostSample) -> dict[str, object]:
    return {
        "online": frozenset(sample.pcpu_busy_ns),
        "cpus": {
            c.id: {
                "socket": c.socket,
                "core": c.core,
                "siblings": t.siblings_of(c.id),
                "llc": t.cache_group_of(c.id),
            }
            for c in t.cpu_list
        },
        "nodes": dict(t.nodes),
    }


def read_host() -> HostSample:
    host = LibvirtHost(URI)
    try:
        return host.sample()
    finally:
        host.close()


def test_topology_equals_sysfs(vmlab: Lab) -> None:
    sample = read_host()
    seen, truth = agent_view(sample.topology, sample), sysfs_view()
    record_result(
        vmlab,
        "lab-topology",
        {"agent": str(sample.topology.summary()), "nodes": str(truth["nodes"])},
    )
    assert seen == truth
    assert sample.isolated == cpulist((hotplug.CPU / "isolated").read_text())


def test_topology_with_a_pcpu_offline_equals_sysfs(vmlab: Lab) -> None:
    """A CPU going offline is dropped from the samples and from the topology at the next
    sample, on the same connection; it comes back when the CPU does."""
    victim = online_pcpus()[-1]
    if victim == 0 or not hotplug.can_offline(victim):
        pytest.fail(f"pCPU {victim} cannot go offline here: this test needs one that can")
    host = LibvirtHost(URI)
    try:
        before = host.sample()
        assert victim in before.pcpu_busy_ns
        with hotplug.offline(victim):
            time.sleep(0.2)
            during = host.sample()
            truth = sysfs_view()
            assert during.topology.node_of(victim) is None
            assert victim not in during.pcpu_busy_ns
            assert agent_view(during.topology, during) == truth
        after = host.sample()
        assert host.connected
    finally:
        host.close()
    assert after.topology == before.topology
    assert set(after.pcpu_busy_ns) == set(before.pcpu_busy_ns)
    assert hotplug.is_online(victim)


def test_real_guest_numatune_reaches_the_agent(vmlab: Lab) -> None:
    specs = [
        GuestSpec(
            "lab-t-numa-strict",
            load=5,
            extra_xml="<numatune><memory mode='strict' nodeset='0'/></numatune>",
        ),
        GuestSpec("lab-t-numa-none", load=5),
    ]
    vmlab.start(specs)
    try:
        sample = read_host()
        # Where the unbound guest's memory is, read from its QEMU process as the agent reads
        # it on a host of several nodes, against the kernel's own count of its memory.
        resident = read_resident("lab-t-numa-none")
        pid = int((QEMU_RUN / "lab-t-numa-none.pid").read_text())
        kib = parse_numa_maps(Path(f"/proc/{pid}/numa_maps").read_text())
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        rss = int(next(line for line in status if line.startswith("VmRSS:")).split()[1])
    finally:
        vmlab.destroy(s.name for s in specs)
    strict = sample.memory["lab-t-numa-strict"]
    assert (strict.mode, strict.nodeset, strict.binding) == ("strict", {0}, True)
    assert strict.allowed_cpus(0, sample.topology) == sample.topology.nodes[0]
    none = sample.memory["lab-t-numa-none"]
    assert none.mode is None
    nodes = sysfs_view()["nodes"]
    assert isinstance(nodes, dict)
    record_result(vmlab, "lab-resident", {"numa_maps_kib": kib, "vmrss_kib": rss})
    assert set(kib) <= set(nodes), kib
    assert abs(sum(kib.values()) - rss) <= 0.05 * rss, (kib, rss)
    if len(nodes) == 1:
        assert resident == next(iter(nodes))
        # One node says nothing: the agent does not read it there.
        assert none.resident is None
    else:
        most = max(kib, key=lambda n: kib[n])
        assert resident == (most if kib[most] > sum(kib.values()) / 2 else None)
