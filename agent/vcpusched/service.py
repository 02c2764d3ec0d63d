"""The agent's cycle and the daemon loop around it: it wires the host, the readings and the policy.

`Agent.step` is one cycle and knows nothing of time or signals, so the simulator drives the
very same code. `Runner` adds the wall clock, reconnection, SIGHUP reloads and shutdown.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import stat
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from vcpusched import __version__, notify, policy, state, stats
from vcpusched.config import (
    LOG_LEVELS,
    Config,
    ConfigError,
    load_config,
    online_problem,
    override,
)
from vcpusched.emulator import EmulatorPins
from vcpusched.guard import HostView
from vcpusched.host import DomainGone, Host, HostError, PinError, ThreadHost
from vcpusched.logs import event
from vcpusched.metrics import Exporter
from vcpusched.model import HostSample, Move, Plan, Snapshot, VcpuRef, excluded, format_cpus

log = logging.getLogger("vcpusched")

# A plan is made only on a window of at least this share of the interval. The daemon's ticks
# are one interval apart; the latency of reading the counters moves a window by milliseconds.
FULL_WINDOW = 0.9


class Agent:
    """One cycle of the agent: host -> readings -> the balancer's plan -> pins -> audit."""

    def __init__(self, host: Host, config: Config, balancer: policy.Planner | None = None) -> None:
        self.host = host
        self.config = config
        # Injected by the benchmark, which times plans and compares policies.
        self.balancer: policy.Planner = balancer or policy.Balancer(config)
        self.last: HostSample | None = None
        # The last measured snapshot, and the last plan made from it.
        self.snapshot: Snapshot | None = None
        self.plan: Plan | None = None
        # Each vCPU's affinity when first seen, and the pin we last gave each vCPU we moved:
        # what a restore on exit puts back, and where it has nothing to do.
        self.original: dict[VcpuRef, frozenset[int]] = {}
        self.changed: dict[VcpuRef, frozenset[int]] = {}
        self.balanced: bool | None = None
        self._dry_plan: list[tuple[VcpuRef, int]] = []
        self.moves_total = 0
        # Online pCPUs, topology, isolated CPUs and refused pins (see vcpusched.guard).
        self.host_view = HostView()
        # Failed operations by name, for the metrics (`vcpusched_errors_total`).
        self.failures: dict[str, int] = {}
        # Emulator threads and iothreads that follow their vCPUs (`pin_emulator: node`).
        self.emulators = EmulatorPins()

    def excluded(self, domain: str) -> bool:
        return excluded(self.config.exclude, domain)

    def reconfigure(self, config: Config) -> None:
        self.config = config
        self.balancer.reconfigure(config)
        self.balanced = None
        self.host_view.forget()  # a refused pin may be allowed now: try it again
        self.emulators.forget()

    def forget_sample(self) -> None:
        """Drop the baseline: after a reconnect the counters may have moved on without us."""
        self.last = None
        self.plan = None
        self.balancer.forget()

    def step(self) -> list[Move]:
        """One cycle: sample, compare with the previous sample, plan, pin. Returns the moves."""
        sample = self.host.sample()
        self.host_view.see(sample)
        self._track_domains(sample)
        before, self.last = self.last, sample
        if before is None:
            return []
        if sample.clock - before.clock < self.config.interval * FULL_WINDOW:
            # A late sample followed at once by the next (a stalled libvirt call, a cycle
            # that overran): too short a window to read demand from. It is the next baseline.
            log.debug(event("short-window", seconds=round(sample.clock - before.clock, 3)))
            return []
        measured = stats.snapshot(before, sample, self.excluded)
        if measured is None:
            return []
        measured = self.host_view.hold(measured, self.config)
        self.snapshot = measured
        try:
            self.plan = self.balancer.plan(measured, self.host_view.usable(self.config))
        except Exception:
            # A fault of the policy must not take the agent, and with it every later cycle:
            # logged with its traceback, counted, and the policy starts again from nothing.
            log.exception(event("plan-failed"))
            self.failures["plan"] = self.failures.get("plan", 0) + 1
            self.balancer.forget()
            self.plan = None
            return []
        if log.isEnabledFor(logging.DEBUG):
            _log_readings(measured, self.plan)
        for pcpu, (points, cycles) in sorted(self.plan.doubts.items()):
            log.info(event("doubt", pcpu=pcpu, points=points, cycles=cycles))
        moves = list(self.plan.moves)
        if self.config.dry_run:
            self._log_dry_run(moves)
            applied: list[Move] = []
        else:
            applied = self._apply(moves)
            self.balancer.applied(applied)
        if self.config.pin_emulator == "node":
            self._follow_emulators(sample, moves if self.config.dry_run else applied)
        # Balanced is said of a plan made on enough readings, with nothing held to measure.
        waiting = any(self.plan.held.get(k) for k in ("readings", "measuring"))
        self._log_balance(measured, bool(moves) or waiting)
        return applied

    def _track_domains(self, sample: HostSample) -> None:
        known = {ref.domain for ref in self.original}
        current = {ref.domain for ref in sample.vcpus}
        for domain in sorted(current - known):
            count = sum(1 for ref in sample.vcpus if ref.domain == domain)
            log.info(
                event(
                    "new", domain=domain, vcpus=count, excluded=1 if self.excluded(domain) else None
                )
            )
        for domain in sorted(known - current):
            self._forget(domain)
        for ref, counters in sample.vcpus.items():
            self.original.setdefault(ref, counters.affinity)

    def _forget(self, domain: str, during: str | None = None) -> None:
        """One line per vanished domain: whether the sample or a pin noticed it first."""
        refs = [r for r in self.original if r.domain == domain]
        if not refs:
            return
        log.info(event("gone", domain=domain, during=during))
        self.host_view.forget(domain)
        self.emulators.forget(domain)
        for ref in refs:
            del self.original[ref]
            self.changed.pop(ref, None)

    def _apply(self, moves: list[Move]) -> list[Move]:
        """Pin each move; returns those that were pinned."""
        applied = []
        for move in moves:
            try:
                self.host.pin(move.ref, frozenset((move.dst,)))
            except DomainGone:
                self._forget(move.ref.domain, during="pin")
                continue
            except PinError as exc:
                self.failures["pin"] = self.failures.get("pin", 0) + 1
                self.host_view.refuse(move, str(exc))
                continue
            self.changed[move.ref] = frozenset((move.dst,))
            self.moves_total += 1
            applied.append(move)
            log.info(_move_line(move, node=self.host_view.node_change(move)))
        return applied

    def _follow_emulators(self, sample: HostSample, moves: list[Move]) -> None:
        if not isinstance(self.host, ThreadHost):
            return  # a host that cannot pin threads (the topology benchmark's)
        pins = {ref: counters.affinity for ref, counters in sample.vcpus.items()}
        pins.update((m.ref, frozenset((m.dst,))) for m in moves)
        allowed = policy.allowed_pcpus(self.config, self.host_view.usable(self.config))
        refused = self.emulators.follow(
            self.host, pins, self.host_view.topology, allowed, self.excluded, self.config.dry_run
        )
        if refused:
            self.failures["emulator"] = self.failures.get("emulator", 0) + refused

    def _log_dry_run(self, moves: list[Move]) -> None:
        # The host does not change in a dry run, so every cycle plans the same moves again;
        # log a plan only when it differs from the last one logged.
        planned = [(m.ref, m.dst) for m in moves]
        if planned == self._dry_plan:
            return
        self._dry_plan = planned
        for move in moves:
            log.info(_move_line(move, dry_run=True, node=self.host_view.node_change(move)))

    def _log_balance(self, snapshot: Snapshot, moved: bool) -> None:
        if moved:
            self.balanced = False
            return
        if self.balanced:
            return
        self.balanced = True
        allowed = policy.allowed_pcpus(self.config, self.host_view.usable(self.config))
        allowed &= snapshot.util.keys()
        util = [snapshot.util[p] for p in sorted(allowed)]
        log.info(
            event(
                "balanced",
                pcpus=format_cpus(allowed),
                sd=statistics.pstdev(util) if util else 0.0,
                util="/".join(f"{u:.0f}" for u in util),
            )
        )

    def restore(self) -> None:
        """Put back the pins each changed vCPU had when first seen."""
        for ref, now in sorted(self.changed.items()):
            pcpus = self.original.get(ref)
            if pcpus is None or pcpus == now:
                continue
            try:
                self.host.pin(ref, pcpus)
            except DomainGone:
                continue
            except PinError as exc:
                self.failures["restore"] = self.failures.get("restore", 0) + 1
                log.error(event("restore-failed", domain=ref.domain, vcpu=ref.vcpu, error=str(exc)))
                continue
            log.info(event("restore", domain=ref.domain, vcpu=ref.vcpu, to=format_cpus(pcpus)))
        self.changed.clear()
        if isinstance(self.host, ThreadHost) and (refused := self.emulators.restore(self.host)):
            self.failures["restore"] = self.failures.get("restore", 0) + refused


def _move_line(move: Move, dry_run: bool = False, node: str | None = None) -> str:
    fields: dict[str, object] = {
        "domain": move.ref.domain,
        "vcpu": move.ref.vcpu,
        "from": format_cpus(move.src),
        "to": move.dst,
    }
    if node is not None:
        fields["node"] = node  # only where the move changes it
    fields["demand"] = move.demand
    if move.src_demand is not None:
        fields["from_demand"] = move.src_demand
    fields["to_demand"] = move.dst_demand
    fields["reason"] = move.reason or None
    if dry_run:
        fields["dry_run"] = 1
    return event(move.kind, **fields)


class Signals:
    """What the signal handlers ask for; they only set flags and wake the loop, which does
    the work.

    The wake-up is a byte written to a pipe that the loop waits on: a handler runs between
    two bytecodes of the main thread, and one that took a lock (a `threading.Event`) could
    find the main thread holding it already, and wait for it forever.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stop_signal: str | None = None
        self.reload = False

    @property
    def fds(self) -> tuple[int, int]:
        """The pipe's ends, for a daemon context to keep open."""
        return self._read, self._write

    def request_stop(self, name: str) -> None:
        self.stop_signal = self.stop_signal or name
        self._poke()

    def request_reload(self) -> None:
        self.reload = True
        self._poke()

    def _poke(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: the loop is woken already
            os.write(self._write, b"!")

    def wait(self, timeout: float) -> None:
        """Sleep up to `timeout` seconds, or until a handler asks for something."""
        ready, _, _ = select.select([self._read], [], [], max(timeout, 0.0))
        if ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._read, 4096):
                    pass


@dataclass(frozen=True)
class ReloadVerdict:
    """What became of the last SIGHUP: `at` is wall-clock time, `generation` the config's
    generation after it (unchanged when rejected)."""

    at: float
    accepted: bool
    error: str | None
    generation: int


def _log_readings(snapshot: Snapshot, plan: Plan) -> None:
    """What a plan was made from, at debug level: every vCPU's reading, then the plan's
    pCPU demands and what it held back, so a decision can be followed after the fact."""
    for vcpu in snapshot.vcpus:
        log.debug(
            event(
                "reading",
                domain=vcpu.ref.domain,
                vcpu=vcpu.ref.vcpu,
                pcpus=format_cpus(vcpu.affinity),
                received=round(vcpu.received, 1),
                demand=round(vcpu.demand, 1),
            )
        )
    log.debug(
        event(
            "plan",
            util=",".join(f"{p}:{u:.1f}" for p, u in sorted(snapshot.util.items())),
            demand=",".join(f"{p}:{d:.1f}" for p, d in sorted(plan.pcpu_demand.items())),
            moves=len(plan.moves),
            held=",".join(f"{k}:{n}" for k, n in sorted(plan.held.items()) if n) or None,
        )
    )


def _plan_of(agent: Agent) -> tuple[Sequence[Move], Mapping[str, int], Mapping[int, float]]:
    """The last plan's moves, what it held back by reason, and its pCPU demands."""
    plan = agent.plan
    if plan is None:
        return (), {}, {}
    return plan.moves, plan.held, plan.pcpu_demand


def _move_state(move: Move) -> state.MoveState:
    return state.MoveState(
        kind=move.kind,
        domain=move.ref.domain,
        vcpu=move.ref.vcpu,
        src=format_cpus(move.src),
        dst=move.dst,
        demand=round(move.demand, 2),
        reason=move.reason or "none",
    )


# Beside the pidfile: what `vcpusched reload` waits for (see cli.reload).
VERDICT_FILE = "reload-verdict.json"


class StartError(Exception):
    """The agent cannot start: libvirt unreachable, or a config this host cannot run."""

    def __init__(self, message: str, *, unreachable: bool) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class Runner:
    """The daemon loop: a cycle every interval, reconnecting and reloading as needed.

    After each cycle it publishes the live state (`vcpusched.state`): the state file beside
    the pidfile, the metrics, and systemd's STATUS=.
    """

    def __init__(
        self,
        config: Config,
        config_path: Path | None,
        overrides: dict[str, object],
        host_factory: Callable[[str], Host],
        signals: Signals,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = overrides
        self.host_factory = host_factory
        self.signals = signals
        self.host = host_factory(config.uri)
        self.agent = Agent(self.host, config)
        self._down_since: float | None = None
        self._down_logged = 0.0
        self._failures = 0
        self._connected = False
        # 1 at start, +1 per accepted reload.
        self.generation = 1
        self.last_reload: ReloadVerdict | None = None
        self._reloads = 0
        self._reload_started = 0.0
        self._started = False
        self._no_pcpus = False
        # When the last sample was asked for: the next one comes one interval later.
        self._sampled = time.monotonic()
        self._watchdog = notify.watchdog_period()
        self._pinged = 0.0
        self.counts = state.Counts()
        self.exporter = Exporter(config.metrics_textfile_dir, config.metrics_listen)
        self.state_file = state.state_path(config.pidfile)
        self.live: state.LiveState | None = None
        self._down_since_unix: float | None = None
        self._error: str | None = None
        self._last_cycle: float | None = None
        self._status = ""
        # What this cycle pinned, after the sample the state is built from.
        self._pinned: dict[VcpuRef, frozenset[int]] = {}
        self._counted: Plan | None = None
        # The last failure of each output, logged once until it works again.
        self._output_errors: dict[str, str] = {}

    def start(self) -> None:
        """Log the start and take the first sample; raise StartError if this cannot run.

        Done before READY=1, so that systemd (and the exit code) hear about an unreachable
        libvirt or a `cpus` set that selects no online pCPU, rather than a log line later.
        """
        self._log_start()
        self._sampled = time.monotonic()
        try:
            self.agent.step()
        except HostError as exc:
            raise StartError(str(exc), unreachable=True) from None
        online = self._online()
        problem = online_problem(self.config, online)
        if problem is not None:
            source = f"{self.config_path}: " if self.config_path else ""
            raise StartError(source + problem, unreachable=False)
        self._connected = True
        log.info(event("connected", uri=self.config.uri, pcpus=format_cpus(online)))
        self._started = True
        self.write_verdict()
        self.publish()

    def _online(self) -> frozenset[int]:
        last = self.agent.last
        return frozenset(last.pcpu_busy_ns) if last is not None else frozenset()

    def _ping(self, force: bool = False) -> None:
        # Only from the loop itself: a hung libvirt call stops the pings, and systemd
        # restarts the agent. A thread pinging beside it would hide the hang.
        if self._watchdog is None:
            return
        now = time.monotonic()
        if force or now - self._pinged >= self._watchdog * 0.9:
            self._pinged = now
            notify.watchdog()

    def _log_start(self) -> None:
        cfg = self.config
        log.info(
            event(
                "start",
                version=__version__,
                uri=cfg.uri,
                interval=cfg.interval,
                thresholds=f"{cfg.low:g}/{cfg.target:g}/{cfg.high:g}",
                min_gain=cfg.min_gain,
                cpus=None if cfg.cpus is None else format_cpus(cfg.cpus),
                exclude=",".join(cfg.exclude) or None,
                dry_run=int(cfg.dry_run),
            )
        )

    def run(self, once: bool = False) -> int:
        """Cycle until stopped; `start()` first, or this starts without its checks."""
        if not self._started:
            self._log_start()
            self.write_verdict()
        cycles = 1 if self._started else 0
        next_tick = time.monotonic()
        if self._started:
            next_tick += self._delay()
        try:
            while self.signals.stop_signal is None:
                self._ping(force=True)
                if self.signals.reload:
                    # The verdict is given at once; the new config plans from the next regular
                    # tick, on a full window, never on a sample taken straight after the last.
                    self.signals.reload = False
                    interval = self.config.interval
                    self.reload()
                    if self.config.interval != interval:
                        next_tick = self._sampled + self._delay()
                elif next_tick <= time.monotonic():
                    if self._cycle():
                        cycles += 1
                    elif once:
                        return 1
                    if once and cycles >= 2:
                        break
                    next_tick = max(next_tick + self._delay(), time.monotonic())
                while self.signals.stop_signal is None and not self.signals.reload:
                    remaining = next_tick - time.monotonic()
                    if remaining <= 0:
                        break
                    wait = remaining if self._watchdog is None else min(remaining, self._watchdog)
                    self.signals.wait(wait)
                    self._ping()
        finally:
            notify.stopping()
            self.remove_verdict()
            if self.config.restore_on_exit and not self.config.dry_run:
                self._restore()
            self.host.close()
            self.publish(running=False)
            log.info(
                event(
                    "stop", signal=self.signals.stop_signal or "none", moves=self.agent.moves_total
                )
            )
        return 0

    def _delay(self) -> float:
        if self._down_since is None:
            return self.config.interval
        # Bounded back-off: retrying a local socket is cheap, and the agent must be back
        # within two intervals of libvirtd's return.
        backoff: float = self.config.interval * 2 ** max(self._failures - 1, 0)
        return min(backoff, 2 * self.config.interval)

    def _cycle(self) -> bool:
        started = self._sampled = time.monotonic()
        self._pinned = {}
        try:
            applied = self.agent.step()
        except HostError as exc:
            self.counts.error("sample")
            self._error = str(exc)
            if self._down_since_unix is None:
                self._down_since_unix = time.time()
            connected = self._lost(exc)
        else:
            self.counts.count_moves([_move_state(m) for m in applied])
            self._pinned = {m.ref: frozenset((m.dst,)) for m in applied}
            connected = self._found()
        self.counts.observe_cycle(time.monotonic() - started)
        if connected:
            self._last_cycle = time.time()
            # Once per plan: a cycle that made none (no baseline yet) leaves the last one.
            if self.agent.plan is not None and self.agent.plan is not self._counted:
                self._counted = self.agent.plan
                self.counts.count_held(self.agent.plan.held)
        self.publish()
        return connected

    def publish(self, running: bool = True) -> state.LiveState:
        """Rebuild the live state from the agent's, and hand it to every output."""
        agent = self.agent
        for operation, n in agent.failures.items():
            # The agent counts its own; a new agent (after a URI change) starts again at 0.
            self.counts.errors[operation] = self.counts.errors.get(operation, 0) + n
        agent.failures.clear()
        moves, held, demand = _plan_of(agent)
        sample = agent.last if self._connected else None
        pcpus, vcpus = state.measured(
            sample,
            agent.snapshot,
            demand,
            policy.allowed_pcpus(self.config, agent.host_view.usable(self.config))
            if sample
            else frozenset(),
            agent.excluded,
            self._pinned,
        )
        verdict = self.last_reload
        live = state.LiveState(
            version=__version__,
            pid=os.getpid(),
            written=time.time(),
            interval=self.config.interval,
            generation=self.generation,
            running=running,
            connected=self._connected,
            disconnected_since=None if self._connected else self._down_since_unix,
            error=None if self._connected else self._error,
            last_reload=None
            if verdict is None
            else state.ReloadState(verdict.at, verdict.accepted, verdict.error, verdict.generation),
            last_cycle=self._last_cycle,
            pcpus=pcpus,
            vcpus=vcpus,
            moves=tuple(_move_state(m) for m in moves) if sample is not None else (),
            held=dict(held) if sample is not None else {},
            dry_run=self.config.dry_run,
            counts=self.counts,
        )
        self.live = live
        self._output("write_state", self.state_file, lambda: state.write(self.state_file, live))
        self._output(
            "write_metrics", self.exporter.textfile_dir, lambda: self.exporter.publish(live)
        )
        text = state.summary(live)
        if running and text != self._status:
            self._status = text
            notify.status(text)
        return live

    def _output(self, operation: str, where: object, write: Callable[[], None]) -> None:
        try:
            write()
        except OSError as exc:
            self.counts.error(operation)
            # strerror, not str(exc): the latter names a temporary file, new each cycle.
            message = exc.strerror or str(exc)
            if self._output_errors.get(operation) != message:
                self._output_errors[operation] = message
                log.error(event(f"{operation.replace('_', '-')}-failed", path=where, error=message))
            return
        if self._output_errors.pop(operation, None) is not None:
            log.info(event(f"{operation.replace('_', '-')}-ok", path=where))

    def _lost(self, exc: HostError) -> bool:
        now = time.monotonic()
        self._failures += 1
        self.agent.forget_sample()
        if self._down_since is None:
            self._down_since = self._down_logged = now
            log.warning(event("disconnected", uri=self.config.uri, error=str(exc)))
        elif now - self._down_logged >= 60:
            self._down_logged = now
            log.warning(
                event(
                    "still-disconnected",
                    uri=self.config.uri,
                    seconds=round(now - self._down_since),
                    error=str(exc),
                )
            )
        self._connected = False
        return False

    def _found(self) -> bool:
        if not self._connected:
            self._connected = True
            down = None if self._down_since is None else time.monotonic() - self._down_since
            last = self.agent.last
            log.info(
                event(
                    "connected",
                    uri=self.config.uri,
                    pcpus=None if last is None else format_cpus(frozenset(last.pcpu_busy_ns)),
                    after=None if down is None else f"{down:.1f}s",
                )
            )
            self._down_since = None
            self._down_since_unix = None
            self._error = None
            self._failures = 0
        self._check_online()
        return True

    def _check_online(self) -> None:
        # CPUs can go offline under a running agent: say so once, as an error, and keep going
        # (the policy then has no pCPU to pin to and moves nothing).
        problem = online_problem(self.config, self._online())
        if problem is None:
            self._no_pcpus = False
        elif not self._no_pcpus:
            self._no_pcpus = True
            log.error(event("no-pcpus", error=problem))

    def reload(self) -> None:
        notify.reloading()
        self._reloads += 1
        self._reload_started = time.monotonic()
        try:
            if self.config_path is None:
                log.info(event("reload", changed="none", note="no config file"))
                self._verdict(None)
                return
            try:
                new = override(load_config(self.config_path), **self.overrides)
                problem = online_problem(new, self._online()) if self.agent.last else None
                if problem is not None:
                    raise ConfigError(str(self.config_path), [problem])
            except ConfigError as exc:
                for error in exc.errors:
                    log.error(event("reload", rejected=str(self.config_path), error=error))
                self._verdict("; ".join(exc.errors))
                return
            changes = self.config.changes(new)
            if new.pidfile != self.config.pidfile:
                log.warning(event("reload", ignored="pidfile", note="takes effect on restart"))
                new = override(new, pidfile=self.config.pidfile)
            if new.metrics_listen != self.config.metrics_listen:
                log.warning(
                    event("reload", ignored="metrics.listen", note="takes effect on restart")
                )
                new = override(new, metrics_listen=self.config.metrics_listen)
            log.info(event("reload", changed=",".join(changes) or "none"))
            self.exporter.textfile_dir = new.metrics_textfile_dir
            old, self.config = self.config, new
            logging.getLogger("vcpusched").setLevel(LOG_LEVELS[new.log_level])
            if new.uri != old.uri:
                self.host.close()
                self.host = self.host_factory(new.uri)
                agent = Agent(self.host, new)
                agent.original, agent.changed = self.agent.original, self.agent.changed
                agent.emulators.original = self.agent.emulators.original
                self.agent = agent
            else:
                self.agent.reconfigure(new)
            self._verdict(None)
        finally:
            notify.ready()
            # Reflect the verdict at once, not only after the next cycle.
            self._status = ""
            if self.live is not None:
                self.publish()

    def _verdict(self, error: str | None) -> None:
        self.counts.reloads["accepted" if error is None else "rejected"] += 1
        if error is None:
            self.generation += 1
        self.last_reload = ReloadVerdict(
            at=time.time(), accepted=error is None, error=error, generation=self.generation
        )
        self.write_verdict()

    def write_verdict(self) -> None:
        """The verdict file beside the pidfile, replaced atomically: `vcpusched reload`
        reads it to learn the answer to its SIGHUP."""
        directory = self.config.pidfile.parent
        document = {
            "pid": os.getpid(),
            "generation": self.generation,
            "reloads": self._reloads,
            # CLOCK_MONOTONIC is system-wide: the waiter compares it with its own send time.
            "reload_started": self._reload_started,
            "last_reload": None if self.last_reload is None else asdict(self.last_reload),
        }
        try:
            state.atomic_write(directory / VERDICT_FILE, (json.dumps(document) + "\n").encode())
        except OSError as exc:
            log.warning(event("verdict-unwritten", path=str(directory), error=exc.strerror))

    def remove_verdict(self) -> None:
        """Remove the verdict file if it is still the one this process wrote."""
        path = self.config.pidfile.parent / VERDICT_FILE
        with contextlib.suppress(OSError, ValueError):
            regular = stat.S_ISREG(os.lstat(path).st_mode)
            if regular and json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()

    def _restore(self) -> None:
        try:
            self.agent.restore()
        except HostError as exc:
            log.error(event("restore-failed", error=str(exc)))
