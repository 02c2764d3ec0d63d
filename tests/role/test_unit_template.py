"""The role ships its own unit template and manual page (a role copied alone must work); the
unit rendered with the role's defaults is exactly the project's etc/vcpusched.service, so the two
cannot drift.

Rendered by ansible-core itself (the template module, run locally), not by a look-alike.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.role.playbook import ANSIBLE_DIR, BIN, REPO

ROLE = ANSIBLE_DIR / "roles/vcpusched"


def render(tmp_path: Path, *extra: str) -> str:
    dest = tmp_path / "vcpusched.service"
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
        "ANSIBLE_HOME": str(tmp_path / "home"),
        "ANSIBLE_NOCOLOR": "1",
    }
    result = subprocess.run(
        [
            str(BIN / "ansible"),
            "localhost",
            "-i",
            "localhost,",
            "-c",
            "local",
            "-m",
            "ansible.builtin.template",
            "-a",
            f"src={ROLE / 'templates/vcpusched.service.j2'} dest={dest} mode=0644",
            # The interpreter running the tests; discovery might pick another one.
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            "-e",
            f"@{ROLE / 'defaults/main.yml'}",
            "-e",
            f"@{ROLE / 'vars/main.yml'}",
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return dest.read_text()


def without_header(unit: str) -> str:
    """The rendered unit less its leading comment block (the ansible_managed note)."""
    lines = unit.splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "".join(lines)


def test_role_has_no_link_out_of_itself() -> None:
    for path in ROLE.rglob("*"):
        if path.is_symlink():
            pytest.fail(f"{path} is a symlink: a role copied alone would break")


def test_rendered_unit_with_defaults_is_the_shipped_unit(tmp_path: Path) -> None:
    shipped = (REPO / "etc/vcpusched.service").read_text()
    assert without_header(render(tmp_path)) == shipped


def test_rendered_unit_follows_the_virtualenv(tmp_path: Path) -> None:
    unit = without_header(render(tmp_path, "-e", "vcpusched_venv=/srv/agent//"))
    shipped = (REPO / "etc/vcpusched.service").read_text()
    assert unit == shipped.replace("/opt/vcpusched/", "/srv/agent/")
    assert "ExecStart=/srv/agent/bin/vcpusched run " in unit


def test_role_man_page_is_the_projects() -> None:
    """The role ships its own copy of the manual page (no link out of the role)."""
    assert (ROLE / "files/vcpusched.8").read_text() == (REPO / "man/vcpusched.8").read_text()
