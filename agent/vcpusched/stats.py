"""Readings from two host samples: pure arithmetic, no I/O."""

from __future__ import annotations

import logging
from collections.abc import Callable

from vcpusched.model import HostSample, Snapshot, Vcpu

log = logging.getLogger(__name__)

# Points of an interval a vCPU must spend asleep (neither running nor waiting) to count as
# having received all it wanted. About three standard deviations of the sleep that the lab
# measures for a vCPU that never idles (counters of different precision jitter by ±1-3 points
# over 2 s), so a starved vCPU is not mistaken for a satisfied one by noise alone.
SATISFIED_SLEEP = 10.0


def _percent(delta_ns: int, elapsed_s: float) -> float:
    # Counters of different precision (10 ms ticks beside exact ns) can step backwards or
    # overshoot a little over a short window; clamp instead of reporting nonsense.
    return min(max(delta_ns / (elapsed_s * 1e7), 0.0), 100.0)


def _utilization(before: HostSample, after: HostSample, pcpu: int, elapsed: float) -> float:
    busy = after.pcpu_busy_ns[pcpu] - before.pcpu_busy_ns[pcpu]
    if pcpu in after.pcpu_idle_ns and pcpu in before.pcpu_idle_ns:
        counted = busy + after.pcpu_idle_ns[pcpu] - before.pcpu_idle_ns[pcpu]
        if counted > 0:
            # Out of the time the pCPU was there to run: a hypervisor below this host can
            # take some of the wall clock, and a pCPU that runs whenever it can is full.
            return min(max(100.0 * busy / counted, 0.0), 100.0)
    return _percent(busy, elapsed)


def snapshot(
    before: HostSample,
    after: HostSample,
    excluded: Callable[[str], bool] = lambda domain: False,
) -> Snapshot | None:
    """Readings over the interval between two samples, or None if the interval is unusable.

    A vCPU present only in `after` (a domain that just started) has no reading yet and is left out
    until the next interval; so is one whose counter went backwards (its domain restarted).
    """
    elapsed = after.clock - before.clock
    if elapsed <= 0:
        log.warning("interval of %.3f s between samples; skipping this cycle", elapsed)
        return None
    util = {
        pcpu: _utilization(before, after, pcpu, elapsed)
        for pcpu in after.pcpu_busy_ns
        if pcpu in before.pcpu_busy_ns
    }
    vcpus: list[Vcpu] = []
    for ref, now in after.vcpus.items():
        then = before.vcpus.get(ref)
        if then is None or now.time_ns < then.time_ns:
            continue
        received = _percent(now.time_ns - then.time_ns, elapsed)
        demand = received
        if now.wait_ns is not None and then.wait_ns is not None:
            demand = _demand(received, _percent(now.wait_ns - then.wait_ns, elapsed))
        vcpus.append(
            Vcpu(
                ref=ref,
                received=received,
                demand=demand,
                affinity=now.affinity,
                excluded=excluded(ref.domain),
            )
        )
    vcpus.sort(key=lambda v: v.ref)
    return Snapshot(util=util, vcpus=tuple(vcpus), topology=after.topology, memory=after.memory)


def _demand(received: float, wait: float) -> float:
    """What a vCPU would have used with a pCPU of its own, from the time it ran and waited.

    The wait alone does not tell: a vCPU sharing a pCPU waits while the others run even when
    it gets all it wants, and on the lab a 30% guest beside two others showed 47 points of
    wait. What tells is sleep, the rest of the interval. A vCPU that went idle had run out of
    work, so what it received was its demand; one that never idled fell behind, and wants up
    to all the time it was runnable. Between the two the wait counts in proportion, so that
    the estimate has no step for noise to flip across.
    """
    sleep = max(0.0, 100.0 - received - wait)
    starved = max(0.0, 1.0 - sleep / SATISFIED_SLEEP)
    return min(100.0, received + wait * starved)
