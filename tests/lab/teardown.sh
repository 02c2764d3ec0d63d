#!/bin/sh
# Safety net for a run cut short: destroy the lab's guests, then stop the libvirtd the lab
# started (by its recorded PID). Does nothing when there is nothing to stop.
set -u
cd "$(dirname "$0")/../.."
pidfile="${VCPUSCHED_LAB_DIR:-.lab}/run/libvirtd.pid"
[ -s "$pidfile" ] || exit 0
[ -x .venv/bin/python ] || exit 0
.venv/bin/python tests/lab/lab.py down
