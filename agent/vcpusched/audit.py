"""`vcpusched audit`: replay the agent's audit lines from the journal or from syslog files.

Three questions: where was each vCPU pinned at a given time (`pins`), which pin changes were
made in a time range and why (`moves`), and how many per domain and per hour (`count`).

Input is streamed line by line (journalctl's JSON output, an rsyslog file in RFC 3339 or
traditional format, or the agent's own stderr), so memory grows with the number of vCPUs and
of hours, not with the length of the log. Lines are parsed generically (`logs.parse_event`):
a key added to a line later is carried along, and the names lines had before the vocabulary
change (`vcpu_load`, `from_load`, `to_load`, `loads`) are read as today's.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from vcpusched.logs import IDENT, parse_event
from vcpusched.model import format_cpus, parse_cpus

# Longest line read; past it the input is not a log (and reading on would hold it in memory).
MAX_LINE = 65536
# Field names before the vocabulary change -> today's.
ALIASES = {
    "vcpu_load": "demand",
    "from_load": "from_demand",
    "to_load": "to_demand",
    "loads": "util",
}
PIN_EVENTS = ("place", "move", "restore")
LIFECYCLE = ("start", "stop", "reload", "connected", "disconnected", "new", "gone", "emulator")

_LEVEL = r"(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) )?"
# `TIME [HOST] vcpusched[PID]: [LEVEL] message`: rsyslog (RFC 3339 or `Mon dd hh:mm:ss`), and
# the agent's own stderr (no host).
_TEXT = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\dT\S+|[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d)"
    r"(?: (?P<host>\S+))? " + re.escape(IDENT) + r"\[(?P<pid>\d+)\]: " + _LEVEL + r"(?P<msg>.*)$"
)
_MONTHS = {
    m: i
    for i, m in enumerate(
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"], 1
    )
}


class AuditError(Exception):
    """Bad input or arguments: one line for the user."""


@dataclass(frozen=True)
class Entry:
    at: float  # seconds since the epoch
    host: str
    pid: int
    event: str
    fields: dict[str, str]

    @property
    def applied(self) -> bool:
        return self.event in PIN_EVENTS and self.fields.get("dry_run") != "1"


def parse_time(text: str) -> float:
    """An instant from the command line: ISO 8601 (local time without an offset) or @EPOCH."""
    if text.startswith("@"):
        try:
            return float(text[1:])
        except ValueError:
            raise AuditError(f"not a time: {text!r} (use ISO 8601 or @EPOCH)") from None
    try:
        moment = datetime.fromisoformat(text.strip().replace(" ", "T", 1))
    except ValueError:
        raise AuditError(
            f"not a time: {text!r} (use ISO 8601, e.g. 2026-12-01T08:40:00, or @EPOCH)"
        ) from None
    return moment.astimezone().timestamp()


def show_time(at: float) -> str:
    return datetime.fromtimestamp(at).astimezone().isoformat(timespec="milliseconds")


def _text_time(text: str, year: int) -> float:
    if text[:1].isdigit():
        return datetime.fromisoformat(text).astimezone().timestamp()
    # Traditional syslog carries no year: take the one given (this year by default).
    month, day, clock = text.split()
    hour, minute, second = (int(x) for x in clock.split(":"))
    return datetime(year, _MONTHS[month], int(day), hour, minute, second).timestamp()


def _normalized(fields: dict[str, str]) -> dict[str, str]:
    return {ALIASES.get(k, k): v for k, v in fields.items()}


def _lines(stream: IO[str], name: str) -> Iterator[tuple[int, str]]:
    number = 0
    while True:
        line = stream.readline(MAX_LINE + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE:
            raise AuditError(f"{name}:{number}: line longer than {MAX_LINE} characters: not a log")
        yield number, line.rstrip("\n")


def read(stream: IO[str], name: str, year: int | None = None) -> Iterator[Entry]:
    """The agent's entries in one input; its format is judged from the first line."""
    year = year or time.localtime().tm_year
    lines = _lines(stream, name)
    json_input: bool | None = None
    for number, line in lines:
        if not line.strip():
            continue
        if json_input is None:
            json_input = line.lstrip().startswith("{")
        entry = _json_entry(line, name, number) if json_input else _text_entry(line, year)
        if entry is not None:
            yield entry


def _text_entry(line: str, year: int) -> Entry | None:
    match = _TEXT.match(line)
    if match is None:
        return None  # another program's line
    parsed = parse_event(match["msg"])
    if parsed is None:
        return None  # the agent's, but not an audit line (a traceback, say)
    try:
        at = _text_time(match["time"], year)
    except (ValueError, KeyError):
        return None
    return Entry(at, match["host"] or "-", int(match["pid"]), parsed[0], _normalized(parsed[1]))


def _json_entry(line: str, name: str, number: int) -> Entry | None:
    try:
        record = json.loads(line)
    except ValueError:
        raise AuditError(f"{name}:{number}: not journal JSON (journalctl -o json)") from None
    if not isinstance(record, dict):
        raise AuditError(f"{name}:{number}: not journal JSON (journalctl -o json)")
    if record.get("SYSLOG_IDENTIFIER") != IDENT:
        return None
    message = record.get("MESSAGE")
    if isinstance(message, list):  # journalctl writes non-UTF-8 messages as byte arrays
        message = bytes(b & 0xFF for b in message if isinstance(b, int)).decode(errors="replace")
    if not isinstance(message, str):
        return None
    parsed = parse_event(message)
    if parsed is None:
        return None
    try:
        at = int(record["__REALTIME_TIMESTAMP"]) / 1e6
        pid = int(record.get("_PID") or record.get("SYSLOG_PID") or 0)
    except (KeyError, TypeError, ValueError):
        raise AuditError(f"{name}:{number}: journal entry without __REALTIME_TIMESTAMP") from None
    host = str(record.get("_HOSTNAME") or "-")
    return Entry(at, host, pid, parsed[0], _normalized(parsed[1]))


def journal(directory: Path | None = None, since: float | None = None) -> Iterator[Entry]:
    """The agent's entries from the local journal (or a journal directory), via journalctl."""
    command = ["journalctl", "--no-pager", "-q", "-o", "json", f"SYSLOG_IDENTIFIER={IDENT}"]
    if directory is not None:
        command += ["-D", str(directory)]
    if since is not None:
        command += ["--since", f"@{int(since)}"]
    # stderr to a file: a pipe nobody reads while stdout streams could stall journalctl.
    with tempfile.TemporaryFile("w+") as errors:
        try:
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=errors, text=True, errors="replace"
            )
        except OSError as exc:
            raise AuditError(f"cannot run journalctl: {exc.strerror}") from None
        assert process.stdout is not None
        try:
            yield from read(process.stdout, "journalctl")
        finally:
            process.stdout.close()
            if process.poll() is None:
                process.terminate()
            code = process.wait()
        errors.seek(0)
        problem = errors.read(4096).strip().splitlines()
    if code not in (0, -signal.SIGTERM) and problem:
        raise AuditError(f"journalctl: {problem[0]}")


def inputs(paths: list[str], year: int | None = None) -> Iterator[Entry]:
    for path in paths:
        if path == "-":
            yield from read(sys.stdin, "<stdin>", year)
            continue
        try:
            handle = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
        except OSError as exc:
            raise AuditError(f"{path}: {exc.strerror}") from None
        with handle:
            try:
                yield from read(handle, path, year)
            except OSError as exc:  # a directory, a device that fails
                raise AuditError(f"{path}: {exc.strerror}") from None


# -- pins at an instant


@dataclass
class Pin:
    host: str
    domain: str
    vcpu: int
    pcpus: frozenset[int] | None  # None: not known, or the domain was gone
    since: float | None
    basis: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "domain": self.domain,
            "vcpu": self.vcpu,
            "pcpus": None if self.pcpus is None else format_cpus(self.pcpus),
            "since": None if self.since is None else show_time(self.since),
            "basis": self.basis,
        }


@dataclass
class _Domain:
    last_gone: float | None = None  # last `gone` at or before the instant
    last_new: float | None = None  # last `new` at or before the instant
    next_gone: float | None = None  # first `gone` after the instant
    # First `new` after the instant that is an arrival, not a (re)started agent's roll call.
    next_arrival: float | None = None
    vcpus: int = 0


@dataclass
class PinReplay:
    """Where each vCPU was pinned at `at`, from one pass over the entries.

    Kept per vCPU: the last pin change at or before `at`, and the first one after it (whose
    `from=` tells the pins before it, for a vCPU the agent had not touched yet by then).
    """

    at: float
    before: dict[tuple[str, str, int], Entry] = field(default_factory=dict)
    after: dict[tuple[str, str, int], Entry] = field(default_factory=dict)
    domains: dict[tuple[str, str], _Domain] = field(default_factory=dict)
    restarts: dict[str, list[float]] = field(default_factory=dict)
    # Hosts whose agent started and has not yet said `connected`: the `new` lines of its first
    # cycle name the domains already running, not domains that just arrived.
    starting: set[str] = field(default_factory=set)
    entries: int = 0

    def feed(self, entry: Entry) -> None:
        self.entries += 1
        f = entry.fields
        if entry.event == "connected":
            self.starting.discard(entry.host)
        if entry.event == "start":
            self.starting.add(entry.host)
            self.restarts.setdefault(entry.host, []).append(entry.at)
            # Only the last start before the instant and the first after it matter.
            kept = self.restarts[entry.host]
            if len(kept) > 2:
                kept.sort()
                low = [t for t in kept if t <= self.at][-1:]
                high = [t for t in kept if t > self.at][:1]
                self.restarts[entry.host] = low + high
            return
        if entry.event in ("new", "gone") and "domain" in f:
            state = self.domains.setdefault((entry.host, f["domain"]), _Domain())
            if entry.event == "new":
                if entry.at <= self.at and (state.last_new or 0) <= entry.at:
                    state.last_new = entry.at
                    state.vcpus = _int(f.get("vcpus"), 0)
                elif (
                    entry.at > self.at
                    and entry.host not in self.starting
                    and (state.next_arrival is None or entry.at < state.next_arrival)
                ):
                    state.next_arrival = entry.at
            elif entry.at <= self.at:
                if (state.last_gone or 0) <= entry.at:
                    state.last_gone = entry.at
            elif state.next_gone is None or entry.at < state.next_gone:
                state.next_gone = entry.at
            return
        if not entry.applied or "domain" not in f or "to" not in f:
            return
        vcpu = _int(f.get("vcpu"), -1)
        if vcpu < 0:
            return
        key = (entry.host, f["domain"], vcpu)
        self.domains.setdefault((entry.host, f["domain"]), _Domain())
        if entry.at <= self.at:
            if key not in self.before or self.before[key].at <= entry.at:
                self.before[key] = entry
        elif key not in self.after or entry.at < self.after[key].at:
            self.after[key] = entry

    def pins(self) -> list[Pin]:
        keys = set(self.before) | set(self.after)
        for (host, domain), state in self.domains.items():
            keys.update((host, domain, v) for v in range(state.vcpus))
        return [self._pin(*key) for key in sorted(keys)]

    def _pin(self, host: str, domain: str, vcpu: int) -> Pin:
        state = self.domains.get((host, domain), _Domain())
        before = self.before.get((host, domain, vcpu))
        after = self.after.get((host, domain, vcpu))
        gone = state.last_gone
        back = state.last_new is not None and gone is not None and state.last_new >= gone
        if gone is not None and not back and (before is None or before.at <= gone):
            return Pin(host, domain, vcpu, None, gone, "gone")
        # A pin from before the domain went and came back belongs to its previous life.
        stale = before is not None and gone is not None and before.at <= gone
        if before is not None and not stale:
            basis = _describe(before)
            starts = self.restarts.get(host, [])
            if any(before.at < t <= self.at for t in starts):
                basis += "; agent restarted since"
            return Pin(host, domain, vcpu, _cpus(before.fields["to"]), before.at, basis)
        arrived = state.next_arrival
        if arrived is not None and (after is None or arrived <= after.at):
            return Pin(
                host, domain, vcpu, None, None, f"not running yet (new at {show_time(arrived)})"
            )
        went_before_next = state.next_gone is not None and (
            after is None or state.next_gone < after.at
        )
        if after is not None and "from" in after.fields and not went_before_next:
            basis = f"from= of the {after.event} at {show_time(after.at)}"
            return Pin(host, domain, vcpu, _cpus(after.fields["from"]), None, basis)
        return Pin(host, domain, vcpu, None, None, "not in the log")


def _describe(entry: Entry) -> str:
    reason = entry.fields.get("reason")
    return entry.event + (f" ({reason})" if reason else "")


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def _cpus(text: str) -> frozenset[int] | None:
    try:
        return parse_cpus(text)
    except ValueError:
        return None


def pins_at(entries: Iterable[Entry], at: float) -> list[Pin]:
    replay = PinReplay(at)
    for entry in entries:
        replay.feed(entry)
    if not replay.entries:
        raise AuditError("no vcpusched audit lines in the input")
    return replay.pins()


# -- moves and counts

_SHOWN_FIRST = ("domain", "vcpu", "from", "to")


def move_line(entry: Entry) -> str:
    f = entry.fields
    head = f"{show_time(entry.at)} {entry.host} {entry.event}"
    if entry.event in PIN_EVENTS:
        where = f"{f.get('domain', '?')}/{f.get('vcpu', '?')}"
        change = f"{f.get('from', '?')}->{f.get('to', '?')}"
        rest = " ".join(f"{k}={_shown(v)}" for k, v in f.items() if k not in _SHOWN_FIRST)
        return f"{head} {where} {change} {rest}".rstrip()
    rest = " ".join(f"{k}={_shown(v)}" for k, v in f.items())
    return f"{head} {rest}".rstrip()


def _shown(value: str) -> str:
    return value if value and " " not in value and '"' not in value else json.dumps(value)


@dataclass
class Counts:
    by_domain: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    by_hour: dict[str, dict[str, int]] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)
    reloads: dict[str, int] = field(default_factory=dict)
    entries: int = 0

    def feed(self, entry: Entry) -> None:
        self.entries += 1
        if entry.event == "start":
            self.starts[entry.host] = self.starts.get(entry.host, 0) + 1
        elif entry.event == "reload":
            self.reloads[entry.host] = self.reloads.get(entry.host, 0) + 1
        if not entry.applied or entry.event == "restore":
            return
        domain = self.by_domain.setdefault((entry.host, entry.fields.get("domain", "?")), {})
        domain[entry.event] = domain.get(entry.event, 0) + 1
        hour = datetime.fromtimestamp(entry.at).astimezone().replace(minute=0, second=0)
        key = hour.replace(microsecond=0).isoformat(timespec="minutes")
        bucket = self.by_hour.setdefault(key, {})
        bucket[entry.event] = bucket.get(entry.event, 0) + 1

    def render(self) -> str:
        lines = ["moves per domain", f"  {'host':<20} {'domain':<24} {'place':>6} {'move':>6}"]
        for (host, domain), n in sorted(self.by_domain.items()):
            lines.append(f"  {host:<20} {domain:<24} {n.get('place', 0):>6} {n.get('move', 0):>6}")
        lines += ["moves per hour", f"  {'hour':<22} {'place':>6} {'move':>6}"]
        for hour, n in sorted(self.by_hour.items()):
            lines.append(f"  {hour:<22} {n.get('place', 0):>6} {n.get('move', 0):>6}")
        for host in sorted(set(self.starts) | set(self.reloads)):
            lines.append(
                f"agent {host}: {self.starts.get(host, 0)} starts, "
                f"{self.reloads.get(host, 0)} reloads"
            )
        return "\n".join(lines)


# -- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        help="syslog files or journalctl -o json output ('-' for stdin); default: the journal",
    )
    common.add_argument("-D", "--directory", type=Path, help="read this journal directory")
    common.add_argument("--host", help="only this host")
    common.add_argument("--domain", help="only this domain")
    common.add_argument("--vcpu", type=int, help="only this vCPU")
    common.add_argument("--year", type=int, help="year of traditional `Mon dd` syslog times")
    ranged = argparse.ArgumentParser(add_help=False)
    ranged.add_argument("--since", help="from this instant (ISO 8601 or @EPOCH)")
    ranged.add_argument("--until", help="up to this instant")
    queries = parser.add_subparsers(dest="query", metavar="QUERY", required=True)
    pins = queries.add_parser(
        "pins", parents=[common], help="where each vCPU was pinned at an instant"
    )
    pins.add_argument("--at", help="the instant (ISO 8601 or @EPOCH; default now)")
    pins.add_argument("--json", action="store_true", help="one JSON object per vCPU")
    moves = queries.add_parser(
        "moves", parents=[common, ranged], help="the pin changes in a time range, with reasons"
    )
    moves.add_argument(
        "--all", action="store_true", help="also starts, stops, reloads, domains coming and going"
    )
    queries.add_parser(
        "count", parents=[common, ranged], help="pin changes per domain and per hour"
    )


def main(args: argparse.Namespace, out: IO[str]) -> int:
    """Raises AuditError for bad input."""
    since = parse_time(args.since) if getattr(args, "since", None) else None
    until = parse_time(args.until) if getattr(args, "until", None) else None
    at = parse_time(args.at) if getattr(args, "at", None) else time.time()
    if args.files and args.directory is not None:
        raise AuditError("give FILEs or --directory, not both")
    journal_since = since if args.query != "pins" else None
    source = inputs(args.files, args.year) if args.files else journal(args.directory, journal_since)

    def wanted(entry: Entry) -> bool:
        f = entry.fields
        return (
            (args.host is None or entry.host == args.host)
            and (args.domain is None or f.get("domain") == args.domain)
            and (args.vcpu is None or "domain" not in f or f.get("vcpu") == str(args.vcpu))
        )

    entries = (e for e in source if wanted(e))
    if args.query == "pins":
        pins = [p for p in pins_at(entries, at) if args.vcpu is None or p.vcpu == args.vcpu]
        if args.json:
            for pin in pins:
                print(json.dumps(pin.as_dict()), file=out)
            return 0
        print(f"pins at {show_time(at)}", file=out)
        print(f"{'host':<20} {'domain':<24} {'vcpu':>4}  {'pcpus':<8} {'since':<29} by", file=out)
        for pin in pins:
            pcpus = "-" if pin.pcpus is None else format_cpus(pin.pcpus)
            since_text = "-" if pin.since is None else show_time(pin.since)
            print(
                f"{pin.host:<20} {pin.domain:<24} {pin.vcpu:>4}  {pcpus:<8} {since_text:<29} "
                f"{pin.basis}",
                file=out,
            )
        return 0
    in_range = (
        e for e in entries if (since is None or e.at >= since) and (until is None or e.at <= until)
    )
    if args.query == "count":
        counts = Counts()
        for entry in in_range:
            counts.feed(entry)
        if not counts.entries:
            raise AuditError("no vcpusched audit lines in the input (or the range)")
        print(counts.render(), file=out)
        return 0
    shown = PIN_EVENTS + (LIFECYCLE if args.all else ())
    seen = 0
    for entry in in_range:
        seen += 1
        if entry.event in shown:
            print(move_line(entry), file=out)
    if not seen:
        raise AuditError("no vcpusched audit lines in the input (or the range)")
    return 0
