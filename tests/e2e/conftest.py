from __future__ import annotations

import pytest

from tests.lab.fixtures import RESULTS, vmlab

__all__ = ["vmlab"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The scenario numbers, also without -s: they are what the lab run is for."""
    rows = [r for r in RESULTS if r["name"].startswith("e2e-")]
    if not rows:
        return
    terminalreporter.section("e2e scenarios (pCPU utilization from /proc/stat, pins from libvirt)")
    for row in rows:
        terminalreporter.line(row["line"])
