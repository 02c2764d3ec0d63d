#!/bin/sh
# Safety net after a role test that was cut short: stop each container the fixture recorded
# (by the PID in its nspawn.pid, and only if that PID is still our systemd-nspawn on that tree),
# then delete the run's directory. The fixture does the same itself on a normal exit.
set -u

WORKROOT=${VCPUSCHED_ROLE_WORKDIR:-$(cd "$(dirname "$0")/../.." && pwd)/.role}
[ -d "$WORKROOT" ] || exit 0

ours() {  # ours PID ROOTFS: is PID a systemd-nspawn started on ROOTFS?
    tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null | grep -qx "$2" &&
        tr '\0' '\n' <"/proc/$1/cmdline" | head -n 1 | grep -q 'systemd-nspawn$'
}

for run in "$WORKROOT"/run-*; do
    [ -d "$run" ] || continue
    if [ -f "$run/nspawn.pid" ]; then
        pid=$(cat "$run/nspawn.pid")
        if ours "$pid" "$run/rootfs"; then
            echo "role teardown: stopping container (systemd-nspawn pid $pid)"
            kill -TERM "$pid"
            i=0
            while ours "$pid" "$run/rootfs" && [ $i -lt 150 ]; do sleep 0.2; i=$((i + 1)); done
            ours "$pid" "$run/rootfs" && kill -KILL "$pid"
        fi
    fi
    if grep -q " $run/" /proc/self/mountinfo; then
        echo "role teardown: $run still has mounts, not deleting it" >&2
        continue
    fi
    rm -rf "$run"
done
exit 0
