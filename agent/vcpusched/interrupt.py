"""Ctrl-C for the commands: a quiet exit 130, wherever the SIGINT lands.

Python turns a SIGINT into a KeyboardInterrupt in whatever Python code runs next, and some
code swallows it: a finalizer (libvirt's handles free themselves in `__del__`, where an
exception is only printed, "Exception ignored in ...") or a callback from C. So the handler
also keeps a flag, and the command line exits 130 once the flag is set, whatever became of
the exception. `run` replaces this handler with its own (stop after the cycle).
"""

from __future__ import annotations

import signal
import sys

# Not `typing.TYPE_CHECKING`: typing alone takes longer to import than all of this module.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import FrameType

EXIT_INTERRUPTED = 130

_seen = False


def _handler(_signum: int, _frame: FrameType | None) -> None:
    global _seen
    _seen = True
    raise KeyboardInterrupt


def _unraisable(args: sys.UnraisableHookArgs) -> None:
    # The one exception a finalizer may swallow quietly: the flag carries it on.
    if isinstance(args.exc_value, KeyboardInterrupt):
        return
    sys.__unraisablehook__(args)


def install() -> None:
    """Take SIGINT from now on: call it first, before the command line's modules load.

    A SIGINT the caller set to be ignored (`trap '' INT`, a background job of a shell without
    job control) stays ignored, as for any program.
    """
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _handler)
        sys.unraisablehook = _unraisable


def interrupted() -> bool:
    """Whether a SIGINT came since `install()`, even if its exception was swallowed."""
    return _seen


def check() -> None:
    """Raise KeyboardInterrupt if a SIGINT came whose exception was swallowed."""
    if _seen:
        raise KeyboardInterrupt
