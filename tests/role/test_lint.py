"""ansible-lint over the role and the playbook: production profile, no network."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.role.playbook import ANSIBLE_DIR, BIN

pytestmark = pytest.mark.role


def test_ansible_lint_production_profile_offline() -> None:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    # --offline repeats what .ansible-lint says, so the run stays offline even if it is edited.
    result = subprocess.run(
        [
            str(BIN / "ansible-lint"),
            "--offline",
            "-c",
            ".ansible-lint",
            "roles/vcpusched",
            "site.yml",
        ],
        cwd=ANSIBLE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Profile 'production' was required, and it passed" in output, output
