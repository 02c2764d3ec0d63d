#!/usr/bin/env python3
"""Build the wheel directory the vcpusched role installs from (run on the Ansible controller).

The directory holds the agent's wheel plus a wheel for every dependency except those the role
installs from the target's own distribution (see DISTRO_PROVIDED), so hosts need no package
index. Only pure-Python wheels are accepted: a compiled wheel would be tied to the controller's
Python and libraries rather than the target's.

    python3 ansible/build_wheels.py                # -> ansible/wheels/
    python3 ansible/build_wheels.py --out DIR --source PROJECT_DIR
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Installed by the role from Debian (python3-libvirt, python3-yaml, python3-systemd,
# python3-prometheus-client) into a virtualenv that sees the system site-packages: the libvirt
# binding must match the host's libvirt, and the compiled ones could not be trusted on the
# target if built on the controller; the Prometheus client comes along so that one version of
# it serves the agent and anything else on the host.
DISTRO_PROVIDED = frozenset({"libvirt-python", "pyyaml", "systemd-python", "prometheus-client"})
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(wheel: Path) -> list[str]:
    """The wheel's unconditional Requires-Dist entries (extras are not installed)."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode()
    found = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        spec = line.partition(":")[2].strip()
        if "extra ==" in spec:
            continue
        found.append(spec)
    return found


def pip_wheel(out: Path, args: list[str]) -> None:
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(out), *args]
    subprocess.run(command, check=True)


def build(source: Path, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    # A stale wheel left here would be shipped to every host.
    for old in out.glob("*.whl"):
        old.unlink()
    pip_wheel(out, ["--no-deps", str(source)])
    (agent,) = out.glob("vcpusched-*.whl")
    needed = []
    for spec in requirements(agent):
        match = _NAME.match(spec)
        if match and normalize(match.group(1)) not in DISTRO_PROVIDED:
            needed.append(spec)
    if needed:
        pip_wheel(out, needed)
    wheels = sorted(out.glob("*.whl"))
    compiled = [w.name for w in wheels if not w.name.endswith("-none-any.whl")]
    if compiled:
        raise SystemExit(
            f"build_wheels: compiled wheels {', '.join(compiled)} would only fit the "
            "controller's Python; install them on the hosts from the distribution instead "
            "(role variable vcpusched_os_packages) and add them to DISTRO_PROVIDED"
        )
    return wheels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=HERE.parent, help="project directory")
    parser.add_argument("--out", type=Path, default=HERE / "wheels", help="wheel directory")
    args = parser.parse_args()
    for wheel in build(args.source.resolve(), args.out.resolve()):
        print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
