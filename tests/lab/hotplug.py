"""Take a pCPU offline for a test, and put everything back: the CPU and the cpusets.

With cgroup v1 (the lab's libvirtd uses the v1 cpuset controller), the kernel removes a CPU
that goes offline from every cpuset's `cpuset.cpus` and does not give it back when the CPU
returns. Measured on the lab: afterwards libvirt refuses every pin to that CPU ("Unable to
write to '.../vcpu0/cpuset.cpus': Permission denied"), and a guest pinned there would not
start. `restore()` brings every CPU back and copies the root cpuset's CPUs down libvirt's
`machine` subtree, leaving the `vcpuN` groups (the pins) alone. Standard library only, so
that tests/lab/teardown.sh can run it without the venv: `python3 tests/lab/hotplug.py restore`.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CPU = Path("/sys/devices/system/cpu")
CPUSET = Path("/sys/fs/cgroup/cpuset")
_VCPU_GROUP = re.compile(r"vcpu\d+")


def can_offline(cpu: int) -> bool:
    """Whether `cpu` has an `online` switch (CPU 0 often has none)."""
    return (CPU / f"cpu{cpu}" / "online").exists()


def is_online(cpu: int) -> bool:
    path = CPU / f"cpu{cpu}" / "online"
    return not path.exists() or path.read_text().strip() == "1"


def set_online(cpu: int, on: bool) -> None:
    (CPU / f"cpu{cpu}" / "online").write_text("1" if on else "0")


def online_all() -> list[int]:
    """Bring every offline CPU back; returns those it brought back."""
    back = []
    for path in sorted(CPU.glob("cpu[0-9]*/online")):
        if path.read_text().strip() != "1":
            path.write_text("1")
            back.append(int(path.parent.name[3:]))
    return back


def repair_cpusets() -> list[str]:
    """Give libvirt's v1 cpusets back the CPUs that offlining took from them; returns the
    groups rewritten. Nothing to do on cgroup v2, which recomputes them itself."""
    root = CPUSET / "cpuset.cpus"
    if not root.exists():
        return []
    rewritten = []
    for top in sorted(CPUSET.glob("machine*")):
        if not top.is_dir():
            continue
        for dirpath, dirnames, _ in os.walk(top):  # parents before their children
            dirnames[:] = [d for d in dirnames if not _VCPU_GROUP.fullmatch(d)]
            group = Path(dirpath)
            parent = (group.parent / "cpuset.cpus").read_text().strip()
            mine = group / "cpuset.cpus"
            if mine.read_text().strip() != parent:
                mine.write_text(parent)
                rewritten.append(str(group.relative_to(CPUSET)))
    return rewritten


def restore() -> tuple[list[int], list[str]]:
    return online_all(), repair_cpusets()


@contextmanager
def offline(cpu: int) -> Iterator[None]:
    """`cpu` offline for the block; every CPU and cpuset restored afterwards, whatever happens."""
    try:
        set_online(cpu, False)
        yield
    finally:
        restore()


def main(argv: list[str]) -> int:
    if argv != ["restore"]:
        print("usage: hotplug.py restore", file=sys.stderr)
        return 2
    try:
        cpus, groups = restore()
    except OSError as exc:
        print(f"hotplug: {exc}", file=sys.stderr)
        return 1
    if cpus:
        print(f"hotplug: brought cpus {','.join(map(str, cpus))} back online")
    if groups:
        print(f"hotplug: restored the cpus of {len(groups)} cpusets under {CPUSET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
