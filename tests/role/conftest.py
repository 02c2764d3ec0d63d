from __future__ import annotations

import pytest

from tests.role.fixtures import TIMINGS, target

__all__ = ["target"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("role test timings")
        for line in TIMINGS:
            terminalreporter.write_line(line)
