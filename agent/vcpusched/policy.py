"""The balancing policy: a pure function from a snapshot of loads and pins to a list of moves.

How a plan is made, in three passes over an estimate of each pCPU's load:

1. **Place.** A movable vCPU that may run on several pCPUs (or is pinned outside `cpus`) is
   pinned once, heaviest first, onto the allowed pCPU with the least load, then the fewest of
   its domain's vCPUs, then the fewest vCPUs. With equal loads that spreads vCPUs evenly; with
   unequal ones it is the classic longest-processing-time partition. Floating vCPUs wait
   while any of them is still `settling` (see `stats.Smoother`): a placement is one partition.
2. **Relieve (the thresholds).** While a *high* pCPU (load above `high`, more than one vCPU)
   and a *low* one (below `low`) remain, move from the high one the vCPU that brings the low
   one closest to `target`. Among those, a vCPU that leaves the high pCPU at least as loaded
   as the low one comes first: the seed's rule alone would take 30 off 95 to lift 50 to 80,
   leaving 65 beside 80, where moving 20 gives 75 beside 70 in the same single move (and
   spares the swap that the refine pass would then need).
3. **Refine.** Thresholds alone strand imbalance: 89% beside 71% is neither high nor low. So,
   from the most loaded pCPU down, a vCPU is moved (or two are swapped) between two pCPUs when
   that narrows the gap between them by at least `min_gain` points.

Every move in passes 2 and 3 must narrow the gap between its two pCPUs by at least `min_gain`,
so each lowers the sum of squared pCPU loads by at least min_gain²/2: with steady loads the
passes end, and the plan of the next cycle is empty. Noise needs more than that. Where two
placements are about equally good, an error e on the measured gap makes one look better by 2e,
so a refining move must also clear NOISE_SIGMAS standard deviations of that gap, estimated
from how much each vCPU's demand moves from one interval to the next (the caller's
`stats.Smoother` both steadies the loads and estimates this). On the benchmark's ±5% noise the
first version of this pass, with min_gain alone, made 20 to 71 pin changes in 300 cycles after
converging; with the margin it makes none, and still converges within one cycle of a real
change, because a change larger than the noise resets the smoothing at once. Upper bounds
need more still: vCPUs that share a full pCPU never idle and all read as wanting a whole one,
so whichever of an equal pair moves on shows its real demand while the other still reads 100,
and the next plan would swap them back. So within COOLDOWN cycles a vCPU returns to a pCPU it
left only to correct a move made on such bounds, and then only on readings that are not
(`_may_return`).

A pCPU's load is its *demand*: the load of the work pinned there plus what waits for it, plus
the load on it that no pinned vCPU explains (host work, unpinned vCPUs). Demand can pass 100:
two vCPUs that each want a whole pCPU but share one show 50% each, and only their wait time
tells that moving one would double its throughput. A vCPU that never idles is only known to
want more than it got (`stats` counts all its wait, an upper bound), so where loads rise past a
pCPU's capacity the first move gives one room and the next cycle shows what it really wants:
such changes take a cycle more than others to converge.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from vcpusched import stats
from vcpusched.config import Config
from vcpusched.model import SATURATED, SHORT, Move, Plan, Snapshot, Vcpu, VcpuRef

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
    demand: float
    # Movable vCPUs anchored here, kept sorted by demand so that the vCPU whose demand is
    # nearest a wanted transfer is found by bisection: a plan on a host with a thousand vCPUs
    # must stay within milliseconds.
    vcpus: list[Vcpu] = field(default_factory=list)
    fixed: int = 0  # anchored here but not movable (excluded)
    noise2: float = 0.0  # variance of `demand`, from its vCPUs' noise
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
        self.demand += vcpu.demand
        self.busy += vcpu.received
        self.noise2 += vcpu.noise**2
        self.shorts += self._measured_short(vcpu)

    def remove(self, vcpu: Vcpu) -> None:
        self.version += 1
        del self.vcpus[bisect.bisect_left(self.vcpus, _order(vcpu), key=_order)]
        self.demand -= vcpu.demand
        self.busy -= vcpu.received
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
        reason: str,
        demands: tuple[float, float] | None = None,
    ) -> None:
        """Record a move; `demands` overrides (src, dst) demands, for the two halves of a swap."""
        src_demand = None if src is None else src.demand
        dst_demand = dst.demand
        if demands is not None:
            src_demand, dst_demand = demands
        first = self.moves.get(vcpu.ref)
        if first is None:
            self.moves[vcpu.ref] = Move(
                ref=vcpu.ref,
                src=vcpu.affinity,
                dst=dst.number,
                demand=vcpu.demand,
                src_demand=None if src_demand is None else round(src_demand, 1),
                dst_demand=round(dst_demand, 1),
                reason=reason,
            )
        elif first.src == frozenset((dst.number,)):
            del self.moves[vcpu.ref]  # moved back where it started within one plan
        else:
            self.moves[vcpu.ref] = Move(
                ref=vcpu.ref,
                src=first.src,
                dst=dst.number,
                demand=first.demand,
                src_demand=first.src_demand,
                dst_demand=round(dst_demand, 1),
                reason=first.reason,
            )

    def result(self) -> list[Move]:
        return list(self.moves.values())


class Balancer:
    """Everything the policy remembers across cycles, and the plan made from it.

    It is fed each cycle's measured snapshot (`plan`) and the moves really pinned (`applied`):
    the steadied readings (`stats.Smoother`) and the cooldown (`COOLDOWN`) live here only.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self._smoother = stats.Smoother()
        self._cycle = 0
        # The pCPU each moved vCPU left, the cycle it left it in, and whether it was full then.
        self._left: dict[VcpuRef, list[tuple[int, int, bool]]] = {}
        self._full: frozenset[int] = frozenset()
        self._domains: frozenset[str] | None = None

    def reconfigure(self, config: Config) -> None:
        self.config = config

    def forget(self) -> None:
        """Drop the readings: after a reconnect the counters may have moved on without us."""
        self._smoother.forget()

    def plan(self, snapshot: Snapshot, online: frozenset[int]) -> Plan:
        domains = frozenset(v.ref.domain for v in snapshot.vcpus)
        if self._domains is not None and domains != self._domains:
            # A guest that starts or stops changes what the pCPUs hold: the cooldown guards
            # against reading the same situation twice, and this one is new.
            self._left.clear()
        self._domains = domains
        self._full = frozenset(p for p, u in snapshot.util.items() if u >= SATURATED)
        # Read per cycle, so that a reloaded min_gain applies here as everywhere else.
        steadied = self._with_left(self._smoother.update(snapshot, min_jump=self.config.min_gain))
        moves = decide(steadied, self.config, online)
        measuring = sum(1 for v in steadied.vcpus if v.settling)
        return Plan(
            moves=tuple(moves),
            held={"measuring": measuring} if measuring else {},
            pcpu_demand=pcpu_demand(steadied),
        )

    def applied(self, moves: Sequence[Move]) -> None:
        for move in moves:
            if len(move.src) == 1:
                self._left.setdefault(move.ref, []).extend(
                    (self._cycle, p, p in self._full) for p in move.src
                )

    def _with_left(self, snapshot: Snapshot) -> Snapshot:
        self._cycle += 1
        recent = self._cycle - COOLDOWN
        self._left = {
            ref: kept
            for ref, left in self._left.items()
            if (kept := [entry for entry in left if entry[0] > recent])
        }
        if not self._left:
            return snapshot
        vcpus = []
        for v in snapshot.vcpus:
            left = self._left.get(v.ref)
            if left:
                v = replace(
                    v,
                    left=frozenset(p for _, p, _ in left),
                    left_full=frozenset(p for _, p, full in left if full),
                )
            vcpus.append(v)
        return replace(snapshot, vcpus=tuple(vcpus))


def allowed_pcpus(config: Config, online: Iterable[int]) -> frozenset[int]:
    online_set = frozenset(online)
    return online_set if config.cpus is None else online_set & config.cpus


def pcpu_demand(snapshot: Snapshot, movable_floating: Iterable[Vcpu] = ()) -> dict[int, float]:
    """Each pCPU's demand, from measured utilization and the vCPUs anchored to it.

    What a pCPU's utilization holds beyond the vCPUs pinned to it is host work and unpinned
    vCPUs. The unpinned vCPUs about to be placed are taken out of it, in proportion to that
    remainder, since placing them is what puts their load on one pCPU.
    """
    return _estimates(snapshot, movable_floating)[0]


def _estimates(
    snapshot: Snapshot, movable_floating: Iterable[Vcpu]
) -> tuple[dict[int, float], dict[int, float]]:
    """Each pCPU's demand (see `pcpu_demand`) and its utilization without the vCPUs about to
    be placed (placing puts all of a vCPU's time on one pCPU, which `_Pcpu.add` counts)."""
    anchored_load: dict[int, float] = defaultdict(float)
    anchored_demand: dict[int, float] = defaultdict(float)
    for vcpu in snapshot.vcpus:
        pcpu = vcpu.pcpu
        if pcpu is not None and pcpu in snapshot.util:
            anchored_load[pcpu] += vcpu.received
            anchored_demand[pcpu] += vcpu.demand
    rest = {p: max(0.0, u - anchored_load[p]) for p, u in snapshot.util.items()}
    floating = sum(v.received for v in movable_floating)
    rest_total = sum(rest.values())
    share = min(1.0, floating / rest_total) if rest_total > 0 else 0.0
    demand = {p: r * (1.0 - share) + anchored_demand[p] for p, r in rest.items()}
    busy = {p: u - rest[p] * share for p, u in snapshot.util.items()}
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
    return vcpu.demand > vcpu.received + SHORT


def _gain(gap: float, transfer: float) -> float:
    """How much moving `transfer` from the higher to the lower pCPU narrows their gap."""
    return gap - abs(gap - 2.0 * transfer)


def decide(snapshot: Snapshot, config: Config, pcpus: frozenset[int] | None = None) -> list[Move]:
    """The moves that balance `snapshot`; empty when it is balanced enough to leave alone."""
    online = frozenset(snapshot.util) if pcpus is None else pcpus
    allowed = allowed_pcpus(config, online) & frozenset(snapshot.util)
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
        return (round(p.demand), p.count, p.number)

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
        result.add(vcpu, src, dst, "place" if src is None else "outside-cpus")
        if src is not None:
            src.demand -= vcpu.demand
            src.fixed -= 1
            src.shorts -= _short(vcpu)
        dst.add(vcpu)
        siblings[dst.number, vcpu.ref.domain] += 1
        for _, number in popped:
            heapq.heappush(heap, (key(by_number[number]), number))


def _move(
    vcpu: Vcpu,
    src: _Pcpu,
    dst: _Pcpu,
    result: _Plan,
    reason: str,
    demands: tuple[float, float] | None = None,
) -> None:
    result.add(vcpu, src, dst, reason, demands)
    src.remove(vcpu)
    dst.add(vcpu)


def _relieve(targets: list[_Pcpu], config: Config, result: _Plan) -> None:
    half_gain = config.min_gain / 2
    while True:
        highs = sorted(
            (p for p in targets if p.demand > config.high and p.count > 1 and p.vcpus),
            key=lambda p: (-p.demand, p.number),
        )
        lows = sorted(
            (p for p in targets if p.demand < config.low), key=lambda p: (p.demand, p.number)
        )
        chosen = None
        for src in highs:
            for dst in lows:
                gap = src.demand - dst.demand
                want = config.target - dst.demand
                # Gaining min_gain needs a demand in [min_gain/2, gap - min_gain/2]; one that
                # also leaves src no lower than dst (at most gap/2) is preferred.
                vcpu = src.nearest(want, half_gain, gap / 2) or src.nearest(
                    want, math.nextafter(gap / 2, math.inf), gap - half_gain
                )
                if vcpu is not None and dst.fits(vcpu.received) and _may_return(vcpu, dst):
                    chosen = (vcpu, src, dst)
                    break
            if chosen:
                break
        if chosen is None:
            return
        _move(*chosen, result, "high")


_Step = tuple[float, Vcpu, Vcpu | None]  # gain, the vCPU sent, the one sent back (a swap)


def _refine(targets: list[_Pcpu], config: Config, result: _Plan) -> None:
    # What each pair of pCPUs can trade, kept while neither changes: a step changes two
    # pCPUs, so the next search redoes their pairs only, not all of them (on a host with
    # hundreds of starved vCPUs, redoing every pair made a first plan take half a second).
    pairs: dict[tuple[int, int], tuple[tuple[int, int], _Step | None]] = {}
    # Bounded so a pathological input cannot stall a cycle; each move already lowers the
    # sum of squares by a fixed step, so real inputs end long before this.
    for _ in range(4 * sum(len(p.vcpus) for p in targets) + len(targets)):
        by_load = sorted(targets, key=lambda p: (p.demand, p.number))
        step = _best_step(by_load, config.min_gain, pairs)
        if step is None:
            return
        src, dst, out, back = step
        before = (src.demand, dst.demand)
        reason = "refine" if back is None else "swap"
        _move(out, src, dst, result, reason, before)
        if back is not None:
            _move(back, dst, src, result, reason, before[::-1])


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
            gap = src.demand - dst.demand
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
    gap = src.demand - dst.demand
    need = min_gain + NOISE_SIGMAS * math.sqrt(max(0.0, src.noise2 + dst.noise2))
    if gap < need or dst.shorts or dst.busy >= SATURATED:
        return None  # within the noise, or full: nothing can go there (see `fits`)
    half = need / 2
    best: _Step | None = None
    out = src.nearest(gap / 2, half, gap - half)
    if out is not None and dst.fits(out.received) and _may_return(out, dst):
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
    room = FULL - dst.busy + max(v.received for v in dst.vcpus)
    for swap_out in src.vcpus:
        if swap_out.received > room:
            continue
        back = dst.nearest(
            swap_out.demand - gap / 2, swap_out.demand - (gap - half), swap_out.demand - half
        )
        if (
            back is None
            or not dst.fits(swap_out.received, back.received)
            or not _may_return(swap_out, dst, back)
            or not _may_return(back, src, swap_out)
        ):
            continue
        gain = _gain(gap, swap_out.demand - back.demand)
        if gain >= need_swap and (best is None or gain > best[0]):
            best = (gain, swap_out, back)
    return best
