"""The demo's non-interactive path: it runs, shows the balancing, and leaves nothing behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.lab.lab import REPO, Lab, Libvirtd, down, online_pcpus
from tests.lifecycle.procs import as_at_a_terminal

pytestmark = pytest.mark.lab


def processes_matching(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(f"{cmdline.parent.name}: {args[:120]}")
    return found


def test_demo_runs_and_tears_down(vmlab: Lab) -> None:
    daemon = Libvirtd()
    # With the session's libvirtd stopped first, the demo starts and stops its own: the
    # teardown it must do on a fresh machine.
    ours = daemon.our_pid() is not None
    if ours:
        down(vmlab)
    try:
        proc = subprocess.run(
            ["bash", str(REPO / "tests/lab/demo.sh"), "--duration", "24"],
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        if ours:
            daemon.start()
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    frames = out.split("-" * 72)
    assert len(frames) >= 5, out
    for pcpu in online_pcpus():
        assert f"pCPU{pcpu} [" in frames[-2]
    assert re.search(r"^  \S+ move domain=", out, re.M), "no move in the agent's log pane"
    # All started on the first pCPU; in the last frame some vCPU runs elsewhere.
    last_pins = [line for line in frames[-2].splitlines() if line.startswith("pCPU")]
    assert any(re.search(r"\]\s+[\d.]+%\s+\S", line) for line in last_pins[1:]), last_pins
    assert "teardown complete" in out
    if ours:
        assert "libvirtd stopped" in out
    assert not [d for d in vmlab.lab_domains("lab-demo-")]
    assert not processes_matching("guest=lab-demo-")


def test_demo_piped_through_a_reader_that_dies_still_tears_down(vmlab: Lab) -> None:
    """`make demo | tee log` and Ctrl-C: the terminal's SIGINT ends tee too, so the demo's
    stdout is a broken pipe by the time it tears down. Here the reader goes away once the agent
    runs, and the whole process group gets SIGINT at that moment, as from the terminal."""
    proc = subprocess.Popen(
        ["bash", str(REPO / "tests/lab/demo.sh"), "--duration", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=as_at_a_terminal,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if "starting the agent" in line:
                break
        assert any("starting the agent" in line for line in seen), "".join(seen)
        time.sleep(3)
        proc.stdout.close()  # the reader (tee) is gone...
        os.killpg(proc.pid, signal.SIGINT)  # ...as the Ctrl-C reaches everyone
        rest = proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = rest
    assert code == 0, err
    # Its stdout is dead: the teardown's report falls back to stderr.
    assert "teardown complete" in err, err
    assert "Traceback" not in err, err
    assert not list(vmlab.lab_domains("lab-demo-"))
    assert not processes_matching("guest=lab-demo-")
