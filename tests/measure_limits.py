"""What the agent needs on the benchmark's large host: the figures behind the unit's limits.

    .venv/bin/python -m tests.measure_limits [--cycles N]

Runs the agent's own cycle (service.Agent, unchanged) against the simulator's `large` scenario
(1,000 vCPUs on 128 pCPUs) in this process, with libvirt's binding imported as the real agent
has it, and prints the peak RSS, the thread count and the slowest cycle. MemoryMax=, TasksMax=,
WatchdogSec= and TimeoutStartSec= in etc/vcpusched.service are set from these with headroom.
"""

from __future__ import annotations

import argparse
import resource
import threading
import time
from pathlib import Path

import libvirt  # noqa: F401  (the real agent's memory includes the binding)

from vcpusched.config import Config
from vcpusched.service import Agent
from vcpusched_sim.scenarios import SCENARIOS


def _status(field: str) -> str:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=300)
    args = parser.parse_args()
    scenario = SCENARIOS["large"]
    host = scenario.host()
    agent = Agent(host, Config(interval=scenario.interval))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    slowest = first = 0.0
    moves = 0
    for cycle in range(args.cycles):
        start = time.perf_counter()
        moves += len(agent.step())
        took = time.perf_counter() - start
        if cycle <= 1:
            first = max(first, took)
        slowest = max(slowest, took)
        host.tick(scenario.interval)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"scenario: {scenario.summary}, {args.cycles} cycles, {moves} pin changes")
    print(f"peak RSS: {peak / 1024:.1f} MiB (after imports {before / 1024:.1f} MiB)")
    print(f"threads: {_status('Threads')} (Python sees {threading.active_count()})")
    print(
        f"first two cycles: {first * 1000:.0f} ms at most; slowest cycle: {slowest * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
