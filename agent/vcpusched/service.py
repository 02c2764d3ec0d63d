"""The agent's cycle and the daemon loop around it: it wires the host, the readings and the policy.

`Agent.step` is one cycle and knows nothing of time or signals, so the simulator drives the
very same code. `Runner` adds the wall clock, reconnection, SIGHUP reloads and shutdown.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vcpusched import __version__, notify, policy, stats
from vcpusched.config import LOG_LEVELS, Config, ConfigError, load_config, override
from vcpusched.host import DomainGone, Host, HostError, PinError
from vcpusched.logs import event
from vcpusched.model import HostSample, Move, Plan, Snapshot, VcpuRef, excluded, format_cpus

log = logging.getLogger("vcpusched")


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

    def excluded(self, domain: str) -> bool:
        return excluded(self.config.exclude, domain)

    def reconfigure(self, config: Config) -> None:
        self.config = config
        self.balancer.reconfigure(config)
        self.balanced = None

    def forget_sample(self) -> None:
        """Drop the baseline: after a reconnect the counters may have moved on without us."""
        self.last = None
        self.balancer.forget()

    def step(self) -> list[Move]:
        """One cycle: sample, compare with the previous sample, plan, pin. Returns the moves."""
        sample = self.host.sample()
        self._track_domains(sample)
        before, self.last = self.last, sample
        if before is None:
            return []
        measured = stats.snapshot(before, sample, self.excluded)
        if measured is None:
            return []
        self.snapshot = measured
        self.plan = self.balancer.plan(measured, frozenset(sample.pcpu_busy_ns))
        moves = list(self.plan.moves)
        if self.config.dry_run:
            self._log_dry_run(moves)
            applied: list[Move] = []
        else:
            applied = self._apply(moves)
            self.balancer.applied(applied)
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
                log.error(
                    event(
                        "pin-failed",
                        domain=move.ref.domain,
                        vcpu=move.ref.vcpu,
                        to=move.dst,
                        error=str(exc),
                    )
                )
                continue
            self.changed[move.ref] = frozenset((move.dst,))
            self.moves_total += 1
            applied.append(move)
            log.info(_move_line(move))
        return applied

    def _log_dry_run(self, moves: list[Move]) -> None:
        # The host does not change in a dry run, so every cycle plans the same moves again;
        # log a plan only when it differs from the last one logged.
        planned = [(m.ref, m.dst) for m in moves]
        if planned == self._dry_plan:
            return
        self._dry_plan = planned
        for move in moves:
            log.info(_move_line(move, dry_run=True))

    def _log_balance(self, snapshot: Snapshot, moved: bool) -> None:
        if moved:
            self.balanced = False
            return
        if self.balanced:
            return
        self.balanced = True
        allowed = policy.allowed_pcpus(self.config, snapshot.util)
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
                log.error(event("restore-failed", domain=ref.domain, vcpu=ref.vcpu, error=str(exc)))
                continue
            log.info(event("restore", domain=ref.domain, vcpu=ref.vcpu, to=format_cpus(pcpus)))
        self.changed.clear()


def _move_line(move: Move, dry_run: bool = False) -> str:
    fields: dict[str, object] = {
        "domain": move.ref.domain,
        "vcpu": move.ref.vcpu,
        "from": format_cpus(move.src),
        "to": move.dst,
        "demand": move.demand,
    }
    if move.src_demand is not None:
        fields["from_demand"] = move.src_demand
    fields["to_demand"] = move.dst_demand
    fields["reason"] = move.reason or None
    if dry_run:
        fields["dry_run"] = 1
    return event(move.kind, **fields)


class Signals:
    """What the signal handlers ask for; they only set flags, the loop does the work."""

    def __init__(self) -> None:
        self.wake = threading.Event()
        self.stop_signal: str | None = None
        self.reload = False

    def request_stop(self, name: str) -> None:
        self.stop_signal = self.stop_signal or name
        self.wake.set()

    def request_reload(self) -> None:
        self.reload = True
        self.wake.set()


class Runner:
    """The daemon loop: a cycle every interval, reconnecting and reloading as needed."""

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

    def run(self, once: bool = False) -> int:
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
        cycles = 0
        next_tick = time.monotonic()
        try:
            while self.signals.stop_signal is None:
                if self.signals.reload:
                    self.signals.reload = False
                    self.reload()
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
                    self.signals.wake.wait(remaining)
                    self.signals.wake.clear()
        finally:
            notify.stopping()
            if self.config.restore_on_exit and not self.config.dry_run:
                self._restore()
            self.host.close()
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
        try:
            self.agent.step()
        except HostError as exc:
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
            self._failures = 0
        return True

    def reload(self) -> None:
        notify.reloading()
        try:
            if self.config_path is None:
                log.info(event("reload", changed="none", note="no config file"))
                return
            try:
                new = override(load_config(self.config_path), **self.overrides)
            except ConfigError as exc:
                for error in exc.errors:
                    log.error(event("reload", rejected=str(self.config_path), error=error))
                return
            changes = self.config.changes(new)
            if new.pidfile != self.config.pidfile:
                log.warning(event("reload", ignored="pidfile", note="takes effect on restart"))
                new = override(new, pidfile=self.config.pidfile)
            log.info(event("reload", changed=",".join(changes) or "none"))
            old, self.config = self.config, new
            logging.getLogger("vcpusched").setLevel(LOG_LEVELS[new.log_level])
            if new.uri != old.uri:
                self.host.close()
                self.host = self.host_factory(new.uri)
                agent = Agent(self.host, new)
                agent.original, agent.changed = self.agent.original, self.agent.changed
                self.agent = agent
            else:
                self.agent.reconfigure(new)
        finally:
            notify.ready()

    def _restore(self) -> None:
        try:
            self.agent.restore()
        except HostError as exc:
            log.error(event("restore-failed", error=str(exc)))
