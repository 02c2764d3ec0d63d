"""Real QEMU guests inside the role's container, so the agent installed there has work to do.

The guests are the lab's (tests/lab: Debian's kernel and a busybox initramfs with a load
program), run by the container's own libvirtd under TCG. nspawn mounts the cgroup v1
controllers read-only, so libvirt is told to use none (`cgroup_controllers = [ ]`): vCPU
pinning works without them (notes in tests/role/README are from trying it).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tests.lab.lab import QEMU, GuestSpec, Lab, read_proc_stat, state_dir, utilization
from tests.role.container import Container

# Inside the container.
LAB_DIR = "/var/lib/vcpusched-lab"
QEMU_CONF = """# written by the vcpusched role test: nspawn's cgroup controllers are read-only
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
cgroup_controllers = [ ]
"""
# Work units per ms when the lab was never calibrated on this machine: only the ratio of the
# guests' loads matters here (pCPU 0 must be over-full), not their exact values.
FALLBACK_WORK_PER_MS = 2.0e6
_VCPUPIN = re.compile(r"^\s*(\d+)\s+(\S+)\s*$")


# Points of pCPU time, summed over the pCPUs, that other work may take before the guests start.
# After QUIET_WAIT the test goes on: a busy host is a fact the test must live with, and the
# agent's own rule (nothing onto a full pCPU) decides what it may do there.
QUIET = 30.0
QUIET_WAIT = 120.0


def wait_quiet_host() -> float:
    """Wait, at most QUIET_WAIT, until other jobs leave the pCPUs; returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < QUIET_WAIT:
        before = read_proc_stat()
        time.sleep(2.0)
        if sum(utilization(before, read_proc_stat()).values()) <= QUIET:
            break
    return time.monotonic() - started


def work_per_ms() -> float:
    path = state_dir() / "calibration.json"
    try:
        return float(json.loads(path.read_text())["work_per_ms"])
    except (OSError, ValueError, KeyError):
        return FALLBACK_WORK_PER_MS


def prepare(container: Container, extra_packages: str = "") -> float:
    """Install QEMU (and `extra_packages`) in the container, configure its libvirtd for
    guests without cgroups, and copy the lab's guest image in. Returns the seconds it took."""
    started = time.monotonic()
    guest = state_dir() / "guest"
    if not (guest / "vmlinux").exists():
        raise FileNotFoundError(f"{guest}/vmlinux missing: run tests/lab/setup.sh (make lab-setup)")
    target = container.root / LAB_DIR.lstrip("/")
    (target / "guest").mkdir(parents=True, exist_ok=True)
    (target / "run/console").mkdir(parents=True, exist_ok=True)
    for name in ("vmlinux", "initramfs.gz"):
        shutil.copyfile(guest / name, target / "guest" / name)
    # No service may start while the packages install (policy-rc.d, as in Debian's chroots):
    # node_exporter would listen on every address of the shared network namespace.
    container.ssh(
        "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d"
        " && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q"
        f" --no-install-recommends qemu-system-x86 {extra_packages} >/tmp/guests-apt.log 2>&1;"
        " status=$?; rm -f /usr/sbin/policy-rc.d; exit $status",
        timeout=600,
    )
    (container.root / "etc/libvirt/qemu.conf").write_text(QEMU_CONF)
    container.ssh("systemctl restart libvirtd && virsh -c qemu:///system version >/dev/null")
    return time.monotonic() - started


@dataclass
class Guests:
    container: Container
    lab: Lab

    def start(self, specs: list[GuestSpec], timeout: float = 90) -> None:
        """Start transient guests and wait until each one's load runs."""
        work = work_per_ms()
        for spec in specs:
            xml = self.lab.domain_xml(spec, work)
            path = self.container.root / LAB_DIR.lstrip("/") / f"{spec.name}.xml"
            path.write_text(xml)
            self.container.ssh(f"virsh -c qemu:///system create {LAB_DIR}/{spec.name}.xml")
        deadline = time.monotonic() + timeout
        for spec in specs:
            console = self.container.root / LAB_DIR.lstrip("/") / "run/console" / f"{spec.name}.log"
            while "LAB-READY" not in (console.read_text() if console.exists() else ""):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{spec.name} did not start its load in {timeout:.0f} s")
                time.sleep(0.2)

    def destroy(self, name: str) -> None:
        self.container.ssh(f"virsh -c qemu:///system destroy {shlex.quote(name)}")

    def pins(self, names: list[str]) -> tuple[float, dict[tuple[str, int], str]]:
        """libvirt's pins of each vCPU of `names` (running ones), and the container's clock
        (seconds since the epoch) halfway through reading them."""
        script = "date +%s.%N; " + "; ".join(
            f"echo @{n}; virsh -c qemu:///system vcpupin {shlex.quote(n)} 2>/dev/null"
            for n in names
        )
        script += "; date +%s.%N"
        lines = self.container.ssh(script).stdout.splitlines()
        first, last = float(lines[0]), float(lines[-1])
        pins: dict[tuple[str, int], str] = {}
        domain = ""
        for line in lines[1:-1]:
            if line.startswith("@"):
                domain = line[1:]
            elif (match := _VCPUPIN.match(line)) and domain:
                pins[(domain, int(match[1]))] = match[2]
        return (first + last) / 2, pins


def lab_for_container() -> Lab:
    """A Lab whose domain XML points at the guest image and consoles inside the container."""
    lab = Lab(state=Path(LAB_DIR))
    assert QEMU == "/usr/bin/qemu-system-x86_64"
    return lab
