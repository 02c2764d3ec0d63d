"""The `target` fixture: a booted systemd container plus helpers to converge and inspect it."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.role.container import Container
from tests.role.playbook import ANSIBLE_DIR, REPO, PlayRun, run_playbook

HERE = Path(__file__).resolve().parent
WORKROOT = Path(os.environ.get("VCPUSCHED_ROLE_WORKDIR", REPO / ".role"))
DEFAULTS = ANSIBLE_DIR / "roles/vcpusched/defaults/main.yml"
# Every ansible-playbook output of the last run, for reading after a failure.
PLAYS_LOG = WORKROOT / "last-run-plays.log"
CONSOLE_LOG = WORKROOT / "last-run-console.log"


def role_defaults() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(DEFAULTS.read_text())
    return loaded


def config_document(variables: dict[str, Any]) -> dict[str, Any]:
    """What /etc/vcpusched.yaml must hold for these role variables (defaults filled in)."""
    merged = {**role_defaults(), **variables}
    return {
        "interval": merged["vcpusched_interval"],
        "thresholds": {
            "high": merged["vcpusched_thresholds_high"],
            "target": merged["vcpusched_thresholds_target"],
            "low": merged["vcpusched_thresholds_low"],
        },
        "min_gain": merged["vcpusched_min_gain"],
        "smt_pair_capacity": merged["vcpusched_smt_pair_capacity"],
        "exclude": merged["vcpusched_exclude"],
        "cpus": merged["vcpusched_cpus"],
        "uri": merged["vcpusched_uri"],
        "pidfile": merged["vcpusched_pidfile"],
        "dry_run": merged["vcpusched_dry_run"],
        "restore_on_exit": merged["vcpusched_restore_on_exit"],
        "pin_emulator": merged["vcpusched_pin_emulator"],
        "log_level": merged["vcpusched_log_level"],
        "syslog_facility": merged["vcpusched_syslog_facility"],
        "metrics": {
            "textfile_dir": merged["vcpusched_metrics_textfile_dir"],
            "listen": merged["vcpusched_metrics_listen"],
        },
    }


def build_wheels(source: Path, out: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            str(ANSIBLE_DIR / "build_wheels.py"),
            "--source",
            str(source),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return out


@dataclass
class Target:
    container: Container
    workdir: Path
    inventory: Path
    wheels: Path
    timings: list[tuple[str, float]] = field(default_factory=list)
    runs: list[PlayRun] = field(default_factory=list)
    # Role variables the host was last converged with; None until the first converge passed.
    converged: dict[str, Any] | None = None
    # The collection built from the role and installed with ansible-galaxy, and a play using it.
    collections: Path | None = None
    collection_play: Path | None = None

    def play(
        self, variables: dict[str, Any], *extra: str, label: str, from_collection: bool = False
    ) -> PlayRun:
        """Apply the repository's ansible/site.yml, or with `from_collection` the role as
        installed from the collection artifact (see `install_collection`)."""
        where: dict[str, Any] = {}
        if from_collection:
            where = {"playbook": self.collection_play, "collections": self.collections}
        run = run_playbook(
            self.workdir,
            self.inventory,
            {"vcpusched_wheel_dir": str(self.wheels), **variables},
            *extra,
            **where,
        )
        self.runs.append(run)
        self.timings.append((label, run.seconds))
        with open(PLAYS_LOG, "a") as log:
            log.write(f"===== {label}\n{run.summary()}\n{run.output}\n")
        return run

    def require_converged(self) -> dict[str, Any]:
        if self.converged is None:
            pytest.fail("the first converge did not pass, so this step cannot be judged")
        return self.converged

    def sh(self, command: str) -> str:
        return self.container.ssh(command).stdout

    def service(self) -> dict[str, str]:
        out = self.sh(
            "systemctl show vcpusched -p ActiveState -p SubState -p UnitFileState -p MainPID"
        )
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self) -> int:
        return int(self.service()["MainPID"])

    def journal(self, pid: int) -> list[str]:
        """The agent's own messages from process `pid`, as journald recorded them."""
        out = self.sh(f"journalctl --no-pager -o cat -u vcpusched _PID={pid}")
        return out.splitlines()

    def wait_for_line(self, pid: int, pattern: str, timeout: float = 30.0) -> str:
        """The first journal message of `pid` matching `pattern` (log lines may trail a bit)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.journal(pid):
                if regex.search(line):
                    return line
            if time.monotonic() > deadline:
                shown = "\n".join(self.journal(pid)[-20:])
                pytest.fail(
                    f"no journal line /{pattern}/ from pid {pid} in {timeout:.0f} s:\n{shown}"
                )
            time.sleep(0.5)

    def syslog(self, pid: int) -> list[str]:
        """The agent's lines in rsyslog's /var/log/syslog, anchored on the `vcpusched[PID]:` tag
        (Ansible's own module log lines in syslog mention the same words)."""
        out = self.sh(f"grep -E '^[^ ]+ [^ ]+ vcpusched\\[{pid}\\]: ' /var/log/syslog || true")
        return out.splitlines()

    def checksum(self, path: str) -> str:
        return self.sh(f"sha256sum {path}").split()[0]

    def host_state(self) -> dict[str, str]:
        """What a failed run must leave untouched."""
        return {
            "config": self.checksum("/etc/vcpusched.yaml"),
            "unit": self.checksum("/etc/systemd/system/vcpusched.service"),
            "wheels": self.sh("cd /var/cache/vcpusched/wheels && sha256sum *.whl"),
            "venv": self.sh("cat /opt/vcpusched/vcpusched-wheel.sha256"),
            "pid": self.service()["MainPID"],
            "active": self.service()["ActiveState"],
        }


COLLECTION_PLAY = """---
- name: Roll out vcpusched from the installed collection
  hosts: hypervisors
  become: true
  roles:
    - role: vcpusched.vcpusched.vcpusched
"""


def install_collection(workdir: Path) -> tuple[Path, Path, Path]:
    """Build the collection artifact with ansible-galaxy, install it into a collections path
    of its own, and write a play naming the role by its collection name. Returns the
    artifact, the collections path and the play."""
    subprocess.run(
        [sys.executable, str(ANSIBLE_DIR / "build_collection.py"), "--out", str(workdir / "dist")],
        check=True,
        capture_output=True,
        text=True,
    )
    (artifact,) = (workdir / "dist").glob("vcpusched-vcpusched-*.tar.gz")
    collections = workdir / "collections"
    galaxy = Path(sys.executable).parent / "ansible-galaxy"
    subprocess.run(
        [str(galaxy), "collection", "install", "--offline", "-p", str(collections), str(artifact)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "ANSIBLE_HOME": str(workdir / "ansible-home")},
    )
    play = workdir / "collection-site.yml"
    play.write_text(COLLECTION_PLAY)
    return artifact, collections, play


def local_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _line(label: str, seconds: float) -> str:
    return f"  {label:<50} {seconds:6.1f} s"


# Filled by the fixture, shown by pytest_terminal_summary in conftest.py (so it is printed
# even though pytest captures the tests' output).
TIMINGS: list[str] = []


def _report(before: list[str], target: Target | None, after: list[str]) -> None:
    plays = [] if target is None else [_line(label, s) for label, s in target.timings]
    TIMINGS.extend([*before, *plays, *after])


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    if os.geteuid() != 0:
        pytest.fail("the role test needs root: it boots a systemd-nspawn container")
    started = time.monotonic()
    lines: list[str] = []
    setup = subprocess.run(
        ["sh", str(HERE / "setup.sh")], capture_output=True, text=True, check=False
    )
    if setup.returncode != 0:
        pytest.fail(f"tests/role/setup.sh failed:\n{setup.stderr}")
    tarball = Path(setup.stdout.strip().splitlines()[-1])
    lines.append(_line(f"setup.sh ({tarball.name})", time.monotonic() - started))

    workdir = WORKROOT / f"run-{os.getpid()}"
    container = Container(workdir, name=f"vcpusched-role-{os.getpid()}")
    if workdir.exists():  # left by an earlier run cut short that had the same PID
        if container.pidfile.exists():
            container.pid = int(container.pidfile.read_text())
            container.stop()
        container.remove()
    workdir.mkdir(parents=True)
    PLAYS_LOG.unlink(missing_ok=True)
    target: Target | None = None
    try:
        step = time.monotonic()
        wheels = build_wheels(REPO, workdir / "wheels")
        lines.append(_line("build wheels on the controller", time.monotonic() - step))
        step = time.monotonic()
        container.unpack(tarball)
        lines.append(_line("unpack rootfs", time.monotonic() - step))
        step = time.monotonic()
        state, failed = container.boot()
        lines.append(
            _line(f"boot until ssh and is-system-running ({state})", time.monotonic() - step)
        )
        if failed:
            lines.append(f"  failed units in the container: {failed}")
        step = time.monotonic()
        _, collections, collection_play = install_collection(workdir)
        lines.append(_line("build + install the collection", time.monotonic() - step))
        inventory = workdir / "inventory"
        inventory.write_text(container.inventory())
        target = Target(container, workdir, inventory, wheels)
        target.collections, target.collection_play = collections, collection_play
        yield target
    finally:
        step = time.monotonic()
        status = container.stop()
        if container.console.exists():
            shutil.copyfile(container.console, CONSOLE_LOG)
        container.remove()
        after = [
            _line(f"stop container (nspawn exit {status}), delete it", time.monotonic() - step),
            _line("whole role test (fixture lifetime)", time.monotonic() - started),
        ]
        _report(lines, target, after)
