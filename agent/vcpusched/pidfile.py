"""A pidfile held by an fcntl lock: a second instance is refused, a stale file is not.

The lock lives as long as the open file description, so it dies with the process however the
process dies; a file left behind by a SIGKILL holds no lock and is simply taken over. (The
lockfile-based pidfile shipped with python-daemon cannot tell a stale file from a live one.)
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType


class PidfileError(Exception):
    pass


class PidFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        # The pidfile has a directory of its own (the unit's RuntimeDirectory, where only it
        # is writable); without systemd, make it.
        try:
            self.path.parent.mkdir(mode=0o755, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise PidfileError(f"cannot create pidfile {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise PidfileError(
                    f"another instance is running (pid {holder}, pidfile {self.path})"
                ) from None
            raise PidfileError(f"cannot lock pidfile {self.path}: {exc.strerror}") from None
        self.fd = fd
        self.write()

    def write(self) -> None:
        """Record the current PID; called again after daemonizing changes it."""
        assert self.fd is not None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        # Unlink while still holding the lock, so no newcomer can lock a file we then delete.
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> PidFile:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _holder(fd: int) -> str:
    # The holder writes its PID just after taking the lock: a loser of a simultaneous start
    # can look in between, so give it a moment before calling the PID unknown.
    for _ in range(50):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "unknown"
