"""Fixtures shared by the unit tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture
def keep_log_level() -> Iterator[None]:
    # A reload sets the agent logger's level; later tests (the soak's memory count, which
    # pytest's log capture would fill) must not inherit it.
    logger = logging.getLogger("vcpusched")
    level = logger.level
    yield
    logger.setLevel(level)
