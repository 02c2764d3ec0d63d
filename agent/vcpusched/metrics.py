"""Prometheus metrics, rendered from the daemon's live state (`vcpusched.state.LiveState`).

Every family is recomputed from the last state document when it is collected: gauges are
what the agent sees now, counters are the agent's own totals (or the host's, for the vCPU wait
time), and a vCPU's series go with its domain. Two outputs, both optional: a `.prom` file
rewritten each cycle for node_exporter's textfile collector, and a local HTTP listener.

Names follow Prometheus conventions: `vcpusched_` prefix, base units (seconds, ratios of one
pCPU rather than percentages), `_total` on counters.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from vcpusched.config import listen_address
from vcpusched.state import CYCLE_BUCKETS, LiveState, atomic_write

TEXTFILE = "vcpusched.prom"


def families(state: LiveState) -> list[Metric]:
    """Every metric family of one state document."""
    out: list[Metric] = []

    def gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> None:
        family = GaugeMetricFamily(name, doc, labels=list(labels or {}))
        family.add_metric(list((labels or {}).values()), value)
        out.append(family)

    gauge(
        "vcpusched_up",
        "1 while the agent runs; 0 in the file it leaves when it stops.",
        1.0 if state.running else 0.0,
    )
    gauge(
        "vcpusched_build_info", "The agent's version, as a label.", 1.0, {"version": state.version}
    )
    gauge(
        "vcpusched_connected",
        "1 while the agent's libvirt connection works.",
        1.0 if state.connected and state.running else 0.0,
    )
    gauge(
        "vcpusched_config_generation",
        "The config in force: 1 at start, one more per accepted reload.",
        state.generation,
    )
    gauge("vcpusched_interval_seconds", "Seconds between two cycles.", state.interval)
    if state.last_cycle is not None:
        gauge(
            "vcpusched_last_cycle_timestamp_seconds",
            "Unix time the last completed cycle ended.",
            state.last_cycle,
        )

    counts = state.counts
    buckets = [
        (_le(bound), float(n)) for bound, n in zip(CYCLE_BUCKETS, counts.cycle_buckets, strict=True)
    ]
    buckets.append(("+Inf", float(counts.cycle_count)))
    out.append(
        HistogramMetricFamily(
            "vcpusched_cycle_duration_seconds",
            "Time one cycle took: sample, plan and pin.",
            buckets=buckets,
            sum_value=counts.cycle_sum,
        )
    )

    changes = CounterMetricFamily(
        "vcpusched_pin_changes",
        "vCPU pin changes made, by kind (place, move) and the policy's reason.",
        labels=["kind", "reason"],
    )
    for key, n in sorted(counts.pin_changes.items()):
        kind, _, reason = key.partition("/")
        changes.add_metric([kind, reason], n)
    out.append(changes)
    held_total = CounterMetricFamily(
        "vcpusched_moves_held_back",
        "Moves the policy considered and held back, summed over cycles, by reason.",
        labels=["reason"],
    )
    for reason, n in sorted(counts.held_back.items()):
        held_total.add_metric([reason], n)
    out.append(held_total)
    plan_moves = GaugeMetricFamily(
        "vcpusched_plan_moves", "Pin changes in the last plan.", value=len(state.moves)
    )
    out.append(plan_moves)
    plan_held = GaugeMetricFamily(
        "vcpusched_plan_held_back_moves",
        "Moves the last plan held back, by reason.",
        labels=["reason"],
    )
    for reason, n in sorted(state.held.items()):
        plan_held.add_metric([reason], n)
    out.append(plan_held)

    util = GaugeMetricFamily(
        "vcpusched_pcpu_utilization_ratio",
        "Share of the pCPU's counted time (busy + idle) that was busy over the last interval.",
        labels=["pcpu"],
    )
    demand = GaugeMetricFamily(
        "vcpusched_pcpu_demand_ratio",
        "What the pCPU's vCPUs (and other work) would use with room, in pCPUs; may pass 1.",
        labels=["pcpu"],
    )
    for p in state.pcpus:
        util.add_metric([str(p.pcpu)], _ratio(p.util))
        demand.add_metric([str(p.pcpu)], _ratio(p.demand))
    out += [util, demand]
    sd = state.sd
    if sd is not None:
        gauge(
            "vcpusched_imbalance_ratio",
            "Standard deviation of the allowed pCPUs' utilization.",
            sd / 100.0,
        )

    wait = CounterMetricFamily(
        "vcpusched_vcpu_wait_seconds",
        "Seconds the vCPU was runnable but waiting for a pCPU (the host's counter).",
        labels=["domain", "vcpu"],
    )
    pinned = GaugeMetricFamily(
        "vcpusched_vcpu_pcpu",
        "The pCPU the vCPU is pinned to; -1 while it may run on several.",
        labels=["domain", "vcpu"],
    )
    for v in state.vcpus:
        labels = [v.domain, str(v.vcpu)]
        if v.wait_seconds is not None:
            wait.add_metric(labels, v.wait_seconds)
        pinned.add_metric(labels, -1 if v.pcpu is None else v.pcpu)
    out += [wait, pinned]

    managed, excluded = state.domains()
    domains = GaugeMetricFamily(
        "vcpusched_domains", "Running domains, managed or excluded.", labels=["state"]
    )
    domains.add_metric(["managed"], managed)
    domains.add_metric(["excluded"], excluded)
    out.append(domains)

    reloads = CounterMetricFamily(
        "vcpusched_reloads", "Config reloads (SIGHUP), by result.", labels=["result"]
    )
    for result, n in sorted(counts.reloads.items()):
        reloads.add_metric([result], n)
    out.append(reloads)
    errors = CounterMetricFamily(
        "vcpusched_errors", "Failed operations, by operation.", labels=["operation"]
    )
    for operation, n in sorted(counts.errors.items()):
        errors.add_metric([operation], n)
    out.append(errors)
    return out


def _ratio(percent: float) -> float:
    # Percentages are kept to 2 decimals; a ratio of 4 reads the same without float residue.
    return round(percent / 100.0, 4)


def _le(bound: float) -> str:
    return repr(float(bound))


class _StateCollector:
    """A prometheus_client collector serving whatever state was published last."""

    def __init__(self) -> None:
        self._state: LiveState | None = None
        self._lock = threading.Lock()

    def publish(self, state: LiveState) -> None:
        with self._lock:
            self._state = state

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            state = self._state
        if state is not None:
            yield from families(state)


class Exporter:
    """The agent's metrics outputs: a textfile directory, a listener, both or neither."""

    def __init__(self, textfile_dir: Path | None, listen: str | None) -> None:
        self.textfile_dir = textfile_dir
        self.listen = listen
        self._collector = _StateCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self._collector)
        self._listening = False

    def start(self) -> None:
        """Open the listener, if one is configured. Raises OSError (address in use, ...)."""
        if self.listen is None or self._listening:
            return
        address, port = listen_address(self.listen)
        start_http_server(port, addr=address, registry=self.registry)
        self._listening = True

    def publish(self, state: LiveState) -> None:
        """Serve `state` and rewrite the textfile. Raises OSError when the file cannot be
        written (the listener still serves the new state)."""
        self._collector.publish(state)
        if self.textfile_dir is not None:
            atomic_write(self.textfile_dir / TEXTFILE, generate_latest(self.registry))

    def text(self) -> bytes:
        return generate_latest(self.registry)
