"""Run the agent as a real process against lab guests and judge it from outside.

The judge never trusts the agent's numbers: pCPU utilization comes from the host's /proc/stat
and pins from libvirt (`vcpuPinInfo`), polled much faster than the agent's interval. The
agent's log is only checked for consistency: every pin change seen must match exactly one of
its audit lines (`move`, `place`, `restore`) and every such line one change.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.lab.lab import URI, LabError, PinChange, PinWatcher, StatSampler, format_cpus, sd

INTERVAL = 2.0  # seconds; TCG guests and a 2-core host make shorter windows noisy
AUDIT_EVENTS = ("move", "place", "restore")
# How far apart a pin change and its audit line may be seen: the agent pins, then logs; the
# watcher polls every 0.1 s and the log is read as it comes.
MATCH_SLACK = 1.5

_LINE = re.compile(r"^(\S+) vcpusched\[(\d+)\]: (\w+) (\S+)(.*)$")
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def agent_command() -> list[str]:
    """The agent's console script from the venv running the tests."""
    script = Path(sys.executable).parent / "vcpusched"
    if not script.exists():
        raise FileNotFoundError(f"{script} missing: pip install -e . into this venv")
    return [str(script)]


@dataclass(frozen=True)
class LogLine:
    at: float  # host monotonic time the line was read
    level: str
    event: str
    fields: dict[str, str]
    raw: str

    def __str__(self) -> str:
        return self.raw


def parse_line(raw: str, at: float) -> LogLine | None:
    m = _LINE.match(raw)
    if not m:
        return None
    fields: dict[str, str] = {}
    for key, value in _FIELD.findall(m[5]):
        fields[key] = json.loads(value) if value.startswith('"') else value
    return LogLine(at, m[3], m[4], fields, raw)


def write_config(path: Path, **settings: Any) -> Path:
    """A config file for the agent; root-owned and 0644, as the agent demands when root."""
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    path.chmod(0o644)
    return path


def config_settings(tmp: Path, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "interval": INTERVAL,
        "uri": URI,
        "pidfile": str(tmp / "vcpusched.pid"),
        # The readings and plan of every cycle, for a failing test to show (`Agent.trail`).
        "log_level": "debug",
    }
    settings.update(overrides)
    return settings


class Agent:
    """`vcpusched run` in the foreground, its stderr read line by line as it comes."""

    def __init__(self, config: Path, *extra: str) -> None:
        cmd = [*agent_command(), "run", "--config", str(config), "--log-target", "stderr"]
        self.proc = subprocess.Popen(
            [*cmd, *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[LogLine] = []
        self.other: list[str] = []  # output that is not a log line (tracebacks, stdout)
        self._cond = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stderr, True), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stdout, False), daemon=True),
        ]
        for t in self._readers:
            t.start()
        self.started = self.wait_for("start", timeout=30).at

    def _read(self, stream: Any, is_log: bool) -> None:
        for raw in stream:
            raw = raw.rstrip("\n")
            line = parse_line(raw, time.monotonic()) if is_log else None
            with self._cond:
                if line is None:
                    self.other.append(raw)
                else:
                    self.lines.append(line)
                self._cond.notify_all()

    def events(self, *names: str) -> list[LogLine]:
        with self._cond:
            return [line for line in self.lines if not names or line.event in names]

    def wait_for(self, event: str, timeout: float, after: float = 0.0, **fields: str) -> LogLine:
        """The first line of `event` read after `after` whose fields include `fields`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if (
                        line.event == event
                        and line.at >= after
                        and all(line.fields.get(k) == v for k, v in fields.items())
                    ):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._alive_readers()):
                    raise AssertionError(
                        f"no {event!r} {fields or ''} in the agent's log within {timeout} s; "
                        f"exit={self.proc.poll()}\n{self.transcript()}"
                    )
                self._cond.wait(min(remaining, 0.2))

    def _alive_readers(self) -> bool:
        return any(t.is_alive() for t in self._readers)

    def signal(self, signum: int) -> float:
        self.proc.send_signal(signum)
        return time.monotonic()

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"agent ignored SIGTERM for {timeout} s\n{self.transcript()}"
            ) from None
        for t in self._readers:
            t.join(5)
        return code

    def transcript(self, last: int = 60) -> str:
        with self._cond:
            text = [line.raw for line in self.lines[-last:]] + self.other[-20:]
        return "\n".join(text)

    def trail(self, since: float = 0.0) -> str:
        """One line per cycle from `since`: each vCPU's reading (received/demand on its
        pCPUs), the plan's pCPU demands and holds, and the pins made, for failure messages."""
        out: list[str] = []
        readings: list[str] = []
        with self._cond:
            lines = [line for line in self.lines if line.at >= since]
        for line in lines:
            f = line.fields
            if line.event == "reading":
                name = f"{f.get('domain', '?').rsplit('-', 1)[-1]}/{f.get('vcpu')}"
                readings.append(f"{name}@{f.get('pcpus')} {f.get('received')}/{f.get('demand')}")
            elif line.event == "plan":
                held = f" held={f['held']}" if "held" in f else ""
                at = line.at - self.started
                out.append(f"+{at:.1f}s demand={f.get('demand')}{held} | {' '.join(readings)}")
                readings = []
            elif line.event in ("move", "place", "restore"):
                out.append(f"    {line.event} {f.get('domain')}/{f.get('vcpu')} -> {f.get('to')}")
        return "\n".join(out)

    def problems(self) -> list[str]:
        """Warnings, errors and anything that is not a log line (a traceback)."""
        with self._cond:
            bad = [line.raw for line in self.lines if line.level in ("WARNING", "ERROR")]
            return bad + list(self.other)


def cycles_to(started: float, event: float, change: float) -> int:
    """Agent cycles from the first one after `event` to the one that made `change` (1 = that
    first one). The agent samples at `started` and then every INTERVAL; its first decision is
    one interval after it starts."""
    first = max(1, math.ceil((event - started) / INTERVAL - 0.05))
    return max(1, round((change - started) / INTERVAL) - first + 1)


@dataclass
class AuditCheck:
    matched: int = 0
    unmatched_changes: list[str] = field(default_factory=list)
    unmatched_lines: list[str] = field(default_factory=list)
    # `restore` lines for vCPUs already on their original pins: no change to match, and
    # harmless, but counted so that a report shows them.
    noop_restores: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unmatched_changes and not self.unmatched_lines

    def __str__(self) -> str:
        out = [f"{self.matched} pin changes matched their audit lines"]
        if self.noop_restores:
            out.append(f"{len(self.noop_restores)} restore lines for vCPUs already in place")
        if self.unmatched_changes:
            out.append("pin changes with no audit line: " + "; ".join(self.unmatched_changes))
        if self.unmatched_lines:
            out.append("audit lines with no pin change:\n  " + "\n  ".join(self.unmatched_lines))
        return "\n".join(out)


def _cpus(text: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(out)


PinsAt = Callable[[str, int, float], "frozenset[int] | None"]


def _close(change: PinChange, at: float) -> bool:
    """A line logged at `at` can be this change's: within the slack of the span in which the
    watcher knows the change happened (not only of when its poll ended)."""
    since = change.at if change.since is None else change.since
    return since - MATCH_SLACK <= at <= change.at + MATCH_SLACK


def check_audit(
    changes: Iterable[PinChange], lines: Iterable[LogLine], pins_at: PinsAt | None = None
) -> AuditCheck:
    """Pair pin changes and audit lines one to one (same vCPU, same pins, close in time).

    With `pins_at` (the watcher's history), a `restore` line whose vCPU already had those
    pins is a no-op rather than a line without its change.
    """
    result = AuditCheck()
    pending = list(changes)
    for line in lines:
        if line.event not in AUDIT_EVENTS or line.fields.get("dry_run") == "1":
            continue
        f = line.fields
        domain, vcpu, to = f.get("domain", ""), int(f.get("vcpu", "-1")), _cpus(f.get("to", ""))
        src = _cpus(f["from"]) if "from" in f else None
        for change in pending:
            if (
                change.domain == domain
                and change.vcpu == vcpu
                and change.new == to
                and (src is None or change.old == src)
                and _close(change, line.at)
            ):
                pending.remove(change)
                result.matched += 1
                break
        else:
            if (
                line.event == "restore"
                and pins_at is not None
                and pins_at(domain, vcpu, line.at) == to
            ):
                result.noop_restores.append(line.raw)
            else:
                result.unmatched_lines.append(line.raw)
    result.unmatched_changes = [str(c) for c in pending]
    return result


class Judge:
    """Everything a scenario observes from outside the agent, from start to finish."""

    def __init__(self) -> None:
        self.stat = StatSampler(every=0.5, uri=URI)
        # Every 0.1 s the watcher cost 6 points of pCPU time beside four guests (libvirtd's
        # and this process's), as much as QEMU's own threads; a change is still placed within
        # the span between two polls, which the audit check allows for.
        self.pins = PinWatcher(URI, every=0.25)
        # Pin changes the test makes itself, to exclude from the audit check.
        self.external: list[tuple[float, float]] = []

    def __enter__(self) -> Judge:
        self.stat.__enter__()
        self.pins.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.pins.stop()
        self.stat.__exit__()

    def changes(
        self, since: float = 0.0, until: float = math.inf, prefix: str = ""
    ) -> list[PinChange]:
        changes, _ = self.pins.snapshot()
        return [
            c
            for c in changes
            if since <= c.at <= until
            and c.domain.startswith(prefix)
            and not any(a <= c.at <= b for a, b in self.external)
        ]

    def util(self, start: float, end: float) -> dict[int, float]:
        return self.stat.window(start, end)

    def foreign(self, start: float, end: float) -> float:
        return self.stat.foreign(start, end)

    def other(self, start: float, end: float) -> float:
        return self.stat.other(start, end)

    def received(self, start: float, end: float, prefix: str = "") -> dict[str, float]:
        """CPU time each running guest received in the window (% of one pCPU), from libvirt's
        counters as sampled by the judge, not from the agent."""
        inside = [s for s in self.stat.samples if start <= s[0] <= end]
        if len(inside) < 2:
            raise LabError(f"no samples between {start:.1f} and {end:.1f}")
        first, last = inside[0], inside[-1]
        span = last[0] - first[0]
        return {
            name: (ns - first[2][name]) / 1e9 / span * 100
            for name, ns in last[2].items()
            if name in first[2] and name.startswith(prefix)
        }

    def sd(self, start: float, end: float) -> float:
        return sd(self.util(start, end).values())

    def current_pins(self, prefix: str) -> dict[tuple[str, int], frozenset[int]]:
        _, pins = self.pins.snapshot()
        return {k: v for k, v in pins.items() if k[0].startswith(prefix)}


def pins_by_pcpu(pins: Mapping[tuple[str, int], frozenset[int]]) -> dict[str, list[str]]:
    """{"0": ["dom/0", ...], "0-1": [...]}: readable pins for reports and messages."""
    out: dict[str, list[str]] = {}
    for (domain, vcpu), cpus in sorted(pins.items()):
        out.setdefault(format_cpus(cpus), []).append(f"{domain}/{vcpu}")
    return out


def sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)
