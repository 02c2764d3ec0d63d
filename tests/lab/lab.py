"""The libvirt + QEMU lab: a libvirtd, tiny TCG guests with set loads, outside measurements.

Used by the lab and e2e tests and by the demo; also a small command line for contributors:

    python tests/lab/lab.py up                      # start libvirtd (if none answers)
    python tests/lab/lab.py start 70 50:p0 30,80:10 # guests lab-cli-0.. (load[:pPCPU] or pattern)
    python tests/lab/lab.py status                  # pCPU utilization and pins
    python tests/lab/lab.py down                    # destroy lab-* guests, stop our libvirtd

Needs root, tests/lab/setup.sh run once, and the libvirt Python binding (the project venv).
Every lab domain is named "lab-..."; nothing here touches other domains or other processes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import libvirt

REPO = Path(__file__).resolve().parents[2]
URI = "qemu:///system"
PREFIX = "lab-"
SOCKET = Path("/run/libvirt/libvirt-sock")
LIBVIRTD = "/usr/sbin/libvirtd"
QEMU = "/usr/bin/qemu-system-x86_64"
MEMORY_MIB = 128  # the stock kernel needs 96 MiB at least; below that it dies while booting
CALIBRATION_ROUNDS = 3

# libvirt prints every error to stderr by default as well as raising it; the lab handles them.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


class LabError(Exception):
    pass


def state_dir() -> Path:
    return Path(os.environ.get("VCPUSCHED_LAB_DIR") or REPO / ".lab")


def online_pcpus() -> list[int]:
    """Online pCPUs of this host, from sysfs ("0-1" -> [0, 1])."""
    spec = Path("/sys/devices/system/cpu/online").read_text().strip()
    cpus: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def format_cpus(cpus: Iterable[int]) -> str:
    """Render a pCPU set as libvirt and the agent's audit lines do ("0-2,5").

    Written here rather than imported from the agent: the judge shares no code with what it
    judges."""
    ordered = sorted(cpus)
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def release_affinity(pid: int, cpus: set[int]) -> None:
    """Let every thread of a process run on `cpus`.

    libvirtd's worker threads come and go, so a thread may vanish between the listing and the
    call (what made `taskset -a` fail), and one may be born of a thread not yet set: passes
    repeat until one finds every thread already on `cpus`.
    """
    task_dir = Path(f"/proc/{pid}/task")
    for _ in range(50):
        changed = False
        for entry in task_dir.iterdir():
            tid = int(entry.name)
            try:
                if os.sched_getaffinity(tid) != cpus:
                    os.sched_setaffinity(tid, cpus)
                    changed = True
            except ProcessLookupError:
                continue  # the thread ended: nothing left to set
        if not changed:
            return
    raise LabError(f"threads of pid {pid} kept starting on other pCPUs than {format_cpus(cpus)}")


def process_alive(pid: int, comm: str) -> bool:
    """True if `pid` exists and is still the program we started (guards against PID reuse)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == comm
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# libvirtd


@dataclass
class Libvirtd:
    """The lab's libvirtd: reused when one already answers, else started and later stopped."""

    state: Path = field(default_factory=state_dir)

    @property
    def run_dir(self) -> Path:
        return self.state / "run"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "libvirtd.pid"

    @staticmethod
    def answering() -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            try:
                s.connect(str(SOCKET))
            except OSError:
                return False
        return True

    def our_pid(self) -> int | None:
        """The PID of a libvirtd this lab started and that still runs."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if process_alive(pid, "libvirtd") else None

    def start(self) -> bool:
        """Make sure a libvirtd answers; return True if this call started it."""
        if self.answering():
            return False
        if not Path(LIBVIRTD).exists():
            raise LabError(f"{LIBVIRTD} missing: run tests/lab/setup.sh as root")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        stale = self.our_pid()
        if stale is not None:
            # Ours but not answering: hung or still starting. Start over.
            self._terminate(stale)
        env = dict(os.environ)
        env["LIBVIRT_LOG_OUTPUTS"] = f"3:file:{self.run_dir / 'libvirtd.log'}"
        # A private mount namespace without the cgroup2 mount at /sys/fs/cgroup/unified makes
        # libvirt use the v1 cpuacct controller, the only one with per-pCPU domain times, while
        # the host's mounts stay as they are. Starting on pCPU 0 only keeps the host CPUID that
        # libvirt stores with its QEMU capabilities stable; otherwise it re-probes QEMU (~8 s)
        # whenever it happens to start on another pCPU than last time.
        script = (
            "mountpoint -q /sys/fs/cgroup/unified && umount /sys/fs/cgroup/unified; "
            'exec "$0" --daemon --pid-file "$1"'
        )
        cmd = ["taskset", "-c", "0", "unshare", "--mount", "--propagation", "private"]
        cmd += ["sh", "-c", script, LIBVIRTD, str(self.pidfile)]
        subprocess.run(cmd, env=env, check=True, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            pid = self.our_pid()
            if pid is not None and self.answering():
                try:
                    conn = libvirt.open(URI)
                    conn.getCapabilities()  # forces the QEMU capability probe, under taskset 0
                    conn.close()
                    break
                except libvirt.libvirtError:
                    pass
            if time.monotonic() > deadline:
                raise LabError(f"libvirtd did not answer within 60 s; see {self.run_dir}")
            time.sleep(0.05)
        # QEMU processes inherit libvirtd's affinity: give all pCPUs back.
        release_affinity(pid, set(online_pcpus()))
        return True

    def stop(self) -> None:
        """Stop the libvirtd this lab started (by its PID). Destroy the guests first."""
        pid = self.our_pid()
        if pid is not None:
            self._terminate(pid)

    @staticmethod
    def _terminate(pid: int) -> None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while process_alive(pid, "libvirtd"):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
            time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# host measurements


def read_proc_stat() -> dict[int, tuple[int, int]]:
    """Per pCPU: (busy, busy + idle) in clock ticks since boot.

    Steal is left out of both, so a pCPU of a virtual host that loses time to its own host
    still reads as 100% busy when it runs whenever it can.
    """
    out: dict[int, tuple[int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *values = line.split()
            user, nice, system, idle, iowait, irq, softirq = (int(v) for v in values[:7])
            busy = user + nice + system + irq + softirq
            out[int(name[3:])] = (busy, busy + idle + iowait)
    return out


def utilization(
    before: Mapping[int, tuple[int, int]], after: Mapping[int, tuple[int, int]]
) -> dict[int, float]:
    """Busy percent of each pCPU between two /proc/stat readings."""
    out: dict[int, float] = {}
    for cpu, (busy1, total1) in after.items():
        busy0, total0 = before[cpu]
        span = total1 - total0
        out[cpu] = 100.0 * (busy1 - busy0) / span if span > 0 else 0.0
    return out


def sd(values: Iterable[float]) -> float:
    """Population standard deviation: the spread of pCPU utilization around its mean."""
    vals = list(values)
    return statistics.pstdev(vals) if len(vals) > 1 else 0.0


# One reading: (monotonic time, /proc/stat per pCPU, vCPU ns of each running domain, and each
# one's ns over all its threads: its vCPUs and QEMU's own)
_Sample = tuple[float, dict[int, tuple[int, int]], dict[str, int], dict[str, int]]


class StatSampler:
    """Reads /proc/stat every `every` seconds in a thread, to cut any window out afterwards.

    With a libvirt URI it also reads the total vCPU time of all running domains, so that a
    window can tell how much of the host's busy time was not the guests' (`foreign`).
    """

    def __init__(self, every: float = 0.5, uri: str | None = None) -> None:
        self.every = every
        self.uri = uri
        self.samples: list[_Sample] = []
        self._conn: libvirt.virConnect | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stat-sampler", daemon=True)

    def __enter__(self) -> StatSampler:
        if self.uri is not None:
            self._conn = libvirt.open(self.uri)
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            if self._conn is not None:
                self._conn.close()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def _sample(self) -> None:
        vcpu_ns: dict[str, int] = {}
        total_ns: dict[str, int] = {}
        if self._conn is not None:
            try:
                records = self._conn.getAllDomainStats(
                    libvirt.VIR_DOMAIN_STATS_VCPU | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL,
                    libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE,
                )
            except libvirt.libvirtError:
                return
            for dom, stats in records:
                vcpu_ns[dom.name()] = sum(
                    int(v)
                    for k, v in stats.items()
                    if k.startswith("vcpu.") and k.endswith(".time")
                )
                total_ns[dom.name()] = int(stats.get("cpu.time", vcpu_ns[dom.name()]))
        self.samples.append((time.monotonic(), read_proc_stat(), vcpu_ns, total_ns))

    def _bounds(self, start: float, end: float) -> tuple[_Sample, _Sample]:
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            raise LabError(f"no /proc/stat samples between {start:.1f} and {end:.1f}")
        return inside[0], inside[-1]

    def window(self, start: float, end: float) -> dict[int, float]:
        """Utilization between the first sample at or after `start` and the last before `end`."""
        first, last = self._bounds(start, end)
        return utilization(first[1], last[1])

    def foreign(self, start: float, end: float) -> float:
        """Host busy time in the window beyond the domains' vCPU time, in points of one pCPU:
        QEMU's own threads, and all other work. A domain that starts or stops inside the
        window counts as foreign for that window."""
        return self._beyond(start, end, whole=False)

    def other(self, start: float, end: float) -> float:
        """Host busy time in the window beyond all of the domains' threads: libvirtd, the
        agent, this test, and jobs that have nothing to do with the lab. QEMU's own threads
        cost more the slower the machine runs (a clean-clone run read 12 to 15 points of
        foreign time beside four guests), other jobs come and go: this tells the two apart."""
        return self._beyond(start, end, whole=True)

    def _beyond(self, start: float, end: float, *, whole: bool) -> float:
        first, last = self._bounds(start, end)
        busy = sum(utilization(first[1], last[1]).values())
        before, after = (first[3], last[3]) if whole else (first[2], last[2])
        ns = sum(v - before[d] for d, v in after.items() if d in before)
        return busy - ns / 1e9 / (last[0] - first[0]) * 100


def vcpu_time_ns(dom: libvirt.virDomain) -> int:
    """Total vCPU time of a domain: exact from cpuacct, else the 10 ms ticks of vcpus()."""
    try:
        return int(dom.getCPUStats(True)[0]["vcpu_time"])
    except (libvirt.libvirtError, KeyError, IndexError):
        return sum(int(v[2]) for v in dom.vcpus()[0])


# ---------------------------------------------------------------------------------------------
# guests


@dataclass(frozen=True)
class GuestSpec:
    """One lab guest. `pin`: None leaves every vCPU free to run on all pCPUs; an int pins every
    vCPU to that pCPU; a sequence gives one pCPU (or None) per vCPU."""

    name: str
    load: int | None = None
    pattern: str | None = None
    vcpus: int = 1
    pin: int | Sequence[int | None] | None = None
    period_ms: int = 100
    cmdline: str = ""
    # Raw domain XML placed after <cputune>, e.g. a <numatune> element.
    extra_xml: str = ""

    def __post_init__(self) -> None:
        if not self.name.startswith(PREFIX):
            raise ValueError(f"lab guest names start with {PREFIX!r}: {self.name!r}")
        if self.pattern is not None and not re.fullmatch(
            r"\d+:\d+(\.\d+)?(,\d+:\d+(\.\d+)?)*", self.pattern
        ):
            raise ValueError(f"pattern must be L:S[,L:S...], got {self.pattern!r}")

    def pins(self) -> list[int | None]:
        if self.pin is None or isinstance(self.pin, int):
            return [self.pin] * self.vcpus
        pins = list(self.pin)
        if len(pins) != self.vcpus:
            raise ValueError(f"{self.name}: {len(pins)} pins for {self.vcpus} vCPUs")
        return pins

    def kernel_cmdline(self, work_per_ms: float) -> str:
        parts = ["console=ttyS0", "quiet", "panic=-1", f"work={work_per_ms:.1f}"]
        parts.append(f"period={self.period_ms}")
        if self.pattern is not None:
            parts.append(f"pattern={self.pattern}")
        else:
            parts.append(f"load={self.load or 0}")
        if self.cmdline:
            parts.append(self.cmdline)
        return " ".join(parts)


class Lab:
    """Guests on the lab's libvirtd, and the outside view of them."""

    def __init__(self, state: Path | None = None, uri: str = URI) -> None:
        self.state = state or state_dir()
        self.uri = uri
        self.guest_dir = self.state / "guest"
        self.console_dir = self.state / "run" / "console"
        self._conn: libvirt.virConnect | None = None

    # -- connection

    @property
    def conn(self) -> libvirt.virConnect:
        if self._conn is None or not self._conn.isAlive():
            self._conn = libvirt.open(self.uri)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    def check_built(self) -> None:
        for name in ("vmlinux", "initramfs.gz"):
            if not (self.guest_dir / name).is_file():
                raise LabError(f"{self.guest_dir / name} missing: run tests/lab/setup.sh as root")

    # -- calibration

    def _calibration_key(self) -> str:
        """What the loop speed depends on: the guest program, QEMU, and the host CPU."""
        h = hashlib.sha256((self.guest_dir / "lab-load").read_bytes())
        qemu = Path(QEMU).stat()
        h.update(f"{qemu.st_size}:{qemu.st_mtime_ns}".encode())
        model = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        h.update((model.group(1) if model else "?").encode())
        return h.hexdigest()

    def work_per_ms(self) -> float:
        """Loop iterations per ms of vCPU time, calibrated once per host and guest build."""
        path = self.state / "calibration.json"
        key = self._calibration_key()
        with contextlib.suppress(OSError, ValueError, KeyError):
            data = json.loads(path.read_text())
            if data["key"] == key:
                return float(data["work_per_ms"])
        rounds = self.calibrate()
        value = statistics.median(rounds)
        path.write_text(json.dumps({"key": key, "work_per_ms": value, "rounds": rounds}) + "\n")
        return value

    def calibrate(self, pcpu: int | None = None) -> list[float]:
        """Boot one guest alone on `pcpu` (the last one by default) that runs timed bursts of
        the load loop.

        The guest prints a line before and after each burst; the host reads the domain's vCPU
        time at each line. Iterations over vCPU time stays right when other processes compete
        for the pCPU, where the guest's own clock would count the time it was not running.
        """
        spec = GuestSpec(
            f"{PREFIX}calibrate",
            pin=online_pcpus()[-1] if pcpu is None else pcpu,
            cmdline=f"calibrate={CALIBRATION_ROUNDS}",
        )
        self.destroy([spec.name])
        (guest,) = self.start([spec], work_per_ms=1.0)
        dom = self.conn.lookupByName(spec.name)
        rounds: list[float] = []
        begin: dict[int, int] = {}
        seen = 0
        deadline = time.monotonic() + 60 + 10 * CALIBRATION_ROUNDS
        try:
            while len(rounds) < CALIBRATION_ROUNDS:
                if time.monotonic() > deadline:
                    raise LabError(f"calibration timed out:\n{guest.console()[-2000:]}")
                text = guest.console()
                # Only complete lines count: a half-written one is read again next time.
                lines = text[: text.rfind("\n") + 1].splitlines()
                for line in lines[seen:]:
                    if m := re.match(r"LAB-CAL-BEGIN round=(\d+)", line):
                        begin[int(m[1])] = vcpu_time_ns(dom)
                    elif m := re.match(r"LAB-CAL-END round=(\d+) iters=(\d+)", line):
                        spent_ms = (vcpu_time_ns(dom) - begin[int(m[1])]) / 1e6
                        rounds.append(int(m[2]) / spent_ms)
                seen = len(lines)
                time.sleep(0.002)
        finally:
            self.destroy([spec.name])
        return rounds

    # -- domains

    def domain_xml(self, spec: GuestSpec, work_per_ms: float) -> str:
        pins = "".join(
            f"<vcpupin vcpu='{i}' cpuset='{p}'/>"
            for i, p in enumerate(spec.pins())
            if p is not None
        )
        console = self.console_dir / f"{spec.name}.log"
        return f"""<domain type='qemu'>
  <name>{escape(spec.name)}</name>
  <memory unit='MiB'>{MEMORY_MIB}</memory>
  <vcpu placement='static'>{spec.vcpus}</vcpu>
  <cputune>{pins}</cputune>{spec.extra_xml}
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{self.guest_dir / "vmlinux"}</kernel>
    <initrd>{self.guest_dir / "initramfs.gz"}</initrd>
    <cmdline>{escape(spec.kernel_cmdline(work_per_ms))}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='maximum'/>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{QEMU}</emulator>
    <controller type='usb' model='none'/>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""

    def start(
        self, specs: Sequence[GuestSpec], work_per_ms: float | None = None, timeout: float = 90
    ) -> list[Guest]:
        """Define and start the guests, then wait until each one's load runs."""
        self.check_built()
        work = work_per_ms if work_per_ms is not None else self.work_per_ms()
        self.console_dir.mkdir(parents=True, exist_ok=True)
        guests: list[Guest] = []
        for spec in specs:
            self.destroy([spec.name])
            guest = Guest(spec, self.console_dir / f"{spec.name}.log")
            guest.console_path.unlink(missing_ok=True)
            dom = self.conn.defineXML(self.domain_xml(spec, work))
            dom.create()
            guest.created = time.monotonic()
            guests.append(guest)
        deadline = time.monotonic() + timeout
        for guest in guests:
            guest.wait_ready(self.conn, deadline)
        return guests

    def lab_domains(self, prefix: str = PREFIX) -> list[libvirt.virDomain]:
        try:
            domains = self.conn.listAllDomains()
        except libvirt.libvirtError:
            # A connection made before a libvirtd restart (the fault tests restart it) still
            # looks alive until its first call fails: reconnect once.
            self.close()
            domains = self.conn.listAllDomains()
        return [d for d in domains if d.name().startswith(prefix)]

    def destroy(self, names: Iterable[str]) -> None:
        """Destroy and undefine lab domains by name; names that do not exist are fine."""
        for name in names:
            if not name.startswith(PREFIX):
                raise ValueError(f"refusing to destroy non-lab domain {name!r}")
            try:
                dom = self.conn.lookupByName(name)
            except libvirt.libvirtError:
                continue
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isPersistent():
                    dom.undefine()

    def destroy_prefix(self, prefix: str = PREFIX) -> None:
        if not prefix.startswith(PREFIX):
            raise ValueError(f"lab prefixes start with {PREFIX!r}")
        self.destroy([d.name() for d in self.lab_domains(prefix)])

    def pin(self, name: str, vcpu: int, pcpus: Iterable[int]) -> None:
        """Pin a vCPU from outside the agent (to set up a scenario)."""
        wanted = set(pcpus)
        cpumap = tuple(i in wanted for i in range(max(online_pcpus()) + 1))
        self.conn.lookupByName(name).pinVcpuFlags(vcpu, cpumap, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def pins(self) -> dict[tuple[str, int], frozenset[int]]:
        """Affinity of every vCPU of every running domain, as libvirt reports it."""
        return pins_of(self.conn)

    def measure(self, window: float) -> Measurement:
        """pCPU utilization (/proc/stat) and each running domain's vCPU time, over one window."""
        doms = [d for d in self.conn.listAllDomains() if d.isActive()]
        t0 = time.monotonic()
        stat0 = read_proc_stat()
        before = {d.name(): vcpu_time_ns(d) for d in doms}
        vcpus0 = {d.name(): [int(v[2]) for v in d.vcpus()[0]] for d in doms}
        per0 = {d.name(): d.getCPUStats(False) for d in doms}
        time.sleep(window)
        after = {d.name(): vcpu_time_ns(d) for d in doms}
        vcpus1 = {d.name(): [int(v[2]) for v in d.vcpus()[0]] for d in doms}
        per1 = {d.name(): d.getCPUStats(False) for d in doms}
        util = utilization(stat0, read_proc_stat())
        span = time.monotonic() - t0

        def pct(ns: int) -> float:
            return ns / 1e9 / span * 100

        def on_pcpus(key: str) -> dict[int, float]:
            return {
                p: pct(sum(per1[n][p][key] - per0[n][p][key] for n in per0 if n in per1))
                for p in util
            }

        return Measurement(
            pins=pins_of(self.conn),
            pcpu=util,
            domain={n: pct(after[n] - before[n]) for n in before},
            vcpu={
                (n, i): pct(b - a)
                for n in vcpus0
                for i, (a, b) in enumerate(zip(vcpus0[n], vcpus1[n], strict=True))
            },
            threads=on_pcpus("cpu_time"),
            vcpus_on=on_pcpus("vcpu_time"),
        )


@dataclass(frozen=True)
class Measurement:
    pcpu: dict[int, float]  # busy % of each pCPU, from /proc/stat
    domain: dict[str, float]  # vCPU time of each domain, % of one pCPU
    vcpu: dict[tuple[str, int], float]  # per vCPU, from vcpus() (10 ms ticks)
    pins: dict[tuple[str, int], frozenset[int]] = field(default_factory=dict)
    # Per pCPU, the time all domains' threads ran there (QEMU's own and the vCPUs), and the
    # vCPUs' share of it, from libvirt's per-pCPU accounting.
    threads: dict[int, float] = field(default_factory=dict)
    vcpus_on: dict[int, float] = field(default_factory=dict)

    def other(self) -> dict[int, float]:
        """Busy time of each pCPU beyond all of the domains' threads: host processes and
        other jobs, none of the lab's guests."""
        return {p: busy - self.threads.get(p, 0.0) for p, busy in self.pcpu.items()}

    def own(self) -> dict[int, float]:
        """Time QEMU's own threads (not the vCPUs) ran on each pCPU."""
        return {p: self.threads.get(p, 0.0) - self.vcpus_on.get(p, 0.0) for p in self.pcpu}


def pins_of(conn: libvirt.virConnect) -> dict[tuple[str, int], frozenset[int]]:
    out: dict[tuple[str, int], frozenset[int]] = {}
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            info = dom.vcpuPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE)
            name = dom.name()
        except libvirt.libvirtError:
            continue  # destroyed while we looked
        for vcpu, cpumap in enumerate(info):
            out[(name, vcpu)] = frozenset(i for i, on in enumerate(cpumap) if on)
    return out


@dataclass
class Guest:
    spec: GuestSpec
    console_path: Path
    created: float = 0.0
    ready: float = 0.0

    @property
    def name(self) -> str:
        return self.spec.name

    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, conn: libvirt.virConnect, deadline: float) -> None:
        dom = conn.lookupByName(self.name)
        while "LAB-READY" not in self.console():
            if not dom.isActive():
                raise LabError(f"{self.name} stopped while booting:\n{self.console()[-2000:]}")
            if time.monotonic() > deadline:
                raise LabError(f"{self.name} not ready in time:\n{self.console()[-2000:]}")
            time.sleep(0.05)
        if "LAB-ERROR" in self.console():
            raise LabError(f"{self.name}: {self.console()[-2000:]}")
        self.ready = time.monotonic()

    def wait_console(
        self, pattern: str, after: int = 0, timeout: float = 60, every: float = 0.02
    ) -> re.Match[str]:
        """Wait for `pattern` in the console past offset `after`, reading it every `every`
        seconds; the match is on the whole text, so `m.end()` is a good `after` for the next
        wait."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.console(), after)
            if m:
                return m
            if time.monotonic() > deadline:
                raise LabError(f"{self.name}: no {pattern!r} in time:\n{self.console()[-2000:]}")
            time.sleep(every)

    def work_report(self, conn: libvirt.virConnect, vcpu: int) -> tuple[int, int]:
        """Wait for the vCPU's next LAB-WORK report and read its vCPU time as it arrives:
        (iterations done, vCPU ns). The guest reports between bursts, so the two agree to
        the few ms the host takes to see the line."""
        dom = conn.lookupByName(self.name)
        m = self.wait_console(
            rf"LAB-WORK vcpu={vcpu} iters=(\d+) .*\n", len(self.console()), timeout=10, every=0.002
        )
        # One vCPU: the domain's exact time; else vcpus(), in 10 ms ticks.
        ns = vcpu_time_ns(dom) if self.spec.vcpus == 1 else int(dom.vcpus()[0][vcpu][2])
        return int(m[1]), ns

    def phases(self) -> list[tuple[float, int]]:
        """(guest uptime, load) of each phase the guest has entered, from its console."""
        return [
            (float(m[2]), int(m[1]))
            for m in re.finditer(r"LAB-PHASE n=\d+ load=(\d+) uptime=([\d.]+)", self.console())
        ]


class PinWatcher:
    """Polls the pins of all domains from libvirt in a thread and records every change.

    The agent's audit log is checked against these records, so the poll must be much faster
    than the agent's interval; a vCPU that appears or vanishes is not a change.
    """

    def __init__(self, uri: str = URI, every: float = 0.1) -> None:
        self.uri = uri
        self.every = every
        self.changes: list[PinChange] = []
        self.current: dict[tuple[str, int], frozenset[int]] = {}
        self.first_seen: dict[tuple[str, int], frozenset[int]] = {}
        self.errors: list[str] = []
        self._last_start: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pin-watcher", daemon=True)

    def __enter__(self) -> PinWatcher:
        self._conn = libvirt.open(self.uri)
        self._poll()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self._poll()
            self._conn.close()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._poll()

    def _poll(self) -> None:
        started = time.monotonic()
        try:
            now = pins_of(self._conn)
        except libvirt.libvirtError as e:
            self.errors.append(str(e))
            return
        t = time.monotonic()
        with self._lock:
            since = self._last_start if self._last_start is not None else t
            for key, cpus in now.items():
                old = self.current.get(key)
                if old is None:
                    self.first_seen.setdefault(key, cpus)
                elif old != cpus:
                    self.changes.append(PinChange(t, key[0], key[1], old, cpus, since))
            self.current = now
            self._last_start = started

    def pins_at(self, domain: str, vcpu: int, at: float) -> frozenset[int] | None:
        """The pins a vCPU had at monotonic time `at`, from what was seen of it."""
        with self._lock:
            pins = self.first_seen.get((domain, vcpu))
            for c in self.changes:
                if c.at > at:
                    break
                if (c.domain, c.vcpu) == (domain, vcpu):
                    pins = c.new
            return pins

    def snapshot(self) -> tuple[list[PinChange], dict[tuple[str, int], frozenset[int]]]:
        with self._lock:
            return list(self.changes), dict(self.current)


@dataclass(frozen=True)
class PinChange:
    at: float
    domain: str
    vcpu: int
    old: frozenset[int]
    new: frozenset[int]
    # The change happened after this (the start of the poll before) and before `at` (the end
    # of the poll that saw it). A poll can take seconds on a busy host, when libvirtd is
    # starting a guest, so `at` alone may lag the change by more than any fixed slack.
    since: float | None = None

    def __str__(self) -> str:
        return f"{self.domain}/{self.vcpu} {format_cpus(self.old)}->{format_cpus(self.new)}"


def pcpu_view(
    util: Mapping[int, float], pins: Mapping[tuple[str, int], frozenset[int]], width: int = 40
) -> list[str]:
    """Text bars: one line per pCPU with its utilization and the vCPUs pinned to it alone."""
    lines: list[str] = []
    unpinned = sorted(f"{d}/{v}" for (d, v), cpus in pins.items() if len(cpus) != 1)
    for cpu in sorted(util):
        pct = max(0.0, min(100.0, util[cpu]))
        filled = round(pct / 100 * width)
        on = sorted(f"{d}/{v}" for (d, v), cpus in pins.items() if cpus == {cpu})
        bar = "#" * filled + "." * (width - filled)
        lines.append(f"pCPU{cpu} [{bar}] {util[cpu]:5.1f}%  {' '.join(on)}")
    if unpinned:
        lines.append(f"unpinned: {' '.join(unpinned)}")
    return lines


# ---------------------------------------------------------------------------------------------
# command line


def _parse_cli_guest(i: int, arg: str) -> GuestSpec:
    """ "70" (load), "70:p1" (load pinned to pCPU 1), "80:10,0:10" (pattern), "+v2" suffix."""
    vcpus = 1
    if m := re.search(r"\+v(\d+)$", arg):
        vcpus = int(m[1])
        arg = arg[: m.start()]
    pin: int | None = None
    if m := re.search(r":p(\d+)$", arg):
        pin = int(m[1])
        arg = arg[: m.start()]
    name = f"{PREFIX}cli-{i}"
    if ":" in arg:
        return GuestSpec(name, pattern=arg, vcpus=vcpus, pin=pin)
    return GuestSpec(name, load=int(arg), vcpus=vcpus, pin=pin)


def _status(lab: Lab, window: float) -> None:
    m = lab.measure(window)
    for line in pcpu_view(m.pcpu, lab.pins()):
        print(line)
    print(f"sd={sd(m.pcpu.values()):.1f}")
    for name, load in sorted(m.domain.items()):
        print(f"  {name}: {load:.1f}% vCPU time")


def down(lab: Lab | None = None) -> None:
    """Destroy every lab guest, then stop the libvirtd the lab started (in that order: QEMU
    processes outlive a stopped libvirtd)."""
    daemon = Libvirtd()
    if daemon.answering():
        lab = lab or Lab()
        # A connection left idle through the rest of a test session may have been dropped by
        # libvirtd (no event loop answers its keepalives): start from a fresh one.
        lab.close()
        lab.destroy_prefix()
        lab.close()
    daemon.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Drive the vcpusched libvirt lab.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="start libvirtd if none answers")
    sub.add_parser("down", help="destroy lab-* guests and stop the lab's libvirtd")
    sub.add_parser("calibrate", help="measure the load loop speed again")
    p = sub.add_parser("start", help="start guests lab-cli-N")
    p.add_argument("guests", nargs="+", metavar="LOAD[:pN][+vN]|PATTERN")
    p = sub.add_parser("status", help="pCPU utilization and pins")
    p.add_argument("--window", type=float, default=3.0)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "down":
            down()
            return 0
        Libvirtd().start()
        lab = Lab()
        if args.cmd == "calibrate":
            (lab.state / "calibration.json").unlink(missing_ok=True)
            print(f"work_per_ms={lab.work_per_ms():.1f}")
        elif args.cmd == "start":
            specs = [_parse_cli_guest(i, a) for i, a in enumerate(args.guests)]
            for g in lab.start(specs):
                print(f"{g.name} ready in {g.ready - g.created:.1f} s")
        elif args.cmd == "status":
            _status(lab, args.window)
    except (LabError, libvirt.libvirtError) as e:
        print(f"lab: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
