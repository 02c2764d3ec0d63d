"""The daemon loop in-process, on the simulator: reconnect back-off, reload and shutdown.

`Runner` takes a `host_factory`, so a host that fails on demand stands in for libvirtd going
away; the loop runs in a thread and is stopped through `Signals`, as the handlers do.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from vcpusched.config import Config
from vcpusched.host import HostError
from vcpusched.model import HostSample
from vcpusched.service import Runner, Signals
from vcpusched_sim.host import DomainSpec, SimHost, constant

INTERVAL = 0.1
pytestmark = pytest.mark.usefixtures("keep_log_level")


class _Flaky(SimHost):
    """Four 40% guests on pCPU0 of 2; `down` makes every call fail as a lost connection."""

    def __init__(self) -> None:
        pin = frozenset({0})
        super().__init__(2, [DomainSpec(f"vm{i}", (constant(40),), (pin,)) for i in range(4)])
        self.down = threading.Event()
        self.closed = 0

    def sample(self) -> HostSample:
        if self.down.is_set():
            raise HostError("cannot connect to test:///flaky: Connection refused")
        self.tick(INTERVAL)
        return super().sample()

    def close(self) -> None:
        self.closed += 1


def _start(runner: Runner) -> tuple[threading.Thread, list[int]]:
    code: list[int] = []
    thread = threading.Thread(target=lambda: code.append(runner.run()), daemon=True)
    thread.start()
    return thread, code


def _until(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def _messages(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(event + " ")]


def test_a_lost_connection_backs_off_within_two_intervals_and_reconnects(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hosts: list[_Flaky] = []

    def factory(uri: str) -> _Flaky:
        hosts.append(_Flaky())
        return hosts[-1]

    signals = Signals()
    runner = Runner(Config(interval=INTERVAL), None, {}, factory, signals)
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        thread, code = _start(runner)
        _until(lambda: _messages(caplog, "connected"))
        hosts[0].down.set()
        _until(lambda: runner._failures >= 4)
        # Bounded back-off: never longer than two intervals between attempts.
        assert runner._delay() == pytest.approx(2 * INTERVAL)
        assert len(_messages(caplog, "disconnected")) == 1  # one line per outage
        hosts[0].down.clear()
        _until(lambda: len(_messages(caplog, "connected")) == 2)
        signals.request_stop("SIGTERM")
        thread.join(10)
    assert code == [0]
    assert runner._failures == 0
    assert "after=" in _messages(caplog, "connected")[1]
    # The readings were dropped at the outage: the next plan starts from fresh samples.
    assert runner.agent.last is not None


def test_a_reload_reaches_the_balancer_and_a_bad_one_keeps_the_old_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "vcpusched.yaml"
    path.write_text(f"interval: {INTERVAL}\nmin_gain: 5\ndry_run: true\n")
    host = _Flaky()
    signals = Signals()
    runner = Runner(Config(interval=INTERVAL, dry_run=True), path, {}, lambda uri: host, signals)
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        thread, code = _start(runner)
        _until(lambda: runner.agent.plan is not None)
        path.write_text(f"interval: {INTERVAL}\nmin_gain: 40\ndry_run: true\n")
        signals.request_reload()
        _until(lambda: runner.agent.balancer.config.min_gain == 40)
        path.write_text("interval: 0\n")
        signals.request_reload()
        _until(
            lambda: _messages(caplog, "reload") and "rejected=" in _messages(caplog, "reload")[-1]
        )
        signals.request_stop("SIGTERM")
        thread.join(10)
    assert code == [0]
    assert runner.config.min_gain == 40
    assert runner.agent.balancer.config is runner.config
    assert any("min_gain:5.0->40.0" in m for m in _messages(caplog, "reload"))


def test_shutdown_finishes_the_cycle_restores_pins_and_closes_the_host(
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = _Flaky()
    signals = Signals()
    config = Config(interval=INTERVAL, restore_on_exit=True)
    runner = Runner(config, None, {}, lambda uri: host, signals)
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        thread, code = _start(runner)
        _until(lambda: runner.agent.moves_total > 0)
        signals.request_stop("SIGINT")
        thread.join(10)
    assert not thread.is_alive()
    assert code == [0]
    assert host.closed == 1
    # Every vCPU it moved is back on pCPU0, where it was first seen.
    assert {c.affinity for c in SimHost.sample(host).vcpus.values()} == {frozenset({0})}
    (stop,) = _messages(caplog, "stop")
    assert stop == f"stop signal=SIGINT moves={runner.agent.moves_total}"
