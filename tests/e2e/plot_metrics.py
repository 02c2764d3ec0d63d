"""Plot a lab run's metrics files: the panels of docs/grafana-dashboard.json, from real data.

    python -m tests.e2e.plot_metrics [RUN_DIR] [OUT.png]

RUN_DIR holds the .prom files that tests/e2e/test_metrics.py keeps (one per cycle, in
<lab state>/results/metrics-run); each is read with prometheus_client's parser.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from prometheus_client.parser import text_string_to_metric_families

from tests.lab.lab import state_dir

REPO = Path(__file__).resolve().parents[2]


def load(run: Path) -> list[dict[str, dict[tuple[tuple[str, str], ...], float]]]:
    files = []
    for path in sorted(run.glob("[0-9]*.prom")):
        series: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(path.read_text()):
            for s in family.samples:
                series.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        if "vcpusched_last_cycle_timestamp_seconds" in series and series["vcpusched_up"][()]:
            files.append(series)
    # One point per cycle: a reload rewrites the file within a cycle.
    by_cycle = {f["vcpusched_last_cycle_timestamp_seconds"][()]: f for f in files}
    return [by_cycle[t] for t in sorted(by_cycle)]


def plot(run: Path, out: Path) -> None:
    files = load(run)
    if not files:
        raise SystemExit(f"no metrics files in {run}")
    t0 = files[0]["vcpusched_last_cycle_timestamp_seconds"][()]
    t = [f["vcpusched_last_cycle_timestamp_seconds"][()] - t0 for f in files]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)

    util: dict[str, list[float]] = defaultdict(list)
    for f in files:
        per = {dict(k)["pcpu"]: v for k, v in f.get("vcpusched_pcpu_utilization_ratio", {}).items()}
        for pcpu in sorted(
            {
                dict(k)["pcpu"]
                for f2 in files
                for k in f2.get("vcpusched_pcpu_utilization_ratio", {})
            }
        ):
            util[pcpu].append(per.get(pcpu, float("nan")))
    ax = axes[0]
    for pcpu, values in util.items():
        ax.plot(t, values, marker=".", label=f"pCPU {pcpu} utilization")
    sd = [f.get("vcpusched_imbalance_ratio", {}).get((), float("nan")) for f in files]
    ax.plot(t, sd, color="black", linewidth=2, label="imbalance (sd)")
    ax.set_ylabel("ratio")
    ax.set_title("vcpusched_pcpu_utilization_ratio, vcpusched_imbalance_ratio")
    ax.legend(loc="upper right", fontsize=8)

    ax = axes[1]
    keys = sorted({k for f in files for k in f.get("vcpusched_pin_changes_total", {})})
    for key in keys:
        labels = dict(key)
        values = [f.get("vcpusched_pin_changes_total", {}).get(key, 0.0) for f in files]
        ax.step(t, values, where="post", label=f"{labels['kind']} / {labels['reason']}")
    ax.set_ylabel("pin changes")
    ax.set_title("vcpusched_pin_changes_total by kind / reason")
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[2]
    moves = [f["vcpusched_plan_moves"][()] for f in files]
    ax.bar(t, moves, width=0.8, label="pin changes in the plan", color="tab:blue")
    held_keys = sorted({k for f in files for k in f.get("vcpusched_plan_held_back_moves", {})})
    bottom = moves
    for key in held_keys:
        values = [f.get("vcpusched_plan_held_back_moves", {}).get(key, 0.0) for f in files]
        ax.bar(t, values, width=0.8, bottom=bottom, label=f"held back: {dict(key)['reason']}")
        bottom = [a + b for a, b in zip(bottom, values, strict=True)]
    ax.set_ylabel("moves")
    ax.set_title("vcpusched_plan_moves, vcpusched_plan_held_back_moves by reason")
    ax.legend(loc="upper right", fontsize=8)

    ax = axes[3]
    counts = [f["vcpusched_cycle_duration_seconds_count"][()] for f in files]
    sums = [f["vcpusched_cycle_duration_seconds_sum"][()] for f in files]
    per_cycle = [float("nan")] + [
        1000 * (s1 - s0) / (c1 - c0) if c1 > c0 else float("nan")
        for s0, s1, c0, c1 in zip(sums, sums[1:], counts, counts[1:], strict=False)
    ]
    ax.plot(t, per_cycle, marker=".", color="tab:purple")
    ax.set_ylabel("ms")
    ax.set_title("cycle time (from vcpusched_cycle_duration_seconds)")
    ax.set_xlabel("seconds since the agent's first measured cycle")
    fig.suptitle(f"vcpusched on the lab: {len(files)} cycles of real guests")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"wrote {out} from {len(files)} cycles in {run}")


def main(argv: list[str]) -> int:
    run = Path(argv[0]) if argv else state_dir() / "results" / "metrics-run"
    out = Path(argv[1]) if len(argv) > 1 else REPO / "docs/img/metrics-lab.png"
    plot(run, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
