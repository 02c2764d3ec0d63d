"""A pidfile held by an fcntl lock: a second instance is refused, a stale file is not.

The lock lives as long as the open file description, so it dies with the process however the
process dies; a file left behind by a SIGKILL holds no lock and is simply taken over. (The
lockfile-based pidfile shipped with python-daemon cannot tell a stale file from a live one.)
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from pathlib import Path
from types import TracebackType


class PidfileError(Exception):
    def __init__(self, message: str, *, running: bool = False) -> None:
        super().__init__(message)
        # Another instance holds the lock (a distinct exit code), rather than a bad path.
        self.running = running


def check_directory(directory: Path, *, strict_owner: bool | None = None) -> None:
    """As root, the pidfile's directory must be root's and writable by no one else: whoever
    can write there can plant a symlink or a FIFO where root will open the pidfile."""
    if strict_owner is None:
        strict_owner = os.geteuid() == 0
    info = os.stat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise PidfileError(f"pidfile directory {directory} is not a directory")
    if not strict_owner:
        return
    if info.st_uid != 0:
        raise PidfileError(
            f"pidfile directory {directory} must be owned by root, is owned by uid {info.st_uid}"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PidfileError(
            f"pidfile directory {directory} must not be writable by group or others, "
            f"mode is {stat.S_IMODE(info.st_mode):04o}"
        )


def open_regular(path: Path, flags: int, mode: int = 0o644) -> int:
    """Open `path` without following a symlink, and only if it is a regular file of one link."""
    # O_NONBLOCK: a FIFO planted at the path must not hang the open.
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(info.st_mode) else "has other hard links"
        raise PidfileError(f"refusing pidfile {path}: {what}")
    return fd


class PidFile:
    def __init__(self, path: Path, *, strict_owner: bool | None = None) -> None:
        self.path = path
        self.fd: int | None = None
        self.strict_owner = strict_owner

    def acquire(self) -> None:
        if not self.path.is_absolute():
            raise PidfileError(f"pidfile must be an absolute path, got {str(self.path)!r}")
        # The pidfile has a directory of its own (the unit's RuntimeDirectory, where only it
        # is writable); without systemd, make it.
        try:
            self.path.parent.mkdir(mode=0o755, exist_ok=True)
            check_directory(self.path.parent, strict_owner=self.strict_owner)
            fd = open_regular(self.path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            reason = exc.strerror
            if exc.errno == errno.ELOOP:
                reason = "it is a symbolic link"
            raise PidfileError(f"cannot create pidfile {self.path}: {reason}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise PidfileError(
                    f"another instance is running (pid {holder}, pidfile {self.path})",
                    running=True,
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
        # Unlink while still holding the lock, so no newcomer can lock a file we then delete;
        # and only the very file we hold (same device and inode, seen without following a
        # link): whatever else has taken the path since is not ours to delete.
        try:
            now, ours = os.lstat(self.path), os.fstat(self.fd)
            if stat.S_ISREG(now.st_mode) and (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino):
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
