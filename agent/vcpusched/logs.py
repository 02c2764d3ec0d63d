"""Logging: stderr in the foreground, syslog when detached, and the audit line format.

Audit lines are `event key=value ...`. Values come partly from libvirt (domain names), which a
guest's owner may choose: anything beyond a plain token is JSON-quoted, so a name holding a
newline or `key=value` text cannot forge a line or a field.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import sys
from typing import Any, ClassVar

LOGGER = "vcpusched"
IDENT = "vcpusched"
# Overridable for containers that mount the syslog socket elsewhere, and for tests.
SYSLOG_SOCKET = os.environ.get("VCPUSCHED_SYSLOG_SOCKET", "/dev/log")

_PLAIN = re.compile(r"[A-Za-z0-9_.:@/+,<>\[\]\-]+")

log = logging.getLogger(LOGGER)


def quote(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    text = str(value)
    return text if _PLAIN.fullmatch(text) else json.dumps(text, ensure_ascii=True)


def event(name: str, **fields: Any) -> str:
    """`name key=value ...` with every value quoted where needed."""
    parts = [name] + [f"{k}={quote(v)}" for k, v in fields.items() if v is not None]
    return " ".join(parts)


class _JournalFormatter(logging.Formatter):
    """stderr under systemd: `<N>` priority prefixes that journald turns into levels."""

    PRIORITY: ClassVar[dict[int, int]] = {
        logging.DEBUG: 7,
        logging.INFO: 6,
        logging.WARNING: 4,
        logging.ERROR: 3,
        logging.CRITICAL: 2,
    }

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def setup(target: str, level: str, facility: str) -> None:
    """Send the `vcpusched` logger to `target`: stderr, syslog, or auto.

    auto: under journald (JOURNAL_STREAM set) stderr alone, since journald forwards to syslog;
    otherwise stderr plus syslog when a syslog socket exists.
    Raises OSError when syslog was asked for and cannot be reached.
    """
    log.handlers.clear()
    log.propagate = False
    log.setLevel(level.upper())
    handlers: list[logging.Handler] = []
    if target in ("stderr", "auto"):
        stream = logging.StreamHandler(sys.stderr)
        if os.environ.get("JOURNAL_STREAM"):
            stream.setFormatter(_JournalFormatter("%(message)s"))
        else:
            stream.setFormatter(
                logging.Formatter(
                    "%(asctime)s " + IDENT + "[%(process)d]: %(levelname)s %(message)s",
                    "%Y-%m-%dT%H:%M:%S",
                )
            )
        handlers.append(stream)
    want_syslog = target == "syslog" or (
        target == "auto" and not os.environ.get("JOURNAL_STREAM") and os.path.exists(SYSLOG_SOCKET)
    )
    if want_syslog:
        handlers.append(syslog_handler(facility))
    for handler in handlers:
        log.addHandler(handler)


def syslog_handler(facility: str) -> logging.Handler:
    code = logging.handlers.SysLogHandler.facility_names[facility]
    handler = logging.handlers.SysLogHandler(address=SYSLOG_SOCKET, facility=code)
    # SysLogHandler adds no program name; %(process)d is read per record, so it is right
    # after a fork as well.
    handler.setFormatter(logging.Formatter(IDENT + "[%(process)d]: %(levelname)s %(message)s"))
    return handler
