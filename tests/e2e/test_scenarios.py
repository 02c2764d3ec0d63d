"""The agent against real guests: the classic balancing scenarios, judged from outside.

The classic cases put 8 one-vCPU VMs on 4 pCPUs; here they scale with the host (2 guests per
pCPU, so 4 on a 2-core machine). Each scenario records, and prints:

- `sd_before` / `sd_after`: standard deviation of pCPU utilization (/proc/stat) before the
  agent starts and over the hold window at the end;
- `converged`: the agent cycle of the last pin change within the convergence budget;
- `changes_after`: pin changes in the hold window, after the budget (must be 0: no thrash),
  unless they are a `late_response`: one plan answering an imbalance the host shows from
  outside (see `late_response`);
- `audit`: pin changes that matched exactly one audit line.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import signal
import statistics
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    AUDIT_EVENTS,
    INTERVAL,
    Agent,
    Judge,
    check_audit,
    config_settings,
    cycles_to,
    pins_by_pcpu,
    sleep_until,
    write_config,
)
from tests.lab.fixtures import record_result
from tests.lab.lab import (
    Guest,
    GuestSpec,
    Lab,
    LabError,
    PinChange,
    online_pcpus,
    read_proc_stat,
    utilization,
)
from vcpusched.estimate import PLACE_SAMPLES

pytestmark = pytest.mark.lab

PCPUS = online_pcpus()
N = len(PCPUS)
SD_BAR = 5.0  # points of utilization: the bar the original course set for "balanced"
# Cycles the agent may take to converge after a change. The objective policy waits for
# readings of a vCPU's new level before its next step: spreading from one full pCPU, its last
# step has come at cycle 4 to 6 on the lab, and a quiet clean-clone run saw one at 6 that the
# pin watcher saw just after a budget of 6.
BUDGET = 8
HOLD = 8  # cycles watched after the budget, which must bring no pin change
# Intervals before a pin change in the hold window over which /proc/stat must show the host
# unbalanced beyond SD_BAR for the change to count as an answer, not as thrash.
LATE_LOOK = 3
BEFORE = 5.0  # seconds measured before the agent starts
PREFIX = "lab-e2e-"
# Points of pCPU time beyond all of the guests' threads (libvirtd, the agent, this test's
# polling, other jobs) below which the host counts as quiet enough to start a scenario, and
# how long a scenario waits for that before it starts anyway. QEMU's own threads are the
# lab's, not other work: they cost more the slower the machine runs, and a gate on them held
# a slow clean-clone run at 12 to 15 points for the whole wait, with nothing else running.
QUIET = 10.0
QUIET_WAIT = 120.0


@dataclass
class Run:
    """What one scenario saw; `result()` is what gets recorded."""

    name: str
    loads: list[Any]
    sd_before: float = 0.0
    util_before: dict[int, float] = field(default_factory=dict)
    sd_after: float = 0.0
    util_after: dict[int, float] = field(default_factory=dict)
    converged: int | None = None
    changes_total: int = 0
    changes_after: int = 0
    audit: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    trail: str = ""  # the agent's readings and plans, cycle by cycle, for failure messages
    # Each guest's setting at the end and the guests the agent may not move: what the
    # reference placement (`reference`) is laid out from.
    settings: dict[str, float] = field(default_factory=dict)
    fixed: frozenset[str] = frozenset()

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "loads": self.loads,
            "sd_before": round(self.sd_before, 1),
            "sd_after": round(self.sd_after, 1),
            "util_before": {k: round(v, 1) for k, v in self.util_before.items()},
            "util_after": {k: round(v, 1) for k, v in self.util_after.items()},
            "converged_cycle": self.converged,
            "changes": self.changes_total,
            "changes_after": self.changes_after,
        }
        out.update(self.extra)
        return out


@pytest.fixture
def scenario(vmlab: Lab, request: pytest.FixtureRequest) -> Iterator[str]:
    """A guest-name prefix for one scenario; its guests go when it ends, pass or fail."""
    name = request.node.name.removeprefix("test_").replace("_", "-")[:20]
    prefix = f"{PREFIX}{name}-"
    vmlab.destroy_prefix(prefix)
    yield prefix
    vmlab.destroy_prefix(prefix)


def start_guests(lab: Lab, prefix: str, specs: Sequence[tuple[Any, Any]]) -> list[Guest]:
    """specs: (load or "pattern", pin) per guest, named <prefix>0, <prefix>1, ..."""
    guests = []
    for i, (load, pin) in enumerate(specs):
        if isinstance(load, str):
            guests.append(GuestSpec(f"{prefix}{i}", pattern=load, pin=pin))
        else:
            guests.append(GuestSpec(f"{prefix}{i}", load=load, pin=pin))
    return lab.start(guests)


def settings_of(prefix: str, specs: Sequence[tuple[Any, Any]]) -> dict[str, float]:
    """Each guest's setting at the end: its load, or its pattern's last level; none for a
    pattern that keeps changing (more than one level in its last phase is not known)."""
    out = {}
    for i, (load, _) in enumerate(specs):
        if isinstance(load, str):
            level, _, length = load.split(",")[-1].partition(":")
            if float(length) < 60:
                return {}  # it changes again within the run
            load = level
        out[f"{prefix}{i}"] = float(load)
    return out


def measure_before(judge: Judge, run: Run) -> None:
    """Wait for other jobs to leave the pCPUs, then measure the start. They show up in every
    pCPU's utilization, which is all the agent (and the judge) can see; if they stay past
    QUIET_WAIT the scenario starts beside them, and records how much there was."""
    time.sleep(1.0)  # let the guests' first periods pass
    deadline = time.monotonic() + QUIET_WAIT
    while True:
        t0 = time.monotonic()
        time.sleep(BEFORE)
        t1 = time.monotonic()
        other = judge.other(t0, t1)
        if other <= QUIET or t1 > deadline:
            break
    run.util_before = judge.util(t0, t1)
    run.sd_before = statistics.pstdev(run.util_before.values())
    run.extra["foreign_before"] = round(judge.foreign(t0, t1), 1)
    run.extra["other_before"] = round(other, 1)


def wait_quiet_host() -> None:
    """Before booting guests whose timing matters: wait up to QUIET_WAIT for other jobs to
    leave the pCPUs (no guest of the lab runs yet, so all busy time is other work)."""
    deadline = time.monotonic() + QUIET_WAIT
    while time.monotonic() < deadline:
        before = read_proc_stat()
        time.sleep(2.0)
        if sum(utilization(before, read_proc_stat()).values()) <= QUIET:
            return


def settle(
    judge: Judge, agent: Agent, run: Run, since: float, prefix: str, budget: int = BUDGET
) -> float:
    """Watch `budget` + HOLD cycles from `since`; fill in convergence and the final balance.
    Returns the end of the budget (the start of the hold window)."""
    budget_end = since + budget * INTERVAL + 0.5
    end = budget_end + HOLD * INTERVAL
    sleep_until(end)
    assert agent.proc.poll() is None, f"agent exited early\n{agent.transcript()}"
    during = judge.changes(since, budget_end, prefix)
    after = judge.changes(budget_end, prefix=prefix)
    run.converged = cycles_to(agent.started, since, during[-1].at) if during else 0
    run.changes_total = len(judge.changes(prefix=prefix))
    run.changes_after = len(after)
    run.util_after = judge.util(budget_end, end)
    run.sd_after = statistics.pstdev(run.util_after.values())
    run.extra["foreign_after"] = round(judge.foreign(budget_end, end), 1)
    run.extra["foreign_peak"] = round(foreign_peak(judge, agent.started, end), 1)
    run.extra["other_peak"] = round(foreign_peak(judge, agent.started, end, other=True), 1)
    last_change = max((c.at for c in after), default=-math.inf)
    if last_change > end - LATE_LOOK * INTERVAL:
        # Too close to the end to read what followed it: watch on, once, until it can be.
        end = last_change + LATE_LOOK * INTERVAL + 0.5
        sleep_until(end)
        after = judge.changes(budget_end, prefix=prefix)
        run.changes_total = len(judge.changes(prefix=prefix))
        run.changes_after = len(after)
        run.extra["watched_on_to_s"] = round(end - budget_end, 1)
    run.extra["after"] = [str(c) for c in after]
    if after and (late := late_response(judge, after, end)):
        run.extra["late_response"], run.util_after = late
        run.sd_after = statistics.pstdev(run.util_after.values())
    run.trail = agent.trail(since - 2 * INTERVAL)
    return budget_end


def late_response(
    judge: Judge, after: Sequence[PinChange], end: float
) -> tuple[str, dict[int, float]] | None:
    """Pin changes after the budget that answer a change of the host, not thrash: one plan
    (all within one interval, each vCPU moved once) made while /proc/stat showed the host
    unbalanced beyond SD_BAR over the LATE_LOOK intervals before it, after which it stays
    within the bar to the end. Loads in time follow the speed each pCPU of this virtual host
    gets, which moves by a fifth within a minute (docs/reliability.md): a placement balanced at
    the budget can become unbalanced in the hold window with no guest changing its setting.
    Returns what was seen, and the utilization from the interval after the plan to the end."""
    if (plan := one_plan(after)) is None:
        return None
    first, last = plan
    try:
        before = judge.sd(first - LATE_LOOK * INTERVAL, first)
        util = judge.util(last + INTERVAL, end)
    except LabError:
        return None  # too close to either end of the run to tell
    settled = statistics.pstdev(util.values())
    if before > SD_BAR and settled <= SD_BAR:
        return f"sd {before:.1f} before, {settled:.1f} after", util
    return None


def one_plan(changes: Sequence[PinChange]) -> tuple[float, float] | None:
    """When the changes began and ended, if they are one plan: all within one interval, each
    vCPU moved once."""
    first = min(c.since if c.since is not None else c.at for c in changes)
    last = max(c.at for c in changes)
    refs = [(c.domain, c.vcpu) for c in changes]
    if last - first > INTERVAL + 0.5 or len(set(refs)) != len(refs):
        return None
    return first, last


def finish(vmlab: Lab, judge: Judge, agent: Agent, run: Run, *, allow: Sequence[str] = ()) -> None:
    """Stop the agent, check its audit trail and its log, record the run."""
    code = agent.stop()
    judge.pins.stop()
    audit = check_audit(judge.changes(), agent.events(*AUDIT_EVENTS), judge.pins.pins_at)
    run.audit = str(audit)
    run.extra["audit_matched"] = audit.matched
    if audit.noop_restores:
        run.extra["noop_restores"] = len(audit.noop_restores)
    run.extra["pins"] = pins_by_pcpu(judge.current_pins(PREFIX))
    if run.sd_after > REFERENCE_ABOVE and run.settings:
        with contextlib.suppress(LabError):
            run.extra["reference"] = reference(vmlab, judge, run)
    record_result(vmlab, f"e2e-{run.name}", run.result())
    (vmlab.state / "results" / f"e2e-{run.name}.log").write_text(agent.transcript(last=10_000))
    assert code == 0, f"agent exit {code}\n{agent.transcript()}"
    assert audit.ok, f"{audit}\n{agent.transcript()}"
    problems = [p for p in agent.problems() if not any(a in p for a in allow)]
    assert not problems, "agent logged problems:\n" + "\n".join(problems)


# The strictest bar a scenario sets for its end: above it, the reference is measured.
REFERENCE_ABOVE = 3.0
# Intervals the reference measures each placement over, and the points by which the agent's
# placement may read above the best placement of the settings, measured just after it.
REFERENCE_LOOK = 3
REFERENCE_NOISE = 1.0


def reference(vmlab: Lab, judge: Judge, run: Run) -> dict[str, Any]:
    """What balance this host allowed at the end, measured on it: the agent's last placement
    read again (the agent stopped), then the placement of the guests' settings with the least
    spread (fewest pins changed among equals), read the same way. Loads in time follow the
    speed each pCPU of this virtual host gets: where one pCPU ran its guests a quarter slower,
    the placement that balances the settings read at SD 10 and the agent's at 6.4."""
    now = judge.current_pins(PREFIX)
    placed = {d: next(iter(c)) for (d, _), c in now.items() if d in run.settings and len(c) == 1}
    if placed.keys() != run.settings.keys():
        raise LabError(f"not every guest pinned to one pCPU: {now}")
    start = time.monotonic()
    sleep_until(start + REFERENCE_LOOK * INTERVAL)
    agent_sd = judge.sd(start, time.monotonic())
    best = best_placement(run.settings, placed, run.fixed)
    best_sd = agent_sd
    if best != placed:
        start = time.monotonic()
        judge.external.append((start, math.inf))
        for domain, pcpu in best.items():
            if pcpu != placed[domain]:
                vmlab.pin(domain, 0, [pcpu])
        start += INTERVAL
        sleep_until(start + REFERENCE_LOOK * INTERVAL)
        best_sd = judge.sd(start, time.monotonic())
    best_pins = pins_by_pcpu({(d, 0): frozenset({p}) for d, p in best.items()})
    return {"agent_sd": round(agent_sd, 1), "best_sd": round(best_sd, 1), "best": best_pins}


def best_placement(
    settings: dict[str, float], placed: dict[str, int], fixed: Iterable[str]
) -> dict[str, int]:
    """The placement of the settings with the least spread of pCPU sums, and among equals
    the fewest guests moved from `placed` (small hosts: it tries them all)."""
    fixed = set(fixed)
    movable = sorted(d for d in settings if d not in fixed)
    best: tuple[float, int] = (math.inf, 0)
    out = dict(placed)
    for pcpus in itertools.product(PCPUS, repeat=len(movable)):
        where = {**{d: placed[d] for d in fixed}, **dict(zip(movable, pcpus, strict=True))}
        sums = dict.fromkeys(PCPUS, 0.0)
        for domain, pcpu in where.items():
            sums[pcpu] += settings[domain]
        moved = sum(where[d] != placed[d] for d in movable)
        key = (round(statistics.pstdev(sums.values()), 6), moved)
        if key < best:
            best, out = key, where
    return out


def count_per_pcpu(pins: dict[tuple[str, int], frozenset[int]]) -> Counter[int]:
    counts: Counter[int] = Counter()
    for cpus in pins.values():
        assert len(cpus) == 1, f"vCPU left unpinned: {pins}"
        counts[next(iter(cpus))] += 1
    return counts


def run_to_balance(
    vmlab: Lab,
    tmp_path: Path,
    prefix: str,
    name: str,
    specs: Sequence[tuple[Any, Any]],
    budget: int = BUDGET,
) -> tuple[Run, Judge, Agent]:
    """The common shape: guests, a measured start, the agent, BUDGET + HOLD cycles."""
    run = Run(name, [load for load, _ in specs], settings=settings_of(prefix, specs))
    start_guests(vmlab, prefix, specs)
    config = write_config(tmp_path / "vcpusched.yaml", **config_settings(tmp_path))
    with Judge() as judge:
        measure_before(judge, run)
        agent = Agent(config)
        try:
            settle(judge, agent, run, agent.started, prefix, budget)
        finally:
            finish(vmlab, judge, agent, run)
    return run, judge, agent


def foreign_peak(judge: Judge, start: float, end: float, *, other: bool = False) -> float:
    """The most pCPU time beyond the guests' vCPUs (with `other`, beyond all their threads) in
    any interval of the run: when a scenario fails on a shared machine, this tells whether
    another job was hogging the pCPUs meanwhile."""
    peak = 0.0
    t = start
    while t + INTERVAL <= end:
        with contextlib.suppress(LabError):
            peak = max(peak, (judge.other if other else judge.foreign)(t, t + INTERVAL))
        t += INTERVAL
    return peak


def assert_converged(run: Run) -> None:
    assert run.converged is not None
    assert run.converged <= BUDGET, f"converged only at cycle {run.converged}\n{run.trail}"


def assert_still_while_balanced(run: Run, changes: Sequence[PinChange]) -> None:
    """No pin change while guests of equal settings run balanced. The host is judged from
    outside before the agent starts: where it read unbalanced all the same (a pCPU that ran
    its guests slower, as a cloud host's can: 93.5 beside 75.4), one step may be tried, in
    one cycle, and never a second (the readings after it tell that they follow the pCPU)."""
    seen = [str(c) for c in changes]
    if run.sd_before <= SD_BAR:
        assert not changes, (
            f"moves while balanced (SD {run.sd_before:.1f} before): {seen}\n{run.trail}"
        )
        return
    run.extra["tried_while_unbalanced"] = seen
    if changes:
        vcpus = [(c.domain, c.vcpu) for c in changes]
        span = max(c.at for c in changes) - min(c.at for c in changes)
        why = f"more than one step tried (SD {run.sd_before:.1f} before): {seen}\n{run.trail}"
        assert span <= INTERVAL, why
        assert len(set(vcpus)) == len(vcpus), why


def assert_settled(run: Run, bar: float = SD_BAR) -> None:
    """No pin change after the budget but one answer to the host, and an end within `bar`, or
    no worse than the best placement of the settings, both measured again on the same host
    after it."""
    assert run.changes_after == 0 or "late_response" in run.extra, (
        f"pin changes after convergence: {run.extra['after']}\n{run.trail}"
    )
    if run.sd_after <= bar:
        return
    ref = run.extra.get("reference")
    assert ref is not None, (
        f"unbalanced at the end: {run.util_after} sd {run.sd_after:.1f}\n{run.trail}"
    )
    # Not the bar again: a second reading of the same placement within it says nothing of
    # whether a better one was there to take.
    assert ref["agent_sd"] <= ref["best_sd"] + REFERENCE_NOISE, (
        f"unbalanced at the end: {run.util_after} sd {run.sd_after:.1f}, the best placement"
        f" of the settings measured after it: {ref}\n{run.trail}"
    )


# --------------------------------------------------------------------------------------------


def test_already_balanced(vmlab: Lab, tmp_path: Path, scenario: str) -> None:
    """Round-robin pins and equal loads: nothing to do, and nothing done."""
    specs = [(40, PCPUS[i % N]) for i in range(2 * N)]
    run, judge, agent = run_to_balance(vmlab, tmp_path, scenario, "balanced", specs)
    assert_still_while_balanced(run, judge.changes(agent.started, prefix=scenario))
    assert_settled(run, bar=3.0)


def test_all_on_one_pcpu(vmlab: Lab, tmp_path: Path, scenario: str) -> None:
    """Everything on pCPU0, equal loads: two per pCPU in the end, then quiet."""
    specs = [(40, PCPUS[0]) for _ in range(2 * N)]
    run, judge, _ = run_to_balance(vmlab, tmp_path, scenario, "all-on-pcpu0", specs)
    # Judged on pCPU0 alone: other work on pCPU1 (a low-priority job burning a CPU read 63.7
    # there) narrows the spread at the start, but not the guests' pile.
    assert run.util_before[PCPUS[0]] >= 95, "the guests, all on pCPU0, were supposed to fill it"
    assert_converged(run)
    assert count_per_pcpu(judge.current_pins(scenario)) == Counter({p: 2 for p in PCPUS})
    assert_settled(run, bar=3.0)


def test_unpinned_heavy_and_light(vmlab: Lab, tmp_path: Path, scenario: str) -> None:
    """Unpinned, alternating heavy (100) and light (30): one of each per pCPU.

    Both pCPUs end full, so the pins are the judge here, not the spread. The heavy vCPUs are
    short of time while they float, so the agent measures them over PLACE_SAMPLES intervals
    before placing them: that much more budget. The light ones want less than their fair
    share even where the machine runs their loop at 1.5 times its calibrated cost; set to 50,
    exactly their fair share, a light guest read short on a slow machine, as a heavy one
    does, and the split was a coin's toss.
    """
    specs = [(100 if i % 2 == 0 else 30, None) for i in range(2 * N)]
    budget = BUDGET + PLACE_SAMPLES
    run, judge, _ = run_to_balance(vmlab, tmp_path, scenario, "heavy-light", specs, budget)
    pins = judge.current_pins(scenario)
    count_per_pcpu(pins)
    per_pcpu: dict[int, list[int]] = {p: [] for p in PCPUS}
    for (domain, _), cpus in pins.items():
        per_pcpu[next(iter(cpus))].append(specs[int(domain.removeprefix(scenario))][0])
    run.extra["loads_per_pcpu"] = per_pcpu
    assert all(sorted(v) == [30, 100] for v in per_pcpu.values()), per_pcpu
    assert_settled(run)


@pytest.mark.xfail(
    strict=False,
    reason="known fault: the agent may stop two moves from one full pCPU at a placement the "
    "lab reads at SD 5.4, where the swap that balances it gains less than min_gain plus its "
    "uncertainty, or make that swap after the budget (docs/reliability.md)",
)
def test_more_guests_mixed_loads(vmlab: Lab, tmp_path: Path, scenario: str) -> None:
    """Three guests per pCPU with mixed loads, all starting on pCPU0: balanced, then stable.

    The loads leave each pCPU room at the end (about 72 points of guests beside the lab's 8
    or so of QEMU's own threads), so that once balanced every guest can be read exactly; the
    case with no room left is the next test."""
    mixed_loads_from_pcpu0(vmlab, tmp_path, scenario, "mixed-6", [40, 35, 25, 20, 15, 10])


@pytest.mark.xfail(
    strict=False,
    reason="known fault: with both pCPUs full once balanced, the agent plans on bounds and may "
    "balance late or move after balance (docs/reliability.md)",
)
def test_more_guests_mixed_loads_no_room(vmlab: Lab, tmp_path: Path, scenario: str) -> None:
    """The same with loads that fill both pCPUs once balanced (90 points of guests each, with
    QEMU's own 98-99% busy): guests there read short of time, their demands bounds, and in 3
    of 5 runs (4 on the lab, 1 in CI) the agent moved after balancing or balanced late."""
    mixed_loads_from_pcpu0(vmlab, tmp_path, scenario, "mixed-6-no-room", [50, 40, 30, 30, 20, 10])


def mixed_loads_from_pcpu0(
    vmlab: Lab, tmp_path: Path, scenario: str, name: str, mix: list[int]
) -> None:
    """Three guests per pCPU of these loads, all starting on pCPU0: balanced, then stable."""
    specs = [(mix[i % len(mix)], PCPUS[0]) for i in range(3 * N)]
    run, _, _ = run_to_balance(vmlab, tmp_path, scenario, name, specs)
    assert_converged(run)
    assert_settled(run)


def test_a_bursty_guest_beside_steady_ones(vmlab: Lab, tmp_path: Path, scenario: str) -> None:
    """A guest that alternates 100% and 0% every second beside steady ones (nominally 90
    beside 70): the agent does not chase its bursts, and ends no worse than it started.

    Each 2 s interval holds one burst and one idle second, so the bursty guest idles in every
    interval and reads exact at what it got, about 28 (60 of each burst, shared with the 40);
    measured so, the host is balanced already (about 71 beside 78 with QEMU's threads), and
    the swap the nominal loads suggest (the 40 for the 30) would read about 65 beside 88. So:
    at most one swap, nothing after the budget, and an end within the bar, or within the
    lab's 2 points of noise of where it started (work-based loads follow the speed each pCPU
    of this virtual host gets: a 30% guest read 33 to 41 within one run)."""
    if N < 2:
        pytest.skip("needs two pCPUs")
    a, b = PCPUS[0], PCPUS[1]
    specs = [("100:1,0:1", a), (40, a), (30, b), (40, b)]
    run, _, _ = run_to_balance(vmlab, tmp_path, scenario, "bursty", specs)
    assert run.changes_total <= 2, f"pins changed {run.changes_total} times\n{run.trail}"
    assert_settled(run, bar=max(SD_BAR, run.sd_before + 2.0))


def test_oversubscribed_four_to_one(vmlab: Lab, tmp_path: Path, scenario: str) -> None:
    """Five guests each wanting a whole pCPU, pinned four to one: the fair end is three and
    two, where the guests on the shared pCPU get a third of what it gives guests (they got a
    quarter) and the pair a half each.

    With the host saturated, QEMU's own threads float over both pCPUs and take a share the
    guests' counters do not show, so the judge compares the guests' received time with each
    other and with the start, not with a whole pCPU; and the host is checked quiet before the
    guests boot, since once they run it is full by design.

    Placement decides what each pCPU's guests receive together, not how the pCPU is split
    among its equal guests: after the move, one of the three took 43% and another 23% on the
    lab, with equal cgroup shares (docs/reliability.md). So the shares are judged per pCPU,
    by the mean share of each pCPU's guests.
    """
    if N != 2:
        pytest.skip("the case is two pCPUs")
    specs = [(100, PCPUS[0])] * 4 + [(100, PCPUS[1])]
    run = Run("oversubscribed", [load for load, _ in specs])
    wait_quiet_host()
    guests = start_guests(vmlab, scenario, specs)
    config = write_config(tmp_path / "vcpusched.yaml", **config_settings(tmp_path))
    with Judge() as judge:
        time.sleep(1.0 + BEFORE)
        now = time.monotonic()
        before = judge.received(now - BEFORE, now, scenario)
        run.extra["foreign_before"] = round(judge.foreign(now - BEFORE, now), 1)
        agent = Agent(config)
        try:
            budget_end = settle(judge, agent, run, agent.started, scenario)
            after = judge.received(budget_end, budget_end + HOLD * INTERVAL, scenario)
            late = judge.changes(budget_end, prefix=scenario)
            if late and (fair := fair_response(judge, late, budget_end + HOLD * INTERVAL)):
                run.extra["fair_response"] = fair
            pins = judge.current_pins(scenario)
            counts = count_per_pcpu(pins)
        finally:
            finish(vmlab, judge, agent, run)
    pcpu_before = {g.name: pin for g, (_, pin) in zip(guests, specs, strict=True)}
    pcpu_after = {domain: next(iter(cpus)) for (domain, _), cpus in pins.items()}
    share_before = mean_per_pcpu(before, pcpu_before)
    share_after = mean_per_pcpu(after, pcpu_after)
    run.extra["received_before"] = {k: round(v, 1) for k, v in sorted(before.items())}
    run.extra["received_after"] = {k: round(v, 1) for k, v in sorted(after.items())}
    run.extra["per_guest_before"] = {p: round(v, 1) for p, v in sorted(share_before.items())}
    run.extra["per_guest_after"] = {p: round(v, 1) for p, v in sorted(share_after.items())}
    record_result(vmlab, f"e2e-{run.name}", run.result())
    assert sorted(counts.values()) == [2, 3], counts
    # Max-min fair: the shared pCPU's guests gain a third (1/3 against 1/4), and the pair get
    # about 1.5 times what they do (1/2 against 1/3); four to one, the lone guest had 4 times.
    assert min(share_after.values()) >= 1.2 * min(share_before.values()), (before, after)
    assert max(share_after.values()) <= 1.8 * min(share_after.values()), share_after
    assert run.changes_after == 0 or "fair_response" in run.extra, (
        f"pin changes after convergence: {run.extra['after']}\n{run.trail}"
    )


# Points of one pCPU by which a plan after the budget must raise what the least served guests
# get, as read from libvirt's counters, to count as an answer to other work.
FAIR_GAIN = 2.0


def fair_response(judge: Judge, after: Sequence[PinChange], end: float) -> str | None:
    """Pin changes after the budget on a full host that answer other work, not thrash: one
    plan, after which the guests of the pCPU whose guests got least each get more. Time beyond
    the guests' vCPUs (QEMU's own threads, other jobs) takes its share of the pCPU it runs on
    from the guests beside it, and moves: a slow clean-clone run read 14 to 28 points of it,
    and the pair beside most of it got 42 each where the three on the other pCPU got 34."""
    if (plan := one_plan(after)) is None:
        return None
    first, last = plan
    try:
        before = judge.received(first - LATE_LOOK * INTERVAL, first, PREFIX)
        later = judge.received(last + INTERVAL, end, PREFIX)
    except LabError:
        return None  # too close to either end of the run to tell
    least_before = min(mean_per_pcpu(before, pcpus_at(judge, before, first)).values())
    least_after = min(mean_per_pcpu(later, pcpus_at(judge, later, end)).values())
    if least_after >= least_before + FAIR_GAIN:
        return f"least per guest {least_before:.1f} before, {least_after:.1f} after"
    return None


def pcpus_at(judge: Judge, guests: Iterable[str], at: float) -> dict[str, int]:
    """The pCPU each one-vCPU guest was pinned to at `at`, as the pin watcher saw it."""
    out = {}
    for name in guests:
        cpus = judge.pins.pins_at(name, 0, at)
        assert cpus is not None, f"{name}: not seen at {at:.1f}"
        assert len(cpus) == 1, f"{name}: pins {cpus} at {at:.1f}"
        out[name] = next(iter(cpus))
    return out


def mean_per_pcpu(received: dict[str, float], pcpu: dict[str, int]) -> dict[int, float]:
    """The mean share of the guests pinned to each pCPU: what the placement gives them."""
    groups: dict[int, list[float]] = {}
    for name, share in received.items():
        groups.setdefault(pcpu[name], []).append(share)
    return {p: statistics.fmean(shares) for p, shares in groups.items()}


def test_loads_change_mid_run(vmlab: Lab, tmp_path: Path, scenario: str) -> None:
    """Balanced at first (no move), then the loads change: the agent rebalances and settles.

    Two guests per pCPU at 40 each. After PHASE seconds, the guests of even pCPUs go to 60 and
    those of odd pCPUs to 20: 120 beside 40, which one move or swap per pair brings to 80/80.
    """
    # Phase 1 must hold the boot, the wait for a quiet host (5 s windows, retried while
    # other jobs burst) and three of the agent's cycles: 18 s failed beside bursts of load.
    phase = 40
    specs = []
    for p in PCPUS:
        later = 60 if p % 2 == 0 else 20
        specs += [(f"40:{phase},{later}:600", p)] * 2
    run = Run("pattern", [load for load, _ in specs], settings=settings_of(scenario, specs))
    wait_quiet_host()  # the phases start at boot: the agent must start well inside phase 1
    guests = start_guests(vmlab, scenario, specs)
    config = write_config(tmp_path / "vcpusched.yaml", **config_settings(tmp_path))
    with Judge() as judge:
        measure_before(judge, run)
        agent = Agent(config)
        try:
            for g in guests:
                g.wait_console(r"LAB-PHASE n=1 ", timeout=phase + 30)
            # The switches as seen in the consoles, in host time; guests booted a little
            # apart, so they switch a little apart.
            switches = [switch_time(g) for g in guests]
            first, last = min(switches), max(switches)
            run.extra["switch_spread_s"] = round(last - first, 1)
            if agent.started + 3 * INTERVAL > first:
                pytest.fail("the host was too busy: the agent started too late to see phase 1")
            before_switch = judge.changes(agent.started, first - 0.5, scenario)
            run.extra["changes_before_switch"] = len(before_switch)
            # The change is whole when the last guest has switched: the budget runs from
            # there. (On a slow lab, guests reading a fifth above their settings, the switches
            # came 3.9 s apart and the agent moved 12 s after the pCPUs showed the change,
            # its window of readings holding the old levels until then.)
            budget_end = settle(judge, agent, run, last, scenario)
            run.trail = agent.trail()  # from the start: phase 1 is judged too
            changes = judge.changes(first, budget_end, scenario)
            run.extra["converged_note"] = "cycles after the last load switch"
        finally:
            finish(vmlab, judge, agent, run)
    assert_still_while_balanced(run, before_switch)
    assert changes, "the agent did not react to the load change"
    assert_converged(run)
    assert_settled(run)


def switch_time(guest: Guest) -> float:
    """Host time of the guest's first phase change: its console stamps lines with guest
    uptime, and the READY line ties that clock to the host's."""
    ready = guest.wait_console(r"LAB-READY .* uptime=([\d.]+)")
    change = guest.wait_console(r"LAB-PHASE n=1 load=\d+ uptime=([\d.]+)")
    return guest.ready + float(change[1]) - float(ready[1])


def test_excluded_domain(vmlab: Lab, tmp_path: Path, scenario: str) -> None:
    """An excluded domain stays where it is, and its load still counts.

    All on pCPU0; the excluded guest carries 60. Ignoring its load, the agent would leave
    about half of the others' 100 beside it (110/50); counting it, 80/80.
    """
    excluded = f"{scenario}x"
    others = [20, 20, 20, 40] + [40, 40] * (N - 2)
    specs = [(load, PCPUS[0]) for load in others]
    run = Run(
        "excluded",
        [60, *others],
        settings={**settings_of(scenario, [(load, None) for load in others]), excluded: 60.0},
        fixed=frozenset({excluded}),
    )
    start_guests(vmlab, scenario, specs)
    vmlab.start([GuestSpec(excluded, load=60, pin=PCPUS[0])])
    settings = config_settings(tmp_path, exclude=[f"{PREFIX}*-x"])  # a glob, as users write
    config = write_config(tmp_path / "vcpusched.yaml", **settings)
    with Judge() as judge:
        measure_before(judge, run)
        agent = Agent(config)
        try:
            settle(judge, agent, run, agent.started, scenario)
        finally:
            finish(vmlab, judge, agent, run)
        touched = [c for c in judge.changes() if c.domain == excluded]
    assert not touched, f"excluded domain re-pinned: {[str(c) for c in touched]}"
    assert not [e for e in agent.events(*AUDIT_EVENTS) if e.fields.get("domain") == excluded]
    assert_converged(run)
    assert_settled(run)


def test_guest_started_and_destroyed(vmlab: Lab, tmp_path: Path, scenario: str) -> None:
    """A guest that starts mid-run is adopted (placed); one destroyed is forgotten; no error."""
    specs = [(40, PCPUS[0]), (30, PCPUS[0]), (20, PCPUS[-1])]
    newcomer = f"{scenario}new"
    settings = {**settings_of(scenario, specs), newcomer: 50.0}
    del settings[f"{scenario}0"]
    run = Run("lifecycle", [40, 30, 20, "+50", "-40"], settings=settings)
    start_guests(vmlab, scenario, specs)
    config = write_config(tmp_path / "vcpusched.yaml", **config_settings(tmp_path))
    with Judge() as judge:
        measure_before(judge, run)
        agent = Agent(config)
        try:
            sleep_until(agent.started + 4 * INTERVAL)
            (guest,) = vmlab.start([GuestSpec(newcomer, load=50)])
            agent.wait_for("new", timeout=3 * INTERVAL, domain=newcomer)
            # A newcomer short of time (it boots at full speed) is measured first.
            place = agent.wait_for("place", timeout=(PLACE_SAMPLES + 2) * INTERVAL, domain=newcomer)
            run.extra["placed_after_s"] = round(place.at - guest.created, 1)
            sleep_until(guest.ready + 5 * INTERVAL)
            gone_at = time.monotonic()
            vmlab.destroy([f"{scenario}0"])
            agent.wait_for("gone", timeout=3 * INTERVAL, domain=f"{scenario}0")
            settle(judge, agent, run, gone_at, scenario)
            run.extra["converged_note"] = "cycles after the destroy"
        finally:
            finish(vmlab, judge, agent, run)
    pins = judge.current_pins(scenario)
    assert len(pins[(newcomer, 0)]) == 1, f"newcomer not pinned: {pins}"
    assert (f"{scenario}0", 0) not in pins
    assert_converged(run)
    assert_settled(run)


def test_signals(vmlab: Lab, tmp_path: Path, scenario: str) -> None:
    """SIGHUP applies new thresholds on the next cycle; a bad file keeps the config in force;
    SIGTERM with restore_on_exit puts back the pins the agent first saw."""
    run = Run("signals", [10] * (2 * N) + ["+30"])
    # Light loads: the pCPU stays far from full, so no estimate of its demand (which adds the
    # time vCPUs wait for each other) can come near a gap of 100 points.
    start_guests(vmlab, scenario, [(10, PCPUS[0])] * (2 * N))
    path = tmp_path / "vcpusched.yaml"
    # Lenient: only a gap of 100 points could justify a move.
    lenient = config_settings(
        tmp_path,
        thresholds={"high": 95, "target": 90, "low": 85},
        min_gain=100,
        restore_on_exit=True,
    )
    strict = {**lenient, "thresholds": {"high": 85, "target": 75, "low": 65}, "min_gain": 8}
    write_config(path, **lenient)
    with Judge() as judge:
        first_seen = dict(judge.current_pins(scenario))
        measure_before(judge, run)
        agent = Agent(path)
        try:
            sleep_until(agent.started + 3 * INTERVAL + 0.5)
            lenient_changes = judge.changes(prefix=scenario)

            write_config(path, **strict)
            hup = agent.signal(signal.SIGHUP)
            reload_line = agent.wait_for("reload", timeout=5, after=hup)
            run.extra["reload"] = reload_line.fields.get("changed")
            sleep_until(hup + BUDGET * INTERVAL)
            moved = judge.changes(hup, prefix=scenario)
            run.extra["first_move_after_hup_s"] = round(moved[0].at - hup, 2) if moved else None

            path.write_text("thresholds:\n  low: 95\n")  # low above target: invalid
            bad_hup = agent.signal(signal.SIGHUP)
            rejected = agent.wait_for("reload", timeout=5, after=bad_hup, rejected=str(path))
            run.extra["rejected"] = rejected.fields.get("error")
            sleep_until(bad_hup + 2 * INTERVAL)
            assert agent.proc.poll() is None, f"agent died on a bad reload\n{agent.transcript()}"

            # A new imbalance: the strict config moves for it, the lenient one would not.
            # (It may move while the guest boots: booting, it already loads its pCPU.)
            late_start = time.monotonic()
            (guest,) = vmlab.start([GuestSpec(f"{scenario}late", load=30, pin=PCPUS[0])])
            first_seen[(f"{scenario}late", 0)] = frozenset({PCPUS[0]})
            sleep_until(guest.ready + BUDGET * INTERVAL)
            late_moves = judge.changes(late_start, prefix=scenario)

            write_config(path, **{**strict, "min_gain": 5})
            check_hup = agent.signal(signal.SIGHUP)
            check = agent.wait_for("reload", timeout=5, after=check_hup)
            run.extra["reload_after_bad"] = check.fields.get("changed")
            sleep_until(check_hup + INTERVAL)
            before_term = judge.current_pins(scenario)
            run.util_after = judge.util(check_hup - 2 * INTERVAL, check_hup)
            run.sd_after = statistics.pstdev(run.util_after.values())
            term = agent.signal(signal.SIGTERM)
            agent.proc.wait(30)
            agent.wait_for("stop", timeout=5, signal="SIGTERM")
            time.sleep(0.5)
            restored = judge.current_pins(scenario)
            run.changes_total = len(judge.changes(prefix=scenario))
            run.extra["restores"] = len(judge.changes(term, prefix=scenario))
        finally:
            finish(vmlab, judge, agent, run, allow=["reload rejected="])
    assert not lenient_changes, f"moved under min_gain 100: {[str(c) for c in lenient_changes]}"
    assert "min_gain:100.0->8.0" in (run.extra["reload"] or "")
    assert moved, "no move after the SIGHUP that allowed it"
    assert moved[0].at - hup <= INTERVAL + 1.0, "the new thresholds waited past the next cycle"
    assert late_moves, "no rebalance after the bad reload: the config in force changed"
    assert "min_gain:8.0->5.0" in (run.extra["reload_after_bad"] or "")
    assert before_term != first_seen, "nothing to restore: the test proves nothing"
    assert restored == first_seen, f"restore_on_exit: {restored} != {first_seen}"


def test_dry_run(vmlab: Lab, tmp_path: Path, scenario: str) -> None:
    """--dry-run logs the moves it would make and pins nothing."""
    run = Run("dry-run", [40] * (2 * N))
    start_guests(vmlab, scenario, [(40, PCPUS[0])] * (2 * N))
    config = write_config(tmp_path / "vcpusched.yaml", **config_settings(tmp_path))
    with Judge() as judge:
        measure_before(judge, run)
        agent = Agent(config, "--dry-run")
        try:
            sleep_until(agent.started + 5 * INTERVAL)
            run.changes_total = len(judge.changes(prefix=scenario))
            planned = [e for e in agent.events("move") if e.fields.get("dry_run") == "1"]
            run.extra["dry_run_moves"] = len(planned)
            run.util_after = judge.util(agent.started, time.monotonic())
            run.sd_after = statistics.pstdev(run.util_after.values())
        finally:
            finish(vmlab, judge, agent, run)
    assert planned, "dry run logged no move for an obviously unbalanced host"
    assert run.changes_total == 0
    assert agent.events("start")[0].fields.get("dry_run") == "1"
