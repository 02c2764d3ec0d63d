"""The agent as a real process: pidfile, signals, reloads, daemon mode, readiness.

libvirt's built-in test driver stands in for the hypervisor here (no daemon needed); what the
agent does to real guests is proven in tests/e2e against a real libvirtd.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.lifecycle.procs import AGENT, Agent, as_at_a_terminal, write_config


def test_foreground_reload_and_stop(tmp_path: Path, agents: list[Agent]) -> None:
    pidfile = tmp_path / "a.pid"
    config = write_config(tmp_path / "c.yaml", pidfile)
    agent = Agent(["run", "--config", str(config)])
    agents.append(agent)
    agent.wait_for("connected uri=test:///default")
    assert pidfile.read_text() == f"{agent.proc.pid}\n"

    write_config(config, pidfile, interval=0.5, thresholds="{high: 95}")
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_for("reload changed=interval:0.2->0.5,thresholds.high:90.0->95.0")

    config.write_text(f"uri: test:///default\npidfile: {pidfile}\nthresholds: {{low: 99}}\n")
    agent.proc.send_signal(signal.SIGHUP)
    text = agent.wait_for("reload rejected=")
    assert 'error="thresholds.low: must be below thresholds.target (80), got 99"' in text
    time.sleep(0.6)
    assert agent.proc.poll() is None

    assert agent.stop() == 0
    text = agent.text()
    assert "stop signal=SIGTERM" in text
    assert "Traceback" not in text
    assert not pidfile.exists()


def test_second_instance_refused_and_stale_pidfile_ignored(
    tmp_path: Path, agents: list[Agent]
) -> None:
    pidfile = tmp_path / "a.pid"
    config = write_config(tmp_path / "c.yaml", pidfile)
    first = Agent(["run", "--config", str(config)])
    agents.append(first)
    first.wait_for("connected")
    second = subprocess.run(
        [*AGENT, "run", "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert second.returncode == 4  # another instance running
    assert second.stderr.strip() == (
        f"vcpusched: another instance is running (pid {first.proc.pid}, pidfile {pidfile})"
    )

    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    assert pidfile.exists()  # left behind by the kill
    third = Agent(["run", "--config", str(config)])
    agents.append(third)
    third.wait_for("connected")
    assert pidfile.read_text() == f"{third.proc.pid}\n"
    assert third.stop() == 0


def test_bad_config_at_start_is_one_line_and_exit_3(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("interval: 0\n")
    config.chmod(0o644)
    result = subprocess.run(
        [*AGENT, "run", "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 3
    assert result.stderr == (
        f"vcpusched: {config}: interval: must be at least 0.1 and at most 3600, got 0\n"
    )


def _next(sock: socket.socket, statuses: list[str]) -> bytes:
    """The next datagram that is not a STATUS= update; those go to `statuses`."""
    while True:
        message = sock.recv(4096)
        if not message.startswith(b"STATUS="):
            return message
        statuses.append(message.decode().removeprefix("STATUS="))


def _status_with(sock: socket.socket, statuses: list[str], needle: str) -> str:
    while not any(needle in s for s in statuses):
        message = sock.recv(4096)
        assert message.startswith(b"STATUS="), message
        statuses.append(message.decode().removeprefix("STATUS="))
    return next(s for s in statuses if needle in s)


def test_readiness_and_reload_notifications(tmp_path: Path, agents: list[Agent]) -> None:
    address = str(tmp_path / "notify.sock")
    statuses: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(15)
        pidfile = tmp_path / "a.pid"
        config = write_config(tmp_path / "c.yaml", pidfile)
        agent = Agent(["run", "--config", str(config)], env={"NOTIFY_SOCKET": address})
        agents.append(agent)
        assert _next(sock, statuses) == b"READY=1"
        # The test driver's one domain, "test", and its sd, once a cycle has measured it.
        assert "balanced: 1 domains, sd " in _status_with(sock, statuses, "balanced")
        agent.proc.send_signal(signal.SIGHUP)
        assert _next(sock, statuses).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
        assert _next(sock, statuses) == b"READY=1"

        config.write_text(f"uri: test:///default\npidfile: {pidfile}\ninterval: 0\n")
        agent.proc.send_signal(signal.SIGHUP)
        assert _next(sock, statuses).startswith(b"RELOADING=1")
        assert _next(sock, statuses) == b"READY=1"
        rejected = _status_with(sock, statuses, "reload rejected")
        assert rejected.endswith("interval: must be at least 0.1 and at most 3600, got 0")
        assert rejected.startswith("balanced: 1 domains")
        agent.proc.send_signal(signal.SIGTERM)
        assert _next(sock, statuses) == b"STOPPING=1"
        assert agent.stop() == 0


def test_libvirt_unreachable_at_start_is_exit_5(tmp_path: Path) -> None:
    """At start it is an answer for systemd (which retries: Restart=on-failure); once running,
    an outage is survived (tests/e2e/test_faults.py, against a real libvirtd)."""
    uri = f"qemu+unix:///system?socket={tmp_path}/no-such.sock"
    pidfile = tmp_path / "a.pid"
    config = write_config(tmp_path / "c.yaml", pidfile, uri=f"'{uri}'")
    result = subprocess.run(
        [*AGENT, "run", "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 5, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vcpusched: cannot connect to {uri}: "), result.stderr
    assert "Traceback" not in result.stderr
    assert not pidfile.exists()


def test_cpus_selecting_no_online_pcpu_refused_at_start_and_on_reload(
    tmp_path: Path, agents: list[Agent]
) -> None:
    pidfile = tmp_path / "a.pid"
    config = write_config(tmp_path / "c.yaml", pidfile, cpus='"100-200"')
    result = subprocess.run(
        [*AGENT, "run", "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 3, result.stderr
    problem = "cpus: 100-200 selects no online pCPU of this host (online: "
    assert result.stderr.strip().splitlines()[-1].startswith(f"vcpusched: {config}: {problem}")
    status = subprocess.run(
        [*AGENT, "status", "--config", str(config), "-i", "0.1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 0, status.stderr
    assert "pcpus none: cpus selects no online pCPU of this host" in status.stdout

    write_config(config, pidfile)
    agent = Agent(["run", "--config", str(config)])
    agents.append(agent)
    agent.wait_for("connected")
    write_config(config, pidfile, cpus='"100-200"')
    agent.proc.send_signal(signal.SIGHUP)
    text = agent.wait_for("reload rejected=")
    assert problem in text
    assert agent.stop() == 0


def test_daemon_mode_detaches_and_logs_to_syslog(tmp_path: Path) -> None:
    address = str(tmp_path / "log.sock")
    pidfile = tmp_path / "d.pid"
    config = write_config(tmp_path / "c.yaml", pidfile)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(address)
        syslog.settimeout(15)
        env = {**os.environ, "VCPUSCHED_SYSLOG_SOCKET": address}
        parent = subprocess.run(
            [*AGENT, "run", "--daemon", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )
        assert parent.returncode == 0, parent.stderr
        messages = []
        while not any(b"connected" in m for m in messages):
            messages.append(syslog.recv(4096))
        pid = int(pidfile.read_text())
        assert pid != os.getpid()
        # <facility*8+severity>: daemon (3) * 8 + info (6) = 30
        assert messages[0].startswith(f"<30>vcpusched[{pid}]: INFO start ".encode())
        os.kill(pid, signal.SIGTERM)
        while b"stop signal=SIGTERM" not in messages[-1]:
            messages.append(syslog.recv(4096))
    deadline = time.monotonic() + 10
    while pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidfile.exists()


def test_daemon_mode_without_syslog_refuses(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path / "d.pid")
    env = {**os.environ, "VCPUSCHED_SYSLOG_SOCKET": str(tmp_path / "absent.sock")}
    result = subprocess.run(
        [*AGENT, "run", "--daemon", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode == 1
    assert "cannot log to syslog" in result.stderr
    assert not (tmp_path / "d.pid").exists()


def test_once_places_unpinned_vcpus(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path / "a.pid")
    result = subprocess.run(
        [*AGENT, "run", "--once", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    places = [line for line in result.stderr.splitlines() if " place domain=test " in line]
    assert len(places) == 2
    assert {line.split(" to=")[1].split()[0] for line in places} == {"0", "2"}


def test_dry_run_pins_nothing_and_says_so(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path / "a.pid")
    result = subprocess.run(
        [*AGENT, "run", "--once", "--dry-run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    places = [line for line in result.stderr.splitlines() if " place " in line]
    assert len(places) == 2
    assert all(line.endswith(" dry_run=1") for line in places)


def test_status_reads_the_running_daemons_state(tmp_path: Path, agents: list[Agent]) -> None:
    pidfile = tmp_path / "a.pid"
    config = write_config(tmp_path / "c.yaml", pidfile)
    agent = Agent(["run", "--config", str(config)])
    agents.append(agent)
    agent.wait_for("balanced ")

    def status(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*AGENT, "status", "--config", str(config), *extra],
            capture_output=True,
            text=True,
            timeout=30,
        )

    shown = status()
    assert shown.returncode == 0, shown.stderr
    first = shown.stdout.splitlines()[0]
    assert first.startswith(f"daemon pid {agent.proc.pid}: its state of "), first
    assert "test/0:" in shown.stdout
    assert "status: balanced: 1 domains" in shown.stdout
    doc = json.loads(status("--json").stdout)
    assert doc["source"]["kind"] == "daemon"
    assert doc["pid"] == agent.proc.pid
    assert doc["source"]["age_seconds"] < 5
    assert {v["domain"] for v in doc["vcpus"]} == {"test"}
    assert doc["connected"]
    assert doc["running"]
    assert doc["generation"] == 1

    assert agent.stop() == 0
    alone = status("--interval", "0.2")
    assert alone.returncode == 0, alone.stderr
    assert alone.stdout.startswith(f"no daemon running (no {pidfile}): sampled by itself")
    assert "test/0:" in alone.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_metrics_listener_serves_and_a_taken_port_is_one_line(
    tmp_path: Path, agents: list[Agent]
) -> None:
    port = _free_port()
    pidfile = tmp_path / "a.pid"
    config = write_config(tmp_path / "c.yaml", pidfile, metrics=f'{{listen: "127.0.0.1:{port}"}}')
    agent = Agent(["run", "--config", str(config)])
    agents.append(agent)
    agent.wait_for("balanced ")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"vcpusched_up", "vcpusched_vcpu_pcpu", "vcpusched_pin_changes"} <= names

    # A second agent (its own pidfile) asking for the same port: refused, one line, exit 1.
    other = write_config(
        tmp_path / "d.yaml", tmp_path / "b.pid", metrics=f'{{listen: "127.0.0.1:{port}"}}'
    )
    result = subprocess.run(
        [*AGENT, "run", "--config", str(other)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"vcpusched: metrics.listen: cannot listen on 127.0.0.1:{port}")
    assert result.stderr.count("\n") == 1, result.stderr
    assert agent.stop() == 0


def _reload(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AGENT, "reload", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_reload_command_reports_the_agents_verdict(tmp_path: Path, agents: list[Agent]) -> None:
    pidfile = tmp_path / "run" / "a.pid"
    config = write_config(tmp_path / "c.yaml", pidfile)
    agent = Agent(["run", "--config", str(config)])
    agents.append(agent)
    agent.wait_for("connected")

    write_config(config, pidfile, interval=0.3)
    accepted = _reload(config)
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout == f"vcpusched: reloaded {config} (generation 2)\n"
    assert "reload changed=interval:0.2->0.3" in agent.text()

    # A file check-config accepts, but this host cannot run: only the agent can say.
    write_config(config, pidfile, cpus='"100-200"')
    rejected = _reload(config, "--pid", str(agent.proc.pid))
    assert rejected.returncode == 3
    assert rejected.stderr.startswith(
        f"vcpusched: reload rejected: {config}: cpus: 100-200 selects no online pCPU"
    ), rejected.stderr
    assert rejected.stderr.count("\n") == 1

    # A file that does not validate never reaches the agent.
    write_config(config, pidfile, interval=0)
    before = agent.text().count("reload ")
    invalid = _reload(config)
    assert invalid.returncode == 3
    assert invalid.stderr == (
        f"vcpusched: {config}: interval: must be at least 0.1 and at most 3600, got 0\n"
    )
    time.sleep(0.5)
    assert agent.text().count("reload ") == before
    assert agent.proc.poll() is None

    assert agent.stop() == 0
    assert not (pidfile.parent / "reload-verdict.json").exists()
    write_config(config, pidfile)
    gone = _reload(config)
    assert gone.returncode == 1
    assert gone.stderr.startswith(f"vcpusched: no running agent found through {pidfile}: ")


def _wchan(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return ""


def test_ctrl_c_during_status_is_quiet_130(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path / "a.pid")
    proc = subprocess.Popen(
        [*AGENT, "status", "--config", str(config), "--interval", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_at_a_terminal,
    )
    # Inside the sampling interval: the process sleeps there (on a busy machine its start-up
    # alone can take longer than any fixed delay).
    deadline = time.monotonic() + 20
    while "nanosleep" not in _wchan(proc.pid):
        assert time.monotonic() < deadline, "status never reached its sampling interval"
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert (out, err) == ("", "")
