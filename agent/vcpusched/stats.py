"""Readings from two host samples, and their smoothing: pure arithmetic, no I/O."""

from __future__ import annotations

import itertools
import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace

from vcpusched.model import SHORT, HostSample, Snapshot, Vcpu, VcpuRef

log = logging.getLogger(__name__)

# Points of an interval a vCPU must spend asleep (neither running nor waiting) to count as
# having received all it wanted. About three standard deviations of the sleep that the lab
# measures for a vCPU that never idles (counters of different precision jitter by ±1-3 points
# over 2 s), so a starved vCPU is not mistaken for a satisfied one by noise alone.
SATISFIED_SLEEP = 10.0
# Samples a floating vCPU whose demand is uncertain is measured over before it is placed. On
# the lab a 50% guest sharing full pCPUs with 100% ones idles in bursts (0-5 points in one
# 2-second interval, none in the next three): the median of 3 samples ranked the two kinds
# right in 26 of 38 windows, the mean of 8 in 32 of 33.
PLACE_SAMPLES = 8


def _percent(delta_ns: int, elapsed_s: float) -> float:
    # Counters of different precision (10 ms ticks beside exact ns) can step backwards or
    # overshoot a little over a short window; clamp instead of reporting nonsense.
    return min(max(delta_ns / (elapsed_s * 1e7), 0.0), 100.0)


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
        pcpu: _percent(busy - before.pcpu_busy_ns[pcpu], elapsed)
        for pcpu, busy in after.pcpu_busy_ns.items()
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
    return Snapshot(util=util, vcpus=tuple(vcpus))


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


class Smoother:
    """Steadies vCPU loads across cycles, and estimates how noisy each one is.

    Each vCPU's load and demand are averaged exponentially, so noise shrinks while the level
    stays; a change larger than the noise (a guest starting a job) resets the average at once,
    so real changes still show within one cycle. The noise estimate, the median step between
    consecutive raw demands, is robust to those occasional jumps.

    A floating vCPU (one that may run on several pCPUs) is different: it is about to be
    placed once, and a wrong placement sticks, because once both pCPUs are full nothing
    measured tells a vCPU that wants 100 from one that wants 50 (on the lab both run about
    half the time and wait the rest, and only the lighter one idles, a few points in each
    interval). So its demand is the mean of its raw demands since it began to float (a
    median, or a trimmed mean, drops the light one's bursts of idle, which are all that tells
    it apart), and one that was ever short of time is held back (`settling`) until
    PLACE_SAMPLES of them are in. Meanwhile the kernel balances it, as before the agent ran.
    """

    ALPHA = 0.3
    HISTORY = 8
    # Median of |X1 - X2| for two independent normal draws, in units of their sigma.
    MEDIAN_STEP = 0.954
    # The sigma of an exponential average of independent values, relative to theirs, once
    # it has run long (`_shrink` gives it after n samples).
    SHRINK = (ALPHA / (2 - ALPHA)) ** 0.5
    JUMP_SIGMAS = 4.0
    # Until a vCPU has PRIOR_SAMPLES readings no step of its own tells how noisy it is, and
    # its pCPU's load is taken to be this noisy (one figure per pCPU, however many vCPUs are
    # new there): a few times what the lab's guests show per reading (0.3-0.9). Without it a
    # freshly started agent took its first readings for exact, and on a shared host swapped
    # two equal 40% guests of a balanced pinning it had just adopted.
    PRIOR_NOISE = 2.0
    PRIOR_SAMPLES = 3

    def __init__(self) -> None:
        self._state: dict[VcpuRef, _State] = {}

    def forget(self) -> None:
        self._state.clear()

    def update(self, snapshot: Snapshot, min_jump: float) -> Snapshot:
        """Steadied loads for `snapshot`; a change above `min_jump` (and the noise) resets."""
        state: dict[VcpuRef, _State] = {}
        vcpus = []
        shift: dict[int, float] = defaultdict(float)
        unknown: set[int] = set()  # pCPUs holding a vCPU whose noise is not known yet
        for vcpu in snapshot.vcpus:
            prior = self._state.get(vcpu.ref)
            floating = vcpu.pcpu is None
            if prior is not None and floating and prior.affinity != vcpu.affinity:
                prior = None  # began to float just now: what came before says nothing
            short = vcpu.demand > vcpu.received + SHORT
            if prior is None:
                now = _State(vcpu.received, vcpu.demand, [vcpu.demand], vcpu.affinity, short)
            else:
                load, demand, history = prior.load, prior.demand, prior.history
                noise = prior.noise()
                jump = max(self.JUMP_SIGMAS * noise, min_jump)
                carried = prior.carried
                # The received load jumps on its own when a move ends contention: follow it
                # at once too, or the pCPU it left would look busier than it is.
                if abs(vcpu.demand - demand) > jump or abs(vcpu.received - load) > jump:
                    load, demand = vcpu.received, vcpu.demand
                    averaged = 0
                    if not floating:
                        # A new level: steps across the jump are not noise (counted as such,
                        # a vCPU whose demand a move revealed looked noisy for cycles after),
                        # so the noise known before it stands until new steps replace it.
                        history, carried = [], noise
                else:
                    load += self.ALPHA * (vcpu.received - load)
                    demand += self.ALPHA * (vcpu.demand - demand)
                    averaged = prior.averaged + 1
                history = [*history[-(self.HISTORY - 1) :], vcpu.demand]
                now = _State(
                    load,
                    demand,
                    history,
                    vcpu.affinity,
                    prior.short or short,
                    carried,
                    averaged,
                    min(prior.seen + 1, self.PRIOR_SAMPLES),
                )
            noise = now.noise() * _shrink(now.averaged)
            state[vcpu.ref] = now
            pcpu = vcpu.pcpu
            if pcpu is not None:
                shift[pcpu] += now.load - vcpu.received
                if now.seen < self.PRIOR_SAMPLES:
                    unknown.add(pcpu)
            demand = statistics.fmean(now.history) if floating else now.demand
            vcpus.append(
                replace(
                    vcpu,
                    received=now.load,
                    demand=demand,
                    noise=noise,
                    settling=floating and now.short and len(now.history) < PLACE_SAMPLES,
                )
            )
        self._state = state
        # What a pCPU holds beyond its pinned vCPUs (host work) stays as measured; only the
        # vCPUs' part of its utilization is replaced by their steadied loads.
        util = {p: min(100.0, max(0.0, u + shift[p])) for p, u in snapshot.util.items()}
        pcpu_noise = {p: self.PRIOR_NOISE for p in unknown if p in util}
        return Snapshot(util=util, vcpus=tuple(vcpus), pcpu_noise=pcpu_noise)


@dataclass(slots=True)
class _State:
    load: float
    demand: float
    history: list[float]  # raw demands, the latest last
    affinity: frozenset[int]
    short: bool  # short of time in some interval of `history`
    carried: float = 0.0  # the noise from before the last jump, until `history` can tell
    averaged: int = 0  # samples averaged in since the level was last set from one sample
    seen: int = 1  # samples since it was first seen, up to Smoother.PRIOR_SAMPLES

    def noise(self) -> float:
        measured = _step_sigma(self.history) if len(self.history) >= 3 else 0.0
        # A few steps can look calm by chance: the noise known before stays a floor until a
        # full history can speak for itself.
        return measured if len(self.history) >= Smoother.HISTORY else max(measured, self.carried)


def _shrink(averaged: int) -> float:
    """Sigma of the average, relative to one sample's, `averaged` samples after it was set
    from a single one: right after a jump the level is one raw sample, as noisy as any."""
    kept = (1.0 - Smoother.ALPHA) ** (2 * averaged)
    return math.sqrt(kept + Smoother.SHRINK**2 * (1.0 - kept))


def _step_sigma(history: list[float]) -> float:
    steps = [abs(b - a) for a, b in itertools.pairwise(history)]
    return statistics.median_low(steps) / Smoother.MEDIAN_STEP
