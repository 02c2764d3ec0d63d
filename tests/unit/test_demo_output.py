"""The demo's output cannot stop its teardown: a closed stdout (tee gone) is survived."""

from __future__ import annotations

import subprocess
import sys

from tests.lab.lab import REPO

SCRIPT = """
import os, sys
from tests.lab.demo import say
say("before")
r, w = os.pipe()
os.close(r)
os.dup2(w, 1)  # stdout is now a pipe nobody reads, as after tee died
say("frame 1")
say("teardown complete")
print("exit reached", file=sys.stderr)
"""


def test_say_falls_back_to_stderr_when_stdout_is_a_dead_pipe() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "before\n"
    assert "teardown complete" in result.stderr
    assert "exit reached" in result.stderr
    assert "Traceback" not in result.stderr
    assert "BrokenPipeError" not in result.stderr
