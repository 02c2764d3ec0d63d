"""Run ansible/site.yml and read back which tasks and handlers ran, and how.

ansible-core alone has no JSON callback, so this reads the default callback's text: a
`TASK [role : name]` or `RUNNING HANDLER [role : name]` header, then one `status: [host]` line
per host (and loop item), then the PLAY RECAP.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
BIN = Path(sys.executable).parent

_HEADER = re.compile(r"^(TASK|RUNNING HANDLER) \[(?:[^\]:]+ : )?(.+?)\] \*+$")
_STATUS = re.compile(r"^(ok|changed|skipping|fatal|failed|unreachable): \[([^\]]+)\]")
_RECAP = re.compile(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$")


@dataclass
class Step:
    kind: str  # "task" or "handler"
    name: str
    statuses: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return "changed" in self.statuses

    @property
    def failed(self) -> bool:
        return any(s in ("fatal", "failed", "unreachable") for s in self.statuses)

    @property
    def ran(self) -> bool:
        return any(s != "skipping" for s in self.statuses)


@dataclass
class PlayRun:
    args: list[str]
    returncode: int
    output: str
    seconds: float
    steps: list[Step]
    recap: dict[str, int]

    def step(self, name: str, kind: str = "task") -> Step | None:
        found = [s for s in self.steps if s.name == name and s.kind == kind]
        return found[-1] if found else None

    def handler(self, name: str) -> Step | None:
        return self.step(name, kind="handler")

    def statuses(self, name: str, kind: str = "task") -> list[str]:
        """How each host fared in the last task (or handler) so named; [] if it never started."""
        found = self.step(name, kind)
        return [] if found is None else found.statuses

    def changed_steps(self) -> list[str]:
        return [f"{s.kind}:{s.name}" for s in self.steps if s.changed]

    def failed_steps(self) -> list[str]:
        return [s.name for s in self.steps if s.failed]

    def summary(self) -> str:
        lines = [f"$ {' '.join(self.args)}  (rc={self.returncode}, {self.seconds:.1f} s)"]
        lines += [f"  {s.kind:7} {','.join(s.statuses) or '-':10} {s.name}" for s in self.steps]
        lines.append(f"  recap {self.recap}")
        return "\n".join(lines)


def parse(output: str) -> tuple[list[Step], dict[str, int]]:
    steps: list[Step] = []
    recap: dict[str, int] = {}
    in_recap = False
    for raw in output.splitlines():
        line = raw.rstrip()
        if line.startswith("PLAY RECAP"):
            in_recap = True
            continue
        if in_recap:
            match = _RECAP.match(line)
            if match:
                for pair in match.group(2).split():
                    key, _, value = pair.partition("=")
                    recap[key] = recap.get(key, 0) + int(value)
            continue
        header = _HEADER.match(line)
        if header:
            kind = "handler" if header.group(1) == "RUNNING HANDLER" else "task"
            steps.append(Step(kind, header.group(2)))
            continue
        status = _STATUS.match(line)
        if status and steps:
            steps[-1].statuses.append(status.group(1))
    return steps, recap


def run_playbook(
    workdir: Path,
    inventory: Path,
    variables: dict[str, Any],
    *extra: str,
    timeout: float = 600,
    playbook: Path = ANSIBLE_DIR / "site.yml",
    collections: Path | None = None,
) -> PlayRun:
    """ansible-playbook `playbook` (site.yml) with `variables` as extra vars (JSON, so types
    survive); `collections`: an ANSIBLE_COLLECTIONS_PATH to find installed collections in."""
    vars_file = workdir / "vars.json"
    vars_file.write_text(json.dumps(variables, indent=2))
    args = [
        str(BIN / "ansible-playbook"),
        "-i",
        str(inventory),
        "-e",
        f"@{vars_file}",
        *extra,
        str(playbook),
    ]
    env = dict(os.environ)
    env.update(
        {
            "PATH": f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
            "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "ANSIBLE_LOCAL_TEMP": str(workdir / "ansible-local"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(workdir / "cp"),
        }
    )
    if collections is not None:
        env["ANSIBLE_COLLECTIONS_PATH"] = str(collections)
    started = time.monotonic()
    result = subprocess.run(
        args,
        cwd=ANSIBLE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    steps, recap = parse(output)
    shown = [a if not a.startswith("@") else "@vars.json" for a in args[1:]]
    return PlayRun(["ansible-playbook", *shown], result.returncode, output, seconds, steps, recap)
