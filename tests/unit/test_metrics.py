"""The metrics and the live state, from the daemon loop driven on the simulator.

The text is read back with prometheus_client's own parser, as a scraper would.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vcpusched import state
from vcpusched.config import Config
from vcpusched.host import HostError, PinError
from vcpusched.metrics import TEXTFILE, Exporter
from vcpusched.model import VcpuRef
from vcpusched.service import Runner, Signals
from vcpusched_sim.host import DomainSpec, SimHost, constant
from vcpusched_sim.scenarios import SCENARIOS

ALL = frozenset({0, 1})
NAME = re.compile(r"vcpusched_[a-z0-9_]+")


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}}"""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def runner_on(host: SimHost, tmp_path: Path, **config: object) -> Runner:
    settings: dict[str, object] = {
        "pidfile": tmp_path / "run" / "vcpusched.pid",
        "metrics_textfile_dir": tmp_path,
    }
    settings.update(config)
    (tmp_path / "run").mkdir(exist_ok=True)
    return Runner(Config(**settings), None, {}, lambda uri: host, Signals())  # type: ignore[arg-type]


def cycles(runner: Runner, host: SimHost, n: int) -> None:
    for _ in range(n):
        runner._cycle()
        host.tick(1.0)


def metrics(tmp_path: Path) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    return parse((tmp_path / TEXTFILE).read_text())


def test_names_follow_the_conventions(tmp_path: Path) -> None:
    host = SimHost(2, [DomainSpec(f"vm{i}", (constant(40),), (ALL,)) for i in range(3)])
    runner = runner_on(host, tmp_path)
    cycles(runner, host, 4)
    families = list(text_string_to_metric_families((tmp_path / TEXTFILE).read_text()))
    for family in families:
        assert NAME.fullmatch(family.name), family.name
        assert family.documentation, family.name
        assert "percent" not in family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
    types = {f.name: f.type for f in families}
    assert types["vcpusched_cycle_duration_seconds"] == "histogram"
    assert types["vcpusched_vcpu_wait_seconds"] == "counter"
    assert types["vcpusched_pin_changes"] == "counter"
    assert types["vcpusched_pcpu_utilization_ratio"] == "gauge"


def test_values_are_the_agents_state(tmp_path: Path) -> None:
    # Four guests on pCPU0: the agent moves some to pCPU1; the metrics follow the pins.
    loads = (50, 30, 20, 10)
    host = SimHost(
        2,
        [DomainSpec(f"vm{i}", (constant(x),), (frozenset({0}),)) for i, x in enumerate(loads)],
    )
    runner = runner_on(host, tmp_path)
    cycles(runner, host, 6)
    m = metrics(tmp_path)
    assert m["vcpusched_up"][()] == 1
    assert m["vcpusched_connected"][()] == 1
    for i in range(4):
        labels = (("domain", f"vm{i}"), ("vcpu", "0"))
        assert m["vcpusched_vcpu_pcpu"][labels] == min(host.affinity(VcpuRef(f"vm{i}", 0)))
    moved = sum(m["vcpusched_pin_changes_total"].values())
    assert moved == host.pin_changes > 0
    util = {dict(k)["pcpu"]: v for k, v in m["vcpusched_pcpu_utilization_ratio"].items()}
    # 50 + 10 beside 30 + 20, or the other way round: whichever the policy picks.
    assert sorted(util.values()) == pytest.approx([0.5, 0.6], abs=0.01)
    assert m["vcpusched_imbalance_ratio"][()] == pytest.approx(0.05, abs=0.01)
    assert m["vcpusched_domains"][(("state", "managed"),)] == 4
    assert m["vcpusched_cycle_duration_seconds_count"][()] == 6
    assert m["vcpusched_cycle_duration_seconds_bucket"][(("le", "+Inf"),)] == 6
    assert m["vcpusched_last_cycle_timestamp_seconds"][()] > 1.7e9
    # The wait counters are the host's own, in seconds.
    waits = m["vcpusched_vcpu_wait_seconds_total"]
    assert all(v >= 0 for v in waits.values())


def test_a_gone_domains_series_go_with_it(tmp_path: Path) -> None:
    domains = [
        DomainSpec("short-lived", (constant(30), constant(30)), (ALL, ALL), stop=5.0),
        DomainSpec("stays", (constant(30),), (ALL,)),
    ]
    host = SimHost(2, domains)
    runner = runner_on(host, tmp_path)
    cycles(runner, host, 4)
    before = metrics(tmp_path)
    assert (("domain", "short-lived"), ("vcpu", "1")) in before["vcpusched_vcpu_pcpu"]
    assert before["vcpusched_domains"][(("state", "managed"),)] == 2
    cycles(runner, host, 3)
    after = metrics(tmp_path)
    for name in ("vcpusched_vcpu_pcpu", "vcpusched_vcpu_wait_seconds_total"):
        assert {dict(k)["domain"] for k in after[name]} == {"stays"}, name
    assert after["vcpusched_domains"][(("state", "managed"),)] == 1
    live = json.loads(state.state_path(runner.config.pidfile).read_text())
    assert {v["domain"] for v in live["vcpus"]} == {"stays"}


class _Flaky(SimHost):
    down = False
    refuse_pins = False

    def sample(self):  # type: ignore[no-untyped-def]
        if self.down:
            raise HostError("cannot connect to test: gone")
        return super().sample()

    def pin(self, ref: VcpuRef, pcpus: frozenset[int]) -> None:
        if self.refuse_pins:
            raise PinError("refused")
        super().pin(ref, pcpus)


def test_disconnection_errors_and_summary(tmp_path: Path) -> None:
    host = _Flaky(2, [DomainSpec(f"vm{i}", (constant(60),), (frozenset({0}),)) for i in range(2)])
    host.refuse_pins = True
    runner = runner_on(host, tmp_path)
    cycles(runner, host, 3)
    m = metrics(tmp_path)
    assert m["vcpusched_errors_total"][(("operation", "pin"),)] >= 1
    assert m.get("vcpusched_pin_changes_total", {}) == {}
    host.down = True
    cycles(runner, host, 2)
    m = metrics(tmp_path)
    assert m["vcpusched_connected"][()] == 0
    assert m["vcpusched_errors_total"][(("operation", "sample"),)] == 2
    # Nothing is known of the guests while disconnected: their series are gone, not stale.
    assert m.get("vcpusched_vcpu_pcpu", {}) == {}
    assert runner.live is not None
    assert state.summary(runner.live).startswith("disconnected since ")
    assert "gone" in state.summary(runner.live)
    host.down = False
    cycles(runner, host, 2)
    assert metrics(tmp_path)["vcpusched_connected"][()] == 1


@pytest.mark.usefixtures("keep_log_level")
def test_reload_verdicts_are_counted(tmp_path: Path) -> None:
    host = SimHost(2, [DomainSpec("vm", (constant(30),), (ALL,))])
    config = tmp_path / "c.yaml"
    config.write_text(
        f"pidfile: {tmp_path}/run/vcpusched.pid\nmetrics: {{textfile_dir: {tmp_path}}}\n"
    )
    runner = runner_on(host, tmp_path)
    runner.config_path = config
    cycles(runner, host, 3)
    runner.reload()
    assert runner.generation == 2
    assert runner.last_reload is not None
    assert runner.last_reload.accepted
    config.write_text("interval: 0\n")
    runner.reload()
    verdict = runner.last_reload
    assert verdict is not None
    assert not verdict.accepted
    assert verdict.generation == 2
    assert verdict.error is not None
    assert "interval" in verdict.error
    m = metrics(tmp_path)
    assert m["vcpusched_reloads_total"] == {
        (("result", "accepted"),): 1,
        (("result", "rejected"),): 1,
    }
    assert m["vcpusched_config_generation"][()] == 2
    assert runner.live is not None
    assert "reload rejected at " in state.summary(runner.live)


def test_textfile_is_replaced_whole_and_a_failure_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    host = SimHost(2, [DomainSpec("vm", (constant(30),), (ALL,))])
    missing = tmp_path / "no-such-dir"
    runner = runner_on(host, tmp_path, metrics_textfile_dir=missing)
    with caplog.at_level(logging.INFO, logger="vcpusched"):
        cycles(runner, host, 3)
        missing.mkdir()
        cycles(runner, host, 1)
    lines = [r.getMessage() for r in caplog.records if "write-metrics" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("write-metrics-failed path=")
    assert lines[1].startswith("write-metrics-ok")
    assert runner.counts.errors["write_metrics"] == 3
    assert os.listdir(missing) == [TEXTFILE]  # no temporary file left behind
    assert os.stat(missing / TEXTFILE).st_mode & 0o777 == 0o644


def test_the_stopped_agent_leaves_up_0(tmp_path: Path) -> None:
    host = SimHost(2, [DomainSpec("vm", (constant(30),), (ALL,))])
    runner = runner_on(host, tmp_path)
    runner.signals.request_stop("SIGTERM")
    assert runner.run() == 0
    m = metrics(tmp_path)
    assert m["vcpusched_up"][()] == 0
    assert m["vcpusched_connected"][()] == 0


def test_listener_serves_the_same_families(tmp_path: Path) -> None:
    host = SimHost(2, [DomainSpec("vm", (constant(30),), (ALL,))])
    runner = runner_on(host, tmp_path)
    cycles(runner, host, 3)
    assert runner.live is not None
    exporter = Exporter(None, "127.0.0.1:0")
    exporter.publish(runner.live)
    assert parse(exporter.text().decode()) == metrics(tmp_path)


def series_count(scenario: str, n: int, tmp: Path) -> tuple[int, int, int]:
    """(series, vCPUs, pCPUs) after `n` cycles of the agent on a simulated scenario."""
    s = SCENARIOS[scenario]
    host = s.host()
    exporter = Exporter(None, None)
    runner = Runner(
        Config(exclude=s.exclude, cpus=s.cpus),
        None,
        {},
        lambda uri: host,
        Signals(),
    )
    runner.exporter = exporter
    runner.state_file = tmp / "state.json"
    for _ in range(n):
        runner._cycle()
        host.tick(s.interval)
    count = sum(len(v) for v in parse(exporter.text().decode()).values())
    return count, s.vcpus, s.pcpus


def test_series_stay_bounded_on_the_large_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    count, vcpus, pcpus = series_count("large", 4, tmp_path)
    with capsys.disabled():
        print(f"\n[metrics] large: {vcpus} vCPUs on {pcpus} pCPUs -> {count} series")
    # Two series per vCPU (pin, wait), two per pCPU (utilization, demand), and a fixed few.
    assert 2 * vcpus + 2 * pcpus <= count <= 2 * vcpus + 2 * pcpus + 60


def test_the_dashboard_asks_only_for_series_the_agent_exports(tmp_path: Path) -> None:
    dashboard = json.loads((Path(__file__).parents[2] / "docs/grafana-dashboard.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [a["expr"] for a in dashboard["annotations"]["list"]]
    queries.append(dashboard["templating"]["list"][1]["query"]["query"])
    wanted = {name for q in queries for name in NAME.findall(q)}
    # Every family, including those only seen with a floating vCPU (held back, measuring).
    host = SimHost(2, [DomainSpec(f"vm{i}", (constant(60),), (ALL,)) for i in range(3)])
    runner = runner_on(host, tmp_path)
    cycles(runner, host, 4)
    runner.counts.count_held({"measuring": 1})
    runner.publish()
    exported = set(metrics(tmp_path))
    assert wanted, "no query found"
    assert wanted <= exported, wanted - exported
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for subject in ("imbalance", "pin changes", "held back", "cycle time"):
        assert subject in titles, subject


def test_held_back_moves_are_the_plans(tmp_path: Path) -> None:
    # Floating vCPUs short of time are measured for several cycles before they are placed:
    # the policy holds them back as `measuring`.
    host = SimHost(2, [DomainSpec(f"vm{i}", (constant(100),), (ALL,)) for i in range(4)])
    runner = runner_on(host, tmp_path)
    expected: dict[str, int] = {}
    for _ in range(5):
        runner._cycle()
        host.tick(1.0)
        plan = runner.agent.plan
        if plan is not None:
            for reason, n in plan.held.items():
                expected[reason] = expected.get(reason, 0) + n
    assert expected.get("measuring", 0) > 0, expected
    m = metrics(tmp_path)
    total = {dict(k)["reason"]: v for k, v in m["vcpusched_moves_held_back_total"].items()}
    assert total == expected
    assert runner.agent.plan is not None
    last = {dict(k)["reason"]: v for k, v in m["vcpusched_plan_held_back_moves"].items()}
    assert last == dict(runner.agent.plan.held)


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink"])
def test_only_a_regular_file_is_ever_replaced(tmp_path: Path, kind: str) -> None:
    # A path that is not a regular file (a device such as /dev/null, a directory, a symlink)
    # is refused and left exactly as it was.
    target = tmp_path / "vcpusched.prom"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    else:
        (tmp_path / "elsewhere").write_text("keep\n")
        target.symlink_to(tmp_path / "elsewhere")
    before = os.lstat(target)
    with pytest.raises(OSError, match="not a regular file"):
        state.atomic_write(target, b"x")
    after = os.lstat(target)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
