"""The agent's cycle on the simulator: what it logs and what it pins, without libvirt."""

from __future__ import annotations

import logging
import re

import pytest

from vcpusched.config import Config
from vcpusched.host import DomainGone
from vcpusched.model import HostSample, VcpuRef
from vcpusched.service import Agent
from vcpusched_sim.host import DomainSpec, SimHost, constant

ALL = frozenset({0, 1})


def _host(*loads: float, pin: frozenset[int] = ALL, stop: float | None = None) -> SimHost:
    domains = [
        DomainSpec(f"vm{i}", (constant(load),), (pin,), stop=stop if i == 0 else None)
        for i, load in enumerate(loads)
    ]
    return SimHost(2, domains)


def _run(agent: Agent, host: SimHost, cycles: int) -> None:
    for _ in range(cycles):
        agent.step()
        host.tick(1.0)


class _VanishesAtPin(SimHost):
    """vm0 is gone by the time its pin is made, though the sample before still had it."""

    gone = False

    def pin(self, ref: VcpuRef, pcpus: frozenset[int]) -> None:
        if ref.domain == "vm0":
            self.gone = True
            raise DomainGone(ref)
        super().pin(ref, pcpus)

    def sample(self) -> HostSample:
        sample = super().sample()
        if self.gone:
            vcpus = {r: c for r, c in sample.vcpus.items() if r.domain != "vm0"}
            return HostSample(sample.clock, sample.pcpu_busy_ns, vcpus)
        return sample


def test_a_domain_gone_between_sample_and_pin_is_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = _VanishesAtPin(2, [DomainSpec(f"vm{i}", (constant(50),), (ALL,)) for i in range(3)])
    agent = Agent(host, Config())
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        _run(agent, host, 6)
    gone = [r.getMessage() for r in caplog.records if r.getMessage().startswith("gone ")]
    assert gone == ["gone domain=vm0 during=pin"]
    assert all(ref.domain != "vm0" for ref in agent.original)


def test_restore_puts_back_first_seen_pins() -> None:
    host = _host(40, 40, 40, 40, pin=frozenset({0}))
    agent = Agent(host, Config())
    _run(agent, host, 6)
    pins = {ref: c.affinity for ref, c in host.sample().vcpus.items()}
    assert sorted(len([p for p in pins.values() if p == {n}]) for n in (0, 1)) == [2, 2]
    agent.restore()
    assert {c.affinity for c in host.sample().vcpus.values()} == {frozenset({0})}


def test_dry_run_logs_a_plan_once_and_pins_nothing(caplog: pytest.LogCaptureFixture) -> None:
    host = _host(40, 40, 40, 40, pin=frozenset({0}))
    agent = Agent(host, Config(dry_run=True))
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        _run(agent, host, 8)
    moves = [r.getMessage() for r in caplog.records if r.getMessage().startswith("move ")]
    # The host does not change, so the same plan comes every cycle and is logged once: one
    # move, since a pCPU that takes a vCPU whose demand is a guess takes no more in a plan.
    assert len(moves) == 1
    assert all(m.endswith(" dry_run=1") for m in moves)
    assert host.pin_changes == 0


def test_balanced_is_logged_once_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    host = _host(60, 60, 30, 30, pin=frozenset({0}))
    agent = Agent(host, Config())
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        _run(agent, host, 10)
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("balanced ") for m in messages) == 1
    assert messages.index(next(m for m in messages if m.startswith("balanced "))) > max(
        i for i, m in enumerate(messages) if m.startswith("move ")
    )


def test_restore_skips_a_vcpu_already_back_home() -> None:
    host = _host(40, 40, 40, 40, pin=frozenset({0}))
    agent = Agent(host, Config())
    _run(agent, host, 3)
    moved = sorted(agent.changed)
    assert moved
    # As if a later move had taken the first one back to where it started.
    host.pin(moved[0], frozenset({0}))
    agent.changed[moved[0]] = frozenset({0})
    calls = host.pin_calls
    agent.restore()
    assert host.pin_calls == calls + len(moved) - 1


def test_a_reload_reaches_the_balancer() -> None:
    host = _host(40, 40, 40, 40, pin=frozenset({0}))
    agent = Agent(host, Config(dry_run=True))
    _run(agent, host, 3)
    assert agent.plan is not None
    assert agent.plan.moves
    agent.reconfigure(Config(dry_run=True, cpus=frozenset({0})))
    _run(agent, host, 2)
    assert agent.balancer.config is agent.config
    assert agent.plan.moves == ()  # pCPU1 is no longer the agent's to use


def test_audit_lines_name_demands_and_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    host = _host(40, 40, 40, 40, pin=frozenset({0}))
    agent = Agent(host, Config())
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        _run(agent, host, 6)
    messages = [r.getMessage() for r in caplog.records]
    moves = [m for m in messages if m.startswith("move ")]
    assert moves
    pattern = (
        r"move domain=vm\d vcpu=0 from=0 to=1 demand=\d+\.\d from_demand=\d+\.\d"
        r" to_demand=\d+\.\d reason=\w+"
    )
    assert all(re.fullmatch(pattern, m) for m in moves), moves
    (balanced,) = [m for m in messages if m.startswith("balanced ")]
    assert re.fullmatch(r"balanced pcpus=0-1 sd=\d+\.\d util=\d+/\d+", balanced)


def test_at_debug_every_cycle_logs_its_readings_and_plan(caplog: pytest.LogCaptureFixture) -> None:
    host = _host(60, 30, pin=frozenset({0}))
    agent = Agent(host, Config())
    with caplog.at_level(logging.DEBUG, logger="vcpusched"):
        _run(agent, host, 4)
    lines = [r.getMessage() for r in caplog.records]
    readings = [line for line in lines if line.startswith("reading ")]
    plans = [line for line in lines if line.startswith("plan ")]
    assert len(plans) == 3  # the first cycle only takes the baseline
    assert len(readings) == 2 * len(plans)
    assert "reading domain=vm0 vcpu=0 pcpus=0 received=60.0 demand=60.0" in readings
    assert plans[0].startswith("plan util=0:90.0,1:0.0 demand=0:90.0,1:0.0 moves=0")
    assert any(" moves=1" in p for p in plans)
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        caplog.clear()
        _run(agent, host, 2)
    assert not [r for r in caplog.records if r.getMessage().startswith(("reading ", "plan "))]


def test_a_step_whose_vcpus_read_another_level_logs_a_doubt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Four guests of 36, two per pCPU, on a host whose pCPU 1 runs the same work 1.28 times
    # as long: the agent swaps once, the moved guests read what the pCPUs give, and the doubt
    # that holds the next swap is audited on both pCPUs.
    domains = [DomainSpec(f"vm{i}", (constant(36.0),), (frozenset({i % 2}),)) for i in range(4)]
    host = SimHost(2, domains, slowdown={1: 1.28})
    agent = Agent(host, Config())
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        _run(agent, host, 30)
    messages = [r.getMessage() for r in caplog.records]
    moves = [m for m in messages if m.startswith("move ")]
    doubts = [m for m in messages if m.startswith("doubt ")]
    assert len(moves) == 2, moves
    found = [re.fullmatch(r"doubt pcpu=(\d) points=(\d+\.\d) cycles=64", m) for m in doubts]
    assert [m[1] for m in found if m] == ["0", "1"], doubts
    assert all(15.0 < float(m[2]) < 25.0 for m in found if m), doubts


def test_a_fault_of_the_policy_skips_the_cycle_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = _host(40, 40, 40, 40, pin=frozenset({0}))
    agent = Agent(host, Config())
    real = agent.balancer.plan
    calls = 0

    def fails_once(*args: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ZeroDivisionError("a bug")
        return real(*args)  # type: ignore[arg-type]

    agent.balancer.plan = fails_once  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        _run(agent, host, 10)
    failed = [r for r in caplog.records if r.getMessage() == "plan-failed"]
    assert len(failed) == 1
    assert failed[0].levelno == logging.ERROR
    assert failed[0].exc_info is not None
    assert agent.failures == {"plan": 1}
    # The cycles after it plan again, from no readings, and balance the host.
    pins = [c.affinity for c in host.sample().vcpus.values()]
    assert sorted(pins.count(frozenset({n})) for n in (0, 1)) == [2, 2]
