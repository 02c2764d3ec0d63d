"""The live state document: its file, its reading back, its summary and its rendering."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from vcpusched import state
from vcpusched.state import LiveState, MoveState, PcpuState, ReloadState, VcpuState


def live(**changes: object) -> LiveState:
    base = LiveState(
        version="0.1.0",
        pid=os.getpid(),
        written=1_800_000_000.0,
        interval=1.0,
        generation=2,
        running=True,
        connected=True,
        disconnected_since=None,
        error=None,
        last_reload=None,
        last_cycle=1_800_000_000.0,
        pcpus=(PcpuState(0, 80.0, 82.0, True), PcpuState(1, 60.0, 61.0, True)),
        vcpus=(
            VcpuState("web 1\nmove domain=db", 0, "0", 0, 50.0, 52.0, 1.5, False),
            VcpuState("db", 0, "1", 1, 60.0, 60.0, 0.0, False),
            VcpuState("batch", 0, "0-1", None, 30.0, 30.0, None, True),
        ),
        moves=(),
        held={},
        dry_run=False,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_the_file_reads_back_as_written(tmp_path: Path) -> None:
    pidfile = tmp_path / "vcpusched.pid"
    pidfile.write_text(f"{os.getpid()}\n")
    written = live(
        moves=(MoveState("move", "db", 0, "0", 1, 60.0, "relieve"),),
        held={"cooldown": 2},
        last_reload=ReloadState(1.0, False, "interval: bad", 2),
    )
    state.write(state.state_path(pidfile), written)
    assert state.state_path(pidfile) == tmp_path / "vcpusched.state.json"
    read, age = state.read_running(pidfile)
    assert read == written
    assert age >= 0


def test_no_daemon_or_no_state_is_said(tmp_path: Path) -> None:
    pidfile = tmp_path / "vcpusched.pid"
    with pytest.raises(state.StateUnavailable, match="no daemon running"):
        state.read_running(pidfile)
    pidfile.write_text("999999999\n")  # above pid_max: never alive
    with pytest.raises(state.StateUnavailable, match="stale"):
        state.read_running(pidfile)
    pidfile.write_text(f"{os.getpid()}\n")
    with pytest.raises(state.StateUnavailable, match="has written no state yet"):
        state.read_running(pidfile)
    state.write(state.state_path(pidfile), live(pid=1))
    with pytest.raises(state.StateUnavailable, match="is not from daemon pid"):
        state.read_running(pidfile)
    doc = live().as_json()
    doc["format"] = 99
    state.state_path(pidfile).write_text(json.dumps(doc))
    with pytest.raises(state.StateUnavailable, match="state format 99"):
        state.read_running(pidfile)


def test_summary_lines() -> None:
    assert state.summary(live()) == "balanced: 2 domains (+1 excluded), sd 10.0"
    moving = live(moves=(MoveState("move", "db", 0, "0", 1, 60.0, "relieve"),))
    assert state.summary(moving) == "moving: 1 pin changes, 2 domains (+1 excluded), sd 10.0"
    assert state.summary(replace(moving, dry_run=True)).startswith("would move: 1 pin")
    down = live(connected=False, disconnected_since=1_800_000_000.0, error="cannot\nconnect")
    assert state.summary(down).startswith("disconnected since ")
    assert state.summary(down).endswith(": cannot connect")
    rejected = live(last_reload=ReloadState(1_800_000_000.0, False, "interval: bad\nx", 2))
    text = state.summary(rejected)
    assert text.startswith("balanced: ")
    assert "; reload rejected at " in text
    assert "\n" not in text
    assert text.endswith("interval: bad x")
    accepted = live(last_reload=ReloadState(1_800_000_000.0, True, None, 3))
    assert "reload" not in state.summary(accepted)


def test_render_quotes_names_as_the_audit_lines_do() -> None:
    text = state.render(live(held={"cooldown": 1}))
    lines = text.splitlines()
    # The name holding a newline and an audit-like text stays inside one quoted token.
    assert '"web 1\\nmove domain=db"/0:50' in lines[1]
    assert not any(line.startswith("move ") for line in lines)
    assert "unpinned: batch/0*:30" in text
    assert "held back: cooldown=1" in text
    assert "pcpus 0-1  mean 70.0%  sd 10.0" in text
