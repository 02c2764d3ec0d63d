#!/bin/sh
# The one-command demo (`make demo`): set up the lab, then watch the agent balance real guests.
# Options go to tests/lab/demo.py: --duration S (stop by itself), --interval S.
set -eu
repo=$(cd "$(dirname "$0")/../.." && pwd)
python=${VCPUSCHED_PYTHON:-$repo/.venv/bin/python}
if [ ! -x "$python" ] || [ ! -x "$(dirname "$python")/vcpusched" ]; then
    echo "demo: no venv with vcpusched at $(dirname "$python"); run 'make venv' first" >&2
    exit 1
fi
sh "$repo/tests/lab/setup.sh"
cd "$repo"
exec "$python" -m tests.lab.demo "$@"
