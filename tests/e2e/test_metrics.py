"""The agent's metrics and live state on real guests, checked against libvirt and /proc/stat.

The agent runs with `metrics.textfile_dir` set; a recorder keeps every version of the .prom
file it rewrites (each read with prometheus_client's own parser, as node_exporter's textfile
collector would). The judge is the harness's: pins from libvirt polled every 0.1 s, pCPU
utilization from /proc/stat. The recorded files are kept in the lab's results directory, where
`docs/metrics.md`'s plot is drawn from.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import (
    INTERVAL,
    Agent,
    Judge,
    agent_command,
    check_audit,
    config_settings,
    sleep_until,
    write_config,
)
from tests.lab.fixtures import record_result
from tests.lab.lab import GuestSpec, Lab, online_pcpus

pytestmark = pytest.mark.lab

PCPUS = online_pcpus()
PREFIX = "lab-e2e-metrics-"
# Points of utilization the agent's pCPU readings may differ from /proc/stat's over the same
# cycles: both read the same kernel counters as busy over busy + idle (time stolen by the
# hypervisor below is neither), so what is left is where the windows start and end (the judge
# samples every 0.5 s), which a busy host cannot widen much over many cycles.
UTIL_TOLERANCE = 6.0
LOADS = [50, 30, 20, 10, 10]
CYCLES = 14  # watched after the start: the agent converges, then holds

Series = dict[str, dict[tuple[tuple[str, str], ...], float]]


@dataclass
class Scrape:
    at: float  # host monotonic time the file was read
    text: str
    series: Series

    def value(self, name: str, **labels: str) -> float:
        return self.series[name][tuple(sorted(labels.items()))]

    def per(self, name: str, key: str) -> dict[str, float]:
        return {dict(k)[key]: v for k, v in self.series.get(name, {}).items()}

    def cycle_end(self, offset: float) -> float:
        """The monotonic time its cycle ended (the file holds unix time)."""
        return self.value("vcpusched_last_cycle_timestamp_seconds") - offset


def parse(text: str) -> Series:
    out: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


class Recorder:
    """Every version of the textfile, as it appears (polled every 50 ms)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.scrapes: list[Scrape] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seen = None
        while not self._stop.wait(0.05):
            try:
                stat = self.path.stat()
                if (stat.st_ino, stat.st_mtime_ns) == seen:
                    continue
                text = self.path.read_text()
            except FileNotFoundError:
                continue
            seen = (stat.st_ino, stat.st_mtime_ns)
            self.scrapes.append(Scrape(time.monotonic(), text, parse(text)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def last(self) -> Scrape:
        assert self.scrapes, f"no metrics file appeared at {self.path}"
        return self.scrapes[-1]


@pytest.fixture
def guests(vmlab: Lab) -> Iterator[str]:
    vmlab.destroy_prefix(PREFIX)
    yield PREFIX
    vmlab.destroy_prefix(PREFIX)


def same_pin(pcpu: float, real: frozenset[int]) -> bool:
    """A pCPU number as the metric gives it (-1: allowed on several) against libvirt's pins."""
    return len(real) > 1 if pcpu == -1 else real == frozenset({int(pcpu)})


def stolen_ticks() -> int:
    """Ticks of all pCPUs taken by the hypervisor below this host (/proc/stat's steal)."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8])


def status(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*agent_command(), "status", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_metrics_and_status_match_libvirt_and_proc_stat(
    vmlab: Lab, tmp_path: Path, guests: str
) -> None:
    # Four guests on the first pCPU, one of them excluded, and one left to float (placed by
    # the agent) that goes mid-run.
    pins = [PCPUS[0]] * 4 + [None]
    vmlab.start(
        [
            GuestSpec(f"{guests}{i}", load=x, pin=p)
            for i, (x, p) in enumerate(zip(LOADS, pins, strict=True))
        ]
    )
    textfiles = tmp_path / "textfile"
    textfiles.mkdir()
    settings = config_settings(
        tmp_path, exclude=[f"{guests}3"], metrics={"textfile_dir": str(textfiles)}
    )
    config = write_config(tmp_path / "vcpusched.yaml", **settings)
    offset = time.time() - time.monotonic()
    recorder = Recorder(textfiles / "vcpusched.prom")
    record: dict[str, object] = {}
    with Judge() as judge:
        stolen = stolen_ticks()
        agent = Agent(config)
        try:
            sleep_until(agent.started + CYCLES * INTERVAL + 0.5)
            hold_end = time.monotonic()
            # Reported beside the readings: the time a busy host below this one takes is
            # what the agent and /proc/stat must both leave out to agree.
            ticks = os.sysconf("SC_CLK_TCK") * (hold_end - agent.started) * len(PCPUS)
            steal = 100 * (stolen_ticks() - stolen) / ticks

            # `status` against the running daemon reads its state file, and says so.
            shown = status(config)
            assert shown.returncode == 0, shown.stderr
            assert shown.stdout.startswith(f"daemon pid {agent.proc.pid}: its state of ")
            live = json.loads(status(config, "--json").stdout)
            assert live["source"]["kind"] == "daemon"
            assert live["source"]["age_seconds"] < 2 * INTERVAL
            status_pins = {
                (v["domain"], v["vcpu"]): v["pcpu"]
                for v in live["vcpus"]
                if v["domain"].startswith(guests)
            }
            at = time.monotonic()
            for (domain, vcpu), pcpu in status_pins.items():
                real = judge.pins.pins_at(domain, vcpu, at)
                assert real is not None, (domain, vcpu)
                assert same_pin(-1 if pcpu is None else pcpu, real), (domain, vcpu, pcpu, real)
            assert live["domains"] == {"managed": 4, "excluded": 1}

            # A reload, accepted: counted, and the generation moves on.
            write_config(config, **{**settings, "min_gain": 6})
            agent.signal(signal.SIGHUP)
            agent.wait_for("reload", timeout=10, after=hold_end)
            # And one rejected: counted too, the old config kept.
            config.write_text("interval: 0\n")
            rejected_at = agent.signal(signal.SIGHUP)
            agent.wait_for("reload", timeout=10, after=rejected_at)
            # The guest that goes takes its series with it.
            vmlab.destroy([f"{guests}4"])
            gone_at = time.monotonic()
            sleep_until(gone_at + 2 * INTERVAL + 0.5)
            after_gone = recorder.last()
        finally:
            code = agent.stop()
            time.sleep(0.3)
            recorder.stop()
        judge.pins.stop()

        # A file written before the first cycle has ended (at start) has no cycle time yet.
        scrapes = [
            s for s in recorder.scrapes if "vcpusched_last_cycle_timestamp_seconds" in s.series
        ]
        assert code == 0, agent.transcript()
        assert len(scrapes) >= CYCLES, f"{len(scrapes)} metrics files for {CYCLES} cycles"

        # Pins: every file against libvirt's pins just after that cycle ended.
        mismatched = []
        for scrape in scrapes[:-1]:
            end = scrape.cycle_end(offset)
            for labels, pcpu in scrape.series.get("vcpusched_vcpu_pcpu", {}).items():
                d = dict(labels)
                if not d["domain"].startswith(guests):
                    continue
                real = judge.pins.pins_at(d["domain"], int(d["vcpu"]), end + 0.3)
                if real is not None and not same_pin(pcpu, real):
                    mismatched.append(f"{d['domain']}/{d['vcpu']} {pcpu} vs {sorted(real)}")
        assert not mismatched, mismatched

        # pCPU utilization: the mean of the agent's readings over the last cycles before the
        # reload, against /proc/stat over the same span.
        # One file per cycle (a reload rewrites the file within a cycle), read before the reload.
        cycles = {s.cycle_end(offset): s for s in scrapes if s.at <= hold_end}
        window = [cycles[t] for t in sorted(cycles)][-8:]
        assert len(window) >= 6
        start = window[0].cycle_end(offset) - INTERVAL
        end = window[-1].cycle_end(offset)
        proc = judge.util(start, end)
        agent_util = {
            p: 100
            * statistics.fmean(
                s.per("vcpusched_pcpu_utilization_ratio", "pcpu")[str(p)] for s in window
            )
            for p in PCPUS
        }
        for p in PCPUS:
            assert abs(agent_util[p] - proc[p]) <= UTIL_TOLERANCE, (agent_util, proc, steal)
        sd_agent = statistics.fmean(s.value("vcpusched_imbalance_ratio") for s in window)
        assert abs(100 * sd_agent - statistics.pstdev(proc.values())) <= UTIL_TOLERANCE

        # Pin changes: the counter equals libvirt's changes and the agent's audit lines.
        changes = judge.changes(prefix=guests)
        last_running = scrapes[-2]
        counted = sum(last_running.series.get("vcpusched_pin_changes_total", {}).values())
        audit = check_audit(changes, agent.events("move", "place"))
        assert audit.ok, audit
        assert counted == len(changes) > 0

        # Wait time is a counter: it never goes down while a vCPU lives.
        for before, later in itertools.pairwise(scrapes):
            now = later.series.get("vcpusched_vcpu_wait_seconds_total", {})
            for labels, value in before.series.get("vcpusched_vcpu_wait_seconds_total", {}).items():
                if labels in now:
                    assert now[labels] >= value - 1e-6, labels

        mid = window[-1]
        assert mid.value("vcpusched_up") == 1
        assert mid.value("vcpusched_connected") == 1
        assert mid.value("vcpusched_domains", state="managed") == 4
        assert mid.value("vcpusched_domains", state="excluded") == 1
        assert mid.value("vcpusched_config_generation") == 1
        assert after_gone.value("vcpusched_config_generation") == 2
        assert after_gone.value("vcpusched_reloads_total", result="accepted") == 1
        assert after_gone.value("vcpusched_reloads_total", result="rejected") == 1
        gone = f"{guests}4"
        assert gone in mid.per("vcpusched_vcpu_pcpu", "domain")
        assert gone not in after_gone.per("vcpusched_vcpu_pcpu", "domain")
        assert gone not in after_gone.per("vcpusched_vcpu_wait_seconds_total", "domain")
        assert after_gone.value("vcpusched_domains", state="managed") == 3
        assert scrapes[-1].value("vcpusched_up") == 0  # left by the stopped agent
        problems = [p for p in agent.problems() if "reload rejected=" not in p]
        assert not problems, problems

        # Keep the run: every file with its time, for the docs' plot.
        kept = vmlab.state / "results" / "metrics-run"
        shutil.rmtree(kept, ignore_errors=True)
        kept.mkdir(parents=True)
        for i, scrape in enumerate(scrapes):
            (kept / f"{i:04d}.prom").write_text(scrape.text)
        record = {
            "files": len(scrapes),
            "pin_changes": counted,
            "util_agent": {p: round(v, 1) for p, v in agent_util.items()},
            "util_proc_stat": {p: round(v, 1) for p, v in proc.items()},
            "steal_percent": round(steal, 1),
            "sample": {
                name: next(iter(values.values()))
                for name, values in sorted(mid.series.items())
                if values
            },
        }
        (kept / "last-running.prom").write_text(mid.text)
    record_result(vmlab, "e2e-metrics", record)
