"""The balancing policy: a pure function from a snapshot of loads and pins to a list of moves.

How a plan is made, in three passes over an estimate of each pCPU's load:

1. **Place.** A movable vCPU that may run on several pCPUs (or is pinned outside `cpus`) is
   pinned once, heaviest first, onto the allowed pCPU with the least load, then the fewest of
   its domain's vCPUs, then the fewest vCPUs. With equal loads that spreads vCPUs evenly; with
   unequal ones it is the classic longest-processing-time partition.
2. **Relieve (the thresholds).** While a *high* pCPU (load above `high`, more than one vCPU)
   and a *low* one (below `low`) remain, move from the high one the vCPU that brings the low
   one closest to `target`. Among those, a vCPU that leaves the high pCPU at least as loaded
   as the low one comes first: the seed's rule alone would take 30 off 95 to lift 50 to 80,
   leaving 65 beside 80, where moving 20 gives 75 beside 70 in the same single move (and
   spares the swap that the refine pass would then need).
3. **Refine.** Thresholds alone strand imbalance: 89% beside 71% is neither high nor low. So,
   from the most loaded pCPU down, a vCPU is moved (or two are swapped) between two pCPUs when
   that narrows the gap between them by at least `min_gain` points.

Every move in passes 2 and 3 must narrow the gap between its two pCPUs by at least `min_gain`.
That is the whole no-thrash rule: each move lowers the sum of squared pCPU loads by at least
min_gain²/2, so with steady loads the passes end, and a move can only be undone by a later
plan if the loads themselves changed by more than about min_gain: noise smaller than that never
sends a vCPU back and forth.

A pCPU's load is its *demand*: the load of the work pinned there plus what waits for it, plus
the load on it that no pinned vCPU explains (host work, unpinned vCPUs). Demand can pass 100:
two vCPUs that each want a whole pCPU but share one show 50% each, and only their wait time
tells that moving one would double its throughput.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from vcpusched.config import Config
from vcpusched.model import Move, Snapshot, Vcpu, VcpuRef


@dataclass(slots=True)
class _Pcpu:
    number: int
    load: float
    vcpus: list[Vcpu] = field(default_factory=list)  # anchored here and movable
    fixed: int = 0  # anchored here but not movable (excluded)

    @property
    def count(self) -> int:
        return len(self.vcpus) + self.fixed


class _Plan:
    def __init__(self) -> None:
        self.moves: dict[VcpuRef, Move] = {}

    def add(self, vcpu: Vcpu, src: _Pcpu | None, dst: _Pcpu) -> None:
        first = self.moves.get(vcpu.ref)
        if first is None:
            self.moves[vcpu.ref] = Move(
                ref=vcpu.ref,
                src=vcpu.affinity,
                dst=dst.number,
                load=vcpu.demand,
                src_load=None if src is None else round(src.load, 1),
                dst_load=round(dst.load, 1),
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
                dst_load=round(dst.load, 1),
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
    return {p: r * (1.0 - share) + anchored_demand[p] for p, r in rest.items()}


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
    floating = [v for v in to_place if v.pcpu is None]
    loads = pcpu_loads(snapshot, floating)
    pcpu = {n: _Pcpu(n, loads[n]) for n in loads}
    for vcpu in snapshot.vcpus:
        home = vcpu.pcpu
        if home is None or home not in pcpu:
            continue
        if vcpu.excluded or home not in allowed:
            pcpu[home].fixed += 1
        else:
            pcpu[home].vcpus.append(vcpu)
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
    for vcpu in sorted(to_place, key=lambda v: (-v.demand, v.ref)):
        # Loads within a point of each other count as equal, so idle vCPUs spread by count
        # instead of following measurement noise.
        dst = min(
            targets,
            key=lambda p: (
                round(p.load + vcpu.demand),
                siblings[p.number, vcpu.ref.domain],
                p.count,
                p.number,
            ),
        )
        src = pcpu.get(vcpu.pcpu) if vcpu.pcpu is not None else None
        result.add(vcpu, src, dst)
        if src is not None:
            src.load -= vcpu.demand
            src.fixed -= 1
        dst.load += vcpu.demand
        dst.vcpus.append(vcpu)
        siblings[dst.number, vcpu.ref.domain] += 1


def _move(vcpu: Vcpu, src: _Pcpu, dst: _Pcpu, result: _Plan) -> None:
    result.add(vcpu, src, dst)
    src.vcpus.remove(vcpu)
    dst.vcpus.append(vcpu)
    src.load -= vcpu.demand
    dst.load += vcpu.demand


def _relieve(targets: list[_Pcpu], config: Config, result: _Plan) -> None:
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
                fits = [v for v in src.vcpus if _gain(gap, v.demand) >= config.min_gain]
                if fits:
                    vcpu = min(
                        fits,
                        key=lambda v: (
                            2 * v.demand > gap,
                            abs(dst.load + v.demand - config.target),
                            -v.demand,
                            v.ref,
                        ),
                    )
                    chosen = (vcpu, src, dst)
                    break
            if chosen:
                break
        if chosen is None:
            return
        _move(*chosen, result)


def _refine(targets: list[_Pcpu], config: Config, result: _Plan) -> None:
    # Bounded so a pathological input cannot stall a cycle; each move already lowers the
    # sum of squares by a fixed step, so real inputs end long before this.
    for _ in range(4 * sum(len(p.vcpus) for p in targets) + len(targets)):
        step = _best_step(targets, config.min_gain)
        if step is None:
            return
        src, dst, out, back = step
        _move(out, src, dst, result)
        if back is not None:
            _move(back, dst, src, result)


def _best_step(
    targets: list[_Pcpu], min_gain: float
) -> tuple[_Pcpu, _Pcpu, Vcpu, Vcpu | None] | None:
    """The best move or swap off the most loaded pCPU that can gain at least `min_gain`."""
    by_load = sorted(targets, key=lambda p: (p.load, p.number))
    for src in reversed(by_load):
        if not src.vcpus:
            continue
        best: tuple[float, _Pcpu, Vcpu, Vcpu | None] | None = None
        for dst in by_load:
            gap = src.load - dst.load
            if gap < min_gain:
                break  # ascending loads: every later pCPU is closer still
            for out in src.vcpus:
                gain = _gain(gap, out.demand)
                if gain >= min_gain and (best is None or gain > best[0]):
                    best = (gain, dst, out, None)
            move_gain = best[0] if best else 0.0
            for out in src.vcpus:
                for back in dst.vcpus:
                    transfer = out.demand - back.demand
                    if transfer <= 0:
                        continue
                    gain = _gain(gap, transfer)
                    # A swap costs two pin changes: only worth it where a move cannot come
                    # within min_gain of it.
                    if (
                        gain >= min_gain
                        and gain >= move_gain + min_gain
                        and (best is None or gain > best[0])
                    ):
                        best = (gain, dst, out, back)
        if best is not None:
            return src, best[1], best[2], best[3]
    return None
