"""The daemon's import graph: `run`, `check-config` and `status` never load the benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Run the real command line in a fresh interpreter, then list what it imported.
PROBE = """
import json, sys
from vcpusched.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""
BENCH_ONLY = ("vcpusched_sim", "matplotlib", "PIL", "numpy")


def _imported(*args: str) -> tuple[int, list[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report["code"], report["modules"]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    # libvirt's built-in test driver: a host with a running 2-vCPU domain, no daemon needed.
    path = tmp_path / "vcpusched.yaml"
    path.write_text(f'uri: "test:///default"\ninterval: 0.1\npidfile: "{tmp_path / "pid"}"\n')
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["check-config", "-q", "{config}"],
        ["status", "-c", "{config}"],
        ["run", "-c", "{config}", "--once", "--log-target", "stderr"],
    ],
    ids=["check-config", "status", "run"],
)
def test_daemon_commands_never_import_the_benchmark(config: Path, command: list[str]) -> None:
    code, modules = _imported(*(part.format(config=config) for part in command))
    assert code == 0
    assert "vcpusched.policy" in modules or command[0] == "check-config"
    assert not [m for m in modules if m.split(".")[0] in BENCH_ONLY]


def test_bench_lives_in_its_own_package() -> None:
    code, modules = _imported("bench", "--list")
    assert code == 0
    assert "vcpusched_sim.bench" in modules
