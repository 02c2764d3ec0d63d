"""Loads from two host samples: pure arithmetic, no I/O."""

from __future__ import annotations

import itertools
import logging
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace

from vcpusched.model import SATURATED, HostSample, Snapshot, Vcpu, VcpuRef

log = logging.getLogger(__name__)


def _percent(delta_ns: int, elapsed_s: float) -> float:
    # Counters of different precision (10 ms ticks beside exact ns) can step backwards or
    # overshoot a little over a short window; clamp instead of reporting nonsense.
    return min(max(delta_ns / (elapsed_s * 1e7), 0.0), 100.0)


def snapshot(
    before: HostSample,
    after: HostSample,
    excluded: Callable[[str], bool] = lambda domain: False,
) -> Snapshot | None:
    """Loads over the interval between two samples, or None if the interval is unusable.

    A vCPU present only in `after` (a domain that just started) has no load yet and is left out
    until the next interval; so is one whose counter went backwards (its domain restarted).
    """
    elapsed = after.clock - before.clock
    if elapsed <= 0:
        log.warning("interval of %.3f s between samples; skipping this cycle", elapsed)
        return None
    pcpu_load = {
        pcpu: _percent(busy - before.pcpu_busy_ns[pcpu], elapsed)
        for pcpu, busy in after.pcpu_busy_ns.items()
        if pcpu in before.pcpu_busy_ns
    }
    vcpus: list[Vcpu] = []
    for ref, now in after.vcpus.items():
        then = before.vcpus.get(ref)
        if then is None or now.time_ns < then.time_ns:
            continue
        load = _percent(now.time_ns - then.time_ns, elapsed)
        demand = load
        saturated = all(pcpu_load.get(p, 0.0) >= SATURATED for p in now.affinity)
        if saturated and now.wait_ns is not None and then.wait_ns is not None:
            demand = min(100.0, load + _percent(now.wait_ns - then.wait_ns, elapsed))
        vcpus.append(
            Vcpu(
                ref=ref,
                load=load,
                demand=demand,
                affinity=now.affinity,
                excluded=excluded(ref.domain),
            )
        )
    vcpus.sort(key=lambda v: v.ref)
    return Snapshot(pcpu_load=pcpu_load, vcpus=tuple(vcpus))


class Smoother:
    """Steadies vCPU loads across cycles, and estimates how noisy each one is.

    Each vCPU's load and demand are averaged exponentially, so noise shrinks while the level
    stays; a change larger than the noise (a guest starting a job) resets the average at once,
    so real changes still show within one cycle. The noise estimate, the median step between
    consecutive raw demands, is robust to those occasional jumps.
    """

    ALPHA = 0.3
    HISTORY = 8
    # Median of |X1 - X2| for two independent normal draws, in units of their sigma.
    MEDIAN_STEP = 0.954
    # The sigma of an exponential average of independent values, relative to theirs.
    SHRINK = (ALPHA / (2 - ALPHA)) ** 0.5
    JUMP_SIGMAS = 4.0

    def __init__(self) -> None:
        self._state: dict[VcpuRef, tuple[float, float, list[float]]] = {}

    def forget(self) -> None:
        self._state.clear()

    def update(self, snapshot: Snapshot, min_jump: float) -> Snapshot:
        """Steadied loads for `snapshot`; a change above `min_jump` (and the noise) resets."""
        state: dict[VcpuRef, tuple[float, float, list[float]]] = {}
        vcpus = []
        shift: dict[int, float] = defaultdict(float)
        for vcpu in snapshot.vcpus:
            prior = self._state.get(vcpu.ref)
            if prior is None:
                load, demand, history = vcpu.load, vcpu.demand, [vcpu.demand]
                noise = 0.0
            else:
                load, demand, history = prior
                noise = _step_sigma(history)
                jump = max(self.JUMP_SIGMAS * noise, min_jump)
                # The received load jumps on its own when a move ends contention: follow it
                # at once too, or the pCPU it left would look busier than it is.
                if abs(vcpu.demand - demand) > jump or abs(vcpu.load - load) > jump:
                    load, demand = vcpu.load, vcpu.demand
                else:
                    load += self.ALPHA * (vcpu.load - load)
                    demand += self.ALPHA * (vcpu.demand - demand)
                history = [*history[-(self.HISTORY - 1) :], vcpu.demand]
                noise = _step_sigma(history)
            state[vcpu.ref] = (load, demand, history)
            pcpu = vcpu.pcpu
            if pcpu is not None:
                shift[pcpu] += load - vcpu.load
            vcpus.append(replace(vcpu, load=load, demand=demand, noise=noise * self.SHRINK))
        self._state = state
        # What a pCPU holds beyond its pinned vCPUs (host work) stays as measured; only the
        # vCPUs' part of its utilization is replaced by their steadied loads.
        pcpu_load = {p: min(100.0, max(0.0, u + shift[p])) for p, u in snapshot.pcpu_load.items()}
        return Snapshot(pcpu_load=pcpu_load, vcpus=tuple(vcpus))


def _step_sigma(history: list[float]) -> float:
    if len(history) < 3:
        return 0.0
    steps = [abs(b - a) for a, b in itertools.pairwise(history)]
    return statistics.median(steps) / Smoother.MEDIAN_STEP
