#!/bin/sh
# Safety net for a run cut short: bring back any pCPU a test took offline (and the cgroup
# cpusets that lost it), destroy the lab's guests, then stop the libvirtd the lab started (by
# its recorded PID). Does nothing when there is nothing to undo.
set -u
cd "$(dirname "$0")/../.."
python3 tests/lab/hotplug.py restore || true
pidfile="${VCPUSCHED_LAB_DIR:-.lab}/run/libvirtd.pid"
[ -s "$pidfile" ] || exit 0
[ -x .venv/bin/python ] || exit 0
.venv/bin/python tests/lab/lab.py down
