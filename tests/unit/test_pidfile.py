from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vcpusched.pidfile import PidFile, PidfileError


def test_second_holder_refused_and_release_removes(tmp_path: Path) -> None:
    path = tmp_path / "a.pid"
    with PidFile(path):
        assert path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(PidfileError, match=rf"another instance is running \(pid {os.getpid()}"):
            PidFile(path).acquire()
    assert not path.exists()


def test_stale_file_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "a.pid"
    path.write_text("999999\n")
    with PidFile(path):
        assert path.read_text() == f"{os.getpid()}\n"


def test_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        PidfileError, match=r"cannot create pidfile .*/none/deeper/a\.pid: No such file"
    ):
        PidFile(tmp_path / "none" / "deeper" / "a.pid").acquire()


def test_missing_directory_of_its_own_is_made(tmp_path: Path) -> None:
    with PidFile(tmp_path / "run" / "a.pid"):
        assert (tmp_path / "run").is_dir()


def test_symlink_at_the_path_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("root's data\n")
    link = tmp_path / "a.pid"
    link.symlink_to(target)
    with pytest.raises(
        PidfileError, match=r"cannot create pidfile .*a\.pid: it is a symbolic link"
    ):
        PidFile(link, strict_owner=False).acquire()
    assert target.read_text() == "root's data\n"


def test_fifo_and_hard_link_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "a.pid"
    os.mkfifo(fifo)
    with pytest.raises(PidfileError, match="not a regular file"):
        PidFile(fifo, strict_owner=False).acquire()
    other = tmp_path / "other"
    other.write_text("x\n")
    linked = tmp_path / "b.pid"
    os.link(other, linked)
    with pytest.raises(PidfileError, match="has other hard links"):
        PidFile(linked, strict_owner=False).acquire()
    assert other.read_text() == "x\n"


def test_directory_others_can_write_is_refused_when_strict(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(
        PidfileError, match=r"must not be writable by group or others, mode is 1777"
    ):
        PidFile(shared / "a.pid", strict_owner=True).acquire()
    assert not (shared / "a.pid").exists()
    if os.geteuid() == 0:
        mine = tmp_path / "mine"
        mine.mkdir()
        os.chown(mine, 1000, 1000)
        with pytest.raises(PidfileError, match="must be owned by root, is owned by uid 1000"):
            PidFile(mine / "a.pid", strict_owner=True).acquire()


def test_relative_path_refused(tmp_path: Path) -> None:
    with pytest.raises(PidfileError, match=r"must be an absolute path, got 'run/a\.pid'"):
        PidFile(Path("run/a.pid")).acquire()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
def test_a_device_at_the_path_is_refused_and_left_alone(tmp_path: Path) -> None:
    null = tmp_path / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    with pytest.raises(PidfileError, match="not a regular file"):
        PidFile(null, strict_owner=False).acquire()
    assert stat.S_ISCHR(os.lstat(null).st_mode)


def test_release_never_unlinks_what_is_not_ours(tmp_path: Path) -> None:
    path = tmp_path / "a.pid"
    pidfile = PidFile(path, strict_owner=False)
    pidfile.acquire()
    # Someone replaced the path while we ran: ours is the file we hold, not the path.
    path.unlink()
    path.write_text("someone else's\n")
    pidfile.release()
    assert path.read_text() == "someone else's\n"
