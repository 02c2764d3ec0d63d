"""Each vCPU's demand as an estimate over a window of readings: pure arithmetic, no I/O.

A reading of a vCPU that idled is exact: it got all it wanted, so its demand is what it
received. A reading of a vCPU that is `short` of time (it never idled) is a bound: it wanted at
least what it received and at most all the time it was runnable. So the estimator remembers
exact readings, and reads a bound as the largest remembered exact value that the bound allows
(the demand seen when it last had room), or as its top, marked a guess, when none does.

A vCPU is then known by its series of estimated demands over the last WINDOW intervals, the
same intervals for every vCPU, so that a placement can be judged interval by interval: two
vCPUs that burst in turn add up to a steady pCPU, two that burst together do not.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import statistics
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from vcpusched.model import Snapshot, Vcpu, VcpuRef

# Intervals a vCPU is judged over: long enough to hold a few periods of a guest that bursts
# every few intervals, short enough that a real change of load has moved the level within a few
# cycles (the plan reacts to the series, not to its mean alone).
WINDOW = 16
# Demand above what it received by more than this (points): the vCPU was short of time. The
# one definition of `short`, used for readings and for pCPUs alike.
SHORT = 1.0
# A vCPU's level has changed when its latest reading leaves the spread of the readings before
# it by this many standard deviations (of the difference of the two means), and by at least
# JUMP_POINTS: from then on only the readings since the change describe it. A vCPU that bursts
# shows its spread in its window, and its bursts stay within it.
JUMP_SIGMAS = 4.0
JUMP_POINTS = 2.0
# Readings a level needs before a jump from it counts: until then its spread is unknown. (On
# the lab, bound readings of guests sharing a full pCPU wander between 85 and 100, and with
# one reading to go by each step looked like a new level, which put off the first move.)
LEVEL_READINGS = 3
# Readings a floating vCPU that reads short is measured over before it is placed. On the lab a
# 50% guest sharing full pCPUs with 100% ones idles in bursts, and only the mean of several
# intervals ranks the two kinds apart (see docs/policy-history.md).
PLACE_SAMPLES = 8


# (received, demand, short) per reading, the latest last.
Readings = Sequence[tuple[float, float, bool]]


def short(vcpu: Vcpu) -> bool:
    """Whether this reading of `vcpu` is a bound: it never idled, so it may have wanted more.
    One that received a whole pCPU never idled either."""
    return vcpu.demand > vcpu.received + SHORT or vcpu.received >= 100.0 - SHORT


@dataclass(frozen=True, slots=True)
class Estimate:
    """One vCPU's estimated demand, interval by interval over the window (oldest first)."""

    series: tuple[float, ...]
    # Readings taken of it (the series is padded with its first reading before that).
    readings: int
    # Its latest reading is a bound: what it would use with more room is a guess.
    guess: bool
    # A floating vCPU still being measured before it is placed.
    measuring: bool = False
    # Where the series holds a bound read at its top, what the readings say it wanted for
    # sure: what it received there (the series' own value elsewhere). None where it holds none.
    floor: tuple[float, ...] | None = None

    @property
    def mean(self) -> float:
        return sum(self.series) / len(self.series)

    @property
    def flat(self) -> bool:
        """The same in every interval: one interval tells all."""
        first = self.series[0]
        return all(x == first for x in self.series)


@dataclass(slots=True)
class _History:
    affinity: frozenset[int]
    # (received, demand, short) per reading, the latest last.
    readings: deque[tuple[float, float, bool]] = field(default_factory=lambda: deque(maxlen=WINDOW))
    # The same readings' demands alone, and whether each was exact: what every estimate
    # starts from, copied in one go.
    demands: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    exacts: deque[bool] = field(default_factory=lambda: deque(maxlen=WINDOW))
    # The latest exact reading, kept after it has left the window.
    exact: float | None = None
    # Where in `readings` the current level began (its latest change).
    start: int = 0
    # Short readings in the window: with none, every reading is its own demand.
    shorts: int = 0


class Estimator:
    """Keeps each vCPU's readings; `update` turns a snapshot into estimates. It keeps each
    pCPU's host work too (`smooth_host_work`)."""

    def __init__(self) -> None:
        self._history: dict[VcpuRef, _History] = {}
        self._intervals = 0
        self._host_work: dict[int, deque[float]] = {}

    def forget(self) -> None:
        self._history.clear()
        self._intervals = 0
        self._host_work.clear()

    def smooth_host_work(self, snapshot: Snapshot) -> Snapshot:
        """`snapshot` with each pCPU's host work (the time its vCPUs do not explain) read over
        the window like a vCPU's demand: the latest reading where it fell (a process gone),
        else the window's median. A host burst of one interval is no reason to move a guest,
        and read alone it once made a pCPU look full."""
        # A floating vCPU's time is a vCPU's, not the host's: taken as spread evenly over its
        # pCPUs, so that placing it leaves no trace in the window.
        vcpus: dict[int, float] = defaultdict(float)
        for vcpu in snapshot.vcpus:
            for p in vcpu.affinity:
                vcpus[p] += vcpu.received / len(vcpu.affinity)
        util: dict[int, float] = {}
        kept: dict[int, deque[float]] = {}
        for p, u in snapshot.util.items():
            rest = max(0.0, u - vcpus[p])
            window = self._host_work.get(p) or deque(maxlen=WINDOW)
            window.append(rest)
            kept[p] = window
            util[p] = u - rest + min(rest, statistics.median(window))
        self._host_work = kept
        return dataclasses.replace(snapshot, util=util)

    @property
    def intervals(self) -> int:
        """The length of every series: intervals seen, up to WINDOW."""
        return self._intervals

    def update(self, snapshot: Snapshot) -> dict[VcpuRef, Estimate]:
        self._intervals = min(self._intervals + 1, WINDOW)
        history: dict[VcpuRef, _History] = {}
        out: dict[VcpuRef, Estimate] = {}
        for vcpu in snapshot.vcpus:
            kept = self._history.get(vcpu.ref)
            floating = vcpu.pcpu is None
            if kept is None or (floating and kept.affinity != vcpu.affinity):
                # New, or it began to float just now: what came before says nothing of the
                # partition it is about to be placed in.
                kept = _History(vcpu.affinity)
            kept.affinity = vcpu.affinity
            is_short = short(vcpu)
            if len(kept.readings) == WINDOW:
                kept.start = max(0, kept.start - 1)
                kept.shorts -= kept.readings[0][2]
            kept.readings.append((vcpu.received, vcpu.demand, is_short))
            kept.demands.append(vcpu.demand)
            kept.exacts.append(not is_short)
            kept.shorts += is_short
            if not is_short:
                kept.exact = vcpu.demand
            history[vcpu.ref] = kept
            out[vcpu.ref] = self._estimate(kept, floating)
        self._history = history
        return out

    def _estimate(self, kept: _History, floating: bool) -> Estimate:
        readings = kept.readings
        floors: list[float] | None = None
        if kept.shorts:
            known = list(itertools.compress(kept.demands, kept.exacts))
            if kept.exact is not None:
                known.append(kept.exact)
            known.sort()
            values = []
            floors = []
            for r, d, s in readings:
                value = _read_bound(r, d, known) if s else d
                # A bound read at its top says for sure only what the vCPU received.
                values.append(d if value is None else value)
                floors.append(r if value is None else value)
        else:
            values = list(kept.demands)
        kept.start = _level_start(values, kept.start, readings if kept.shorts else None)
        series = self._padded(values[kept.start :])
        floor = None
        if floors is not None:
            level_floors = floors[kept.start :]
            if level_floors != values[kept.start :]:
                floor = self._padded(level_floors)
        is_short = readings[-1][2]
        ever_short = kept.shorts > 0
        return Estimate(
            series=series,
            readings=len(values) - kept.start,
            guess=is_short,
            measuring=floating and ever_short and len(readings) < PLACE_SAMPLES,
            floor=floor,
        )

    def _padded(self, level: list[float]) -> tuple[float, ...]:
        # Before its level changed the vCPU was another one: its current level, repeated,
        # stands in for those intervals.
        pad = self._intervals - len(level)
        series = tuple(level)
        if pad:
            series = tuple(level[i % len(level)] for i in range(-pad, 0)) + series
        return series


def _level_start(values: list[float], start: int, readings: Readings | None = None) -> int:
    """Where the current level of `values` begins: a jump in the latest readings (up to
    LEVEL_READINGS of them, each beyond all the window saw before them) starts a new one; a
    jump that the readings since no longer bear out is forgotten.

    Several readings, not only the latest: a change that one reading leaves within the spread
    of the window (widened by an outlier) is told by the next two, where before it was taken
    only once the window had forgotten the old level."""
    n = len(values)
    most = min(LEVEL_READINGS, n - start - LEVEL_READINGS)
    if most > 0:
        # This runs for every vCPU every cycle, so the cheap tests first. The latest reading
        # is in every group, and each group's `before` holds `base`: unless it lies beyond
        # the range of `base`, no group jumps.
        base = values[: n - most]
        hi, lo, x = max(base), min(base), values[-1]
        if x > hi + JUMP_POINTS or x < lo - JUMP_POINTS:
            ranges: dict[int, tuple[float, float]] = {}  # of values[: n - k]
            for k in range(most, 0, -1):
                ranges[k] = (hi + JUMP_POINTS, lo - JUMP_POINTS)
                hi, lo = max(hi, values[n - k]), min(lo, values[n - k])
            for k in range(1, most + 1):
                group = values[n - k :]
                above, below = ranges[k]
                if (all(v > above for v in group) or all(v < below for v in group)) and _apart(
                    values, readings, start, n - k
                ):
                    return n - k
    if start > 0 and not _apart(values, readings, 0, start):
        return 0
    return start


def _apart(values: list[float], readings: Readings | None, first: int, split: int) -> bool:
    """Whether values[split:] are another level than values[first:split].

    By their spread, or for sure: where bounds are read at their top, their spread says
    nothing (guests on a full pCPU read 50 to 100 by turns), but two readings or more that
    lie wholly beyond what every earlier one said for sure are a change. (On a slow lab, two
    guests set to 40 filled a pCPU and read as bounds; set to 20, they read 20 exactly where
    each had received at least 36, and the spread of the bounds' tops hid it for a window.)"""
    before, after = values[first:split], values[split:]
    if readings is not None and len(after) >= 2:
        # What each reading says for sure: an exact one its demand, a bound at least what
        # it received and at most its top.
        bounds = [(r, d) if s else (d, d) for r, d, s in readings]
        old, new = bounds[first:split], bounds[split:]
        if any(lo < hi for lo, hi in old):
            if max(hi for _, hi in new) < min(lo for lo, _ in old) - JUMP_POINTS:
                return True
            if min(lo for lo, _ in new) > max(hi for _, hi in old) + JUMP_POINTS:
                return True
    return jumps(before, after)


def jumps(before: list[float], after: list[float]) -> bool:
    """Whether the mean of `after` differs from that of `before` beyond their spread."""
    m1, m2 = sum(before) / len(before), sum(after) / len(after)
    ss = sum((x - m1) ** 2 for x in before) + sum((x - m2) ** 2 for x in after)
    free = len(before) + len(after) - 2
    sd = (ss / free) ** 0.5 if free > 0 else 0.0
    bar = JUMP_SIGMAS * sd * (1 / len(before) + 1 / len(after)) ** 0.5
    return bool(abs(m2 - m1) > max(bar, JUMP_POINTS))


def _read_bound(received: float, demand: float, known: Sequence[float]) -> float | None:
    """A short reading's demand: the largest exact reading it allows (`known`, sorted), else
    None: then it is read at its top, all the time it was runnable. That top is a guess: the
    policy never lets it crowd out a vCPU whose demand is known, a pCPU that takes one takes
    nothing more until its next reading, and a step must gain with it at its floor too
    (`Estimate.floor`)."""
    i = bisect.bisect_right(known, demand)
    return known[i - 1] if i and known[i - 1] >= received - SHORT else None
