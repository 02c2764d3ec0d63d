"""Faults on the real lab: libvirtd killed and restarted, guests churning, the agent killed.

Each test records its figures (recovery times, log lines, pin changes) like the scenarios do;
docs/reliability.md holds a run's table.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Agent, Judge, check_audit, config_settings, write_config
from tests.lab.fixtures import record_result
from tests.lab.lab import GuestSpec, Lab, LabError, Libvirtd, online_pcpus, process_alive

pytestmark = pytest.mark.lab

PCPUS = online_pcpus()
N = len(PCPUS)
INTERVAL = 1.0
PREFIX = "lab-e2e-fault-"


@pytest.fixture
def guests(vmlab: Lab) -> Iterator[str]:
    vmlab.destroy_prefix(PREFIX)
    yield PREFIX
    vmlab.destroy_prefix(PREFIX)


def _qemu_pids() -> dict[str, int]:
    """Lab guests' QEMU processes, by domain name, from /proc (libvirt may be down)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for arg in argv:
            if arg.startswith(b"guest=" + PREFIX.encode()):
                out[arg.split(b"=", 1)[1].split(b",")[0].decode()] = int(entry.name)
    return out


def _kill_libvirtd(daemon: Libvirtd) -> int:
    pid = daemon.our_pid()
    if pid is None:
        pytest.fail("these faults need the lab's own libvirtd (one the session started)")
    os.kill(pid, signal.SIGKILL)
    while process_alive(pid, "libvirtd"):
        time.sleep(0.02)
    return pid


@pytest.mark.xfail(
    strict=False,
    reason="open: libvirtd, restarted after SIGKILL, has reported two guests' pins as before "
    "the agent's last exchange, with no pin change logged; rare since (docs/reliability.md)",
)
def test_libvirtd_killed_and_restarted(vmlab: Lab, guests: str, tmp_path: Path) -> None:
    """SIGKILL, back 5 s later; then down for 60 s. The agent logs each outage once,
    reconnects within two intervals of libvirtd's return, changes no pin it already made,
    and resumes balancing; the guests run throughout."""
    specs = [GuestSpec(f"{guests}{i}", load=40, pin=PCPUS[0]) for i in range(2 * N)]
    vmlab.start(specs)
    daemon = Libvirtd()
    config = write_config(tmp_path / "c.yaml", **config_settings(tmp_path, interval=INTERVAL))
    figures: dict[str, object] = {}
    agent = Agent(config)
    try:
        # The pin watcher keeps one connection, which dies with libvirtd: judge the first
        # balancing with it, and what follows from fresh reads of libvirt.
        with Judge() as judge:
            agent.wait_for("balanced", timeout=60)
            time.sleep(0.5)
        first = judge.changes(prefix=guests)
        audit = check_audit(first, agent.events())
        assert audit.ok, str(audit)
        balanced = {k: v for k, v in vmlab.pins().items() if k[0].startswith(guests)}
        qemu = _qemu_pids()
        assert len(qemu) == 2 * N
        first_kill = time.monotonic()
        for outage in (5.0, 60.0):
            killed_at = time.monotonic()
            _kill_libvirtd(daemon)
            down = agent.wait_for("disconnected", timeout=3 * INTERVAL + 5, after=killed_at)
            time.sleep(max(0.0, outage - (time.monotonic() - killed_at)))
            daemon.start()
            back = time.monotonic()
            up = agent.wait_for("connected", timeout=30, after=back - 1)
            lines = [line.raw for line in agent.lines if down.at <= line.at < up.at]
            figures[f"outage_{outage:.0f}s"] = {
                "detected_s": round(down.at - killed_at, 1),
                "reconnected_after_return_s": round(up.at - back, 1),
                "log_lines": len(lines) + 1,
            }
            assert up.at - back <= 2 * INTERVAL + 1.0, figures
            # One line when it goes, a reminder a minute at most, and the one when it is back.
            assert len(lines) <= 1 + outage // 60, lines
            assert _qemu_pids() == qemu, "a guest died with libvirtd"
        time.sleep(4 * INTERVAL)
        vmlab.close()  # its connection died with libvirtd too
        redone = [line.raw for line in agent.events("move", "place") if line.at > first_kill]
        pins = {k: v for k, v in vmlab.pins().items() if k[0].startswith(guests)}
        assert pins == balanced, f"pins changed across the outages\n{agent.transcript()}"
        assert redone == [], redone
        # Balancing resumes: pile everything onto one pCPU again and watch it spread.
        with Judge() as judge:
            shaken = time.monotonic()
            for domain, vcpu in balanced:
                vmlab.pin(domain, vcpu, [PCPUS[0]])
            pinned = time.monotonic()
            settled = agent.wait_for("balanced", timeout=30, after=pinned)
            time.sleep(0.5)
            # Other work on the pCPUs shares them with the guests, as the agent predicts: a
            # guest moved beside it would get less, so with enough of it two guests stay.
            foreign = math.nan
            with contextlib.suppress(LabError):
                foreign = judge.foreign(pinned, time.monotonic())
        # The test's own pins (onto the first pCPU, seen up to a poll later) are not the
        # agent's, which only take vCPUs off it.
        home = frozenset((PCPUS[0],))
        resumed = [
            c
            for c in judge.changes(since=shaken, prefix=guests)
            if not (c.new == home and c.at <= pinned + 0.5)
        ]
        audit = check_audit(resumed, [line for line in agent.events() if line.at >= shaken])
        figures["pin_changes_first"] = len(first)
        figures["pin_changes_after_restarts"] = len(redone)
        figures["pin_changes_resumed"] = len(resumed)
        figures["foreign_resumed"] = round(foreign, 1)
        assert audit.ok, str(audit)
        # Two stay, every other vCPU moves once.
        assert len(resumed) == 2 * N - 2, (
            f"{len(resumed)} moves; the agent read util={settled.fields.get('util')}, and other"
            f" work took {foreign:.0f} points of pCPU time meanwhile\n{agent.transcript()}"
        )
        final = judge.current_pins(guests)
        assert sorted(Counter(next(iter(c)) for c in final.values()).values()) == [2] * N
        assert agent.proc.poll() is None
    finally:
        code = agent.stop()
        record_result(vmlab, "fault-libvirtd", figures)
    assert code == 0
    unexpected = [p for p in agent.problems() if " disconnected " not in p]
    assert unexpected == [], unexpected


def test_guests_come_and_go_at_random(vmlab: Lab, guests: str, tmp_path: Path) -> None:
    """At least ten guests started and destroyed at random moments, some right after the
    agent sampled them: no traceback, at most one log line per event."""
    rng = random.Random(int(time.time()))
    base = [GuestSpec(f"{guests}base{i}", load=30, pin=PCPUS[i % N]) for i in range(N)]
    vmlab.start(base)
    config = write_config(tmp_path / "c.yaml", **config_settings(tmp_path, interval=INTERVAL))
    events: list[tuple[float, str, str]] = []
    stop = threading.Event()

    def churn() -> None:
        # Its own connection: the lab's is used by the test thread.
        lab = Lab()
        live: list[str] = []
        n = 0
        while not stop.is_set() and len(events) < 14:
            if live and (len(live) >= 3 or rng.random() < 0.5):
                name = live.pop(rng.randrange(len(live)))
                lab.destroy([name])
                events.append((time.monotonic(), "destroy", name))
            else:
                name = f"{guests}c{n}"
                n += 1
                spec = GuestSpec(name, load=rng.choice([10, 30, 60]))
                lab.conn.defineXML(lab.domain_xml(spec, lab.work_per_ms())).create()
                live.append(name)
                events.append((time.monotonic(), "create", name))
            stop.wait(rng.uniform(0.3, 2.5))
        lab.destroy(live)
        for name in live:
            events.append((time.monotonic(), "destroy", name))
        lab.close()

    agent = Agent(config)
    try:
        agent.wait_for("connected", timeout=30)
        worker = threading.Thread(target=churn)
        worker.start()
        worker.join(timeout=120)
        stop.set()
        worker.join()
        time.sleep(3 * INTERVAL)
        assert agent.proc.poll() is None
    finally:
        code = agent.stop()
    assert code == 0
    created = {name for _, kind, name in events if kind == "create"}
    lines = agent.events("new", "gone")
    per_domain = Counter((line.event, line.fields["domain"]) for line in lines)
    during_pin = sum(1 for line in lines if line.fields.get("during") == "pin")
    record_result(
        vmlab,
        "fault-churn",
        {
            "events": len(events),
            "created": len(created),
            "new_lines": sum(1 for line in lines if line.event == "new"),
            "gone_lines": sum(1 for line in lines if line.event == "gone"),
            "gone_during_pin": during_pin,
        },
    )
    assert len(events) >= 10
    assert all(count == 1 for count in per_domain.values()), per_domain
    # A guest that lived past one sample is announced, and its end reported, exactly once.
    for name in created:
        if ("new", name) in per_domain:
            assert ("gone", name) in per_domain, name
    assert agent.problems() == [], agent.problems()


def test_agent_killed_and_restarted_adopts_its_balance(
    vmlab: Lab, guests: str, tmp_path: Path
) -> None:
    """SIGKILL leaves the pidfile behind; the next agent starts anyway and, finding the
    pinning already balanced, changes nothing."""
    vmlab.start([GuestSpec(f"{guests}{i}", load=40, pin=PCPUS[0]) for i in range(2 * N)])
    settings = config_settings(tmp_path, interval=INTERVAL)
    config = write_config(tmp_path / "c.yaml", **settings)
    pidfile = Path(settings["pidfile"])
    with Judge() as judge:
        first = Agent(config)
        first.wait_for("balanced", timeout=60)
        first.proc.kill()
        first.proc.wait()
        assert pidfile.exists()
        killed = time.monotonic()
        second = Agent(config)
        try:
            second.wait_for("connected", timeout=30)
            second.wait_for("balanced", timeout=30)
            time.sleep(6 * INTERVAL)
        finally:
            code = second.stop()
    after = judge.changes(since=killed, prefix=guests)
    record_result(
        vmlab,
        "fault-agent-killed",
        {
            "pin_changes_before_kill": len(judge.changes(until=killed, prefix=guests)),
            "pin_changes_after_restart": len(after),
        },
    )
    results = vmlab.state / "results"
    (results / "fault-agent-killed-first.log").write_text(first.transcript(last=10_000))
    (results / "fault-agent-killed-second.log").write_text(second.transcript(last=10_000))
    assert code == 0
    assert after == [], f"{[str(c) for c in after]}\n{second.trail()}"
    assert second.events("move", "place") == []
    assert not pidfile.exists()
