from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.lifecycle.procs import Agent


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for agent in started:
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()
        agent.log.unlink(missing_ok=True)
