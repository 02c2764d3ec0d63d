#!/bin/sh
# Low-priority work in bursts, as a machine that does other things: `nice -n 19`, one CPU
# burned for BURST seconds in every PERIOD (default 1 in 15), until stopped or for DURATION.
#
#   sh tests/lab/bursty_load.sh [--burst S] [--period S] [--duration S] &
#   make test; kill %1
#
# The e2e judges measure the host work that is not the guests' and discount it; the suite must
# pass with this running beside it.
set -eu
burst=1 period=15 duration=0
while [ $# -gt 0 ]; do
    case $1 in
        --burst) burst=$2; shift 2 ;;
        --period) period=$2; shift 2 ;;
        --duration) duration=$2; shift 2 ;;
        *) echo "usage: $0 [--burst S] [--period S] [--duration S]" >&2; exit 2 ;;
    esac
done
exec nice -n 19 python3 -c '
import sys, time
burst, period, duration = map(float, sys.argv[1:])
start = time.monotonic()
print(f"bursty load: {burst:g} s of one CPU in every {period:g} s, nice 19", file=sys.stderr)
try:
    while not duration or time.monotonic() - start < duration:
        end = time.monotonic() + burst
        while time.monotonic() < end:
            pass
        time.sleep(max(0.0, period - burst))
except KeyboardInterrupt:
    pass
' "$burst" "$period" "$duration"
