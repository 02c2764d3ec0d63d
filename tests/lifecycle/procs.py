"""Helpers to run the agent as a real process and read what it logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

AGENT = [sys.executable, "-m", "vcpusched"]


def write_config(path: Path, pidfile: Path, **extra: object) -> Path:
    # Extra keys replace the defaults here: the agent refuses a key given twice.
    values: dict[str, object] = {"uri": "test:///default", "interval": 0.2, "pidfile": pidfile}
    values.update(extra)
    lines = [f"{k}: {v}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o644)
    return path


def as_at_a_terminal() -> None:
    """In the child: SIGINT as a terminal's Ctrl-C finds it. A test runner started as a
    background job of a shell without job control has SIGINT ignored, and children inherit
    that; a test of what Ctrl-C does must not depend on how its runner was started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Agent:
    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"vcpusched-{time.time_ns()}.log"
        self._out = self.log.open("wb")
        self.proc = subprocess.Popen(
            AGENT + args,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, needle: str, count: int = 1, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if text.count(needle) >= count:
                return text
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {needle!r} x{count} in agent output:\n{self.text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=15)
        self._out.close()
        return code
