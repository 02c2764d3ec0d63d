"""`vcpusched bench`: the agent's own cycle, run against simulated hosts beside the baselines.

Each scenario is run once per policy on its own simulated host with the same seed, so every
policy sees the very same demands and noise. The agent is the real `vcpusched.service.Agent`,
with the default configuration or the one given by --config; only the host is simulated.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vcpusched.config import Config, ConfigError, load_config, override
from vcpusched.model import Move, Plan, Snapshot, VcpuRef, format_cpus
from vcpusched.policy import Balancer, Planner
from vcpusched.service import Agent
from vcpusched_sim.baselines import (
    BASELINES,
    EXACT_VCPUS,
    Controller,
    Optimum,
    pins_to_level,
    plan_optimum,
)
from vcpusched_sim.host import DomainSpec, SimHost
from vcpusched_sim.previous import PreviousBalancer
from vcpusched_sim.scenarios import SCENARIOS, Scenario

OURS = "vcpusched"
# The policy before the one objective, for its row beside the new one's.
PREVIOUS = "previous"
POLICIES = (OURS, PREVIOUS, "static", "no-pin", "greedy", "optimum")
QUICK_CYCLES = 60
# A pCPU set this balanced counts as converged: SD within 1% of the mean load, or within
# one point of what the optimum placement shows at the same moment.
BALANCED_PCT = 1.0
BALANCED_POINTS = 1.0
# Timing target (ms).
AGENT_CPU_MS = 5.0
CONVERGE_CYCLES = 2
# A vCPU that received less than this share of its demand was short of time.
SHORT_SHARE = 0.99
# The classes of scenarios the targets single out.
BURSTY_SETTLE = 30  # cycles after which a bursty host's pins should hold
BURSTY_PINS = 2.0  # pin changes per 100 cycles, at most, after that
WORST_POINTS = 2.0  # the worst-off share within this of the max-min optimum...
WORST_CYCLES = 5  # ...within this many cycles
STEADY_MS = {1000: 20.0, 4000: 100.0}  # plan time medians, by vCPUs


# -- running -------------------------------------------------------------------------------


class _Timed:
    """A policy handed to the agent with a clock that times each of its plans."""

    def __init__(self, planner: Planner, clock: Callable[[], float] = time.process_time) -> None:
        self.planner = planner
        self.clock = clock
        self.spent = 0.0

    def reconfigure(self, config: Config) -> None:
        self.planner.reconfigure(config)

    def plan(self, snapshot: Snapshot, online: frozenset[int]) -> Plan:
        start = self.clock()
        try:
            return self.planner.plan(snapshot, online)
        finally:
            self.spent += self.clock() - start

    def applied(self, moves: Sequence[Move]) -> None:
        self.planner.applied(moves)

    def forget(self) -> None:
        self.planner.forget()


class _AgentController:
    def __init__(self, host: SimHost, scenario: Scenario, config: Config, name: str = OURS) -> None:
        # The scenario decides what is excluded and which pCPUs are managed; the rest
        # (thresholds, min_gain) comes from the config under test.
        config = override(
            config, interval=scenario.interval, exclude=scenario.exclude, cpus=scenario.cpus
        )
        self.name = name
        planner: Planner = PreviousBalancer(config) if name == PREVIOUS else Balancer(config)
        self.balancer = _Timed(planner)
        self.agent = Agent(host, config, self.balancer)
        self.moves: list[Move] = []

    def step(self) -> None:
        self.moves = self.agent.step()

    @property
    def pending(self) -> int:
        """vCPUs the agent is still measuring before it places them."""
        plan = self.agent.plan
        return 0 if plan is None else plan.held.get("measuring", 0)


def _controller(name: str, host: SimHost, scenario: Scenario, config: Config) -> Controller:
    if name in (OURS, PREVIOUS):
        return _AgentController(host, scenario, config, name)
    if name == Optimum.name:
        return Optimum(host, scenario.scope())
    return BASELINES[name](host, scenario.scope())


@dataclass(slots=True)
class Trace:
    """Everything measured while one policy ran one scenario. Index s = cycle s (0 = start)."""

    scenario: Scenario
    policy: str
    # Per interval 1..N (index 0 unused): measured and noise-free busy % of each managed pCPU.
    util: list[list[float]] = field(default_factory=lambda: [[]])
    nominal: list[list[float]] = field(default_factory=lambda: [[]])
    # Per cycle 0..N: pin changes made at the end of it, and the time it took.
    moves: list[int] = field(default_factory=list)
    # Per cycle 0..N: vCPUs left unplaced on purpose at the end of it, to be measured longer.
    pending: list[int] = field(default_factory=list)
    decide: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    demanded: float = 0.0
    received: float = 0.0
    # Per interval 1..N: the worst-off managed vCPU's share of its demand (%), and whether some
    # managed vCPU was short of time (its demand then not in the host's counters).
    worst: list[float] = field(default_factory=lambda: [100.0])
    short: list[bool] = field(default_factory=lambda: [False])
    # Fewest pin changes that reach the optimum balance from the placement at each epoch
    # start (measured on our agent's own run); None when too large to search.
    minimum: dict[int, int | None] = field(default_factory=dict)
    exact: bool = True
    # Our agent's moves, by the cycle that made them.
    log: list[tuple[int, Move]] = field(default_factory=list)
    # Which vCPUs sat on which pCPU at the end, for the tests.
    final: dict[VcpuRef, frozenset[int]] = field(default_factory=dict)

    @property
    def cycles(self) -> int:
        return len(self.moves) - 1


def boundaries(scenario: Scenario) -> list[int]:
    """Cycles at whose end a new epoch of demands begins; 0 is the start."""
    steps = {round(t / scenario.interval) for t in scenario.change_times()}
    return sorted({0} | {s for s in steps if 0 < s < scenario.cycles})


def run(scenario: Scenario, policy_name: str, config: Config | None = None) -> Trace:
    host = scenario.host()
    controller = _controller(policy_name, host, scenario, config or Config())
    ours = controller if isinstance(controller, _AgentController) else None
    trace = Trace(scenario, policy_name)
    pcpus = scenario.managed_pcpus
    scope = scenario.scope()
    starts = set(boundaries(scenario))
    for cycle in range(scenario.cycles + 1):
        if cycle:
            stats = host.tick(scenario.interval)
            trace.util.append([stats.util[p] for p in pcpus])
            trace.nominal.append([stats.nominal_util[p] for p in pcpus])
            trace.demanded += stats.demanded
            trace.received += stats.received
            shares = [stats.share(r) for r in stats.vcpu_demanded if scope.managed(r.domain)]
            trace.worst.append(100.0 * min(shares, default=1.0))
            trace.short.append(any(x < SHORT_SHARE for x in shares))
        pins = host.pin_changes
        if ours is not None:
            ours.balancer.spent = 0.0
        start = time.process_time()
        controller.step()
        trace.cpu.append(time.process_time() - start)
        trace.decide.append(0.0 if ours is None else ours.balancer.spent)
        trace.moves.append(host.pin_changes - pins)
        trace.pending.append(0 if ours is None else ours.pending)
        if ours is not None:
            trace.log.extend((cycle, move) for move in ours.moves)
        if policy_name == OURS and cycle in starts:
            trace.minimum[cycle] = plan_optimum(host, scenario.scope()).moves
    if isinstance(controller, Optimum):
        trace.exact = controller.exact
    trace.final = {ref: host.affinity(ref) for ref in host.running()}
    host.close()
    return trace


# -- metrics -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Epoch:
    first: int  # first interval with the epoch's demands
    last: int
    converged: int | None  # the interval where it converged (see _settled)
    moves_to: int
    moves_after: int
    minimum: int | None

    @property
    def cycles_to_converge(self) -> int | None:
        return None if self.converged is None else self.converged - self.first


@dataclass(frozen=True, slots=True)
class Result:
    scenario: str
    policy: str
    sd: float
    sd_pct: float
    spread: float
    unmet: float
    worst: float  # the worst-off vCPU's share of its demand (%), over the same intervals as SD
    epochs: tuple[Epoch, ...]
    decide_ms: tuple[float, float]  # median, max
    cpu_ms: tuple[float, float]
    exact: bool

    @property
    def converge(self) -> int | None:
        """Cycles to converge after the slowest load change; None if some epoch never did."""
        counts = [e.cycles_to_converge for e in self.epochs]
        return None if any(c is None for c in counts) else max(c for c in counts if c is not None)

    @property
    def moves_to(self) -> int:
        return sum(e.moves_to for e in self.epochs)

    @property
    def moves_after(self) -> int | None:
        if any(e.converged is None for e in self.epochs):
            return None
        return sum(e.moves_after for e in self.epochs)

    @property
    def minimum(self) -> int | None:
        values = [e.minimum for e in self.epochs]
        return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def _sd(values: Sequence[float]) -> float:
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def balanced(loads: Sequence[float], reference: Sequence[float]) -> bool:
    """Whether `loads` is as balanced as the target asks, `reference` being the optimum's."""
    sd = _sd(loads)
    mean = statistics.fmean(loads) if loads else 0.0
    return sd <= BALANCED_PCT / 100.0 * mean or sd <= _sd(reference) + BALANCED_POINTS


def _settled(
    ok: Sequence[bool], moves: Sequence[int], pending: Sequence[int], first: int, last: int
) -> int | None:
    """The interval of first..last where the policy converged, or None.

    That is the first interval from which the pCPUs stay balanced to the epoch's end and at
    whose end the policy pins nothing and holds nothing back: a policy placing vCPUs on a
    host that the kernel already keeps balanced has not converged until it is done placing
    them.
    """
    balanced_from: int | None = None
    for s in range(last, first - 1, -1):
        if not ok[s]:
            break
        balanced_from = s
    if balanced_from is None:
        return None
    for j in range(balanced_from, last + 1):
        if j >= len(moves) or (moves[j] == 0 and not pending[j]):
            return j
    return None


def evaluate(trace: Trace, optimum: Trace, minimum: dict[int, int | None]) -> Result:
    """Summarize a run; `optimum` is the oracle's run of the same scenario."""
    n = trace.cycles
    # Judged on noise-free loads: noise no placement can remove must not hide convergence.
    ok = [True] + [balanced(trace.nominal[s], optimum.nominal[s]) for s in range(1, n + 1)]
    starts = boundaries(trace.scenario)
    epochs: list[Epoch] = []
    steady: list[int] = []
    for k, start in enumerate(starts):
        # The epoch's demands hold over intervals first..last; the cycle ending at `start`
        # already sees the guests that started then, so its pins count for this epoch.
        first = start + 1
        last = starts[k + 1] if k + 1 < len(starts) else n
        own = range(start, last if k + 1 < len(starts) else n + 1)
        converged = _settled(ok, trace.moves, trace.pending, first, last)
        cut = last + 1 if converged is None else converged
        epochs.append(
            Epoch(
                first=first,
                last=last,
                converged=converged,
                moves_to=sum(trace.moves[s] for s in own if s < cut),
                moves_after=sum(trace.moves[s] for s in own if s >= cut),
                minimum=minimum.get(start),
            )
        )
        steady.extend(range(first + (last - first + 1) // 2, last + 1))
    sds = [_sd(trace.util[s]) for s in steady]
    means = [statistics.fmean(trace.util[s]) for s in steady]
    spreads = [max(trace.util[s]) - min(trace.util[s]) for s in steady]
    worst = statistics.fmean(trace.worst[s] for s in steady) if len(trace.worst) > 1 else 100.0
    sd = statistics.fmean(sds)
    mean = statistics.fmean(means)
    unmet = 100.0 * (trace.demanded - trace.received) / trace.demanded if trace.demanded else 0.0
    decide = [1000.0 * d for d in trace.decide[1:]] or [0.0]
    cpu = [1000.0 * c for c in trace.cpu[1:]] or [0.0]
    return Result(
        scenario=trace.scenario.name,
        policy=trace.policy,
        sd=sd,
        sd_pct=100.0 * sd / mean if mean else 0.0,
        spread=statistics.fmean(spreads),
        unmet=max(unmet, 0.0),
        worst=worst,
        epochs=tuple(epochs),
        decide_ms=(statistics.median(decide), max(decide)),
        cpu_ms=(statistics.median(cpu), max(cpu)),
        exact=trace.exact,
    )


@dataclass(slots=True)
class ScenarioRun:
    scenario: Scenario
    traces: dict[str, Trace]
    results: dict[str, Result]


def bench_scenario(
    scenario: Scenario, policies: Sequence[str] = POLICIES, config: Config | None = None
) -> ScenarioRun:
    optimum = run(scenario, Optimum.name)
    traces = {Optimum.name: optimum}
    for name in policies:
        if name != Optimum.name:
            traces[name] = run(scenario, name, config)
    minimum = traces[OURS].minimum if OURS in traces else {}
    results = {
        name: evaluate(trace, optimum, minimum if name == OURS else {})
        for name, trace in traces.items()
    }
    ordered = [p for p in policies if p in results]
    return ScenarioRun(scenario, {p: traces[p] for p in ordered}, {p: results[p] for p in ordered})


# -- targets -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    target: str
    met: bool | None  # None: not measured in this run
    detail: str


def _names(items: Sequence[str]) -> str:
    return ", ".join(items) if items else "none"


def checks(runs: Sequence[ScenarioRun]) -> list[Check]:
    ours = [(r.scenario, r.results[OURS]) for r in runs if OURS in r.results]
    out: list[Check] = []
    if not ours:
        return out
    by_name = {r.scenario.name: r for r in runs}

    # Where the host reports every demand when the load changes (no vCPU short of time in the
    # epoch's first interval); bursty hosts have no load changes to converge after.
    timed: list[str] = []
    slow: list[str] = []
    for s, r in ours:
        if s.bursty:
            continue
        trace = by_name[s.name].traces[OURS]
        for e in r.epochs:
            if e.first < len(trace.short) and not trace.short[e.first]:
                timed.append(s.name)
                c = e.cycles_to_converge
                if c is None or c > CONVERGE_CYCLES:
                    slow.append(f"{s.name} ({'never' if c is None else c})")
    every = [
        f"{s.name} {'never' if r.converge is None else r.converge}"
        for s, r in ours
        if not s.bursty and (r.converge is None or r.converge > CONVERGE_CYCLES)
    ]
    out.append(
        Check(
            f"balanced within {CONVERGE_CYCLES} cycles of a load change where the host reports"
            " the demand",
            not slow,
            f"{len(timed)} such epochs in {len(set(timed))} scenarios; over target:"
            f" {_names(slow)}. (Where it does not, cycles: {_names(every)})",
        )
    )

    noisy = [
        (s, r) for s, r in ours if any(_noisy(d, 0.05) for d in s.domains) and not s.pcpus > 128
    ]
    if noisy:
        moving = [f"{s.name} ({r.moves_after})" for s, r in noisy if r.moves_after != 0]
        after = ", ".join(f"{s.name}: {r.moves_after} in {s.cycles} cycles" for s, r in noisy)
        out.append(
            Check(
                "zero moves after convergence with ±5% noise",
                not moving if all(s.cycles >= 300 for s, _ in noisy) else None,
                after + ("" if all(s.cycles >= 300 for s, _ in noisy) else " (short run)"),
            )
        )
    noise20 = [s for s, _ in ours if any(_noisy(d, 0.20) for d in s.domains)]
    for s in noise20:
        pins = sum(by_name[s.name].traces[OURS].moves)
        out.append(
            Check(
                "±20% noise on a balanced host: no pin change",
                pins == 0 if s.cycles >= 300 else None,
                f"{s.name}: {pins} in {s.cycles} cycles",
            )
        )

    bursty = [s for s, _ in ours if s.bursty]
    if bursty:
        worse: list[str] = []
        rates: list[str] = []
        details: list[str] = []
        for s in bursty:
            run = by_name[s.name]
            mine, alone = run.results[OURS], run.results.get("static")
            later = run.traces[OURS].moves[BURSTY_SETTLE + 1 :]
            rate = 100.0 * sum(later) / max(len(later), 1)
            details.append(
                f"{s.name}: unmet {mine.unmet:.1f}% SD {mine.sd:.1f}"
                + (f" (left alone {alone.unmet:.1f}% {alone.sd:.1f})" if alone else "")
                + f", {rate:.1f} pins/100 cycles after {BURSTY_SETTLE}"
            )
            if alone is not None and (
                round(mine.unmet, 1) > round(alone.unmet, 1)
                or round(mine.sd, 1) > round(alone.sd, 1)
            ):
                worse.append(s.name)
            if rate > BURSTY_PINS:
                rates.append(s.name)
        out.append(
            Check(
                "bursty: never worse than leaving the pins alone (unmet, SD), at most"
                f" {BURSTY_PINS:g} pins per 100 cycles after cycle {BURSTY_SETTLE}",
                not worse and not rates,
                "; ".join(details),
            )
        )

    for s in (s for s, _ in ours if s.slowdown):
        run = by_name[s.name]
        later = run.traces[OURS].moves[BURSTY_SETTLE + 1 :]
        rate = 100.0 * sum(later) / max(len(later), 1)
        mine, alone = run.results[OURS], run.results.get("static")
        worse_than_alone = alone is not None and round(mine.sd, 1) > round(alone.sd, 1)
        out.append(
            Check(
                "a pCPU that runs its guests slower: not chased, at most"
                f" {BURSTY_PINS:g} pins per 100 cycles after cycle {BURSTY_SETTLE}",
                rate <= BURSTY_PINS and not worse_than_alone if s.cycles >= 300 else None,
                f"{s.name}: {sum(run.traces[OURS].moves)} pins in {s.cycles} cycles,"
                f" {rate:.1f} per 100 after {BURSTY_SETTLE}; SD {mine.sd:.1f}"
                + (f" (left alone {alone.sd:.1f})" if alone else ""),
            )
        )

    over = [s for s, _ in ours if s.oversubscribed]
    for s in over:
        run = by_name[s.name]
        got, best = (
            run.traces[OURS].worst,
            run.traces["optimum"].worst if "optimum" in run.traces else None,
        )
        if best is None:
            continue
        late = range(WORST_CYCLES, len(got))
        gap = max((best[c] - got[c] for c in late), default=0.0)
        out.append(
            Check(
                f"oversubscribed: worst-off share within {WORST_POINTS:g} points of the max-min"
                f" optimum from cycle {WORST_CYCLES}",
                gap <= WORST_POINTS,
                f"{s.name}: worst-off {got[-1]:.1f}% (optimum {best[-1]:.1f}%), at its worst"
                f" {gap:.1f} points below it after cycle {WORST_CYCLES}",
            )
        )

    packing = [(s, r) for s, r in ours if s.packing]
    for s, r in packing:
        best_sd = (
            by_name[s.name].results["optimum"].sd if "optimum" in by_name[s.name].results else None
        )
        if best_sd is None:
            continue
        out.append(
            Check(
                "multi-vCPU packing: SD within 1 point of the optimum",
                r.sd <= best_sd + 1.0,
                f"{s.name}: SD {r.sd:.1f} (optimum {best_sd:.1f})",
            )
        )

    classic = [(s, r) for s, r in ours if s.classic]
    if classic:
        off = [
            f"{s.name} ({r.moves_to} vs {r.minimum})"
            for s, r in classic
            if r.minimum is None or r.moves_to != r.minimum
        ]
        out.append(
            Check(
                "pin changes to converge equal the minimum in the classic cases",
                not off,
                f"{len(classic) - len(off)}/{len(classic)} equal; differ: {_names(off)}",
            )
        )
    full = [(s, r) for s, r in ours if s.from_full]
    if full:
        off = [
            f"{s.name} ({r.moves_to} vs {r.minimum})"
            for s, r in full
            if r.minimum is None or r.moves_to > r.minimum + 1
        ]
        shown = ", ".join(f"{s.name} {r.moves_to} ({r.minimum})" for s, r in full)
        out.append(
            Check(
                "pin changes to converge from a full pCPU at most the minimum + 1",
                not off,
                f"{shown}; over: {_names(off)}",
            )
        )

    steady_by_size: dict[int, float] = {}
    for s, r in ours:
        limit = STEADY_MS.get(s.vcpus)
        if limit is None:
            continue
        trace = by_name[s.name].traces[OURS]
        settled = max((e.converged or len(trace.decide)) for e in r.epochs[:1])
        cold = [1000.0 * d for d in trace.decide[1:settled]] or [0.0]
        steady = [1000.0 * d for d in trace.decide[settled:]] or [0.0]
        steady_by_size[s.vcpus] = statistics.median(steady)
        out.append(
            Check(
                f"plan time < {limit:g} ms for {s.vcpus} vCPUs on {s.pcpus} pCPUs (medians, cold"
                " and steady)",
                statistics.median(cold) < limit and statistics.median(steady) < limit,
                f"{s.name}: cold (cycles 1-{settled - 1}) median {statistics.median(cold):.1f} ms,"
                f" max {max(cold):.1f} ms; steady median {statistics.median(steady):.1f} ms,"
                f" max {max(steady):.1f} ms",
            )
        )
    if len(steady_by_size) == 2:
        small, big = sorted(steady_by_size)
        bound = big * math.log(big) / (small * math.log(small))
        ratio = steady_by_size[big] / max(steady_by_size[small], 1e-9)
        out.append(
            Check(
                "steady plan time grows no worse than n log n",
                ratio <= bound,
                f"{small} -> {big} vCPUs: x{ratio:.1f} (n log n: x{bound:.1f})",
            )
        )

    eight = [(s, r) for s, r in ours if len(s.domains) == 8]
    if eight:
        worst_median = max(r.cpu_ms[0] for _, r in eight)
        worst_max = max(r.cpu_ms[1] for _, r in eight)
        out.append(
            Check(
                f"agent CPU time per cycle with 8 domains < {AGENT_CPU_MS:g} ms",
                worst_max < AGENT_CPU_MS,
                f"{len(eight)} scenarios: worst median {worst_median:.3f} ms,"
                f" worst max {worst_max:.3f} ms",
            )
        )
    return out


def _noisy(domain: DomainSpec, level: float) -> bool:
    return any(abs(load.noise - level) < 1e-9 for load in domain.loads)


# -- report --------------------------------------------------------------------------------

COLUMNS = (
    "scenario",
    "policy",
    "SD",
    "SD %",
    "max-min",
    "unmet %",
    "worst %",
    "cycles",
    "pins (min)",
    "pins after",
    "plan ms",
    "CPU ms",
)


def _row(result: Result) -> list[str]:
    converge = "never" if result.converge is None else str(result.converge)
    shown = result.minimum if result.policy == OURS else None
    minimum = "" if shown is None else f" ({shown})"
    after = "-" if result.moves_after is None else str(result.moves_after)
    timed = result.policy in (OURS, PREVIOUS)
    plan = f"{result.decide_ms[0]:.2f}/{result.decide_ms[1]:.2f}" if timed else ""
    name = result.policy if result.exact else f"{result.policy}~"
    return [
        result.scenario,
        name,
        f"{result.sd:.1f}",
        f"{result.sd_pct:.1f}",
        f"{result.spread:.1f}",
        f"{result.unmet:.1f}",
        f"{result.worst:.0f}",
        converge,
        f"{result.moves_to}{minimum}",
        after,
        plan,
        f"{result.cpu_ms[0]:.2f}/{result.cpu_ms[1]:.2f}",
    ]


def table(runs: Sequence[ScenarioRun], markdown: bool = False) -> str:
    rows = [_row(r) for run in runs for r in run.results.values()]
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    previous = None
    for row in rows:
        if previous is not None and row[0] != previous:
            lines.append("")
        previous = row[0]
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def _window(scenario: Scenario) -> int:
    """How many cycles to plot: the whole run if anything happens later, else the start."""
    noisy = any(load.noise or load.pattern for d in scenario.domains for load in d.loads)
    if scenario.change_times() or noisy:
        return scenario.cycles
    return min(scenario.cycles, 30)


def plot(run: ScenarioRun, path: Path) -> None:
    """One row of panels, a policy each: every managed pCPU's busy % per cycle, pins in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    scenario = run.scenario
    window = _window(scenario)
    x = list(range(1, window + 1))
    names = list(run.traces)
    fig, axes = plt.subplots(
        1, len(names), figsize=(2.7 * len(names), 2.9), sharey=True, squeeze=False
    )
    pcpus = scenario.managed_pcpus
    colors = [f"C{i}" for i in range(10)]
    for ax, name in zip(axes[0], names, strict=True):
        trace = run.traces[name]
        rows = trace.util[1 : window + 1]
        if len(pcpus) <= 10:
            for i, p in enumerate(pcpus):
                ax.plot(x, [r[i] for r in rows], linewidth=1.1, color=colors[i], label=f"pCPU {p}")
        else:
            low = [min(r) for r in rows]
            ax.fill_between(x, low, [max(r) for r in rows], alpha=0.35, label="min-max")
            ax.plot(
                x, [statistics.fmean(r) for r in rows], linewidth=1.1, color="black", label="mean"
            )
        moved = [s for s in range(1, window + 1) if trace.moves[s]]
        ax.plot(moved, [-5.0] * len(moved), "|", color="red", markersize=8, label="pins")
        for t in scenario.change_times():
            ax.axvline(t / scenario.interval, color="grey", linestyle=":", linewidth=0.9)
        ax.set_title(name, fontsize=10)
        ax.set_ylim(-10, 108)
        ax.set_xlim(0, window + 0.5)
        ax.grid(axis="y", linewidth=0.4, alpha=0.5)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("cycle", fontsize=8)
    axes[0][0].set_ylabel("pCPU busy %", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"{scenario.name}: {scenario.summary}", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 0.94))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    # Few colours are used: a palette image is a fraction of the size.
    with Image.open(path) as image:
        palette = image.convert("RGB").quantize(colors=128, method=Image.Quantize.FASTOCTREE)
        palette.save(path, optimize=True)


DOC_HEAD = """\
# Benchmark

Generated by `vcpusched bench` (also `make bench`, or `python -m vcpusched_sim`); do not edit
by hand, re-run it.

The agent's own cycle (`vcpusched.service.Agent`, thresholds {low:g}/{target:g}/{high:g},
`min_gain` {min_gain:g}) runs against a simulated host (`vcpusched_sim.host`), so the scheduler
can be judged at scales no test machine can host as real guests. Each scenario runs once per
policy on its own simulated host with the same seed: every policy sees the same demands and the
same noise. Hosts with NUMA nodes and SMT threads have their own benchmark, judged on work
done rather than CPU time: `make bench-topology`, [benchmark-topology.md](benchmark-topology.md).

## Running it

- `vcpusched bench`: every scenario, 300 cycles each; prints the table and the targets,
  rewrites `docs/benchmark.md` and `docs/img/*.png` (run it from the repository root).
- `--quick` ({quick} cycles per scenario, event times scaled alike), `--scenario NAME`
  (repeatable; `--list` names them), `--cycles N`: partial runs, which only print unless
  `--docs DIR` is given.
- `--config PATH`: run the agent with that file's thresholds and `min_gain`, to try a tuning.
- `--check`: exit 1 when the agent misses a target; `--no-plots`, `--no-docs`.

## The simulated host

- A saturated pCPU is shared max-min fair, as the Linux scheduler shares it: a vCPU wanting
  less than an equal share gets all it wants, the rest is split equally (demands 100 and 60
  receive 50 and 50; 100 and 20 receive 80 and 20). A vCPU that gets less than it wants never
  idles, and waits all the time it does not run, as the lab's guests do; one that gets all it
  wants idles and is counted as never waiting. So the agent learns a starved vCPU's demand only
  once a move gives it room, as on a real host.
- A vCPU allowed on several pCPUs is run by an ideal work-conserving balancer: it may use any
  spare capacity of its allowed pCPUs, and that load is spread evenly over them. Real kernels
  do worse, so the `no-pin` rows are a best case for "no pinning at all".
- Noise is relative: ±5% draws each interval's demand uniformly within 5% of its nominal value,
  independently for every vCPU and interval.
- A bursty guest follows a repeating pattern (for example 100% for one interval, 0% the next);
  its steps are not load changes of the scenario, which has a single epoch.
- Guests start and stop, and demands change phase, on interval boundaries; a stopped guest
  vanishes from the samples and pinning it raises `DomainGone`, as with libvirt.

## Policies

- `vcpusched`: the agent, unchanged.
- `previous`: the agent's policy before it had one objective (noise margin, cooldown, settling
  gate, "nothing onto a full pCPU"), kept in `vcpusched_sim.previous` for this comparison.
- `static`: round-robin pinning over the managed pCPUs, set once when a vCPU first appears.
- `no-pin`: every managed vCPU allowed on every managed pCPU, the kernel balancer doing the rest.
- `greedy`: whenever the SD of pCPU utilization exceeds 5, re-pin every vCPU by the greedy
  partition (heaviest demand first onto the least loaded pCPU), ignoring where it is.
- `optimum`: an oracle that knows the coming demands (without noise) and pins, before each
  interval, to the partition with the least spread of pCPU demand, reached with the fewest pin
  changes. Exact (branch and bound) up to {exact} vCPUs; beyond that it uses the greedy
  partition, shown as `optimum~`, and the section "Large hosts" compares the busiest pCPU with
  the lower bound max(total demand / pCPUs, largest vCPU demand).

Excluded guests are left alone by every policy, and only the pCPUs of the scenario's `cpus`
are managed and measured.

## Columns

- **SD**, **SD %**, **max-min**: spread of the measured utilization of the managed pCPUs (%),
  averaged over the second half of every epoch (an epoch runs from one load change, or guest
  start or stop, to the next); SD % is relative to the mean utilization.
- **unmet %**: CPU time demanded but not received, over the whole run. On an overloaded host
  (`unpinned-heavy-light`) it is the overload itself: with max-min sharing, any placement that
  keeps every pCPU saturated gives every vCPU the same share.
- **worst %**: the share of its demand the worst-off vCPU received, averaged over the same
  intervals as SD: what max-min fairness is about where demand exceeds the host.
- **cycles**: cycles from a load change until the policy converged (worst epoch): the managed
  pCPUs stay balanced to the end of the epoch (SD ≤ 1% of the mean, or within 1 point of the
  optimum's SD at the same moment, judged on the noise-free loads) and a cycle passes without
  a pin and without vCPUs held back to be measured. The agent's first cycle only takes its
  baseline sample, so 1 is the fastest possible after the start. `never`: unbalanced at the
  end of some epoch.
- **pins (min)**: pin changes made until convergence (the first pin of an unpinned vCPU counts
  as one). For `vcpusched`, in brackets: the fewest pin changes that reach the optimum's balance
  from the placement the agent had at each epoch's start (searched exactly; blank when too big).
- **pins after**: pin changes after convergence, to the end of each epoch.
- **plan ms**, **CPU ms**: median/max per cycle of the CPU time spent in the policy's `plan`
  (handed to the agent with a clock, as `Agent(host, config, planner)`), and in
  the whole cycle (`Agent.step` for the agent: sampling the simulated host, load arithmetic,
  plan, pins, log lines). Process CPU time, so other work on the machine inflates it little.

Plots: each managed pCPU's measured busy % per cycle, one panel per policy; lines on top of each
other are pCPUs with equal load; red ticks mark cycles that changed pins, dotted lines the load
changes. Scenarios where nothing changes after the start show their first 30 cycles.
"""


def write_docs(
    runs: Sequence[ScenarioRun], docs: Path, config: Config, plots: bool, cycles: int | None
) -> None:
    images = docs / "img"
    head = DOC_HEAD.format(
        low=config.low,
        target=config.target,
        high=config.high,
        min_gain=config.min_gain,
        quick=QUICK_CYCLES,
        exact=EXACT_VCPUS,
    )
    lines = [head, "## Targets", ""]
    for check in checks(runs):
        verdict = {True: "met", False: "**missed**", None: "not measured"}[check.met]
        lines.append(f"- {check.target}: {verdict} ({check.detail})")
    speeds = ", ".join(
        f"{simulator_speed(SCENARIOS[name]):,.0f} cycles/s with {SCENARIOS[name].vcpus} vCPUs"
        for name in ("noise", "large")
    )
    lines += ["", f"Simulator speed on this machine (tick + sample, no policy): {speeds}."]
    large = [run for run in runs if run.scenario.vcpus > EXACT_VCPUS]
    if large:
        lines += ["", "## Large hosts: against the bound", ""]
        lines += ["- " + _bound_line(run) for run in large]
    late = [run for run in runs if OURS in run.results and run.results[OURS].moves_after]
    if late:
        lines += ["", f"## `{OURS}` moves after convergence", ""]
        lines += [
            "Every pin the agent made once a scenario had converged, with the loads it measured"
            " (the first 12 per scenario):",
            "",
        ]
        for run in late:
            lines += [f"- {run.scenario.name}:"]
            lines += [f"  - {line}" for line in _late_moves(run)[:12]]
    lines += ["", "## Results", ""]
    if cycles is not None:
        lines += [f"Partial run: {cycles} cycles per scenario.", ""]
    lines += [table(runs, markdown=True), "", "## Scenarios", ""]
    for run in runs:
        s = run.scenario
        lines += [f"### {s.name}", "", s.summary + ".", ""]
        if plots:
            name = f"{s.name}.png"
            plot(run, images / name)
            lines += [f"![{s.name}](img/{name})", ""]
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "benchmark.md").write_text("\n".join(lines).rstrip() + "\n")


def simulator_speed(scenario: Scenario, seconds: float = 0.3) -> float:
    """Simulated cycles per second of wall time (tick and sample, no policy)."""
    host = scenario.host()
    cycles = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        host.tick(scenario.interval)
        host.sample()
        cycles += 1
    return cycles / (time.perf_counter() - start)


def _late_moves(run: ScenarioRun) -> list[str]:
    trace, result = run.traces[OURS], run.results[OURS]
    out = []
    for cycle, move in trace.log:
        # A cycle belongs to the epoch whose demands it saw or whose guests it just met.
        epoch = next(e for e in reversed(result.epochs) if e.first - 1 <= cycle)
        if epoch.converged is None or cycle < epoch.converged:
            continue
        loads = "/".join(f"{v:.1f}" for v in trace.util[cycle])
        out.append(
            f"cycle {cycle}: {move.kind} {move.ref} {format_cpus(move.src)}->{move.dst}"
            f" demand {move.demand:.1f} (pCPU util measured {loads})"
        )
    return out


def _bound_line(run: ScenarioRun) -> str:
    scenario = run.scenario
    host = scenario.host()
    pcpus = scenario.managed_pcpus
    index = {p: b for b, p in enumerate(pcpus)}
    refs = [r for r in host.running() if scenario.scope().managed(r.domain)]
    loads = [host.nominal_demand(r) for r in refs]
    home: list[int | None] = []
    for ref in refs:
        affinity = host.affinity(ref)
        home.append(index.get(next(iter(affinity))) if len(affinity) == 1 else None)
    bound = max(sum(loads) / len(pcpus), max(loads))
    parts = []
    for name, trace in run.traces.items():
        peak = max(trace.nominal[-1])
        need = pins_to_level(loads, home, len(pcpus), peak)
        parts.append(
            f"`{name}` {peak:.1f}% after {sum(trace.moves)} pins"
            f" (reaching that level takes at least {need})"
        )
    return (
        f"{scenario.name}: the busiest pCPU can be no lower than {bound:.1f}%"
        f" (total demand / pCPUs, or the largest vCPU). Busiest at the end: {', '.join(parts)}."
    )


# -- command line --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vcpusched bench",
        description="Run the agent against simulated hosts beside baseline policies.",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_CYCLES} cycles per scenario instead of 300"
    )
    parser.add_argument(
        "--scenario",
        action="append",
        metavar="NAME",
        help="run only this scenario (repeatable); --list shows the names",
    )
    parser.add_argument(
        "--cycles", type=int, metavar="N", help="cycles per scenario (event times scaled alike)"
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="run the agent with this config file's thresholds and min_gain (default: defaults)",
    )
    parser.add_argument(
        "--docs",
        type=Path,
        metavar="DIR",
        help="write DIR/benchmark.md and DIR/img/*.png (default: docs/ on a full run)",
    )
    parser.add_argument("--no-docs", action="store_true", help="only print the table")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG")
    parser.add_argument("--check", action="store_true", help="exit 1 if the agent misses a target")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        for scenario in SCENARIOS.values():
            print(f"{scenario.name:24} {scenario.summary}")
        return 0
    names = args.scenario or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"vcpusched: unknown scenario {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    cycles = args.cycles or (QUICK_CYCLES if args.quick else None)
    if cycles is not None and cycles < 4:
        print("vcpusched: --cycles must be at least 4", file=sys.stderr)
        return 2
    config = Config()
    if args.config is not None:
        try:
            config = load_config(args.config, strict_owner=False)
        except ConfigError as exc:
            for error in exc.errors:
                print(f"vcpusched: {exc.source}: {error}", file=sys.stderr)
            return 1
    full = not args.quick and args.scenario is None and args.cycles is None and args.config is None
    docs: Path | None = args.docs or (Path("docs") if full else None)
    if args.no_docs:
        docs = None

    runs: list[ScenarioRun] = []
    for name in names:
        scenario = SCENARIOS[name]
        if cycles is not None:
            scenario = scenario.resized(cycles)
        started = time.perf_counter()
        runs.append(bench_scenario(scenario, config=config))
        print(f"{name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)

    print(table(runs))
    print()
    results = checks(runs)
    for check in results:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[check.met]
        print(f"{verdict:>12}  {check.target}: {check.detail}")
    if docs is not None:
        write_docs(runs, docs, config, plots=not args.no_plots, cycles=cycles)
        print(f"\nwrote {docs / 'benchmark.md'}", file=sys.stderr)
    if args.check and any(c.met is False for c in results):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
