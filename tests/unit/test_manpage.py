"""The shipped vcpusched(8) is what the argument parser says today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vcpusched import cli
from vcpusched.manpage import render

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "man" / "vcpusched.8"


def test_shipped_man_page_matches_the_parser() -> None:
    assert SHIPPED.read_text() == render(), (
        "man/vcpusched.8 drifted from the parser: "
        "run `.venv/bin/python -m vcpusched.manpage > man/vcpusched.8`"
    )


def test_man_page_names_every_command_option_and_exit_code() -> None:
    page = render()
    for command in ("run", "check-config", "status", "reload", "bench"):
        assert f".SS {command}\n" in page
    for option in ("\\-\\-pidfile", "\\-\\-once", "\\-\\-timeout", "\\-\\-pid"):
        assert option in page
    for code, _ in cli.EXIT_CODES:
        assert f".TP\n\\fB{code}\\fR\n" in page


def test_help_lists_the_exit_codes() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vcpusched", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "exit codes:" in out
    for code, what in cli.EXIT_CODES:
        assert f"  {code:<4} {what}" in out


def test_the_unit_names_the_page_the_role_installs() -> None:
    unit = (REPO / "etc" / "vcpusched.service").read_text()
    assert "Documentation=man:vcpusched(8)" in unit
    assert (REPO / "ansible/roles/vcpusched/files/vcpusched.8").resolve() == SHIPPED
