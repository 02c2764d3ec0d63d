"""The policy before the one objective (vcpusched 0.1, up to commit 405c7d4), kept as a
baseline so the benchmark prints its row beside the new one's.

It is the old code unchanged but for its names: its own vCPU and snapshot records (they carried
the noise, settling and cooldown fields that the agent's model no longer has), and an adapter,
`PreviousBalancer`, that speaks the agent's `Planner` seam. Never imported by the daemon.
"""

# ruff: noqa
# mypy: ignore-errors

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from vcpusched import model
from vcpusched.config import Config
from vcpusched.model import VcpuRef

PLACE_SAMPLES = 8
# A pCPU this busy (percent) has no time to spare: moving work onto it cannot raise anyone's
# share, only move the waiting there. (Guests adding up to 90% read 97% busy on the lab, with
# QEMU's own overhead, so the bar sits above that.)
SATURATED = 99.0
# Demand above received load by more than this (points): the vCPU was short of time.
SHORT = 1.0


@dataclass(frozen=True, slots=True)
class Vcpu:
    """One vCPU as the policy sees it over the last interval.

    `load` is the CPU time it received; `demand` adds the time it waited for a pCPU, so two
    vCPUs that each want a whole pCPU but share one show load 50 and demand 100.
    """

    ref: VcpuRef
    load: float
    demand: float
    affinity: frozenset[int]
    excluded: bool = False
    # Standard deviation of `demand` from one interval to the next, where it is known.
    noise: float = 0.0
    # Floating, and its demand not yet measured over enough intervals to place it by.
    settling: bool = False
    # pCPUs it was moved off in the last few cycles: the policy does not move it back there yet.
    left: frozenset[int] = frozenset()
    # Those of `left` that were full when it left: that move was made on readings that were
    # bounds, and may be corrected once the readings are not.
    left_full: frozenset[int] = frozenset()

    @property
    def pcpu(self) -> int | None:
        """The pCPU it is pinned to, or None while it may run on several."""
        if len(self.affinity) == 1:
            return next(iter(self.affinity))
        return None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Loads over one interval: measured pCPU utilization and every vCPU."""

    pcpu_load: Mapping[int, float]
    vcpus: tuple[Vcpu, ...]
    # Standard deviation of a pCPU's load beyond its vCPUs' own noise, where it is known.
    pcpu_noise: Mapping[int, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Move:
    """Pin one vCPU to one pCPU. `src` is its affinity before; loads are the policy's estimates."""

    ref: VcpuRef
    src: frozenset[int]
    dst: int
    load: float
    src_load: float | None
    dst_load: float

    @property
    def kind(self) -> str:
        return "move" if len(self.src) == 1 else "place"


FULL = 100.0

# How many standard deviations of measurement noise a refining move must clear (beyond
# min_gain) before it is trusted.
NOISE_SIGMAS = 3.0
# Cycles during which a moved vCPU does not go back to the pCPU it left (`_may_return`):
# 15 s at the default interval, 30 s on the lab's. Longer holds
# back answers to real load changes (24 left the benchmark's `phases`, whose loads change
# every 20 cycles, unbalanced for a whole phase).
COOLDOWN = 15


def _order(vcpu: Vcpu) -> tuple[float, VcpuRef]:
    return (vcpu.demand, vcpu.ref)


def _demand(vcpu: Vcpu) -> float:
    return vcpu.demand


@dataclass(slots=True)
class _Pcpu:
    number: int
    load: float
    # Movable vCPUs anchored here, kept sorted by demand so that the vCPU whose demand is
    # nearest a wanted transfer is found by bisection: a plan on a host with a thousand vCPUs
    # must stay within milliseconds.
    vcpus: list[Vcpu] = field(default_factory=list)
    fixed: int = 0  # anchored here but not movable (excluded)
    noise2: float = 0.0  # variance of `load`, from its vCPUs' noise
    busy: float = 0.0  # measured utilization, then what the plan's moves make of it
    shorts: int = 0  # vCPUs here short of time, movable or not (see `fits`)
    version: int = 0  # counts changes, so that what was worked out for it can be reused

    def fits(self, incoming: float, outgoing: float = 0.0) -> bool:
        """Whether this pCPU has room for the CPU time the incoming vCPUs actually received.

        A vCPU's demand on a full pCPU is only an upper bound (one that falls behind stays
        runnable, so its wait reads as a whole pCPU), but the time it received is real. Moving
        work onto a pCPU that is already full, or that the received time would fill, cannot
        raise anyone's share under a fair scheduler: it only moves the waiting elsewhere. On
        the lab, allowing it made two pCPUs near 100% trade vCPUs back and forth. A pCPU is
        full when a vCPU on it is short of time, whatever its utilization says: on the lab
        QEMU's own threads float elsewhere, and a pCPU holding a 100% and a 50% guest read
        96% busy while the 50 waited; two such pCPUs swapped their 50s on bound readings.
        """
        return not self.shorts and self.busy < SATURATED and self.busy - outgoing + incoming <= FULL

    @property
    def count(self) -> int:
        return len(self.vcpus) + self.fixed

    def add(self, vcpu: Vcpu) -> None:
        self.version += 1
        bisect.insort(self.vcpus, vcpu, key=_order)
        self.load += vcpu.demand
        self.busy += vcpu.load
        self.noise2 += vcpu.noise**2
        self.shorts += self._measured_short(vcpu)

    def remove(self, vcpu: Vcpu) -> None:
        self.version += 1
        del self.vcpus[bisect.bisect_left(self.vcpus, _order(vcpu), key=_order)]
        self.load -= vcpu.demand
        self.busy -= vcpu.load
        self.noise2 -= vcpu.noise**2
        self.shorts -= self._measured_short(vcpu)

    def _measured_short(self, vcpu: Vcpu) -> bool:
        # Short of time here, where it was measured; moved elsewhere, it may not be.
        return vcpu.pcpu == self.number and _short(vcpu)

    def nearest(self, want: float, lo: float, hi: float) -> Vcpu | None:
        """The vCPU with demand in [lo, hi] nearest to `want`; the larger one on a tie."""
        if lo > hi or not self.vcpus:
            return None
        aim = min(max(want, lo), hi)
        i = bisect.bisect_left(self.vcpus, aim, key=_demand)
        best: Vcpu | None = None
        for j in (i - 1, i):
            if 0 <= j < len(self.vcpus):
                v = self.vcpus[j]
                if lo <= v.demand <= hi and (
                    best is None or abs(v.demand - want) <= abs(best.demand - want)
                ):
                    best = v
        return best


class _Plan:
    def __init__(self) -> None:
        self.moves: dict[VcpuRef, Move] = {}

    def add(
        self,
        vcpu: Vcpu,
        src: _Pcpu | None,
        dst: _Pcpu,
        loads: tuple[float, float] | None = None,
    ) -> None:
        """Record a move; `loads` overrides (src, dst) loads, for the two halves of a swap."""
        src_load = None if src is None else src.load
        dst_load = dst.load
        if loads is not None:
            src_load, dst_load = loads
        first = self.moves.get(vcpu.ref)
        if first is None:
            self.moves[vcpu.ref] = Move(
                ref=vcpu.ref,
                src=vcpu.affinity,
                dst=dst.number,
                load=vcpu.demand,
                src_load=None if src_load is None else round(src_load, 1),
                dst_load=round(dst_load, 1),
            )
        elif first.src == frozenset((dst.number,)):
            del self.moves[vcpu.ref]  # moved back where it started within one plan
        else:
            self.moves[vcpu.ref] = Move(
                ref=vcpu.ref,
                src=first.src,
                dst=dst.number,
                load=first.load,
                src_load=first.src_load,
                dst_load=round(dst_load, 1),
            )

    def result(self) -> list[Move]:
        return list(self.moves.values())


def allowed_pcpus(config: Config, online: Iterable[int]) -> frozenset[int]:
    online_set = frozenset(online)
    return online_set if config.cpus is None else online_set & config.cpus


def pcpu_loads(snapshot: Snapshot, movable_floating: Iterable[Vcpu] = ()) -> dict[int, float]:
    """Each pCPU's demand, from measured utilization and the vCPUs anchored to it.

    What a pCPU's utilization holds beyond the vCPUs pinned to it is host work and unpinned
    vCPUs. The unpinned vCPUs about to be placed are taken out of it, in proportion to that
    remainder, since placing them is what puts their load on one pCPU.
    """
    return _estimates(snapshot, movable_floating)[0]


def _estimates(
    snapshot: Snapshot, movable_floating: Iterable[Vcpu]
) -> tuple[dict[int, float], dict[int, float]]:
    """Each pCPU's demand (see `pcpu_loads`) and its utilization without the vCPUs about to
    be placed (placing puts all of a vCPU's time on one pCPU, which `_Pcpu.add` counts)."""
    anchored_load: dict[int, float] = defaultdict(float)
    anchored_demand: dict[int, float] = defaultdict(float)
    for vcpu in snapshot.vcpus:
        pcpu = vcpu.pcpu
        if pcpu is not None and pcpu in snapshot.pcpu_load:
            anchored_load[pcpu] += vcpu.load
            anchored_demand[pcpu] += vcpu.demand
    rest = {p: max(0.0, u - anchored_load[p]) for p, u in snapshot.pcpu_load.items()}
    floating = sum(v.load for v in movable_floating)
    rest_total = sum(rest.values())
    share = min(1.0, floating / rest_total) if rest_total > 0 else 0.0
    demand = {p: r * (1.0 - share) + anchored_demand[p] for p, r in rest.items()}
    busy = {p: u - rest[p] * share for p, u in snapshot.pcpu_load.items()}
    return demand, busy


def _may_return(vcpu: Vcpu, dst: _Pcpu, partner: Vcpu | None = None) -> bool:
    """Whether `vcpu` may go to `dst`, which it may have left within COOLDOWN cycles, in a step
    that sends `partner` (if any) the other way.

    A vCPU that never idles reads as wanting all the time it was runnable, an upper bound:
    two such vCPUs sharing a full pCPU both read 100, and whichever of a pair moves on shows
    what it really wants while the one left behind still reads 100. Taken at face value that
    swaps the pair back and forth (the simulator's `phases` did so four cycles running). Near
    a full pCPU the estimate also swells for a moment (on the lab a 40% guest once read 63
    beside a pCPU 99% busy, ten cycles after balance, and was swapped back for a 50% guest;
    another time a 10% guest was moved back beside a 50 and a 40 reading 138 together on a
    full pCPU, for nothing). So a vCPU does not go back within the cooldown, with two
    exceptions. If the pCPU it left was full, its move off it was made on bounds, a guess (on a
    2-pCPU host every correction of the first spread sends some vCPU back): it may go back on
    readings that are not bounds, neither it nor its partner short of time. And one that reads
    as wanting a whole pCPU may go back: its first move was made on that bound, and going back
    is the correction.
    """
    if dst.number not in vcpu.left or vcpu.demand >= SATURATED:
        return True
    if dst.number not in vcpu.left_full:
        return False
    return not _short(vcpu) and (partner is None or not _short(partner))


def _short(vcpu: Vcpu) -> bool:
    """Whether its demand is a bound from waiting rather than the time it used."""
    return vcpu.demand > vcpu.load + SHORT


def _gain(gap: float, transfer: float) -> float:
    """How much moving `transfer` from the higher to the lower pCPU narrows their gap."""
    return gap - abs(gap - 2.0 * transfer)


def plan(snapshot: Snapshot, config: Config, pcpus: frozenset[int] | None = None) -> list[Move]:
    """The moves that balance `snapshot`; empty when it is balanced enough to leave alone."""
    online = frozenset(snapshot.pcpu_load) if pcpus is None else pcpus
    allowed = allowed_pcpus(config, online) & frozenset(snapshot.pcpu_load)
    if not allowed:
        return []
    to_place = [v for v in snapshot.vcpus if not v.excluded and v.pcpu not in allowed]
    if any(v.settling for v in to_place):
        # Placing is one partition of all floating vCPUs: placing some while others are still
        # being measured would pair them by half the facts.
        to_place = [v for v in to_place if v.pcpu is not None]
    floating = [v for v in to_place if v.pcpu is None]
    loads, busy = _estimates(snapshot, floating)
    pcpu = {
        n: _Pcpu(n, loads[n], busy=busy[n], noise2=snapshot.pcpu_noise.get(n, 0.0) ** 2)
        for n in loads
    }
    for vcpu in snapshot.vcpus:
        home = vcpu.pcpu
        if home is None or home not in pcpu:
            continue
        pcpu[home].noise2 += vcpu.noise**2
        pcpu[home].shorts += _short(vcpu)
        if vcpu.excluded or home not in allowed:
            pcpu[home].fixed += 1
        else:
            bisect.insort(pcpu[home].vcpus, vcpu, key=_order)
    targets = [pcpu[n] for n in sorted(allowed)]
    result = _Plan()
    _place(to_place, pcpu, targets, result)
    _relieve(targets, config, result)
    _refine(targets, config, result)
    return result.result()


def _place(
    to_place: list[Vcpu], pcpu: dict[int, _Pcpu], targets: list[_Pcpu], result: _Plan
) -> None:
    siblings: dict[tuple[int, str], int] = defaultdict(int)
    for p in targets:
        for v in p.vcpus:
            siblings[p.number, v.ref.domain] += 1

    # Loads within a point of each other count as equal, so idle vCPUs spread by count
    # instead of following measurement noise.
    def key(p: _Pcpu) -> tuple[int, int, int]:
        return (round(p.load), p.count, p.number)

    heap = [(key(p), p.number) for p in targets]
    heapq.heapify(heap)
    by_number = {p.number: p for p in targets}
    for vcpu in sorted(to_place, key=lambda v: (-v.demand, v.ref)):
        # Among the least loaded pCPUs, the first holding none of the domain's vCPUs.
        popped = [heapq.heappop(heap)]
        while siblings[popped[0][1], vcpu.ref.domain] and heap and heap[0][0][0] == popped[0][0][0]:
            popped.append(heapq.heappop(heap))
            if not siblings[popped[-1][1], vcpu.ref.domain]:
                popped.insert(0, popped.pop())
                break
        dst = by_number[popped[0][1]]
        src = pcpu.get(vcpu.pcpu) if vcpu.pcpu is not None else None
        result.add(vcpu, src, dst)
        if src is not None:
            src.load -= vcpu.demand
            src.fixed -= 1
            src.shorts -= _short(vcpu)
        dst.add(vcpu)
        siblings[dst.number, vcpu.ref.domain] += 1
        for _, number in popped:
            heapq.heappush(heap, (key(by_number[number]), number))


def _move(
    vcpu: Vcpu, src: _Pcpu, dst: _Pcpu, result: _Plan, loads: tuple[float, float] | None = None
) -> None:
    result.add(vcpu, src, dst, loads)
    src.remove(vcpu)
    dst.add(vcpu)


def _relieve(targets: list[_Pcpu], config: Config, result: _Plan) -> None:
    half_gain = config.min_gain / 2
    while True:
        highs = sorted(
            (p for p in targets if p.load > config.high and p.count > 1 and p.vcpus),
            key=lambda p: (-p.load, p.number),
        )
        lows = sorted((p for p in targets if p.load < config.low), key=lambda p: (p.load, p.number))
        chosen = None
        for src in highs:
            for dst in lows:
                gap = src.load - dst.load
                want = config.target - dst.load
                # Gaining min_gain needs a demand in [min_gain/2, gap - min_gain/2]; one that
                # also leaves src no lower than dst (at most gap/2) is preferred.
                vcpu = src.nearest(want, half_gain, gap / 2) or src.nearest(
                    want, math.nextafter(gap / 2, math.inf), gap - half_gain
                )
                if vcpu is not None and dst.fits(vcpu.load) and _may_return(vcpu, dst):
                    chosen = (vcpu, src, dst)
                    break
            if chosen:
                break
        if chosen is None:
            return
        _move(*chosen, result)


_Step = tuple[float, Vcpu, Vcpu | None]  # gain, the vCPU sent, the one sent back (a swap)


def _refine(targets: list[_Pcpu], config: Config, result: _Plan) -> None:
    # What each pair of pCPUs can trade, kept while neither changes: a step changes two
    # pCPUs, so the next search redoes their pairs only, not all of them (on a host with
    # hundreds of starved vCPUs, redoing every pair made a first plan take half a second).
    pairs: dict[tuple[int, int], tuple[tuple[int, int], _Step | None]] = {}
    # Bounded so a pathological input cannot stall a cycle; each move already lowers the
    # sum of squares by a fixed step, so real inputs end long before this.
    for _ in range(4 * sum(len(p.vcpus) for p in targets) + len(targets)):
        by_load = sorted(targets, key=lambda p: (p.load, p.number))
        step = _best_step(by_load, config.min_gain, pairs)
        if step is None:
            return
        src, dst, out, back = step
        before = (src.load, dst.load)
        _move(out, src, dst, result, before)
        if back is not None:
            _move(back, dst, src, result, before[::-1])


def _best_step(
    by_load: list[_Pcpu],
    min_gain: float,
    pairs: dict[tuple[int, int], tuple[tuple[int, int], _Step | None]],
) -> tuple[_Pcpu, _Pcpu, Vcpu, Vcpu | None] | None:
    """The best move or swap off the most loaded pCPU (of `by_load`, in ascending load) that
    gains enough to be trusted."""
    for src in reversed(by_load):
        if not src.vcpus:
            continue
        best: tuple[float, _Pcpu, Vcpu, Vcpu | None] | None = None
        # No step gains more than twice what it transfers, at most the largest demand here.
        cap = 2.0 * src.vcpus[-1].demand
        for dst in by_load:
            # Ascending loads: every later pCPU is closer still, and no step gains more
            # than the gap it narrows.
            gap = src.load - dst.load
            if gap < min_gain or (best is not None and best[0] >= min(gap, cap)):
                break
            versions = (src.version, dst.version)
            known = pairs.get((src.number, dst.number))
            if known is not None and known[0] == versions:
                step = known[1]
            else:
                step = _pair_step(src, dst, min_gain)
                pairs[src.number, dst.number] = (versions, step)
            if step is not None and (best is None or step[0] > best[0]):
                best = (step[0], dst, step[1], step[2])
        if best is not None:
            return src, best[1], best[2], best[3]
    return None


def _pair_step(src: _Pcpu, dst: _Pcpu, min_gain: float) -> _Step | None:
    """The best move or swap from `src` to `dst` that gains enough to be trusted.

    Enough is `min_gain` plus NOISE_SIGMAS standard deviations of the measured gap between
    the two pCPUs: where two placements are about equally good, noise alone makes either look
    better by twice the error on the gap, and chasing that is how balancers ping-pong.
    """
    gap = src.load - dst.load
    need = min_gain + NOISE_SIGMAS * math.sqrt(max(0.0, src.noise2 + dst.noise2))
    if gap < need or dst.shorts or dst.busy >= SATURATED:
        return None  # within the noise, or full: nothing can go there (see `fits`)
    half = need / 2
    best: _Step | None = None
    out = src.nearest(gap / 2, half, gap - half)
    if out is not None and dst.fits(out.load) and _may_return(out, dst):
        best = (_gain(gap, out.demand), out, None)
    if not dst.vcpus:
        return best
    # A swap costs two pin changes: only worth it where a move cannot come within min_gain
    # of it.
    need_swap = max(need, (best[0] if best else 0.0) + min_gain)
    widest = min(src.vcpus[-1].demand - dst.vcpus[0].demand, gap / 2)
    if widest <= 0 or _gain(gap, widest) < need_swap:
        return best
    # What a swap can bring in is bounded by the room plus the most it can send back.
    room = FULL - dst.busy + max(v.load for v in dst.vcpus)
    for swap_out in src.vcpus:
        if swap_out.load > room:
            continue
        back = dst.nearest(
            swap_out.demand - gap / 2, swap_out.demand - (gap - half), swap_out.demand - half
        )
        if (
            back is None
            or not dst.fits(swap_out.load, back.load)
            or not _may_return(swap_out, dst, back)
            or not _may_return(back, src, swap_out)
        ):
            continue
        gain = _gain(gap, swap_out.demand - back.demand)
        if gain >= need_swap and (best is None or gain > best[0]):
            best = (gain, swap_out, back)
    return best


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
            short = vcpu.demand > vcpu.load + SHORT
            if prior is None:
                now = _State(vcpu.load, vcpu.demand, [vcpu.demand], vcpu.affinity, short)
            else:
                load, demand, history = prior.load, prior.demand, prior.history
                noise = prior.noise()
                jump = max(self.JUMP_SIGMAS * noise, min_jump)
                carried = prior.carried
                # The received load jumps on its own when a move ends contention: follow it
                # at once too, or the pCPU it left would look busier than it is.
                if abs(vcpu.demand - demand) > jump or abs(vcpu.load - load) > jump:
                    load, demand = vcpu.load, vcpu.demand
                    averaged = 0
                    if not floating:
                        # A new level: steps across the jump are not noise (counted as such,
                        # a vCPU whose demand a move revealed looked noisy for cycles after),
                        # so the noise known before it stands until new steps replace it.
                        history, carried = [], noise
                else:
                    load += self.ALPHA * (vcpu.load - load)
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
                shift[pcpu] += now.load - vcpu.load
                if now.seen < self.PRIOR_SAMPLES:
                    unknown.add(pcpu)
            demand = statistics.fmean(now.history) if floating else now.demand
            vcpus.append(
                replace(
                    vcpu,
                    load=now.load,
                    demand=demand,
                    noise=noise,
                    settling=floating and now.short and len(now.history) < PLACE_SAMPLES,
                )
            )
        self._state = state
        # What a pCPU holds beyond its pinned vCPUs (host work) stays as measured; only the
        # vCPUs' part of its utilization is replaced by their steadied loads.
        pcpu_load = {p: min(100.0, max(0.0, u + shift[p])) for p, u in snapshot.pcpu_load.items()}
        pcpu_noise = {p: self.PRIOR_NOISE for p in unknown if p in pcpu_load}
        return Snapshot(pcpu_load=pcpu_load, vcpus=tuple(vcpus), pcpu_noise=pcpu_noise)


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


# -- the adapter ---------------------------------------------------------------------------


class PreviousBalancer:
    """The old agent's smoother, cooldown and plan behind the new `Planner` seam."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.smoother = Smoother()
        self.cycle = 0
        self.left: dict[VcpuRef, list[tuple[int, int, bool]]] = {}
        self.full: frozenset[int] = frozenset()
        self.domains: frozenset[str] | None = None

    def reconfigure(self, config: Config) -> None:
        self.config = config

    def forget(self) -> None:
        self.smoother.forget()

    def plan(self, snapshot: model.Snapshot, online: frozenset[int]) -> model.Plan:
        domains = frozenset(v.ref.domain for v in snapshot.vcpus)
        if self.domains is not None and domains != self.domains:
            self.left.clear()
        self.domains = domains
        self.full = frozenset(p for p, u in snapshot.util.items() if u >= SATURATED)
        old = Snapshot(
            pcpu_load=dict(snapshot.util),
            vcpus=tuple(
                Vcpu(v.ref, v.received, v.demand, v.affinity, v.excluded) for v in snapshot.vcpus
            ),
        )
        steadied = self._with_left(self.smoother.update(old, min_jump=self.config.min_gain))
        moves = plan(steadied, self.config, online)
        settling = sum(1 for v in steadied.vcpus if v.settling)
        return model.Plan(
            moves=tuple(
                model.Move(m.ref, m.src, m.dst, m.load, m.src_load, m.dst_load, "previous")
                for m in moves
            ),
            held={"measuring": settling} if settling else {},
            pcpu_demand=pcpu_loads(steadied),
        )

    def applied(self, moves: Sequence[model.Move]) -> None:
        for move in moves:
            if len(move.src) == 1:
                self.left.setdefault(move.ref, []).extend(
                    (self.cycle, p, p in self.full) for p in move.src
                )

    def _with_left(self, snapshot: Snapshot) -> Snapshot:
        self.cycle += 1
        recent = self.cycle - COOLDOWN
        self.left = {
            ref: kept
            for ref, left in self.left.items()
            if (kept := [entry for entry in left if entry[0] > recent])
        }
        vcpus = []
        for v in snapshot.vcpus:
            left = self.left.get(v.ref)
            if left:
                v = replace(
                    v,
                    left=frozenset(p for _, p, _ in left),
                    left_full=frozenset(p for _, p, full in left if full),
                )
            vcpus.append(v)
        return replace(snapshot, vcpus=tuple(vcpus))
