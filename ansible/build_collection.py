#!/usr/bin/env python3
"""Build the role into an Ansible collection artifact (run on the controller).

The collection `vcpusched.vcpusched` holds the role `vcpusched` unchanged, with the role's
README as its own. ansible-galaxy builds it from a staging copy, so that the repository's
`ansible/` directory (playbook, inventory, wheels) stays out of the artifact.

    python3 ansible/build_collection.py                 # -> ansible/dist/vcpusched-vcpusched-*.tar.gz
    ansible-galaxy collection install ansible/dist/vcpusched-vcpusched-0.1.0.tar.gz
    # then in a play:  roles: [vcpusched.vcpusched.vcpusched]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROLE = HERE / "roles/vcpusched"
META = HERE / "collection"


def build(out: Path, galaxy: str = "ansible-galaxy") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vcpusched-collection-") as tmp:
        stage = Path(tmp) / "vcpusched"
        shutil.copytree(META, stage)
        shutil.copytree(
            ROLE, stage / "roles/vcpusched", ignore=shutil.ignore_patterns("__pycache__")
        )
        shutil.copyfile(ROLE / "README.md", stage / "README.md")
        result = subprocess.run(
            [galaxy, "collection", "build", "--force", "--output-path", str(out), str(stage)],
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        raise SystemExit(f"build_collection: ansible-galaxy failed: {result.stderr.strip()}")
    built = sorted(out.glob("vcpusched-vcpusched-*.tar.gz"), key=lambda p: p.stat().st_mtime)
    return built[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "dist", help="output directory")
    default_galaxy = Path(sys.executable).parent / "ansible-galaxy"
    parser.add_argument(
        "--galaxy",
        default=str(default_galaxy) if default_galaxy.exists() else "ansible-galaxy",
        help="the ansible-galaxy command",
    )
    args = parser.parse_args()
    print(build(args.out.resolve(), args.galaxy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
