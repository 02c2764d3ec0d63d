"""A pCPU goes offline under pinned guests, and comes back: the agent on the real lab.

Judged from outside: pins from libvirt, utilization from /proc/stat, refused pin attempts from
libvirtd's own log. The pCPU and the cgroup cpusets are restored whatever happens
(tests/lab/hotplug.py, and tests/lab/teardown.sh for a run cut short).
"""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.e2e.harness import AUDIT_EVENTS, Agent, Judge, check_audit, config_settings, write_config
from tests.lab import hotplug
from tests.lab.fixtures import record_result
from tests.lab.lab import GuestSpec, Lab, Measurement, online_pcpus

pytestmark = pytest.mark.lab

PCPUS = online_pcpus()
VICTIM = PCPUS[-1]
KEEP = frozenset(PCPUS) - {VICTIM}
INTERVAL = 1.0
PREFIX = "lab-e2e-hotplug-"
LOAD = 20  # per guest: all of them fit on the pCPUs that stay
TOLERANCE = 5.0
# Cycles watched after the pCPU is back: more than the policy's cooldown (15 cycles), so every
# vCPU that moved off the pCPU has been free to try going back.
REFUSAL_WATCH = 20 * INTERVAL
USE_WAIT = 60 * INTERVAL
REFUSAL_WAIT = 60 * INTERVAL
# With cgroup v1 the kernel takes an offline pCPU out of every cpuset for good (see hotplug.py).
CPUSET_V1 = (hotplug.CPUSET / "cpuset.cpus").exists()


@pytest.fixture
def guests(vmlab: Lab) -> Iterator[str]:
    if len(PCPUS) < 2 or not hotplug.can_offline(VICTIM):
        pytest.fail(f"pCPU {VICTIM} cannot go offline here: this test needs one that can")
    vmlab.destroy_prefix(PREFIX)
    try:
        yield PREFIX
    finally:
        hotplug.restore()
        vmlab.destroy_prefix(PREFIX)


Pins = Mapping[tuple[str, int], frozenset[int]]


def wait_pins(judge: Judge, ok: Callable[[Pins], bool], timeout: float) -> float:
    """Poll libvirt's pins (the judge's watcher) until `ok(pins)`; returns when."""
    deadline = time.monotonic() + timeout
    while True:
        pins = judge.current_pins(PREFIX)
        if pins and ok(pins):
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"pins never settled within {timeout} s: {pins}")
        time.sleep(0.1)


def busy_host(agent: Agent, what: str) -> None:
    util = [line.fields.get("util") for line in agent.events("balanced")]
    pytest.fail(
        f"{what}; the agent last read utilization {util[-3:]}: if pCPU {VICTIM} stayed full "
        f"of other work, the host was too busy to judge\n{agent.transcript()}"
    )


def guest_sum(m: Measurement) -> float:
    return sum(load for name, load in m.domain.items() if name.startswith(PREFIX))


def refused_attempts(log: Path, offset: int) -> Counter[str]:
    """Pins libvirtd refused since `offset`, by domain, from its error log."""
    with log.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    found = re.findall(rf"qemu-\d+-({re.escape(PREFIX)}\d+)\.libvirt-qemu/vcpu\d+/cpuset", text)
    return Counter(found)


def test_pcpu_offline_and_back(vmlab: Lab, guests: str, tmp_path: Path) -> None:
    """Offline: one line, no outage, every vCPU pinned there re-placed on the pCPUs left.
    Back online: one line; pins the host's cpusets refuse are one line each and not retried;
    once the cpusets are repaired and the config reloaded, the pCPU is used again."""
    specs = [GuestSpec(f"{guests}{i}", load=LOAD, pin=PCPUS[i % len(PCPUS)]) for i in range(4)]
    vmlab.start(specs)
    libvirtd_log = vmlab.state / "run" / "libvirtd.log"
    log_offset = libvirtd_log.stat().st_size
    config = write_config(tmp_path / "c.yaml", **config_settings(tmp_path, interval=INTERVAL))
    figures: dict[str, object] = {"cpuset": "v1" if CPUSET_V1 else "v2", "victim": VICTIM}
    agent = Agent(config)
    try:
        with Judge() as judge:
            agent.wait_for("balanced", timeout=60)
            start = time.monotonic()
            before = vmlab.measure(3.0)

            # 1. The pCPU goes offline under the guests pinned to it: those the agent holds
            # there now (it may have balanced the host since they started as `specs` says).
            on_victim = {k for k, p in judge.current_pins(PREFIX).items() if p == {VICTIM}}
            gone_at = time.monotonic()
            hotplug.set_online(VICTIM, False)
            agent.wait_for("offline", timeout=5 * INTERVAL, after=gone_at, cpus=str(VICTIM))
            replaced_at = wait_pins(
                judge, lambda pins: all(p <= KEEP for p in pins.values()), 10 * INTERVAL
            )
            offline = vmlab.measure(4.0)
            figures["replaced_after_s"] = round(replaced_at - gone_at, 1)
            figures["offline_util"] = offline.pcpu
            figures["offline_guests"] = guest_sum(offline)
            figures["offline_domains"] = offline.domain
            figures["before_domains"] = before.domain
            assert VICTIM not in offline.pcpu, "/proc/stat still lists the offline pCPU"
            # The guests keep running, on the pCPUs left. (How much they get depends on what
            # else runs: libvirt's machine cgroup competes as one with the host's processes.)
            assert guest_sum(offline) > 4 * LOAD / 4
            assert sum(offline.pcpu.values()) >= guest_sum(offline) - TOLERANCE

            # 2. It comes back; the cpusets are as the kernel left them.
            back_at = time.monotonic()
            hotplug.set_online(VICTIM, True)
            agent.wait_for("online", timeout=5 * INTERVAL, after=back_at, cpus=str(VICTIM))
            if CPUSET_V1:
                # A move onto it needs room there, and other work may fill a pCPU that has
                # just come back (the kernel spreads the host's processes onto it at once).
                try:
                    agent.wait_for("pin-failed", timeout=REFUSAL_WAIT, after=back_at)
                except AssertionError:
                    busy_host(agent, f"no pin to pCPU {VICTIM} was tried within {REFUSAL_WAIT} s")
            time.sleep(REFUSAL_WATCH)
            refused = [line for line in agent.events("pin-failed") if line.at >= back_at]
            attempts = refused_attempts(libvirtd_log, log_offset)
            pins_back = judge.current_pins(PREFIX)
            figures["refused_lines"] = len(refused)
            figures["refused_attempts"] = dict(attempts)
            per_vcpu = Counter((line.fields["domain"], line.fields["vcpu"]) for line in refused)
            assert all(n == 1 for n in per_vcpu.values()), per_vcpu
            assert all(line.fields.get("excluded") == "1" for line in refused)
            reload_at = back_at
            if CPUSET_V1:
                # Every later pin to the pCPU is refused: one line and one attempt per vCPU.
                assert refused, f"no refusal seen\n{agent.transcript()}"
                assert all(p <= KEEP for p in pins_back.values()), pins_back
                assert set(attempts) <= {d for d, _ in per_vcpu}, (attempts, per_vcpu)
                assert all(n == 1 for n in attempts.values()), attempts
                # 3. An operator repairs the cpusets and reloads: the pCPU is used again.
                hotplug.repair_cpusets()
                reload_at = agent.signal(signal.SIGHUP)
                agent.wait_for("reload", timeout=10, after=reload_at)
            try:
                used_at = wait_pins(
                    judge, lambda pins: any(p == {VICTIM} for p in pins.values()), USE_WAIT
                )
            except AssertionError:
                busy_host(agent, f"no vCPU went back to pCPU {VICTIM} within {USE_WAIT} s")
            # Nothing refused once the cpusets hold the pCPU again (with cgroup v2, at all).
            assert not [line for line in agent.events("pin-failed") if line.at > reload_at]
            figures["used_again_after_s"] = round(used_at - back_at, 1)
            time.sleep(2 * INTERVAL)
            after = vmlab.measure(4.0)
            figures["after_util"] = after.pcpu
            there = [k for k, p in after.pins.items() if k[0].startswith(PREFIX) and p == {VICTIM}]
            # The vCPUs pinned there run there: their time shows in its busy time.
            assert there
            assert all(after.vcpu[key] > LOAD / 4 for key in there), after.vcpu
            assert after.pcpu[VICTIM] >= sum(after.vcpu[key] for key in there) - TOLERANCE
            audit = check_audit(
                judge.changes(since=start, prefix=PREFIX),
                agent.events(*AUDIT_EVENTS),
                judge.pins.pins_at,
            )
        figures["audit"] = str(audit).splitlines()[0]
        figures["before_util"] = before.pcpu
        record_result(vmlab, "e2e-hotplug", figures)
        assert audit.ok, str(audit)
        assert [line.fields["cpus"] for line in agent.events("offline")] == [str(VICTIM)]
        assert [line.fields["cpus"] for line in agent.events("online")] == [str(VICTIM)]
        assert not agent.events("disconnected"), agent.transcript()
        moved_off = {
            (line.fields["domain"], int(line.fields["vcpu"]))
            for line in agent.events("move")
            if gone_at <= line.at <= replaced_at + 1 and line.fields["from"] == str(VICTIM)
        }
        assert moved_off == on_victim
        expected = (" offline ", " pin-failed ")
        problems = [p for p in agent.problems() if not any(e in p for e in expected)]
        assert problems == [], problems
    finally:
        code = agent.stop()
    assert code == 0
