"""A booted Debian 12 systemd host for the role test: systemd-nspawn over a fresh rootfs copy.

The container shares the host's network namespace (no bridge or DHCP to set up), so its sshd
listens on a port of its own on 127.0.0.1, and Ansible reaches it with plain SSH and a key made
for the run. The host's PID 1 is not systemd, hence `--register=no --keep-unit`: without them
nspawn asks the (absent) host systemd for a scope and fails.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

STOP_TIMEOUT = 30.0


class ContainerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` in our mount namespace (there should be none)."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            mount_point = line.split()[4]
            if mount_point == prefix or mount_point.startswith(prefix + "/"):
                found.append(mount_point)
    return found


def nspawn_alive(pid: int, root: Path) -> bool:
    """True if `pid` is still the systemd-nspawn we started on `root` (not a reused PID)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and argv[0].endswith(b"systemd-nspawn") and str(root).encode() in argv


@dataclass
class Container:
    workdir: Path
    name: str
    port: int = field(default_factory=free_port)
    pid: int | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def root(self) -> Path:
        return self.workdir / "rootfs"

    @property
    def key(self) -> Path:
        return self.workdir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        # The run's own file rather than /dev/null, so that whatever ssh writes about host
        # keys stays in the run's directory.
        return self.workdir / "known_hosts"

    @property
    def pidfile(self) -> Path:
        return self.workdir / "nspawn.pid"

    @property
    def console(self) -> Path:
        return self.workdir / "console.log"

    def unpack(self, tarball: Path) -> None:
        self.root.mkdir(parents=True)
        subprocess.run(
            ["tar", "-C", str(self.root), "--numeric-owner", "--zstd", "-xpf", str(tarball)],
            check=True,
        )
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.name, "-f", str(self.key)],
            check=True,
        )
        ssh_dir = self.root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        authorized = ssh_dir / "authorized_keys"
        shutil.copyfile(self.key.with_suffix(".pub"), authorized)
        authorized.chmod(0o600)
        (self.root / "etc/ssh/sshd_config.d/vcpusched-port.conf").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\n"
        )

    def boot(self, timeout: float = 90.0) -> tuple[str, str]:
        """Start the container; return systemd's state once booted and any failed units."""
        command = [
            "systemd-nspawn",
            "--directory",
            str(self.root),
            "--boot",
            "--register=no",
            "--keep-unit",
            f"--machine={self.name}",
            "--console=pipe",
        ]
        with open(self.console, "wb") as console:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.process = process
        self.pid = process.pid
        self.pidfile.write_text(f"{process.pid}\n")
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise ContainerError(
                    f"systemd-nspawn exited with {process.returncode}: {self.console.read_text()}"
                )
            probe = self.ssh("true", check=False, timeout=10)
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise ContainerError(f"no ssh on port {self.port} after {timeout:.0f} s")
            time.sleep(0.5)
        state = self.ssh(
            "timeout 60 systemctl is-system-running --wait", check=False, timeout=90
        ).stdout.strip()
        failed = self.ssh("systemctl --failed --no-legend --plain", check=False).stdout.strip()
        # "degraded" (some unit failed) is tolerated and reported: the tests themselves show
        # whether what the role needs (sshd, journald, rsyslog, libvirtd) works.
        if state not in ("running", "degraded"):
            raise ContainerError(f"container booted into state {state!r}; failed units:\n{failed}")
        return state, failed

    def ssh_command(self, command: str) -> list[str]:
        return [
            "ssh",
            "-i",
            str(self.key),
            "-p",
            str(self.port),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=5",
            "root@127.0.0.1",
            command,
        ]

    def ssh(
        self, command: str, *, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.ssh_command(command),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise ContainerError(
                f"{command!r} failed with {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def read(self, path: str) -> str:
        return self.ssh(f"cat {shlex.quote(path)}").stdout

    def inventory(self) -> str:
        ssh_args = f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=no"
        return (
            "[hypervisors]\n"
            f"target ansible_host=127.0.0.1 ansible_port={self.port} ansible_user=root "
            f"ansible_ssh_private_key_file={self.key} ansible_ssh_common_args='{ssh_args}'\n"
        )

    def stop(self) -> int | None:
        """One SIGTERM makes nspawn halt the container cleanly; SIGKILL only if that stalls.

        Returns nspawn's exit status when it was our child (0: the container powered off).
        """
        status = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    status = self.process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            else:
                status = self.process.returncode
        elif self.pid is not None and nspawn_alive(self.pid, self.root):
            # Recorded by an earlier run, so not our child: poll instead of wait.
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while nspawn_alive(self.pid, self.root) and time.monotonic() < deadline:
                time.sleep(0.2)
            if nspawn_alive(self.pid, self.root):
                os.kill(self.pid, signal.SIGKILL)
        self.process = None
        self.pid = None
        self.pidfile.unlink(missing_ok=True)
        return status

    def remove(self) -> None:
        left = mounts_under(self.workdir)
        if left:
            raise ContainerError(f"refusing to delete {self.workdir}: still mounted: {left}")
        shutil.rmtree(self.workdir, ignore_errors=True)
