"""The daemon loop in-process, on the simulator: reconnect back-off, reload and shutdown.

`Runner` takes a `host_factory`, so a host that fails on demand stands in for libvirtd going
away; the loop runs in a thread and is stopped through `Signals`, as the handlers do.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from vcpusched import policy, state
from vcpusched.config import Config
from vcpusched.host import HostError
from vcpusched.model import HostSample, Plan, Snapshot
from vcpusched.service import FULL_WINDOW, VERDICT_FILE, Runner, Signals
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


class _RealTime(SimHost):
    """Four 40% guests on pCPU0 of 2, on the wall clock: each sample runs the guests for the
    real time since the last one, so a sample's window is as long as the loop made it.
    `stall` makes the next sample read its counters that many seconds late, as a libvirt
    call that blocks before it answers."""

    def __init__(self) -> None:
        pin = frozenset({0})
        super().__init__(2, [DomainSpec(f"vm{i}", (constant(40),), (pin,)) for i in range(4)])
        self.at: float | None = None
        self.sampled: list[float] = []
        self.stall = 0.0

    def sample(self) -> HostSample:
        time.sleep(self.stall)
        self.stall = 0.0
        now = time.monotonic()
        if self.at is not None:
            self.tick(now - self.at)
        self.at = now
        self.sampled.append(now)
        return super().sample()


class _Windows(policy.Balancer):
    """The balancer, recording the window each plan was made on (its last two samples)."""

    def __init__(self, config: Config, host: _RealTime) -> None:
        super().__init__(config)
        self.host = host
        self.windows: list[tuple[float, float]] = []  # (when, seconds)

    def plan(self, snapshot: Snapshot, online: frozenset[int]) -> Plan:
        first, last = self.host.sampled[-2:]
        self.windows.append((last, last - first))
        return super().plan(snapshot, online)


def _real_time_runner(
    tmp_path: Path, interval: float
) -> tuple[Runner, _RealTime, _Windows, Signals, Path]:
    path = tmp_path / "vcpusched.yaml"
    path.write_text(f"interval: {interval}\npidfile: {tmp_path}/a.pid\n")
    host = _RealTime()
    signals = Signals()
    config = Config(interval=interval, pidfile=tmp_path / "a.pid")
    runner = Runner(config, path, {}, lambda uri: host, signals)
    windows = _Windows(config, host)
    runner.agent.balancer = windows
    return runner, host, windows, signals, path


def test_a_reload_plans_from_the_next_regular_tick_and_answers_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    interval = 0.5
    runner, host, windows, signals, path = _real_time_runner(tmp_path, interval)
    runner.start()
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        thread, code = _start(runner)
        _until(lambda: len(windows.windows) >= 2)
        # Halfway to the next tick (give or take the machine's latency), reload twice: one
        # good file, one bad. Each is answered before the next sample.
        _until(lambda: time.monotonic() - host.sampled[-1] >= interval / 2)
        before = len(host.sampled)
        hup = time.monotonic()
        path.write_text(f"interval: {interval}\npidfile: {tmp_path}/a.pid\nmin_gain: 6\n")
        signals.request_reload()
        _until(lambda: runner.generation == 2)
        path.write_text("interval: 0\n")
        signals.request_reload()
        _until(lambda: runner.last_reload is not None and not runner.last_reload.accepted)
        verdict = json.loads((tmp_path / VERDICT_FILE).read_text())
        answered = len(host.sampled)
        rejected = [m for m in _messages(caplog, "reload") if "rejected=" in m]
        status = state.summary(runner.live) if runner.live else ""
        _until(lambda: len(windows.windows) >= 5)
        signals.request_stop("SIGTERM")
        thread.join(10)
    assert code == [0]
    regular = interval * FULL_WINDOW  # a tick, give or take the latency of a sample
    # The verdict file, the state (what STATUS= says) and the log line came without a sample
    # (or, on a slow machine, after no more than the regular one).
    assert answered == before or host.sampled[before] - host.sampled[before - 1] >= regular
    assert verdict["last_reload"]["accepted"] is False
    assert rejected
    assert "reload rejected" in status
    # No sample was taken because of the reloads: the first after them is the regular tick.
    after = [t for t in host.sampled if t > hup]
    assert after[0] - host.sampled[before - 1] >= regular
    assert min(w for _, w in windows.windows) >= regular, windows.windows


def test_a_reload_that_lengthens_the_interval_plans_on_a_window_of_the_new_one(
    tmp_path: Path,
) -> None:
    runner, _, windows, signals, path = _real_time_runner(tmp_path, 0.2)
    runner.start()
    thread, code = _start(runner)
    _until(lambda: len(windows.windows) >= 2)
    path.write_text(f"interval: 0.8\npidfile: {tmp_path}/a.pid\n")
    hup = time.monotonic()
    signals.request_reload()
    _until(lambda: len([w for w in windows.windows if w[0] > hup]) >= 2)
    signals.request_stop("SIGTERM")
    thread.join(10)
    assert code == [0]
    later = [seconds for when, seconds in windows.windows if when > hup]
    # On the old schedule the first plan after the reload was made on a window of the old
    # interval (0.2 s).
    assert min(later) >= 0.8 * FULL_WINDOW, later


def test_no_plan_on_the_short_window_after_a_stalled_sample(tmp_path: Path) -> None:
    interval = 0.3
    runner, host, windows, signals, _ = _real_time_runner(tmp_path, interval)
    runner.start()
    thread, code = _start(runner)
    _until(lambda: len(windows.windows) >= 2)
    # The next sample reads its counters two intervals late: its cycle overruns, and the
    # one after starts at once, milliseconds after it.
    host.stall = 2 * interval
    stalled = len(host.sampled)
    _until(lambda: len(host.sampled) >= stalled + 3)
    signals.request_stop("SIGTERM")
    thread.join(10)
    assert code == [0]
    gaps = [b - a for a, b in zip(host.sampled, host.sampled[1:], strict=False)]
    assert min(gaps) < interval * FULL_WINDOW, f"no short window came about: {gaps}"
    assert min(w for _, w in windows.windows) >= interval * FULL_WINDOW, windows.windows
