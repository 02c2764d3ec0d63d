"""The balancing policy: one objective, and the search for placements that serve it.

The objective. Under the kernel's max-min fair sharing, a placement predicts for every vCPU
the share of its demand it would receive. A placement is better when, interval by interval
over the window of joint readings (`estimate`), it lowers
  - the *shortfall*, sum over vCPUs of m + m^2 / demand with m = demand - received, which is
    zero when every vCPU gets what it wants and otherwise weighs most the worst-off ones, then
  - the *spread* of pCPU demand, counted up to a pCPU's capacity: beyond it the shortfall tells.
A step (a move, a swap, or an exchange of a few vCPUs between two pCPUs) is taken when its
mean gain over the window, less its uncertainty (how much the gain varies across the window,
a prior while few readings are in, and for a step made for the spread alone what the pCPUs'
speeds may change of the demand it moves), is at least `min_gain` per pin it changes, and it
does not lower the worst-off vCPU's share on the pCPUs it changes (worst-off first).

So moving a vCPU off a pCPU where five share the time onto one that holds one is a gain, and
moving work onto a full pCPU where it would only move the waiting is not. Two vCPUs that burst
in turn add up to a steady pCPU; a placement that looks better in some intervals and worse in
others gains less than its uncertainty and is left alone.

Where steps end short of balance (they take one gain at a time), a whole partition of the
vCPUs replaces them if it gains on their outcome `min_gain` for every pin it adds (`_repack`).

The thresholds choose among steps that gain: while a *high* pCPU (above `high`, more than one
vCPU) and a *low* one (below `low`) remain, the step taken first is the move from high to low
that brings the low one closest to `target`. Floating vCPUs (allowed on several pCPUs, or
pinned outside `cpus`) are pinned once, heaviest first, onto the least loaded pCPU.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import itertools
import math
import operator
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from vcpusched import capacity
from vcpusched.config import Config
from vcpusched.estimate import WINDOW, Estimate, Estimator, jumps, short
from vcpusched.model import Move, Plan, Snapshot, Vcpu, VcpuRef

CAPACITY = 100.0
# The uncertainty of a gain (points) until every vCPU it involves has PRIOR_READINGS readings
# of its current level, when the spread of the gain across them can tell: three times the 2
# points of noise per pCPU the lab's readings show. (A restarted agent must not swap two equal
# guests on its first reading of them.)
PRIOR_GAIN = 6.0
PRIOR_READINGS = 3
# What a vCPU's demand may read other on another pCPU with no change of its own, as a
# fraction of it: pCPUs run the same work at speeds that differ and drift (a busy sibling
# thread, a virtual host's neighbours), and readings follow the pCPU. 0.03 let the lab's
# drift swap two equal guests; 0.08 leaves the benchmark's noisy host short of balance.
SPEED = 0.06
# Nothing is judged on one reading of a vCPU's level: it says nothing of how the vCPU varies
# (a guest that bursts one interval in four reads like a heavy one in that interval).
MIN_READINGS = 2
# Candidates per pair of pCPUs, the nearest fits by mean demand, and how many of the best of
# them are judged over the window.
CANDIDATES = 4
JUDGED = 4
# Exchanges of several vCPUs are searched only where single steps are stuck, and only
# between pCPUs holding at most this many movable vCPUs, against this many partners.
EXCHANGE_VCPUS = 10
EXCHANGE_PARTNERS = 4
# The least loaded pCPUs a loaded one is paired with, and the rounds of steps a plan makes:
# what keeps a plan on a host of thousands of vCPUs within milliseconds.
PARTNERS = 4
ROUNDS = 64
# Steps judged per plan at most: what a plan on a crowded host of thousands of vCPUs leaves
# to the next cycle, to stay within its time (a step judged costs up to a few tens of µs).
JUDGE_BUDGET = 800
# A vCPU whose readings over the window stay within this (points) is steady.
FLAT_POINTS = 0.5
# A repack (`_repack`) is searched on nodes of at most this many pCPUs: laying its bins on
# pCPUs is quadratic in them. Within it, vCPUs whose mean demands round alike to this many
# points count as one size, that may stay where it is.
REPACK_PCPUS = 64
REPACK_SIZE = 1.0
# Cycles a pCPU's doubt (`_Outcomes`) is kept at first: long enough that a pCPU which runs
# its guests slower is not tried again within a few windows of readings, short enough that a
# drift that has passed stops asking more of every step there. Each surprise in a row doubles
# it, up to DOUBT_DOUBLINGS times.
DOUBT_CYCLES = 4 * WINDOW
DOUBT_DOUBLINGS = 4


class Planner(Protocol):
    """What the agent's cycle asks of a policy (the benchmark hands it others to compare)."""

    def reconfigure(self, config: Config) -> None: ...
    def plan(self, snapshot: Snapshot, online: frozenset[int]) -> Plan: ...
    def applied(self, moves: Sequence[Move]) -> None: ...
    def forget(self) -> None: ...


class Balancer:
    """Everything the policy remembers across cycles, and the plan made from it.

    It is fed each cycle's measured snapshot (`plan`) and the moves really pinned (`applied`);
    what it remembers is each vCPU's window of readings (`estimate.Estimator`), and what the
    readings said after its last steps (`_Outcomes`).
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self._estimator = Estimator()
        self._outcomes = _Outcomes()
        self._estimates: Mapping[VcpuRef, Estimate] = {}

    def reconfigure(self, config: Config) -> None:
        self.config = config

    def forget(self) -> None:
        """Drop the readings: after a reconnect the counters may have moved on without us."""
        self._estimator.forget()
        self._outcomes = _Outcomes()
        self._estimates = {}

    def plan(self, snapshot: Snapshot, online: frozenset[int]) -> Plan:
        estimates = self._estimator.update(snapshot)
        self._estimates = estimates
        doubt, learnt = self._outcomes.update(snapshot)
        snapshot = self._estimator.smooth_host_work(snapshot)
        if capacity.flat(snapshot.topology):
            plan = decide(snapshot, estimates, self.config, online, doubt)
        else:
            plan = capacity.plan_by_node(snapshot, estimates, self.config, online, decide, doubt)
        return dataclasses.replace(plan, doubts=learnt) if learnt else plan

    def applied(self, moves: Sequence[Move]) -> None:
        """What was really pinned. A demand does not depend on where it was read, so the
        estimates carry over a move unchanged; the readings after it are checked for that."""
        self._outcomes.applied(moves, self._estimates)


@dataclass(slots=True)
class _Moved:
    src: int
    dst: int
    level: tuple[float, ...]  # its current level's readings when it moved
    after: list[float] = field(default_factory=list)


class _Outcomes:
    """What the readings after each step said of the premise of every plan: that a vCPU's
    demand is the same wherever it runs. Where a vCPU the policy moved, steady and known, reads
    another level at its new pCPU than at its old one, the readings depend on the pCPUs (one
    that runs its guests slower, or a drift of the host below), and swapping equal guests
    between them would chase that. So for a while a step on either pCPU must gain that much
    more: its doubt, in points. The while is DOUBT_CYCLES, doubled each time the pCPU's next
    step is surprised again, and reset by a step whose vCPUs read as before (the lab case is
    in docs/policy-history.md)."""

    def __init__(self) -> None:
        self._moved: dict[VcpuRef, _Moved] = {}
        self._doubt: dict[int, tuple[float, int]] = {}  # pCPU -> (points, cycle it ends)
        self._surprises: Counter[int] = Counter()  # in a row, per pCPU
        self._cycle = 0

    def applied(self, moves: Sequence[Move], estimates: Mapping[VcpuRef, Estimate]) -> None:
        for m in moves:
            e = estimates.get(m.ref)
            if len(m.src) != 1 or e is None or e.guess or e.readings < MIN_READINGS:
                self._moved.pop(m.ref, None)  # nothing known to compare with
                continue
            self._moved[m.ref] = _Moved(next(iter(m.src)), m.dst, e.series[-e.readings :])

    def update(self, snapshot: Snapshot) -> tuple[dict[int, float], dict[int, tuple[float, int]]]:
        """Take this interval's readings of the moved vCPUs: the doubt per pCPU now, and the
        doubts learnt from them (points, cycles kept)."""
        self._cycle += 1
        found: dict[int, float] = defaultdict(float)
        confirmed: set[int] = set()
        seen = {v.ref: v for v in snapshot.vcpus}
        for ref, m in list(self._moved.items()):
            vcpu = seen.get(ref)
            if vcpu is None or vcpu.pcpu != m.dst or short(vcpu):
                del self._moved[ref]  # gone, moved on, or its demand is no longer known
                continue
            m.after.append(vcpu.demand)
            if len(m.after) < MIN_READINGS:
                continue
            del self._moved[ref]
            if jumps(list(m.level), m.after):
                change = abs(sum(m.after) / len(m.after) - sum(m.level) / len(m.level))
                found[m.src] += change
                found[m.dst] += change
            else:
                confirmed |= {m.src, m.dst}
        for p in confirmed - found.keys():
            self._surprises.pop(p, None)
        learnt: dict[int, tuple[float, int]] = {}
        for p, points in found.items():
            self._surprises[p] += 1
            keep = DOUBT_CYCLES << min(self._surprises[p] - 1, DOUBT_DOUBLINGS)
            kept, _ = self._doubt.get(p, (0.0, 0))
            self._doubt[p] = (max(points, kept), self._cycle + keep)
            learnt[p] = (round(points, 1), keep)
        self._doubt = {p: d for p, d in self._doubt.items() if d[1] > self._cycle}
        return {p: points for p, (points, _) in self._doubt.items()}, learnt


def allowed_pcpus(config: Config, online: Iterable[int]) -> frozenset[int]:
    online_set = frozenset(online)
    return online_set if config.cpus is None else online_set & config.cpus


def pcpu_demand(snapshot: Snapshot, floating: Iterable[Vcpu] = ()) -> dict[int, float]:
    """Each pCPU's demand from one snapshot: its vCPUs' demands plus the work no pinned vCPU
    explains (host work, unpinned vCPUs, less those about to be placed)."""
    other = _other_work(snapshot, floating)
    demand = dict(other)
    for vcpu in snapshot.vcpus:
        pcpu = vcpu.pcpu
        if pcpu is not None and pcpu in demand:
            demand[pcpu] += vcpu.demand
    return demand


def _other_work(snapshot: Snapshot, floating: Iterable[Vcpu]) -> dict[int, float]:
    """Utilization on each pCPU that its pinned vCPUs do not explain. The floating vCPUs about
    to be placed are taken out of it, in proportion, since placing them moves their time."""
    pinned: dict[int, float] = defaultdict(float)
    for vcpu in snapshot.vcpus:
        pcpu = vcpu.pcpu
        if pcpu is not None:
            pinned[pcpu] += vcpu.received
    rest = {p: max(0.0, u - pinned[p]) for p, u in snapshot.util.items()}
    moving = sum(v.received for v in floating)
    total = sum(rest.values())
    share = min(1.0, moving / total) if total > 0 else 0.0
    return {p: r * (1.0 - share) for p, r in rest.items()}


def predicted_shares(demands: Sequence[float], capacity: float = CAPACITY) -> list[float]:
    """The share of its demand each vCPU receives when they split `capacity` max-min fairly."""
    level = water_level(demands, capacity)
    return [1.0 if d <= level else level / d for d in demands]


def water_level(demands: Iterable[float], capacity: float) -> float:
    """The share L with sum(min(d, L)) == capacity, or inf when every demand fits."""
    ordered = sorted(demands)
    if sum(ordered) <= capacity:
        return math.inf
    remaining = max(capacity, 0.0)
    for i, demand in enumerate(ordered):
        share = remaining / (len(ordered) - i)
        if demand >= share:
            return share
        remaining -= demand
    return math.inf  # unreachable: the sum exceeded the capacity


def _fill(values: Sequence[float], other: float) -> tuple[float, float]:
    """(shortfall, worst share) of vCPUs with these demands on a pCPU that also runs `other`
    (host work, QEMU's own threads), which shares the pCPU with them fairly.

    The shortfall of a vCPU is what it misses, d - r, plus (d - r)^2 / d: the first is the
    time the placement leaves unserved, the second weighs most the worst-off, so that among
    placements that serve the same time the fairer one wins (5/4/2/1 vCPUs wanting a whole
    pCPU each leave the same time unserved as 3/3/3/3). Host work is not the agent's to serve,
    but it is no wall either: a vCPU moved beside it gets its fair share of the pCPU.
    """
    if sum(values) + other <= CAPACITY:
        return 0.0, 1.0
    level = water_level([*values, other], CAPACITY)
    cost = 0.0
    worst = 1.0
    for d in values:
        if d > level:
            cost += (d - level) + (d - level) ** 2 / d
            worst = min(worst, level / d)
    return cost, worst


def _harms(
    members: Sequence[_V], leaving: Sequence[_V], coming: Sequence[_V], t: int, other: float
) -> bool:
    """Whether guesses coming here would cost the vCPUs known to be satisfied more than the
    guesses are sure to gain, in interval `t` (the plan asks it of the latest only).

    A guessed demand is an upper bound (a vCPU that never idles wants at most all the time it
    was runnable): it may push out of room a vCPU whose demand is known, for a demand that is
    not there. What the known lose at worst is their excess over the fair level; what the
    guesses gain for sure is that level, capped by their bound, beyond what they received.
    """
    values = _after(members, leaving, coming, t)
    if sum(values) + other <= CAPACITY:
        return False
    level = water_level([*values, other], CAPACITY)
    gone = {id(v) for v in leaving}
    loss = sum(
        m.series[t] - level
        for m in members
        if id(m) not in gone and not m.guess and m.series[t] > level + 1e-9
    )
    if loss <= 0.0:
        return False
    gain = sum(max(0.0, min(c.series[t], level) - c.vcpu.received) for c in coming if c.guess)
    return loss >= gain


# -- the planner's picture of the host ------------------------------------------------------


@dataclass(slots=True, eq=False)
class _V:
    vcpu: Vcpu
    series: tuple[float, ...]
    mean: float
    flat: bool
    readings: int
    guess: bool
    floor: tuple[float, ...] | None = None  # Estimate.floor, fitted to the series

    @property
    def ref(self) -> VcpuRef:
        return self.vcpu.ref


def _key(v: _V) -> tuple[float, VcpuRef]:
    return (v.mean, v.ref)


def _mean(v: _V) -> float:
    return v.mean


@dataclass(slots=True, eq=False)
class _P:
    number: int
    other: float  # utilization its vCPUs do not explain, read over the window (estimate)
    intervals: int
    doubt: float = 0.0  # points a step here must gain beyond its own uncertainty (`_Outcomes`)
    members: list[_V] = field(default_factory=list)  # every vCPU anchored here
    movable: list[_V] = field(default_factory=list)  # those the plan may move, by mean demand
    sums: list[float] = field(default_factory=list)  # members' demand per interval
    version: int = 0
    unsteady: int = 0  # members that are not flat
    guesses: int = 0  # members whose latest reading is a bound
    # Took a vCPU whose demand is a guess (read short): no further step here in this plan,
    # the next reading tells what it holds.
    frozen: bool = False
    # Shed a guess: what it holds now is a guess of a new situation; it takes nothing more.
    shed: bool = False

    @property
    def receives(self) -> bool:
        return not self.frozen and not self.shed

    _costs: tuple[int, list[tuple[float, float]]] | None = None
    _mean: tuple[int, float, float] | None = None
    _readings: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.sums = [0.0] * self.intervals

    @property
    def capacity(self) -> float:
        return CAPACITY - self.other

    @property
    def demand(self) -> float:
        """Mean demand over the window, with the other work: what orders the pCPUs."""
        return self._means()[0]

    @property
    def util(self) -> float:
        """Mean predicted utilization: demand up to what the pCPU can give."""
        return self._means()[1]

    def _means(self) -> tuple[float, float]:
        # Cached while nothing changes here: every round of a plan sorts the pCPUs by them.
        if self._mean is None or self._mean[0] != self.version:
            cap = self.capacity
            demand = self.other + sum(self.sums) / self.intervals
            util = self.other + sum(min(s, cap) for s in self.sums) / self.intervals
            self._mean = (self.version, demand, util)
        return self._mean[1], self._mean[2]

    @property
    def flat(self) -> bool:
        return not self.unsteady

    @property
    def readings(self) -> int:
        if self._readings is None or self._readings[0] != self.version:
            fewest = min((m.readings for m in self.members), default=self.intervals)
            self._readings = (self.version, fewest)
        return self._readings[1]

    def add(self, v: _V, movable: bool = True) -> None:
        self.version += 1
        self.members.append(v)
        self.unsteady += not v.flat
        self.guesses += v.guess
        if movable:
            bisect.insort(self.movable, v, key=_key)
        self.sums = list(map(operator.add, self.sums, v.series))

    def remove(self, v: _V) -> None:
        self.version += 1
        self.members.remove(v)
        self.unsteady -= not v.flat
        self.guesses -= v.guess
        del self.movable[bisect.bisect_left(self.movable, _key(v), key=_key)]
        self.sums = list(map(operator.sub, self.sums, v.series))

    def costs(self, intervals: int) -> list[tuple[float, float]]:
        """(shortfall, worst share) per interval, cached while nothing changes here."""
        if self._costs is not None and self._costs[0] == self.version:
            return self._costs[1]
        out = []
        for t in range(intervals):
            if self.sums[t] <= self.capacity:
                out.append((0.0, 1.0))
            else:
                out.append(_fill([m.series[t] for m in self.members], self.other))
        self._costs = (self.version, out)
        return out

    def nearest(self, want: float, lo: float, hi: float, count: int) -> list[_V]:
        """Up to `count` movable vCPUs with mean demand in [lo, hi], nearest `want` first."""
        if lo > hi or not self.movable:
            return []
        aim = min(max(want, lo), hi)
        i = bisect.bisect_left(self.movable, aim, key=_mean)
        left, right = i - 1, i
        found: list[_V] = []
        while len(found) < count and (left >= 0 or right < len(self.movable)):
            pick_left = right >= len(self.movable) or (
                left >= 0
                and abs(self.movable[left].mean - want) <= abs(self.movable[right].mean - want)
            )
            v = self.movable[left] if pick_left else self.movable[right]
            if pick_left:
                left -= 1
            else:
                right += 1
            if lo <= v.mean <= hi:
                found.append(v)
            elif abs(v.mean - aim) > hi - lo:
                break
        return found


@dataclass(frozen=True, slots=True)
class _Verdict:
    gain: float  # mean over the window, points
    uncertainty: float
    worst: float  # mean change of the worst-off share on the two pCPUs, points
    pins: int
    doubt: float = 0.0  # the part of the uncertainty the pCPUs' doubt adds
    # Its gain beyond its uncertainty where the vCPUs it sends that are known by tops want
    # only what they received (their floor): a condition on the step, not its value.
    floor: float = math.inf

    def net(self, min_gain: float) -> float:
        """What it gains beyond its uncertainty and the least gain worth it: min_gain for a
        move or a swap (a swap's second pin is charged in `score`), and min_gain more for
        every pin an exchange adds beyond a swap's two."""
        return self.gain - self.uncertainty - min_gain * max(1, self.pins - 1)

    def score(self, min_gain: float) -> float:
        """Its net gain, less min_gain for every pin beyond the first: a swap is worth its
        second pin only where it gains min_gain more than a move would."""
        return self.gain - self.uncertainty - min_gain * self.pins

    def taken(self, min_gain: float) -> bool:
        # Worst-off first: less shortfall in all does not pay for a worse-off vCPU.
        return self.net(min_gain) >= -1e-9 and self.worst >= -1e-6 and self.floored(min_gain)

    def floored(self, min_gain: float) -> bool:
        return self.floor - min_gain * max(1, self.pins - 1) >= -1e-9


def _judge(a: _P, b: _P, out: Sequence[_V], back: Sequence[_V], intervals: int) -> _Verdict:
    """What sending `out` from a to b and `back` from b to a gains, interval by interval."""
    readings = min([a.readings, b.readings] + [v.readings for v in (*out, *back)])
    if readings < MIN_READINGS:
        return _Verdict(0.0, math.inf, 0.0, len(out) + len(back))
    flat = a.flat and b.flat and all(v.flat for v in (*out, *back))
    span = 1 if flat else intervals
    cost_a, cost_b = a.costs(intervals), b.costs(intervals)
    cap_a, cap_b = a.capacity, b.capacity
    # A guess is a bound on the latest reading only: judged against the others' latest.
    latest = span - 1
    if (any(v.guess for v in out) and _harms(b.members, back, out, latest, b.other)) or (
        any(v.guess for v in back) and _harms(a.members, out, back, latest, a.other)
    ):
        return _Verdict(0.0, math.inf, 0.0, len(out) + len(back))
    gains: list[float] = []
    worsts: list[float] = []
    spread_only = True  # nobody short on either pCPU, before the step or after it
    for t in range(span):
        moved = sum(v.series[t] for v in out) - sum(v.series[t] for v in back)
        sa, sb = a.sums[t], b.sums[t]
        sa2, sb2 = sa - moved, sb + moved
        (ca, wa), (cb, wb) = cost_a[t], cost_b[t]
        if sa2 > cap_a:
            ca2, wa2 = _fill(_after(a.members, out, back, t), a.other)
        else:
            ca2, wa2 = 0.0, 1.0
        if sb2 > cap_b:
            cb2, wb2 = _fill(_after(b.members, back, out, t), b.other)
        else:
            cb2, wb2 = 0.0, 1.0
        gain = ca + cb - ca2 - cb2
        spread_only = spread_only and not (ca or cb or ca2 or cb2)
        if not (ca2 or cb2):
            # Where everyone would get what they want, the spread of demand counts too.
            gap = (min(sa, cap_a) + a.other) - (min(sb, cap_b) + b.other)
            gap2 = (sa2 + a.other) - (sb2 + b.other)
            gain += abs(gap) - abs(gap2)
        gains.append(gain)
        worsts.append(100.0 * (min(wa2, wb2) - min(wa, wb)))
    pins = len(out) + len(back)
    # Every vCPU a step moves brings its own unknown noise.
    prior = PRIOR_GAIN * math.sqrt(pins) if readings < PRIOR_READINGS else 0.0
    # A step for the spread alone must hold if the vCPUs it moves read other where they go.
    speed = SPEED * (sum(v.mean for v in out) + sum(v.mean for v in back)) if spread_only else 0.0
    verdict = _least(gains, worsts, prior, pins, max(a.doubt, b.doubt), readings, speed)
    if any(v.floor is not None for v in out) and b.guesses > sum(v.guess for v in back):
        # A vCPU sent on bounds read at their top, to where the vCPUs staying read short too,
        # may want no more than it received: nowhere on the two had room to show it, and the
        # step must gain then too. (Beside a burst of host work every guest of a balanced host
        # read short, and one known only by tops of 57-87 was swapped for a twin read at 44.)
        # Sent where others have room, tops are taken as they are: a guest sharing a full
        # pCPU with an excluded one received 29-34 of its 47, and waiting for its floor to
        # show more put its last step off by two cycles.
        gains, worsts = _floored(a, b, out, back, span)
        floor = _least(gains, worsts, prior, pins, verdict.doubt, readings, speed)
        verdict = dataclasses.replace(verdict, floor=floor.gain - floor.uncertainty)
    return verdict


def _least(
    gains: list[float],
    worsts: list[float],
    prior: float,
    pins: int,
    doubt: float,
    readings: int,
    speed: float = 0.0,
) -> _Verdict:
    verdict = _verdict(gains, worsts, prior, pins, doubt, speed)
    if readings < len(gains):
        # A level that began since is repeated over the intervals before it, where the others
        # show what they read then: the step must also gain over the intervals all of them
        # were read in. (A slowdown of the whole host restarted one guest's level and not its
        # twin's, and the padding alone called for swapping them.)
        recent = _verdict(gains[-readings:], worsts[-readings:], prior, pins, doubt, speed)
        least = min(verdict, recent, key=lambda v: v.gain - v.uncertainty)
        verdict = dataclasses.replace(least, worst=min(verdict.worst, recent.worst))
    return verdict


def _floored(
    a: _P, b: _P, out: Sequence[_V], back: Sequence[_V], span: int
) -> tuple[list[float], list[float]]:
    """`_judge`'s gains and worst-share changes per interval with each vCPU of `out` at its
    floor, on both pCPUs, before the step and after. Slower than `_judge`'s own loop (no
    cached costs), and asked only of steps that send a vCPU known by tops."""
    gone = {id(v) for v in (*out, *back)}
    gains: list[float] = []
    worsts: list[float] = []
    for t in range(span):
        sent = [v.series[t] if v.floor is None else v.floor[t] for v in out]
        came = [v.series[t] for v in back]
        stay_a = [m.series[t] for m in a.members if id(m) not in gone]
        stay_b = [m.series[t] for m in b.members if id(m) not in gone]
        sa, sb = sum(stay_a) + sum(sent), sum(stay_b) + sum(came)
        sa2, sb2 = sum(stay_a) + sum(came), sum(stay_b) + sum(sent)
        ca, wa = _fill([*stay_a, *sent], a.other)
        cb, wb = _fill([*stay_b, *came], b.other)
        ca2, wa2 = _fill([*stay_a, *came], a.other)
        cb2, wb2 = _fill([*stay_b, *sent], b.other)
        gain = ca + cb - ca2 - cb2
        if not (ca2 or cb2):
            gap = (min(sa, a.capacity) + a.other) - (min(sb, b.capacity) + b.other)
            gain += abs(gap) - abs((sa2 + a.other) - (sb2 + b.other))
        gains.append(gain)
        worsts.append(100.0 * (min(wa2, wb2) - min(wa, wb)))
    return gains, worsts


def _verdict(
    gains: Sequence[float],
    worsts: Sequence[float],
    prior: float,
    pins: int,
    doubt: float = 0.0,
    speed: float = 0.0,
) -> _Verdict:
    n = len(gains)
    mean = sum(gains) / n
    spread = _standard_error(gains, mean) if n > 1 else 0.0
    # The doubt and the speed are added, not combined with the spread: they are biases of
    # the readings, which more of them do not average away.
    uncertainty = math.hypot(spread, prior) + doubt + speed
    return _Verdict(mean, uncertainty, sum(worsts) / n, pins, doubt)


def _after(
    members: Sequence[_V], leaving: Sequence[_V], coming: Sequence[_V], t: int
) -> list[float]:
    gone = {id(v) for v in leaving}
    return [m.series[t] for m in members if id(m) not in gone] + [v.series[t] for v in coming]


def _standard_error(values: Sequence[float], mean: float) -> float:
    """Standard error of the mean of a series, counting what its autocorrelation takes away:
    a gain that holds for ten intervals, then not, is not ten independent readings."""
    n = len(values)
    dev = [x - mean for x in values]
    var = sum(d * d for d in dev) / (n - 1)
    if var <= 1e-12:
        return 0.0
    rho = sum(x * y for x, y in itertools.pairwise(dev)) / (var * (n - 1))
    rho = min(max(rho, 0.0), 0.9)
    effective = n * (1.0 - rho) / (1.0 + rho)
    return math.sqrt(var / effective)


# -- the plan --------------------------------------------------------------------------------


class _Plan:
    def __init__(self) -> None:
        self.moves: dict[VcpuRef, Move] = {}
        self.held: dict[str, int] = defaultdict(int)
        self.judged = 0

    def afford(self) -> bool:
        """Whether the plan may judge one more step (see JUDGE_BUDGET)."""
        if self.judged >= JUDGE_BUDGET:
            self.held["budget"] = 1
            return False
        self.judged += 1
        return True

    def add(
        self, v: _V, src: _P | None, dst: _P, reason: str, demands: tuple[float, float]
    ) -> None:
        first = self.moves.get(v.ref)
        if first is None:
            self.moves[v.ref] = Move(
                ref=v.ref,
                src=v.vcpu.affinity,
                dst=dst.number,
                demand=round(v.mean, 1),
                src_demand=None if src is None else round(demands[0], 1),
                dst_demand=round(demands[1], 1),
                reason=reason,
            )
        elif first.src == frozenset((dst.number,)):
            del self.moves[v.ref]  # moved back where it started within one plan
        else:
            self.moves[v.ref] = Move(
                ref=v.ref,
                src=first.src,
                dst=dst.number,
                demand=first.demand,
                src_demand=first.src_demand,
                dst_demand=round(demands[1], 1),
                reason=first.reason,
            )


def decide(
    snapshot: Snapshot,
    estimates: Mapping[VcpuRef, Estimate],
    config: Config,
    online: frozenset[int] | None = None,
    doubt: Mapping[int, float] | None = None,
) -> Plan:
    """The plan for `snapshot`, judged on the estimates; empty when nothing gains enough.
    `doubt` is what a step on each pCPU must gain beyond its own uncertainty (`_Outcomes`)."""
    online = frozenset(snapshot.util) if online is None else online
    allowed = allowed_pcpus(config, online) & frozenset(snapshot.util)
    intervals = max((len(e.series) for e in estimates.values()), default=1)
    result = _Plan()
    views: dict[VcpuRef, _V] = {}
    for vcpu in snapshot.vcpus:
        e = estimates.get(vcpu.ref)
        series = _fitted(e.series if e is not None else (vcpu.demand,), intervals)
        floor = None if e is None or e.floor is None else _fitted(e.floor, intervals)
        mean = sum(series) / intervals
        flat = max(series) - min(series) <= FLAT_POINTS
        if flat:
            # Counters of different precision jitter a steady vCPU by a fraction of a point:
            # one interval tells all, and judging one is what keeps big plans fast.
            series = (mean,) * intervals
            if floor is not None:
                floor = (sum(floor) / intervals,) * intervals
        guess = e is not None and e.guess
        views[vcpu.ref] = _V(
            vcpu,
            series,
            mean,
            flat,
            1 if e is None else e.readings,
            guess,
            floor,
        )
    fresh = sum(1 for v in views.values() if v.readings < MIN_READINGS and not v.vcpu.excluded)
    if fresh:
        result.held["readings"] = fresh  # judged from the next reading on
    to_place = [v for v in snapshot.vcpus if not v.excluded and v.pcpu not in allowed]
    measuring = [
        v for v in to_place if v.pcpu is None and (e := estimates.get(v.ref)) and e.measuring
    ]
    if measuring:
        # A placement is one partition of all floating vCPUs: placing some while others are
        # still being measured would pair them by half the facts.
        result.held["measuring"] = len(measuring)
        to_place = [v for v in to_place if v.pcpu is not None]
    floating = [v for v in to_place if v.pcpu is None]
    other = _other_work(snapshot, floating)
    doubt = doubt or {}
    pcpus = {n: _P(n, other[n], intervals, doubt.get(n, 0.0)) for n in snapshot.util}
    for vcpu in snapshot.vcpus:
        home = vcpu.pcpu
        if home is None or home not in pcpus:
            continue
        pcpus[home].add(views[vcpu.ref], movable=not vcpu.excluded and home in allowed)
    demand_before = {n: round(p.demand, 1) for n, p in pcpus.items()}
    targets = [pcpus[n] for n in sorted(allowed)]
    if targets:
        _place([views[v.ref] for v in to_place], pcpus, targets, result)
        start = {p.number: (tuple(p.members), tuple(p.movable)) for p in targets}
        _relieve(targets, config, intervals, result)
        _refine(targets, config, intervals, result)
        if not to_place:
            _repack(targets, start, config, intervals, demand_before, result)
    return Plan(
        moves=tuple(result.moves.values()),
        held=dict(result.held),
        pcpu_demand=demand_before,
    )


def _fitted(series: tuple[float, ...], intervals: int) -> tuple[float, ...]:
    """The latest `intervals` of a series, its first value repeated before a short one."""
    series = series[-intervals:]
    if len(series) < intervals:
        series = (series[0],) * (intervals - len(series)) + series
    return series


def _place(to_place: list[_V], pcpus: dict[int, _P], targets: list[_P], result: _Plan) -> None:
    siblings: dict[tuple[int, str], int] = defaultdict(int)
    for p in targets:
        for v in p.members:
            siblings[p.number, v.ref.domain] += 1

    # Demands within a point of each other count as equal, so idle vCPUs spread by count
    # instead of following measurement noise.
    def key(p: _P) -> tuple[int, int, int]:
        return (round(p.demand), len(p.members), p.number)

    heap = [(key(p), p.number) for p in targets]
    heapq.heapify(heap)
    by_number = {p.number: p for p in targets}
    for v in sorted(to_place, key=lambda v: (-v.mean, v.ref)):
        # Among the least loaded pCPUs, the first holding none of the domain's vCPUs.
        popped = [heapq.heappop(heap)]
        while siblings[popped[0][1], v.ref.domain] and heap and heap[0][0][0] == popped[0][0][0]:
            popped.append(heapq.heappop(heap))
            if not siblings[popped[-1][1], v.ref.domain]:
                popped.insert(0, popped.pop())
                break
        dst = by_number[popped[0][1]]
        home = v.vcpu.pcpu
        src = pcpus.get(home) if home is not None else None
        demands = (0.0 if src is None else src.demand, dst.demand)
        result.add(v, src, dst, "place" if src is None else "outside-cpus", demands)
        if src is not None:
            src.members.remove(v)
            src.unsteady -= not v.flat
            src.guesses -= v.guess
            src.version += 1
            for t, x in enumerate(v.series):
                src.sums[t] -= x
        dst.add(v)
        siblings[dst.number, v.ref.domain] += 1
        for _, number in popped:
            heapq.heappush(heap, (key(by_number[number]), number))


def _step(
    src: _P, dst: _P, out: Sequence[_V], back: Sequence[_V], reason: str, result: _Plan
) -> None:
    demands = (src.demand, dst.demand)
    for v in out:
        result.add(v, src, dst, reason, demands)
        src.remove(v)
        dst.add(v)
        dst.frozen = dst.frozen or v.guess
        # What a pCPU whose vCPUs read short holds after it sheds is a guess of a new
        # situation: it takes nothing more until its next reading.
        src.shed = src.shed or v.guess or src.guesses > 0
        # Having shed a known vCPU, it gives nothing more either: what its guesses would use
        # of the room made is the next reading's to tell, and a bound taken for a demand there
        # sent a second known vCPU after the first (and one back the next cycle).
        src.frozen = src.frozen or (not v.guess and src.guesses > 0)
    for v in back:
        result.add(v, dst, src, reason, demands[::-1])
        dst.remove(v)
        src.add(v)
        src.frozen = src.frozen or v.guess


def _relieve(targets: list[_P], config: Config, intervals: int, result: _Plan) -> None:
    """The thresholds: a high pCPU holding more than one vCPU sheds toward a low one, the vCPU
    that brings the low one closest to target first, as long as the step gains."""
    half = config.min_gain / 2
    tried: dict[tuple[int, int], tuple[int, int]] = {}
    for _ in range(ROUNDS):
        moved = False
        lows = sorted(
            (p for p in targets if p.receives and p.util < config.low),
            key=lambda p: (p.util, p.number),
        )
        highs = sorted(
            (p for p in targets if p.util > config.high and len(p.members) > 1 and p.movable),
            key=lambda p: (-p.demand, p.number),
        )
        for src in highs:
            partners = 0
            for dst in lows:
                if src.frozen or partners == PARTNERS:
                    break
                if not dst.receives or dst.util >= config.low:
                    continue
                partners += 1
                versions = (src.version, dst.version)
                if tried.get((src.number, dst.number)) == versions:
                    continue
                tried[src.number, dst.number] = versions
                if not _readable(src, dst):
                    continue
                gap = src.demand - dst.demand
                want = config.target - dst.util
                # Moves that leave src no lower than dst come first.
                candidates = src.nearest(want, half, gap / 2, CANDIDATES) + src.nearest(
                    want, math.nextafter(gap / 2, math.inf), gap - half, CANDIDATES
                )
                # Of the fits, the one that gains most (the best fit to target, as a rule),
                # a guess counting less by as much as its bound leaves open.
                best: tuple[float, _V] | None = None
                for v in candidates:
                    if not result.afford():
                        return
                    verdict = _judge(src, dst, (v,), (), intervals)
                    rank = verdict.net(config.min_gain)
                    if v.guess:
                        rank -= max(0.0, v.mean - v.vcpu.received)
                    if not verdict.taken(config.min_gain):
                        _count_held(verdict, config, result)
                    elif best is None or rank > best[0]:
                        best = (rank, v)
                if best is not None:
                    _step(src, dst, (best[1],), (), "high", result)
                    moved = True
                if src.util <= config.high or not src.movable:
                    break
        if not moved:
            return


def _readable(src: _P, dst: _P) -> bool:
    """Whether steps between the two can be judged at all (`_judge` wants MIN_READINGS of
    everything on both). Not spending the plan's budget on those that cannot is what lets a
    restarted agent's first plans on a crowded host judge the steps that can."""
    return min(src.readings, dst.readings) >= MIN_READINGS


def _count_held(verdict: _Verdict, config: Config, result: _Plan) -> None:
    # A step that would gain enough on its mean but not beyond its uncertainty: `doubt` where
    # the pCPUs' doubt alone holds it (`_Outcomes`).
    net = verdict.net(config.min_gain)
    if verdict.gain - config.min_gain < 0:
        return
    if net < 0:
        result.held["doubt" if net + verdict.doubt >= 0 else "uncertain"] += 1
    elif verdict.worst >= -1e-6 and not verdict.floored(config.min_gain):
        result.held["uncertain"] += 1  # what its bounds leave open holds it


_Found = tuple[float, tuple[_V, ...], tuple[_V, ...]]


def _refine(targets: list[_P], config: Config, intervals: int, result: _Plan) -> None:
    """Best steps between pCPUs, from the most loaded down, while one gains enough."""
    # What each pair of pCPUs can trade, kept while neither changes: a step changes two
    # pCPUs, so the next round redoes their pairs only.
    pairs: dict[tuple[int, int], tuple[tuple[int, int], _Found | None]] = {}
    stuck: dict[tuple[int, int], tuple[int, int]] = {}
    for _ in range(ROUNDS):
        ordered = sorted((p for p in targets if not p.frozen), key=lambda p: (p.demand, p.number))
        moved = False
        for src in reversed(ordered):
            if src.frozen or not src.movable:
                continue
            step = _best_step(src, ordered, config, intervals, pairs, result)
            if step is not None:
                dst, out, back = step
                _step(src, dst, out, back, "swap" if back else "refine", result)
                moved = True
            elif src.demand - ordered[0].demand < config.min_gain:
                break  # no pCPU further down has more to give
        if moved:
            continue
        exchange = _exchange(ordered, config, intervals, stuck, result)
        if exchange is None:
            return
        src, dst, out, back = exchange
        _step(src, dst, out, back, "exchange", result)


def _best_step(
    src: _P,
    ordered: list[_P],
    config: Config,
    intervals: int,
    pairs: dict[tuple[int, int], tuple[tuple[int, int], _Found | None]],
    result: _Plan,
) -> tuple[_P, tuple[_V, ...], tuple[_V, ...]] | None:
    """The best move or swap off `src` toward the least loaded pCPUs that gains enough."""
    best: tuple[float, _P, tuple[_V, ...], tuple[_V, ...]] | None = None
    partners = 0
    for dst in ordered:
        if partners == PARTNERS or dst is src:
            break
        if not dst.receives:
            continue
        if src.demand - dst.demand < config.min_gain:
            break
        partners += 1
        versions = (src.version, dst.version)
        known = pairs.get((src.number, dst.number))
        if known is not None and known[0] == versions:
            found = known[1]
        else:
            found = _pair_step(src, dst, config, intervals, result)
            pairs[src.number, dst.number] = (versions, found)
        if found is not None and (best is None or found[0] > best[0]):
            best = (found[0], dst, found[1], found[2])
    return None if best is None else (best[1], best[2], best[3])


def _pair_step(src: _P, dst: _P, config: Config, intervals: int, result: _Plan) -> _Found | None:
    """The best move or swap from src to dst that gains enough, by net gain."""
    if not _readable(src, dst):
        return None
    gap = src.demand - dst.demand
    half = config.min_gain / 2
    options: list[tuple[float, tuple[_V, ...], tuple[_V, ...]]] = []
    for v in src.nearest(gap / 2, half, gap - half, CANDIDATES):
        options.append((abs(gap / 2 - v.mean), (v,), ()))
    # A swap costs a second pin: worth searching only where no move comes within min_gain of
    # what a perfect step would narrow, and then for the vCPUs too big to move alone.
    near = min((o[0] for o in options), default=math.inf)
    if dst.movable and src.receives and 2 * near > config.min_gain:
        for out in src.nearest(gap / 2, gap / 2, math.inf, CANDIDATES):
            if out.guess:
                continue  # swaps on guesses only where nothing else is left (_exchange)
            for back in dst.nearest(out.mean - gap / 2, out.mean - gap + half, out.mean - half, 2):
                if back.guess:
                    continue
                options.append(
                    (abs(gap / 2 - out.mean + back.mean) + config.min_gain, (out,), (back,))
                )
    return _best_of(src, dst, options, config, intervals, result)


def _best_of(
    src: _P,
    dst: _P,
    options: list[tuple[float, tuple[_V, ...], tuple[_V, ...]]],
    config: Config,
    intervals: int,
    result: _Plan,
) -> _Found | None:
    options.sort(key=lambda o: o[0])
    best: _Found | None = None
    for _, out, back in options[:JUDGED]:
        if not result.afford():
            break
        verdict = _judge(src, dst, out, back, intervals)
        if verdict.taken(config.min_gain):
            net = verdict.score(config.min_gain)
            if best is None or net > best[0]:
                best = (net, out, back)
        else:
            _count_held(verdict, config, result)
    return best


def _exchange(
    ordered: list[_P],
    config: Config,
    intervals: int,
    stuck: dict[tuple[int, int], tuple[int, int]],
    result: _Plan,
) -> tuple[_P, _P, tuple[_V, ...], tuple[_V, ...]] | None:
    """Where no single move or swap gains, exchanges of up to two vCPUs each way between the
    most loaded pCPU and the least loaded ones (guests of several equal vCPUs get stuck so)."""
    if not ordered:
        return None
    src = ordered[-1]
    if not src.movable or not src.receives or len(src.movable) > EXCHANGE_VCPUS:
        return None
    for dst in ordered[:EXCHANGE_PARTNERS]:
        gap = src.demand - dst.demand
        if not dst.receives:
            continue
        if gap < config.min_gain or len(dst.movable) > EXCHANGE_VCPUS:
            break
        versions = (src.version, dst.version)
        if stuck.get((src.number, dst.number)) == versions or not _readable(src, dst):
            continue
        outs = [c for k in (1, 2) for c in itertools.combinations(src.movable, k)]
        backs = [()] + [c for k in (1, 2) for c in itertools.combinations(dst.movable, k)]
        options = []
        for out in outs:
            sent = sum(v.mean for v in out)
            for back in backs:
                if len(out) + len(back) <= 2 and not any(v.guess for v in (*out, *back)):
                    continue  # single moves and swaps were tried
                moved = sent - sum(v.mean for v in back)
                if config.min_gain / 2 <= moved <= gap - config.min_gain / 2:
                    options.append((abs(gap / 2 - moved), out, back))
        found = _best_of(src, dst, options, config, intervals, result)
        if found is not None:
            return src, dst, found[1], found[2]
        stuck[src.number, dst.number] = versions
    return None


# -- repacking -------------------------------------------------------------------------------


def _repack(
    targets: list[_P],
    start: Mapping[int, tuple[tuple[_V, ...], tuple[_V, ...]]],
    config: Config,
    intervals: int,
    demand_before: Mapping[int, float],
    result: _Plan,
) -> None:
    """Where a plan's steps move vCPUs, the whole placement a partition gives instead, if it
    gains on the steps' outcome at least `min_gain` for every pin it adds to theirs.

    Steps take one gain at a time and can end where no few pins gain (guests of several equal
    vCPUs on a few pCPUs); a partition made largest first, each onto the least loaded pCPU,
    does not. Only on readings that are known and steady enough to judge, where every pCPU
    would have room, and on nodes of at most REPACK_PCPUS."""
    if not result.moves or not 2 <= len(targets) <= REPACK_PCPUS:
        return
    movable = [v for n in sorted(start) for v in start[n][1]]
    if not movable or any(v.guess or v.readings < MIN_READINGS for v in movable):
        return
    if any(v.guess for p in targets for v in p.members):
        return
    home = {id(v): n for n, (_, mov) in start.items() for v in mov}
    where = _partition(movable, start)
    pins = sum(1 for v in movable if where[id(v)] != home[id(v)])
    steps = len(result.moves)
    # The partition's outcome, interval by interval, against the steps' outcome.
    sums = {p.number: [0.0] * intervals for p in targets}
    for p in targets:
        fixed = {id(v) for v in start[p.number][1]}
        for v in start[p.number][0]:
            if id(v) not in fixed:
                sums[p.number] = list(map(operator.add, sums[p.number], v.series))
    for v in movable:
        n = where[id(v)]
        sums[n] = list(map(operator.add, sums[n], v.series))
    by_number = {p.number: p for p in targets}
    if any(s > by_number[n].capacity + 1e-9 for n, series in sums.items() for s in series):
        return
    costs = [p.costs(intervals) for p in targets]
    gains = []
    for t in range(intervals):
        before = [p.other + min(p.sums[t], p.capacity) for p in targets]
        after = [by_number[n].other + sums[n][t] for n in sorted(sums)]
        shortfall = sum(c[t][0] for c in costs)
        gains.append(shortfall + _deviation(before) - _deviation(after))
    readings = min(v.readings for v in movable)
    prior = PRIOR_GAIN * math.sqrt(pins) if readings < PRIOR_READINGS else 0.0
    ends = [(home[id(v)], where[id(v)]) for v in movable if home[id(v)] != where[id(v)]]
    doubt = max((by_number[n].doubt for pair in ends for n in pair), default=0.0)
    verdict = _verdict(gains, [0.0] * intervals, prior, pins, doubt)
    net = verdict.gain - verdict.uncertainty
    if net < max(0.0, config.min_gain * (pins - steps)) or (net <= 1e-9 and pins >= steps):
        return
    result.moves.clear()
    for v in movable:
        src, dst = home[id(v)], where[id(v)]
        if src != dst:
            result.add(
                v,
                by_number[src],
                by_number[dst],
                "repack",
                (demand_before[src], demand_before[dst]),
            )


def _deviation(values: Sequence[float]) -> float:
    """Sum of distances from the mean: between two pCPUs, the gap a step narrows."""
    mean = sum(values) / len(values)
    return sum(abs(x - mean) for x in values)


def _partition(
    movable: Sequence[_V], start: Mapping[int, tuple[tuple[_V, ...], tuple[_V, ...]]]
) -> dict[int, int]:
    """Each movable vCPU's pCPU (by id) in a partition made largest first, each onto the least
    loaded bin, with the bins then laid on the pCPUs that hold most of their sizes already: so
    vCPUs of one size, which the objective cannot tell apart, stay where they are."""
    numbers = sorted(start)
    fixed = {
        n: sum(v.mean for v in start[n][0]) - sum(v.mean for v in start[n][1]) for n in numbers
    }
    heap = [(0.0, b) for b in range(len(numbers))]
    bins: list[list[_V]] = [[] for _ in numbers]
    for v in sorted(movable, key=lambda v: (-v.mean, v.ref)):
        load, b = heapq.heappop(heap)
        bins[b].append(v)
        heapq.heappush(heap, (load + v.mean, b))

    def size(v: _V) -> int:
        return round(v.mean / REPACK_SIZE)

    held = {n: Counter(size(v) for v in start[n][1]) for n in numbers}
    wanted = [Counter(size(v) for v in b) for b in bins]
    # The bins with the least fixed work beside them take the heaviest contents first.
    overlaps = sorted(
        (
            (-sum((wanted[b] & held[n]).values()), fixed[n], b, n)
            for b in range(len(bins))
            for n in numbers
        ),
    )
    laid: dict[int, int] = {}
    used: set[int] = set()
    for _, _, b, n in overlaps:
        if b not in laid and n not in used:
            laid[b] = n
            used.add(n)
    # Each bin keeps the vCPUs of its sizes already on its pCPU; the rest come from the pool.
    where: dict[int, int] = {}
    pool: dict[int, list[_V]] = defaultdict(list)
    missing: list[tuple[int, int]] = []
    for b, n in sorted(laid.items()):
        need = Counter(wanted[b])
        for v in start[n][1]:
            if need[size(v)] > 0:
                need[size(v)] -= 1
                where[id(v)] = n
        missing.extend((n, k) for k, count in sorted(need.items()) for _ in range(count))
    for v in movable:
        if id(v) not in where:
            pool[size(v)].append(v)
    for n, k in missing:
        where[id(pool[k].pop())] = n
    return where
