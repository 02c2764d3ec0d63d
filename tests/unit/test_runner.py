"""The daemon loop on the simulator: watchdog pings and reload verdicts, without libvirt."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vcpusched.config import Config
from vcpusched.model import HostSample
from vcpusched.service import VERDICT_FILE, ReloadVerdict, Runner, Signals
from vcpusched_sim.host import DomainSpec, SimHost, constant

ALL = frozenset({0, 1})
pytestmark = pytest.mark.usefixtures("keep_log_level")


class _Hangs(SimHost):
    """A host whose next sample blocks, as a libvirt call that never returns, until released."""

    def __init__(self) -> None:
        super().__init__(2, [DomainSpec("vm0", (constant(50),), (ALL,))])
        self.hang = threading.Event()
        self.hanging = threading.Event()
        self.release = threading.Event()

    def sample(self) -> HostSample:
        if self.hang.is_set():
            self.hanging.set()
            self.release.wait(30)
            self.hang.clear()
        self.tick(0.1)
        return super().sample()


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(0.05)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        yield sock


def _drain(sock: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(sock.recv(4096))
        except TimeoutError:
            return got


def _start(runner: Runner) -> threading.Thread:
    runner.start()
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    return thread


def test_watchdog_pings_while_waiting_and_never_during_a_hung_call(
    tmp_path: Path, notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # WatchdogSec=0.4 s under an interval of 2 s: the loop must ping while it waits.
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    host = _Hangs()
    signals = Signals()
    config = Config(interval=2.0, pidfile=tmp_path / "a.pid")
    runner = Runner(config, None, {}, lambda _uri: host, signals)
    thread = _start(runner)
    time.sleep(1.2)
    waiting = [m for m in _drain(notify_socket) if m == b"WATCHDOG=1"]
    # Half the period is 0.2 s: many pings within the first interval, not one per cycle.
    assert len(waiting) >= 2, waiting

    host.hang.set()
    assert host.hanging.wait(10), "the next cycle never came"
    _drain(notify_socket)
    time.sleep(1.0)
    during = [m for m in _drain(notify_socket) if m == b"WATCHDOG=1"]
    assert during == [], "pinged while the host call hung"

    host.release.set()
    time.sleep(0.5)
    after = [m for m in _drain(notify_socket) if m == b"WATCHDOG=1"]
    assert after, "no ping once the call returned"
    signals.request_stop("SIGTERM")
    thread.join(10)
    assert not thread.is_alive()


def test_no_watchdog_without_watchdog_usec(
    tmp_path: Path, notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    signals = Signals()
    runner = Runner(
        Config(interval=0.2, pidfile=tmp_path / "a.pid"), None, {}, lambda _: _Hangs(), signals
    )
    thread = _start(runner)
    time.sleep(0.6)
    signals.request_stop("SIGTERM")
    thread.join(10)
    assert b"WATCHDOG=1" not in _drain(notify_socket)


def test_reload_verdicts_and_generation(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"interval: 5\npidfile: {tmp_path}/a.pid\n")
    signals = Signals()
    host = _Hangs()
    runner = Runner(
        Config(interval=5, pidfile=tmp_path / "a.pid"), path, {}, lambda _: host, signals
    )
    runner.start()
    verdict = json.loads((tmp_path / VERDICT_FILE).read_text())
    assert (runner.generation, runner.last_reload) == (1, None)
    assert verdict["generation"] == 1
    assert verdict["last_reload"] is None

    path.write_text(f"interval: 6\npidfile: {tmp_path}/a.pid\n")
    runner.reload()
    assert runner.generation == 2
    assert runner.last_reload is not None
    assert (runner.last_reload.accepted, runner.last_reload.error) == (True, None)
    assert runner.last_reload.generation == 2

    path.write_text(f"interval: 6\npidfile: {tmp_path}/a.pid\ncpus: '100-200'\n")
    runner.reload()
    last = runner.last_reload
    assert isinstance(last, ReloadVerdict)
    assert runner.generation == 2
    assert not last.accepted
    assert last.error == "cpus: 100-200 selects no online pCPU of this host (online: 0-1)"
    on_disk = json.loads((tmp_path / VERDICT_FILE).read_text())
    assert on_disk["last_reload"] == {
        "at": last.at,
        "accepted": False,
        "error": last.error,
        "generation": 2,
    }
    assert on_disk["reloads"] == 2
    # Written by replacing: no temporary file left beside it (nor beside the live state).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.state.json", "c.yaml", VERDICT_FILE]
    assert runner.config.interval == 6


def test_signals_wake_the_loop_whenever_they_arrive() -> None:
    # A handler runs between any two bytecodes of the main thread: a storm of them while the
    # loop waits must neither deadlock it (a lock taken in a handler could be held already)
    # nor be lost. The former Event-based wake-up died within seconds of this.
    signals = Signals()
    signal.signal(signal.SIGALRM, lambda *_: signals.request_reload())
    signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
    try:
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            signals.wait(0.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    assert signals.reload
    signals.reload = False
    start = time.monotonic()
    signals.wait(0.0)  # drained: nothing pending
    signals.request_stop("SIGTERM")
    signals.wait(30.0)  # returns at once: the stop is pending
    assert signals.stop_signal == "SIGTERM"
    assert time.monotonic() - start < 25.0
