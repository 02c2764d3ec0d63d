"""`vcpusched audit` against libvirt: replay the agent's log of real guests and compare the
pins it rebuilds with the pins libvirt reported at the same instants.

The agent balances real guests through a reload, a restart (two agents' lines in one file),
a guest going and another coming. Meanwhile the judge polls libvirt's pins every 0.1 s. Then
the agent's log, as written to stderr, is replayed at an instant every half second.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.harness import Agent, Judge, config_settings, write_config
from tests.lab.fixtures import record_result
from tests.lab.lab import GuestSpec, Lab, format_cpus, online_pcpus
from vcpusched import audit

pytestmark = pytest.mark.lab

PREFIX = "lab-e2e-replay-"
# An instant this close to a pin change is not compared: the agent pins, then logs (the log's
# times have milliseconds), and the judge polls every 0.1 s.
SETTLE = 0.5
STEP = 0.5


@pytest.fixture
def guests(vmlab: Lab) -> Lab:
    vmlab.destroy_prefix(PREFIX)
    yield vmlab  # type: ignore[misc]
    vmlab.destroy_prefix(PREFIX)


def test_replayed_pins_are_the_pins_libvirt_reported(guests: Lab, tmp_path: Path) -> None:
    lab = guests
    if len(online_pcpus()) < 2:
        pytest.fail("needs two pCPUs")
    first = online_pcpus()[0]
    # The wall clock the log is written on, against the judge's monotonic one.
    offset = time.time() - time.monotonic()
    config = write_config(tmp_path / "c.yaml", **config_settings(tmp_path))
    log = tmp_path / "agent.log"
    agents: list[Agent] = []
    with Judge() as judge:
        started = time.monotonic()
        lab.start(
            [
                GuestSpec(f"{PREFIX}a", load=60, pin=first),
                GuestSpec(f"{PREFIX}b", load=50, pin=first),
                GuestSpec(f"{PREFIX}c", load=20),
            ]
        )
        agent = Agent(config)
        agents.append(agent)
        agent.wait_for("place", timeout=40, domain=f"{PREFIX}c")
        agent.wait_for("move", timeout=40)
        config.write_text(
            config.read_text().replace("log_level: debug", "log_level: debug\nmin_gain: 6")
        )
        agent.signal(signal.SIGHUP)
        agent.wait_for("reload", timeout=20)
        assert agent.stop() == 0
        # Restarted: the pins stay where the first agent put them.
        agent = Agent(config)
        agents.append(agent)
        agent.wait_for("connected", timeout=20)
        c_destroyed = time.monotonic()
        lab.destroy([f"{PREFIX}c"])
        c_gone = agent.wait_for("gone", timeout=20, domain=f"{PREFIX}c").at
        d_started = time.monotonic()
        lab.start([GuestSpec(f"{PREFIX}d", load=20)])
        d_running = time.monotonic()
        agent.wait_for("place", timeout=40, domain=f"{PREFIX}d")
        time.sleep(2)
        assert agent.stop() == 0
        ended = time.monotonic()
    log.write_text("\n".join(a.transcript(last=100_000) for a in agents) + "\n")

    changes = judge.changes(prefix=PREFIX)
    logged = [
        (e.at, e.fields["domain"], int(e.fields["vcpu"]))
        for e in audit.read(log.open(), str(log))
        if e.applied
    ]
    initial = dict(judge.pins.first_seen)
    compared = moved = gone_checked = 0
    instants = 0
    t = started
    while t < ended:
        wall = t + offset
        replayed = {
            (p.domain, p.vcpu): p.pcpus for p in audit.pins_at(audit.read(log.open(), "log"), wall)
        }
        instants += 1
        for key, first_pins in initial.items():
            if not key[0].startswith(PREFIX):
                continue
            actual = judge.pins.pins_at(key[0], key[1], t)
            near = any(abs(c.at - t) < SETTLE for c in changes if (c.domain, c.vcpu) == key) or any(
                abs(at - wall) < SETTLE for at, d, v in logged if (d, v) == key
            )
            if key[0].endswith("c") and t >= c_destroyed:
                if t > c_gone + SETTLE:
                    assert replayed.get(key, "absent") is None, (audit.show_time(wall), replayed)
                    gone_checked += 1
                continue
            if key[0].endswith("d") and t < d_running:
                if t < d_started:
                    assert replayed.get(key) is None, (audit.show_time(wall), replayed)
                continue
            if near:
                continue
            known = replayed.get(key)
            if known is None and actual == first_pins:
                continue  # untouched so far and never moved later: the log cannot know
            assert known == actual, (
                f"at {audit.show_time(wall)} {key[0]}/{key[1]}: libvirt "
                f"{format_cpus(actual or set())}, replayed {known}\n{log.read_text()[-4000:]}"
            )
            compared += 1
            moved += actual != first_pins
        t += STEP

    # The command line says the same as the library, for one instant.
    at = ended - 3 + offset
    cli = subprocess.run(
        [sys.executable, "-m", "vcpusched", "audit", "pins", "--json", "--at", f"@{at}", str(log)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    by_cli = {
        (p["domain"], p["vcpu"]): p["pcpus"] for p in map(json.loads, cli.stdout.splitlines())
    }
    by_api = {
        (p.domain, p.vcpu): None if p.pcpus is None else format_cpus(p.pcpus)
        for p in audit.pins_at(audit.read(log.open(), "log"), at)
    }
    assert by_cli == by_api
    assert by_cli[(f"{PREFIX}c", 0)] is None  # gone
    timeline = subprocess.run(
        [sys.executable, "-m", "vcpusched", "audit", "moves", "--all", str(log)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    (lab.state / "results").mkdir(parents=True, exist_ok=True)
    (lab.state / "results" / "e2e-audit-replay-timeline.txt").write_text(timeline)
    record_result(
        lab,
        "e2e-audit-replay",
        {
            "instants": instants,
            "compared": compared,
            "after_a_change": moved,
            "gone_checked": gone_checked,
            "pin_changes": len(changes),
            "logged": len(logged),
        },
    )
    # The judge polls every 0.1 s: two changes of one vCPU within a poll are seen as one.
    assert len(logged) >= len(changes) >= 3
    assert compared >= 20, compared
    assert moved >= 5, moved
    assert gone_checked >= 2, gone_checked
