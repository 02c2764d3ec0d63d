from __future__ import annotations

import os
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
