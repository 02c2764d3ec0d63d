"""Ctrl-C during the start-up of `status`, `check-config` and `run`: always a quiet 130.

Each case runs the real entry point in its own process, stopped (SIGSTOP, by
tests/lifecycle/stop_at.py) as it enters one function of its start-up; the test then sends a
real SIGINT and SIGCONT. Waits are bounded and none assumes a quiet machine: the test waits
for the process to stop, however long its start-up takes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lifecycle.procs import as_at_a_terminal, write_config

WAIT = 60.0


def _stopped_at(
    target: str, args: list[str], setup: Callable[[], None] | None = None
) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.lifecycle.stop_at", target, "--", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=setup or as_at_a_terminal,
    )
    deadline = time.monotonic() + WAIT
    while True:
        pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
        if pid and os.WIFSTOPPED(status):
            return proc
        if pid:
            out, err = proc.communicate()
            raise AssertionError(f"exited before {target}: {status} {out!r} {err!r}")
        assert time.monotonic() < deadline, f"never reached {target}"
        time.sleep(0.01)


def _interrupt(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    try:
        out, err = proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()  # a lost SIGINT must not leave an agent running after the test
        proc.communicate()
        raise
    return proc.returncode, out, err


@pytest.fixture
def config(tmp_path: Path) -> Path:
    # libvirt's test driver; a long interval, so that a SIGINT that were lost would show as
    # a sample of its own (exit 0 with output) rather than pass unseen.
    return write_config(tmp_path / "c.yaml", tmp_path / "a.pid", interval=5)


# Where each command spends its start-up, in order. `virDomain.__del__` is where a SIGINT
# once vanished: Python only prints an exception raised in a finalizer, and status went on
# to exit 0 (libvirt frees a domain handle there during the first sample).
STATUS_POINTS = [
    "vcpusched/cli.py:<module>",  # importing the command line
    "vcpusched/config.py:<module>",
    "libvirt.py:<module>",  # importing libvirt, when status first samples
    "vcpusched/config.py:load_config",
    "vcpusched/yamlread.py:load",
    "vcpusched/state.py:read_running",
    "vcpusched/libvirt_host.py:LibvirtHost._connect",
    "vcpusched/libvirt_host.py:LibvirtHost._read_cpus",
    "vcpusched/libvirt_host.py:LibvirtHost.sample",
    "vcpusched/libvirt_host.py:LibvirtHost._counters",
    "libvirt.py:virDomain.__del__",
    "libvirt.py:virConnect.__del__",
]


@pytest.mark.parametrize("target", STATUS_POINTS)
def test_ctrl_c_during_status_start_up_is_a_quiet_130(config: Path, target: str) -> None:
    proc = _stopped_at(target, ["status", "-c", str(config), "-i", "5"])
    assert _interrupt(proc) == (130, "", "")


@pytest.mark.parametrize(
    "target",
    [
        "vcpusched/cli.py:<module>",
        # Python 3.11 wraps a KeyboardInterrupt raised here in a RuntimeError: a traceback.
        "functools.py:cached_property.__set_name__",
        "vcpusched/config.py:load_config",
        "vcpusched/yamlread.py:load",
        "vcpusched/config.py:validate",
    ],
)
def test_ctrl_c_during_check_config_is_a_quiet_130(config: Path, target: str) -> None:
    proc = _stopped_at(target, ["check-config", str(config)])
    assert _interrupt(proc) == (130, "", "")


@pytest.mark.parametrize(
    ("command", "target"),
    [
        (["status", "-i", "0.1"], "vcpusched/state.py:render"),
        (["check-config"], "vcpusched/config.py:Config.as_document"),
    ],
)
def test_ctrl_c_while_printing_is_130_without_a_traceback(
    config: Path, command: list[str], target: str
) -> None:
    # The header may be out already; what follows is not, and no traceback.
    args = [*command, "-c", str(config)] if command[0] == "status" else [*command, str(config)]
    code, out, err = _interrupt(_stopped_at(target, args))
    assert (code, err) == (130, "")
    assert len(out.splitlines()) <= 1


def test_ctrl_c_before_run_takes_its_signals_is_a_quiet_130(config: Path) -> None:
    proc = _stopped_at("vcpusched/config.py:load_config", ["run", "-c", str(config)])
    assert _interrupt(proc) == (130, "", "")
    assert not (config.parent / "a.pid").exists()


def test_a_sigint_the_caller_ignores_stays_ignored(config: Path) -> None:
    # As for any program: `trap '' INT`, or a background job of a shell without job control.
    def ignore() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = _stopped_at("vcpusched/config.py:load_config", ["check-config", str(config)], ignore)
    code, out, err = _interrupt(proc)
    assert (code, err) == (0, "")
    assert out.startswith(f"# {config}: valid")
