"""Run the real `vcpusched` entry point, stopping the process (SIGSTOP) when it first enters
a given function, so that a test can send a real SIGINT at that exact point of start-up.

    python -m tests.lifecycle.stop_at FILE:QUALNAME [COUNT] -- vcpusched arguments...

FILE is the end of the function's file name (`cli.py`), QUALNAME its qualified name
(`LibvirtHost._connect`, `<module>` for a module's import); COUNT picks its n-th call
(default 1). The profile hook goes in before anything of vcpusched is imported.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType


def main() -> int:
    split = sys.argv.index("--")
    target, *count = sys.argv[1:split]
    where, _, qualname = target.partition(":")
    wanted = int(count[0]) if count else 1
    sys.argv = ["vcpusched", *sys.argv[split + 1 :]]
    seen = 0

    def hook(frame: FrameType, event: str, _arg: object) -> None:
        nonlocal seen
        code = frame.f_code
        if event != "call" or code.co_qualname != qualname:
            return
        if not code.co_filename.endswith(where):
            return
        seen += 1
        if seen == wanted:
            sys.setprofile(None)
            os.kill(os.getpid(), signal.SIGSTOP)  # the test's SIGINT lands here

    sys.setprofile(hook)
    from vcpusched.__main__ import main as entry

    return entry()


if __name__ == "__main__":
    raise SystemExit(main())
