"""Loads from two host samples: pure arithmetic, no I/O."""

from __future__ import annotations

import logging
from collections.abc import Callable

from vcpusched.model import HostSample, Snapshot, Vcpu

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
        if now.wait_ns is not None and then.wait_ns is not None:
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
