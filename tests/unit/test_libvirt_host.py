"""The libvirt module against libvirt's test driver, on a host file written per test.

The test driver (`test:///abs/path.xml`, built into libvirt, no daemon) answers the calls the
module makes with well-formed data but no real load: it checks the calls and their shapes,
pins and errors; the real lab (tests/lab, tests/e2e) checks the numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vcpusched.host import DomainGone, HostError
from vcpusched.libvirt_host import LibvirtHost
from vcpusched.model import VcpuRef

NODE = """<node>
  <cpu>
    <mode>custom</mode>
    <model>test</model>
  </cpu>
{domains}
</node>
"""
DOMAIN = """  <domain type='test'>
    <name>{name}</name>
    <memory>131072</memory>
    <vcpu placement='static'>{vcpus}</vcpu>
    <os><type arch='x86_64'>hvm</type></os>
  </domain>"""


@pytest.fixture
def host(tmp_path: Path) -> LibvirtHost:
    path = tmp_path / "node.xml"
    domains = "\n".join(DOMAIN.format(name=n, vcpus=v) for n, v in (("web", 2), ("db", 1)))
    path.write_text(NODE.format(domains=domains))
    return LibvirtHost(f"test://{path}")


def test_a_sample_lists_every_vcpu_with_its_pins(host: LibvirtHost) -> None:
    sample = host.sample()
    assert set(sample.vcpus) == {VcpuRef("web", 0), VcpuRef("web", 1), VcpuRef("db", 0)}
    assert sample.pcpu_busy_ns  # one counter per online pCPU
    assert set(sample.pcpu_idle_ns) == set(sample.pcpu_busy_ns)
    assert all(c.time_ns >= 0 and c.affinity for c in sample.vcpus.values())
    later = host.sample()
    assert later.clock > sample.clock
    host.close()


def test_a_pin_is_made_and_seen_in_the_next_sample(host: LibvirtHost) -> None:
    online = sorted(host.sample().pcpu_busy_ns)
    target = frozenset({online[-1]})
    host.pin(VcpuRef("web", 1), target)
    assert host.sample().vcpus[VcpuRef("web", 1)].affinity == target
    assert host.sample().vcpus[VcpuRef("web", 0)].affinity != target or len(online) == 1
    host.close()


def test_pinning_a_domain_that_is_not_there_is_domain_gone(host: LibvirtHost) -> None:
    host.sample()
    with pytest.raises(DomainGone):
        host.pin(VcpuRef("nosuch", 0), frozenset({0}))
    host.close()


def test_a_host_that_cannot_be_reached_is_a_host_error(tmp_path: Path) -> None:
    missing = LibvirtHost(f"test://{tmp_path / 'absent.xml'}")
    with pytest.raises(HostError, match="cannot connect"):
        missing.sample()
    assert not missing.connected


def test_close_then_sample_reconnects(host: LibvirtHost) -> None:
    host.sample()
    host.close()
    assert not host.connected
    assert host.sample().vcpus
    assert host.connected
    host.close()
