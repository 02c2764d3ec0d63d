"""pytest fixtures shared by the lab and e2e tests: one libvirtd for the whole session.

A missing lab fails the tests instead of skipping them: a skipped lab test would let a run
that never touched a real guest pass. Deselect them with `-m "not lab"` where no lab can run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab.lab import PREFIX, Lab, LabError, Libvirtd, down

# What record_result printed, for a summary at the end of the session.
RESULTS: list[dict[str, str]] = []

# Every guest a test starts is named with one of these; the session removes them at the end.
TEST_PREFIXES = (f"{PREFIX}t-", f"{PREFIX}e2e-")


@pytest.fixture(scope="session")
def vmlab() -> Iterator[Lab]:
    # Each conftest that imports this gets its own instance; the second finds the first's
    # libvirtd answering and leaves stopping it to the first.
    if os.geteuid() != 0:
        pytest.fail("lab tests need root (libvirtd, QEMU): run as root, or deselect -m 'not lab'")
    lab = Lab()
    daemon = Libvirtd()
    started = False
    try:
        lab.check_built()
        started = daemon.start()
        for prefix in TEST_PREFIXES:
            lab.destroy_prefix(prefix)  # leftovers of an interrupted run
        lab.work_per_ms()  # calibrate now, outside any test's timing
    except LabError as exc:
        pytest.fail(f"lab unusable: {exc}")
    try:
        yield lab
    finally:
        if started:
            down(lab)
        else:
            for prefix in TEST_PREFIXES:
                lab.destroy_prefix(prefix)
            lab.close()


def record_result(lab: Lab, name: str, result: dict[str, Any]) -> None:
    """Print a test's numbers and keep them in <state>/results/<name>.json for reports."""
    out = lab.state / "results"
    out.mkdir(parents=True, exist_ok=True)
    if not RESULTS:  # the first result of this run starts a new summary
        (out / "summary.txt").unlink(missing_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    line = f"[{name}] " + " ".join(f"{k}={_short(v)}" for k, v in result.items())
    RESULTS.append({"name": name, "line": line})
    with (out / "summary.txt").open("a") as f:
        f.write(line + "\n")
    print("\n" + line)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_short(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_short(v)}" for k, v in value.items()) + "}"
    return str(value)
