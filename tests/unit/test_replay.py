"""Plans replayed from the agent's own debug log of a lab run: what the readings of real
guests on a real host made the policy decide, kept as a regression test."""

from __future__ import annotations

from pathlib import Path

from vcpusched.config import Config
from vcpusched.logs import parse_event
from vcpusched.model import Plan, Snapshot, Vcpu, VcpuRef, excluded, parse_cpus
from vcpusched.policy import Balancer

FIXTURES = Path(__file__).parent / "fixtures"


def replay(path: Path, config: Config | None = None) -> tuple[list[Plan], list[dict[str, str]]]:
    """A fresh Balancer fed the `reading` and `plan` lines of a log at `log_level: debug`:
    its plans, and the log's own pin lines (`place`, `move`) to compare them with."""
    config = config or Config()
    balancer = Balancer(config)
    plans: list[Plan] = []
    pins: list[dict[str, str]] = []
    vcpus: list[Vcpu] = []
    for raw in path.read_text().splitlines():
        level = next((x for x in (" DEBUG ", " INFO ") if x in raw), None)
        parsed = parse_event(raw.split(level, 1)[1]) if level else None
        if parsed is None:
            continue
        name, f = parsed
        if name == "reading":
            ref = VcpuRef(f["domain"], int(f["vcpu"]))
            vcpus.append(
                Vcpu(
                    ref,
                    float(f["received"]),
                    float(f["demand"]),
                    parse_cpus(f["pcpus"]),
                    excluded=excluded(config.exclude, ref.domain),
                )
            )
        elif name == "plan":
            util = {int(p): float(u) for p, u in (x.split(":") for x in f["util"].split(","))}
            snapshot = Snapshot(util, tuple(sorted(vcpus, key=lambda v: v.ref)))
            plans.append(balancer.plan(snapshot, frozenset(util)))
            balancer.applied(plans[-1].moves)  # as the agent did: the log's pins say so
            vcpus = []
        elif name in ("place", "move"):
            pins.append({"cycle": str(len(plans)), "event": name, **f})
    return plans, pins


def test_a_burst_of_host_work_beside_full_pcpus_moves_nothing() -> None:
    # The lab's unpinned heavy/light scenario (100/50/100/50) beside a job that burst on
    # pCPU 0 for one interval (its guests got 40 and 33 of 100): the agent, reading the burst
    # as lasting host work, swapped a heavy guest for a light one, which put both heavies on
    # one pCPU. Its window then held eight intervals of floating vCPUs counted as host work.
    plans, pins = replay(FIXTURES / "lab-heavy-light-burst.log")
    assert len(plans) == 12
    logged = [(p["cycle"], p["event"], p["domain"][-1], p["to"]) for p in pins]
    assert logged[-2:] == [("12", "move", "0", "1"), ("12", "move", "3", "0")]  # what it did
    placed = [(m.ref.domain[-1], m.dst) for m in plans[7].moves]
    assert placed == [(d, int(to)) for _, e, d, to in logged if e == "place"]
    assert all(plan.held.get("measuring") for plan in plans[:7])
    assert [len(plan.moves) for plan in plans[8:]] == [0, 0, 0, 0]


DRIFT = FIXTURES / "lab-pattern-drift.log"


def test_a_drift_of_a_pcpus_readings_on_a_balanced_host_moves_nothing() -> None:
    # Phase 1 of the lab's load-change scenario (four guests of 40, two per pCPU) beside the
    # bursty low-priority load: every guest read lower for three intervals, pCPU 1's most
    # (36 to 29-32 against 37 to 32-35), and the agent swapped two guests of equal setting
    # (the log's own pins). After the swap each read as its new pCPU's guests did: the
    # readings followed the pCPU. A step for the spread alone must hold if the vCPUs it moves
    # read SPEED other where they go.
    plans, pins = replay(DRIFT)
    assert len(plans) == 8
    logged = [(p["cycle"], p["domain"][-1], p["to"]) for p in pins]
    assert logged == [("6", "1", "1"), ("6", "3", "0")]
    assert plans[5].pcpu_demand[0] - plans[5].pcpu_demand[1] > 2 * Config().min_gain  # the pretext
    assert [len(plan.moves) for plan in plans] == [0] * len(plans)


def test_a_slowdown_of_the_whole_host_does_not_swap_equal_guests() -> None:
    # The lab's excluded-domain scenario (x of 60 excluded, 20/20/20/40 beside it) beside the
    # bursty low-priority load, balanced at 78/87 when every guest read about 8 points more
    # for three intervals. The estimator restarted the level of the two 20s on pCPU 1 at the
    # jump but not that of the 20 on pCPU 0, whose window was wider; repeating the new level
    # over the intervals before it made them look 5 points heavier than their twin, and the
    # agent swapped them. Reconstructed from that run's trail: its readings of every guest and
    # the plans' pCPU demands, the host's utilization taken from those.
    plans, _ = replay(FIXTURES / "lab-excluded-slowdown.log", Config(exclude=["*-x"]))
    assert len(plans) == 15
    assert plans[13].pcpu_demand[1] > plans[13].pcpu_demand[0]  # the swap's pretext
    moved = [(i, str(m.ref), m.dst) for i, plan in enumerate(plans[9:], 9) for m in plan.moves]
    assert moved == []


def test_a_level_that_bounds_hid_is_seen_within_a_cycle() -> None:
    # The lab's load-change scenario on a slow machine: four guests set to 40 read 47-50 and
    # filled both pCPUs, so every reading was a bound (tops of 50 to 100). When two of them
    # went to 20 they read 20-22 exactly, where each had received at least 36 before: a sure
    # change. Judged by the spread of the tops it was none, and the agent answered only when
    # those left the window, 14 cycles later (after the test's budget of 8).
    plans, pins = replay(FIXTURES / "lab-loads-change-bounds.log")
    assert len(plans) == 30
    logged = [(int(p["cycle"]), p["domain"][-1], int(p["to"])) for p in pins]
    assert logged == [(29, "0", 1), (29, "3", 0)]  # what the agent did
    assert all(not plan.moves for plan in plans[:15])
    # The switch shows in plan 14 (pCPU 1 at 48%); the next plan makes the same exchange.
    assert plans[15].pcpu_demand[1] < 55
    assert [(m.ref.domain[-1], m.dst) for m in plans[15].moves] == [("0", 1), ("3", 0)]


def test_a_level_that_boot_bounds_hid_is_seen_within_two_cycles() -> None:
    # The same scenario with the agent started while the guests still booted: their first
    # readings were bounds of 50 to 92 (received 44 to 50), then 34-37 exactly. When two
    # went to 20 (17-21 exactly) the boot's tops still set the spread, and the agent moved
    # 9 cycles after pCPU 0 showed the switch (plan 16, at 96%).
    plans, pins = replay(FIXTURES / "lab-loads-change-boot.log")
    assert [(int(p["cycle"]), p["domain"][-1]) for p in pins] == [(25, "0"), (25, "2")]
    assert all(not plan.moves for plan in plans[:17])
    assert plans[17].moves
    assert plans[17].pcpu_demand[1] < 55


def test_a_guest_known_only_by_tops_is_not_swapped_for_its_twin() -> None:
    # The lab's already-balanced scenario (four guests of 40, two per pCPU) beside the bursty
    # low-priority load, which burst as the agent started: every guest read short at 98% busy
    # pCPUs. One was known only by bounds read at their top (57, 87, 60, where it received
    # 47, 40, 36); on those the agent swapped it for a twin read at 41-46. Sent at what it
    # received, the swap gains nothing.
    plans, pins = replay(FIXTURES / "lab-balanced-host-burst.log")
    assert len(plans) == 16
    logged = [(int(p["cycle"]), p["domain"][-1], int(p["to"])) for p in pins]
    assert logged == [(3, "0", 1), (3, "1", 0)]  # what the agent did
    assert [m for plan in plans for m in plan.moves] == []


def test_a_guest_known_by_tops_is_sent_where_others_have_room() -> None:
    # The lab's excluded-domain scenario (x of 60 excluded, 20/20/20/40, all on pCPU 0) on a
    # slow machine. After three steps the 40 still shared the full pCPU with x and received
    # 29-34, read only as tops of 75-78; pCPU 1's three 20s read exactly. The agent, asking
    # the exchange to gain with the 40 at its floor, waited for an exact reading and made its
    # last step at cycle 10, after the test's budget of 8. With room where it goes, its tops
    # are taken as they are, and the exchange is made at cycle 8.
    plans, pins = replay(FIXTURES / "lab-excluded-full-pcpu.log", Config(exclude=["*-x"]))
    logged = [(int(p["cycle"]), p["domain"][-1], int(p["to"])) for p in pins]
    assert logged[-2:] == [(10, "3", 1), (10, "1", 0)]  # what the agent did
    made = [(i, m.ref.domain[-1], m.dst) for i, plan in enumerate(plans[:7], 1) for m in plan.moves]
    assert made == [(c, d, to) for c, d, to in logged[:3]]
    assert [(m.ref.domain[-1], m.dst) for m in plans[7].moves] == [("3", 1), ("0", 0)]
