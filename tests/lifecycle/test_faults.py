"""Bad input and hostile timing, against the agent as a real process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from tests.lifecycle.procs import AGENT, Agent, write_config


def _replace(path: Path, text: str) -> None:
    # As editors and Ansible do: a reader never sees half a file.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    tmp.rename(path)


def test_sighup_storm_ends_on_last_good_config(tmp_path: Path, agents: list[Agent]) -> None:
    pidfile = tmp_path / "a.pid"
    config = write_config(tmp_path / "c.yaml", pidfile)
    agent = Agent(["run", "--config", str(config)])
    agents.append(agent)
    agent.wait_for("connected")
    base = f"uri: test:///default\npidfile: {pidfile}\n"
    bad_written = 0
    for i in range(50):
        if i % 2:
            _replace(config, base + f"interval: {i}\nthresholds: {{low: 95}}\n")
            bad_written += 1
        else:
            _replace(config, base + f"interval: {0.2 + i / 100:.2f}\n")
        agent.proc.send_signal(signal.SIGHUP)
        time.sleep(0.018)
    _replace(config, base + "interval: 0.25\nmin_gain: 7\n")
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_for("min_gain:5.0->7.0")
    time.sleep(0.5)
    assert agent.proc.poll() is None
    assert agent.stop() == 0
    text = agent.text()
    rejected = [line for line in text.splitlines() if " reload rejected=" in line]
    applied = [line for line in text.splitlines() if " reload changed=" in line]
    print(
        f"SIGHUP storm: 51 signals, {len(applied)} reloads applied, {len(rejected)} files "
        f"rejected (of {bad_written} bad ones written), agent alive"
    )
    assert 0 < len(rejected) <= bad_written
    assert all(
        'error="thresholds.low: must be below thresholds.target (80), got 95"' in line
        for line in rejected
    )
    # The last reload line is the good file, and nothing after it changed the config.
    reloads = [line for line in text.splitlines() if " reload " in line]
    assert "interval:" in reloads[-1]
    assert "->0.25" in reloads[-1]
    assert "Traceback" not in text


def test_two_agents_started_at_the_same_instant(tmp_path: Path, agents: list[Agent]) -> None:
    pidfile = tmp_path / "a.pid"
    config = write_config(tmp_path / "c.yaml", pidfile)
    pair = [Agent(["run", "--config", str(config)]), Agent(["run", "--config", str(config)])]
    agents.extend(pair)
    deadline = time.monotonic() + 20
    while all(a.proc.poll() is None for a in pair) and time.monotonic() < deadline:
        time.sleep(0.05)
    losers = [a for a in pair if a.proc.poll() is not None]
    (loser,) = losers
    (winner,) = [a for a in pair if a is not loser]
    assert loser.proc.returncode == 4  # another instance running
    assert re.fullmatch(
        rf"vcpusched: another instance is running \(pid {winner.proc.pid}, "
        rf"pidfile {re.escape(str(pidfile))}\)\n",
        loser.text(),
    )
    winner.wait_for("connected")
    assert winner.stop() == 0


def test_unusable_pidfile_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    config = write_config(tmp_path / "c.yaml", blocker / "run" / "a.pid")
    result = subprocess.run(
        [*AGENT, "run", "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert (
        result.stderr == f"vcpusched: cannot create pidfile {blocker}/run/a.pid: Not a directory\n"
    )


def test_no_syslog_socket_in_the_foreground_logs_to_stderr(
    tmp_path: Path, agents: list[Agent]
) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path / "a.pid")
    agent = Agent(
        ["run", "--config", str(config)],
        env={"VCPUSCHED_SYSLOG_SOCKET": str(tmp_path / "absent.sock")},
    )
    agents.append(agent)
    agent.wait_for("connected")
    assert agent.stop() == 0
    assert "stop signal=SIGTERM" in agent.text()


def test_syslog_target_without_socket_refuses(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path / "a.pid")
    env = {**os.environ, "VCPUSCHED_SYSLOG_SOCKET": str(tmp_path / "absent.sock")}
    result = subprocess.run(
        [*AGENT, "run", "--log-target", "syslog", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("vcpusched: cannot log to syslog: ")
    assert result.stderr.count("\n") == 1


def test_relative_pidfile_on_the_command_line_refused_like_the_config_key(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path / "a.pid")
    result = subprocess.run(
        [*AGENT, "run", "--config", str(config), "-p", "a.pid"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "argument -p/--pidfile: expected an absolute path, got 'a.pid'" in result.stderr
    assert not (tmp_path / "a.pid").exists()


def test_planted_symlink_at_the_pidfile_refused(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.write_text("keep me\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "a.pid").symlink_to(precious)
    config = write_config(tmp_path / "c.yaml", tmp_path / "run" / "a.pid")
    result = subprocess.run(
        [*AGENT, "run", "--once", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.endswith("a.pid: it is a symbolic link\n"), result.stderr
    assert precious.read_text() == "keep me\n"
