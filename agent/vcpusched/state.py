"""The daemon's live state: what it measured and decided last, as one document.

Each cycle the daemon rebuilds a `LiveState` from the agent's current state (never from
running deltas), writes it as JSON beside its pidfile, renders its metrics from it
(`vcpusched.metrics`) and sums it up for systemd's STATUS=. `vcpusched status` reads the file
back, or builds the same document from a sample of its own when no daemon runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vcpusched.logs import quote
from vcpusched.model import HostSample, Snapshot, VcpuRef, format_cpus
from vcpusched.topology import parse_cpulist

# Bumped when a field changes meaning, so that `status` never misreads another version's file.
FORMAT = 1
# Upper bounds (seconds) of the cycle duration histogram: a cycle on the lab takes tens of
# milliseconds, a plan for 1,000 vCPUs some hundreds.
CYCLE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ERROR_OPERATIONS = ("sample", "pin", "restore", "write_state", "write_metrics")


def state_path(pidfile: Path) -> Path:
    """Where the daemon with this pidfile keeps its state: beside it, in its runtime directory."""
    return pidfile.parent / f"{pidfile.stem}.state.json"


@dataclass(frozen=True, slots=True)
class PcpuState:
    pcpu: int
    util: float  # % busy over the last interval, from the host's counters
    demand: float  # the policy's estimate, % of one pCPU (may pass 100)
    allowed: bool  # within `cpus`: vCPUs may be pinned here
    # Its NUMA node and its core's hardware threads ("0,16"), as libvirt's topology says;
    # None where it does not.
    node: int | None = None
    core: str | None = None


@dataclass(frozen=True, slots=True)
class VcpuState:
    domain: str
    vcpu: int
    affinity: str  # as libvirt writes it: "0-3,8"
    pcpu: int | None  # the pCPU it is pinned to, None while it may run on several
    received: float | None  # % of one pCPU over the last interval; None before two samples
    demand: float | None
    wait_seconds: float | None  # cumulative time it waited for a pCPU, from the host
    excluded: bool


@dataclass(frozen=True, slots=True)
class OffHome:
    vcpu: int
    pcpu: int
    node: int


@dataclass(frozen=True, slots=True)
class DomainHome:
    """A domain's home node, where most of its pinned vCPUs run (the lowest on a tie), and
    its vCPUs pinned elsewhere."""

    domain: str
    node: int
    off: tuple[OffHome, ...]
    excluded: bool


@dataclass(frozen=True, slots=True)
class MoveState:
    kind: str  # place or move
    domain: str
    vcpu: int
    src: str
    dst: int
    demand: float
    reason: str


@dataclass(frozen=True, slots=True)
class ReloadState:
    at: float  # unix time
    accepted: bool
    error: str | None
    generation: int


@dataclass(slots=True)
class Counts:
    """What the daemon has done since it started: the counters of its metrics."""

    pin_changes: dict[str, int] = field(default_factory=dict)  # "kind/reason" -> changes
    held_back: dict[str, int] = field(default_factory=dict)  # reason -> moves held back
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_OPERATIONS, 0))
    reloads: dict[str, int] = field(default_factory=lambda: {"accepted": 0, "rejected": 0})
    # The cycle duration histogram: observations at or below each of CYCLE_BUCKETS.
    cycle_buckets: list[int] = field(default_factory=lambda: [0] * len(CYCLE_BUCKETS))
    cycle_count: int = 0
    cycle_sum: float = 0.0

    def observe_cycle(self, seconds: float) -> None:
        self.cycle_count += 1
        self.cycle_sum += seconds
        for i, bound in enumerate(CYCLE_BUCKETS):
            if seconds <= bound:
                self.cycle_buckets[i] += 1

    def count_moves(self, moves: Sequence[MoveState]) -> None:
        for move in moves:
            key = f"{move.kind}/{move.reason}"
            self.pin_changes[key] = self.pin_changes.get(key, 0) + 1

    def count_held(self, held: Mapping[str, int]) -> None:
        for reason, n in held.items():
            self.held_back[reason] = self.held_back.get(reason, 0) + n

    def error(self, operation: str) -> None:
        self.errors[operation] = self.errors.get(operation, 0) + 1


@dataclass(frozen=True, slots=True)
class LiveState:
    version: str
    pid: int | None  # the daemon's; None when `status` sampled by itself
    written: float  # unix time this document was made
    interval: float
    generation: int  # the config's: 1 at start, one more per accepted reload
    running: bool  # False in the last document of a daemon that stopped
    connected: bool
    disconnected_since: float | None  # unix time of the first failure of an outage
    error: str | None  # the host's last error while disconnected
    last_reload: ReloadState | None
    last_cycle: float | None  # unix time the last completed cycle ended
    pcpus: tuple[PcpuState, ...]
    vcpus: tuple[VcpuState, ...]
    # The last plan: the moves it made (or would make, in a dry run), and what it held back.
    moves: tuple[MoveState, ...]
    held: Mapping[str, int]
    dry_run: bool
    counts: Counts = field(default_factory=Counts)
    format: int = FORMAT

    @property
    def sd(self) -> float | None:
        """Standard deviation of the allowed pCPUs' utilization: the imbalance."""
        utils = [p.util for p in self.pcpus if p.allowed]
        return statistics.pstdev(utils) if utils else None

    def domains(self) -> tuple[int, int]:
        """(managed, excluded) domains."""
        managed = {v.domain for v in self.vcpus if not v.excluded}
        excluded = {v.domain for v in self.vcpus if v.excluded}
        return len(managed), len(excluded)

    def homes(self) -> tuple[DomainHome, ...]:
        """Each domain with a vCPU pinned to a pCPU of known node, by name."""
        node_of = {p.pcpu: p.node for p in self.pcpus if p.node is not None}
        placed: dict[str, list[tuple[VcpuState, int]]] = {}
        excluded: dict[str, bool] = {}
        for v in self.vcpus:
            excluded[v.domain] = v.excluded
            if v.pcpu is not None and v.pcpu in node_of:
                placed.setdefault(v.domain, []).append((v, node_of[v.pcpu]))
        homes = []
        for domain, vcpus in sorted(placed.items()):
            counts: dict[int, int] = {}
            for _, node in vcpus:
                counts[node] = counts.get(node, 0) + 1
            home = min(counts, key=lambda n: (-counts[n], n))
            off = tuple(
                OffHome(v.vcpu, v.pcpu, node)
                for v, node in vcpus
                if node != home and v.pcpu is not None
            )
            homes.append(DomainHome(domain, home, off, excluded[domain]))
        return tuple(homes)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["sd"] = self.sd
        managed, excluded = self.domains()
        out["domains"] = {"managed": managed, "excluded": excluded}
        out["homes"] = [asdict(h) for h in self.homes()]
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> LiveState:
        """Raises ValueError (naming what is wrong) on a document of another shape."""
        if doc.get("format") != FORMAT:
            raise ValueError(f"state format {doc.get('format')!r}, expected {FORMAT}")
        try:
            reload = doc["last_reload"]
            return cls(
                version=str(doc["version"]),
                pid=doc["pid"],
                written=float(doc["written"]),
                interval=float(doc["interval"]),
                generation=int(doc["generation"]),
                running=bool(doc["running"]),
                connected=bool(doc["connected"]),
                disconnected_since=doc["disconnected_since"],
                error=doc["error"],
                last_reload=None if reload is None else ReloadState(**reload),
                last_cycle=doc["last_cycle"],
                pcpus=tuple(PcpuState(**p) for p in doc["pcpus"]),
                vcpus=tuple(VcpuState(**v) for v in doc["vcpus"]),
                moves=tuple(MoveState(**m) for m in doc["moves"]),
                held=dict(doc["held"]),
                dry_run=bool(doc["dry_run"]),
                counts=Counts(**doc["counts"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"state document malformed: {exc!r}") from None


def measured(
    sample: HostSample | None,
    snapshot: Snapshot | None,
    pcpu_demand: Mapping[int, float],
    allowed: frozenset[int],
    excluded: Any,
    pinned: Mapping[VcpuRef, frozenset[int]] | None = None,
) -> tuple[tuple[PcpuState, ...], tuple[VcpuState, ...]]:
    """The pCPUs and vCPUs of the last sample, with the loads of the last snapshot and the
    pins made since the sample (`pinned`), so that a vCPU shows where it is now.

    Only what the last sample holds: a domain that went is gone from here, and so from the
    metrics, at once.
    """
    if sample is None:
        return (), ()
    loads = {} if snapshot is None else {v.ref: v for v in snapshot.vcpus}
    util = {} if snapshot is None else dict(snapshot.util)
    topology = sample.topology
    pcpus = tuple(
        PcpuState(
            pcpu=p,
            util=round(util[p], 2),
            demand=round(pcpu_demand.get(p, util[p]), 2),
            allowed=p in allowed,
            node=topology.node_of(p),
            core=format_cpus(topology.siblings_of(p)) if p in topology.cpus else None,
        )
        for p in sorted(sample.pcpu_busy_ns)
        if p in util
    )
    vcpus = []
    for ref, counters in sorted(sample.vcpus.items()):
        load = loads.get(ref)
        affinity = (pinned or {}).get(ref, counters.affinity)
        vcpus.append(
            VcpuState(
                domain=ref.domain,
                vcpu=ref.vcpu,
                affinity=format_cpus(affinity),
                pcpu=next(iter(affinity)) if len(affinity) == 1 else None,
                received=None if load is None else round(load.received, 2),
                demand=None if load is None else round(load.demand, 2),
                wait_seconds=None if counters.wait_ns is None else counters.wait_ns / 1e9,
                excluded=bool(excluded(ref.domain)),
            )
        )
    return pcpus, tuple(vcpus)


def summary(state: LiveState) -> str:
    """One line for systemd's STATUS=: balanced, moving, disconnected, and a rejected reload."""
    if not state.running:
        text = "stopped"
    elif not state.connected:
        since = state.disconnected_since
        when = "" if since is None else " since " + _clock(since)
        text = f"disconnected{when}: {state.error or 'no connection'}"
    elif state.last_cycle is None or not state.pcpus:
        text = "starting: measuring the first interval"
    else:
        managed, excluded = state.domains()
        what = f"{managed} domains" + (f" (+{excluded} excluded)" if excluded else "")
        sd = state.sd
        sd_text = "" if sd is None else f", sd {sd:.1f}"
        if state.moves:
            verb = "would move" if state.dry_run else "moving"
            text = f"{verb}: {len(state.moves)} pin changes, {what}{sd_text}"
        else:
            text = f"balanced: {what}{sd_text}"
    reload = state.last_reload
    if reload is not None and not reload.accepted:
        text += f"; reload rejected at {_clock(reload.at)}: {reload.error or 'invalid config'}"
    # STATUS= is one line; an error message could hold a newline.
    return " ".join(text.split())


def _clock(unix: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix))


def write(path: Path, state: LiveState) -> None:
    """Replace `path` atomically: a reader sees the old document or the new, never half."""
    data = json.dumps(state.as_json(), separators=(",", ":"), sort_keys=True) + "\n"
    atomic_write(path, data.encode())


def atomic_write(path: Path, data: bytes) -> None:
    """Write a temporary file in the same directory, then rename it over `path`.

    The temporary name starts with a dot and does not end in .prom, so node_exporter's
    textfile collector never reads a file being written. Only a regular file is replaced:
    a configured path that names a device, a directory or a symlink is an error, never
    something to overwrite (a rename over /dev/null would break the whole host).
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EEXIST, f"not a regular file, refusing to replace it: {path}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class StateUnavailable(Exception):
    """No running daemon's state to read; the message says why (one line)."""


def read_running(pidfile: Path) -> tuple[LiveState, float]:
    """The state of the daemon holding `pidfile`, and its age in seconds.

    Raises StateUnavailable when no daemon runs, or when the one that runs has written no
    state that can be read.
    """
    try:
        pid = int(pidfile.read_text().strip() or "0")
    except FileNotFoundError:
        raise StateUnavailable(f"no daemon running (no {pidfile})") from None
    except (OSError, ValueError) as exc:
        raise StateUnavailable(f"cannot read {pidfile}: {exc}") from None
    if pid <= 0 or not _alive(pid):
        raise StateUnavailable(f"no daemon running (stale {pidfile})")
    path = state_path(pidfile)
    try:
        doc = json.loads(path.read_text())
        state = LiveState.from_json(doc)
    except FileNotFoundError:
        raise StateUnavailable(f"daemon pid {pid} has written no state yet ({path})") from None
    except (OSError, ValueError) as exc:
        raise StateUnavailable(f"cannot read the state of daemon pid {pid}: {exc}") from None
    if state.pid != pid:
        raise StateUnavailable(f"{path} is not from daemon pid {pid} (it says {state.pid})")
    return state, max(0.0, time.time() - state.written)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def render(state: LiveState) -> str:
    """The text of `vcpusched status`. Domain names are quoted as in the audit lines, so a
    name holding spaces or a newline cannot break or forge a line."""
    by_pcpu: dict[int | None, list[VcpuState]] = {}
    for vcpu in state.vcpus:
        by_pcpu.setdefault(vcpu.pcpu, []).append(vcpu)
    lines = [f"{'pcpu':>4} {'util%':>6} {'demand%':>8}  vcpus (domain/vcpu received%)"]
    known = set()
    topology = any(p.node is not None for p in state.pcpus)
    for node, group in _by_node_and_core(state.pcpus):
        if topology:  # a host that gives no topology shows its pCPUs as they come
            cpus = format_cpus(frozenset(p.pcpu for p in group))
            lines.append(f"node {'?' if node is None else node}: pcpus {cpus}")
        core = None
        for p in group:
            known.add(p.pcpu)
            mark = "" if p.allowed else " (not in cpus)"
            if p.core is not None and p.core != str(p.pcpu) and p.core != core:
                # The threads of one core are listed together: say which, once per core.
                lines.append(f"  core {p.core}")
            core = p.core
            members = " ".join(_vcpu_text(v) for v in by_pcpu.get(p.pcpu, []))
            lines.append(f"{p.pcpu:>4} {p.util:>6.1f} {p.demand:>8.1f}  {members or '-'}{mark}")
    floating = [v for v in state.vcpus if v.pcpu is None or v.pcpu not in known]
    if floating:
        lines.append("unpinned: " + " ".join(_vcpu_text(v) for v in floating))
    if any(v.excluded for v in state.vcpus):
        lines.append("* excluded: never re-pinned, load still counted")
    homes = state.homes()
    if topology and homes:
        lines.append("home nodes (where most of a domain's vCPUs run):")
        for home in homes:
            off = " ".join(f"{o.vcpu}@{o.pcpu}(node {o.node})" for o in home.off)
            star = "*" if home.excluded else ""
            lines.append(
                f"  {quote(home.domain)}{star} node {home.node}" + (f"  off: {off}" if off else "")
            )
    allowed = [p for p in state.pcpus if p.allowed]
    if allowed:
        mean = statistics.fmean(p.util for p in allowed)
        cpus = format_cpus(frozenset(p.pcpu for p in allowed))
        lines.append(f"pcpus {cpus}  mean {mean:.1f}%  sd {state.sd or 0.0:.1f}")
    elif state.pcpus:
        # A `cpus` set that selects no online pCPU: say so, do not divide by nothing.
        lines.append("pcpus none: cpus selects no online pCPU of this host")
    if state.pid is not None:
        if state.moves:
            verb = "would make" if state.dry_run else "made"
            lines.append(f"last plan {verb} {len(state.moves)} pin changes:")
            lines.extend(
                f"  {m.kind} {quote(m.domain)}/{m.vcpu} {m.src}->{m.dst} "
                f"demand={m.demand:.1f} reason={quote(m.reason)}"
                for m in state.moves
            )
        else:
            lines.append("last plan: no pin change")
        if state.held:
            held = " ".join(f"{quote(r)}={n}" for r, n in sorted(state.held.items()))
            lines.append(f"held back: {held}")
        lines.append(f"status: {summary(state)}")
    return "\n".join(lines)


def _by_node_and_core(
    pcpus: Sequence[PcpuState],
) -> list[tuple[int | None, list[PcpuState]]]:
    """The pCPUs by node (unknown last), and within a node each core's threads together, in
    the order of each core's first thread."""
    nodes: dict[int | None, list[PcpuState]] = {}
    for p in pcpus:
        nodes.setdefault(p.node, []).append(p)

    def core_key(p: PcpuState) -> tuple[int, int]:
        first = min(parse_cpulist(p.core), default=p.pcpu) if p.core else p.pcpu
        return first, p.pcpu

    order = sorted(nodes, key=lambda n: (n is None, n or 0))
    return [(n, sorted(nodes[n], key=core_key)) for n in order]


def _vcpu_text(vcpu: VcpuState) -> str:
    load = "?" if vcpu.received is None else f"{vcpu.received:.0f}"
    return f"{quote(vcpu.domain)}/{vcpu.vcpu}{'*' if vcpu.excluded else ''}:{load}"
