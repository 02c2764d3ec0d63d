"""The one-command demo: real guests all pinned to pCPU0, the agent balancing them, live.

    bash tests/lab/demo.sh [--duration S] [--interval S]      (as root; `make demo` runs it)

Boots a handful of tiny QEMU guests with mixed loads, all pinned to pCPU0, starts
`vcpusched run` in the foreground and shows, every interval, each pCPU's utilization (from
/proc/stat) with the vCPUs pinned to it (from libvirt), and the agent's log lines as they come.
Ctrl-C or SIGTERM (or the end of --duration) stops the agent and tears the lab down: the demo
guests are destroyed and a libvirtd the demo started is stopped; the demo then checks that none
of their processes is left.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from types import FrameType

import libvirt

from tests.lab.lab import (
    PREFIX,
    URI,
    GuestSpec,
    Lab,
    LabError,
    Libvirtd,
    format_cpus,
    online_pcpus,
    process_alive,
    read_proc_stat,
    sd,
    utilization,
)

DEMO = f"{PREFIX}demo-"
BAR = 40
LOG_LINES = 14


class Stop(Exception):
    """SIGTERM, or the end of --duration: leave the way Ctrl-C does."""


def guest_specs(pcpu: int) -> list[GuestSpec]:
    """Mixed loads summing to 75% of each pCPU, all on `pcpu`; one guest has two vCPUs.

    For two pCPUs that is 50, 30, 20, 10 and 2 x 20: from 100/0 the best split is 80/70 (every
    load is a multiple of 10, so no split of their 150 is even).
    """
    pairs = max(1, len(online_pcpus()) // 2)
    specs: list[GuestSpec] = []
    names = iter("abcdefghijklmnopqrstuvwxyz")
    for _ in range(pairs):
        for load in (50, 30, 20, 10):
            specs.append(GuestSpec(f"{DEMO}{next(names)}", load=load, pin=pcpu))
        specs.append(GuestSpec(f"{DEMO}{next(names)}", load=20, vcpus=2, pin=[pcpu, pcpu]))
    return specs


def qemu_pids(names: list[str]) -> dict[str, int]:
    """PIDs of the guests' QEMU processes, from libvirt's pidfiles, to check teardown."""
    out: dict[str, int] = {}
    for name in names:
        with contextlib.suppress(OSError, ValueError):
            out[name] = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
    return out


class View:
    """Renders one frame per interval from outside the agent: /proc/stat and libvirt."""

    def __init__(self, conn: libvirt.virConnect, interval: float, tty: bool) -> None:
        self.conn = conn
        self.interval = interval
        self.tty = tty
        self.log: deque[str] = deque(maxlen=LOG_LINES)
        self.started = time.monotonic()
        self._stat = read_proc_stat()
        self._times = self._vcpu_times()
        self._clock = time.monotonic()

    def _vcpu_times(self) -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        records = self.conn.getAllDomainStats(
            libvirt.VIR_DOMAIN_STATS_VCPU, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
        )
        for dom, stats in records:
            for i in range(int(stats.get("vcpu.current", 0))):
                if f"vcpu.{i}.time" in stats:
                    out[(dom.name(), i)] = int(stats[f"vcpu.{i}.time"])
        return out

    def _pins(self) -> dict[tuple[str, int], frozenset[int]]:
        out: dict[tuple[str, int], frozenset[int]] = {}
        for dom in self.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                info = dom.vcpuPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError:
                continue
            for i, cpumap in enumerate(info):
                out[(dom.name(), i)] = frozenset(c for c, on in enumerate(cpumap) if on)
        return out

    def frame(self) -> str:
        stat, times, clock = read_proc_stat(), self._vcpu_times(), time.monotonic()
        util = utilization(self._stat, stat)
        span = clock - self._clock
        load = {
            k: (t - self._times[k]) / 1e9 / span * 100 for k, t in times.items() if k in self._times
        }
        self._stat, self._times, self._clock = stat, times, clock
        pins = self._pins()
        elapsed = int(clock - self.started)
        lines = [
            f"vcpusched demo: {len(pins)} vCPUs on {len(util)} pCPUs, "
            f"interval {self.interval:g} s, {elapsed // 60:02d}:{elapsed % 60:02d} "
            "(Ctrl-C to stop)",
            "",
        ]
        for cpu in sorted(util):
            pct = max(0.0, min(100.0, util[cpu]))
            filled = round(pct / 100 * BAR)
            on = [
                f"{_short(d)}/{v}:{load.get((d, v), 0):.0f}"
                for (d, v), cpus in sorted(pins.items())
                if cpus == {cpu}
            ]
            bar = "#" * filled + "." * (BAR - filled)
            lines.append(f"pCPU{cpu} [{bar}] {util[cpu]:5.1f}%  {' '.join(on)}")
        floating = [
            f"{_short(d)}/{v}@{format_cpus(c)}" for (d, v), c in sorted(pins.items()) if len(c) != 1
        ]
        if floating:
            lines.append(f"not pinned to one pCPU: {' '.join(floating)}")
        lines.append(f"spread (sd of pCPU utilization): {sd(util.values()):.1f} points")
        lines.append("")
        lines.append("agent log:")
        lines.extend(f"  {line}" for line in self.log)
        return "\n".join(lines)

    def show(self) -> None:
        text = self.frame()
        if self.tty:
            say("\x1b[H\x1b[2J" + text)
        else:
            say(text + "\n" + "-" * 72)


_DEAD: set[int] = set()  # file descriptors found closed (a reader that went away)


def say(text: str = "", *, err: bool = False) -> None:
    """Print, but never fail. Under `make demo | tee log`, Ctrl-C ends tee as well, and the
    teardown must still run: a closed stdout falls back to stderr, then to nothing."""
    for stream in (sys.stderr,) if err else (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
        except (OSError, ValueError):
            continue
        if fd in _DEAD:
            continue
        try:
            stream.write(text + "\n")
            stream.flush()
            return
        except (OSError, ValueError):
            _DEAD.add(fd)
            # Point the dead stream at /dev/null, so that the flush at exit does not raise.
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), fd)


def _short(domain: str) -> str:
    return domain.removeprefix(DEMO)


def _agent_message(raw: str) -> str:
    """`12:00:01 move domain=...` from `<ISO time> vcpusched[pid]: INFO move domain=...`."""
    parts = raw.split(" ", 3)
    if len(parts) == 4 and parts[1].startswith("vcpusched["):
        clock = (parts[0].partition("T")[2] or parts[0])[:8]
        level = "" if parts[2] == "INFO" else parts[2] + " "
        return f"{clock} {level}{parts[3].replace(DEMO, '')}"
    return raw


def run(duration: float | None, interval: float) -> int:
    lab = Lab()
    lab.check_built()
    daemon = Libvirtd()
    started_daemon = daemon.start()
    daemon_pid = daemon.our_pid() if started_daemon else None
    specs = guest_specs(online_pcpus()[0])
    names = [s.name for s in specs]
    pids: dict[str, int] = {}
    agent: subprocess.Popen[str] | None = None
    reader: threading.Thread | None = None
    lines: queue.Queue[str] = queue.Queue()
    tmp = tempfile.TemporaryDirectory(prefix="vcpusched-demo-")
    try:
        lab.destroy_prefix(DEMO)
        say(f"calibrating the guest load (once per host)... {lab.work_per_ms():.0f} loops/ms")
        say(
            f"booting {len(specs)} guests, all pinned to pCPU{online_pcpus()[0]}: "
            + ", ".join(f"{_short(s.name)}={s.load}%x{s.vcpus}" for s in specs)
        )
        t0 = time.monotonic()
        lab.start(specs)
        pids = qemu_pids(names)
        say(f"guests ready in {time.monotonic() - t0:.1f} s; starting the agent")
        config = Path(tmp.name) / "vcpusched.yaml"
        config.write_text(
            f"interval: {interval}\nuri: {URI}\npidfile: {Path(tmp.name) / 'vcpusched.pid'}\n"
        )
        script = Path(sys.executable).parent / "vcpusched"
        # Its own session: Ctrl-C reaches the demo only, which then stops the agent itself.
        agent = subprocess.Popen(
            [str(script), "run", "--config", str(config), "--log-target", "stderr"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        reader = threading.Thread(target=_pump, args=(agent, lines), daemon=True)
        reader.start()
        view = View(lab.conn, interval, sys.stdout.isatty())
        end = None if duration is None else time.monotonic() + duration
        next_frame = time.monotonic() + interval
        while True:
            _drain(lines, view)
            if agent.poll() is not None:
                view.show()
                say(f"the agent exited with code {agent.returncode}")
                return 1
            now = time.monotonic()
            if end is not None and now >= end:
                raise Stop
            if now >= next_frame:
                view.show()
                next_frame += interval
            time.sleep(0.1)
    except (KeyboardInterrupt, Stop):
        say("\nstopping...")
        return 0
    finally:
        # A second Ctrl-C must not leave guests behind half torn down.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if agent is not None:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
            if reader is not None:
                reader.join(5)
            tail: list[str] = []
            while not lines.empty():
                tail.append(lines.get_nowait())
            for raw in tail[-3:]:
                say(f"  {_agent_message(raw)}")
        teardown(lab, names, pids, daemon, daemon_pid)
        tmp.cleanup()


def _pump(agent: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    assert agent.stderr is not None
    for raw in agent.stderr:
        lines.put(raw.rstrip("\n"))


def _drain(lines: queue.Queue[str], view: View) -> None:
    while True:
        try:
            raw = lines.get_nowait()
        except queue.Empty:
            return
        view.log.append(_agent_message(raw))


def teardown(
    lab: Lab, names: list[str], pids: dict[str, int], daemon: Libvirtd, daemon_pid: int | None
) -> None:
    """Destroy the demo guests, then stop the libvirtd the demo started, and check both."""
    lab.destroy(names)
    lab.close()
    if daemon_pid is not None:
        daemon.stop()
    left = [f"qemu {n} (pid {p})" for n, p in pids.items() if process_alive(p, "qemu-system-x86")]
    if daemon_pid is not None and process_alive(daemon_pid, "libvirtd"):
        left.append(f"libvirtd (pid {daemon_pid})")
    if left:
        say(f"teardown incomplete, still running: {', '.join(left)}", err=True)
        raise SystemExit(1)
    stopped = "; libvirtd stopped" if daemon_pid is not None else ""
    say(f"teardown complete: {len(names)} guests destroyed{stopped}; no process left")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Watch vcpusched balance real lab guests.")
    parser.add_argument("--duration", type=float, help="stop after S seconds (default: Ctrl-C)")
    parser.add_argument("--interval", type=float, default=2.0, help="agent interval (s)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: must run as root (libvirtd, QEMU)", file=sys.stderr)
        return 1

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        raise Stop

    signal.signal(signal.SIGTERM, on_term)
    try:
        return run(args.duration, args.interval)
    except (LabError, libvirt.libvirtError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
