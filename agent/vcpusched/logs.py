"""Logging: the journal under systemd, stderr in the foreground, syslog when detached, and the
audit line format.

Audit lines are `event key=value ...`. Values come partly from libvirt (domain names), which a
guest's owner may choose: anything beyond a plain token is JSON-quoted, so a name holding a
newline or `key=value` text cannot forge a line or a field. `parse_event` reads a line back;
the journal fields and `vcpusched audit` both rest on it, so they agree with the text.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import sys
import time
from typing import Any, ClassVar

LOGGER = "vcpusched"
IDENT = "vcpusched"
# Overridable for containers that mount the syslog socket elsewhere, and for tests.
SYSLOG_SOCKET = os.environ.get("VCPUSCHED_SYSLOG_SOCKET", "/dev/log")

_PLAIN = re.compile(r"[A-Za-z0-9_.:@/+,<>\[\]\-]+")
_EVENT = re.compile(r"[a-z][a-z0-9_-]*")
_FIELD = re.compile(r' ([A-Za-z_][A-Za-z0-9_]*)=("(?:[^"\\]|\\.)*"|[^ "]*)')
# Journal field names the journal or python-systemd's handler already use for something else:
# an audit key of that name goes in as VCPUSCHED_<KEY> instead.
_JOURNAL_OWN = frozenset(
    {
        "MESSAGE",
        "MESSAGE_ID",
        "PRIORITY",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
        "CODE_ARGS",
        "ERRNO",
        "EXCEPTION_TEXT",
        "EXCEPTION_INFO",
        "LOGGER",
        "THREAD_NAME",
        "PROCESS_NAME",
        "SYSLOG_FACILITY",
        "SYSLOG_IDENTIFIER",
        "SYSLOG_PID",
        "SYSLOG_TIMESTAMP",
        "SYSLOG_RAW",
        "DOCUMENTATION",
        "TID",
        "UNIT",
        "USER_UNIT",
        "INVOCATION_ID",
    }
)
EVENT_FIELD = "VCPUSCHED_EVENT"

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


def parse_event(text: str) -> tuple[str, dict[str, str]] | None:
    """`(name, fields)` of an audit line, values unquoted; None if `text` is not one.

    Generic on purpose: a key added to a line later is read like every other.
    """
    head, sep, rest = text.partition(" ")
    if not _EVENT.fullmatch(head):
        return None
    fields: dict[str, str] = {}
    pos = 0
    rest = sep + rest
    while pos < len(rest):
        match = _FIELD.match(rest, pos)
        if match is None:
            return None
        key, value = match.groups()
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                return None
        fields[key] = value
        pos = match.end()
    return head, fields


def journal_fields(name: str, fields: dict[str, str]) -> dict[str, str]:
    """Journal fields of an audit line: VCPUSCHED_EVENT, then each key upper-cased."""
    out = {EVENT_FIELD: name}
    for key, value in fields.items():
        field = re.sub(r"[^A-Z0-9_]", "_", key.upper())
        if field in _JOURNAL_OWN or not field[:1].isalpha() or field.startswith("VCPUSCHED_"):
            field = "VCPUSCHED_" + field
        out[field[:64]] = value
    return out


class _JournalFields(logging.Filter):
    """Puts the line's fields on the record, where python-systemd's handler picks up every
    upper-case attribute as a journal field."""

    def filter(self, record: logging.LogRecord) -> bool:
        parsed = parse_event(record.getMessage())
        if parsed is not None:
            for field, value in journal_fields(*parsed).items():
                setattr(record, field, value)
        return True


def under_journald() -> bool:
    """stderr is the journal stream systemd gave us (systemd.exec(5): compare device and inode,
    since a child of a service inherits JOURNAL_STREAM with stderr redirected elsewhere)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (
        device.isdigit()
        and inode.isdigit()
        and (stat.st_dev, stat.st_ino)
        == (
            int(device),
            int(inode),
        )
    )


def journal_handler(facility: str) -> logging.Handler | None:
    """python-systemd's JournalHandler with the audit fields added; None when the module is
    missing (python3-systemd, or systemd-python from PyPI)."""
    try:
        from systemd import journal
    except ImportError:
        return None
    code = logging.handlers.SysLogHandler.facility_names[facility]
    handler: logging.Handler = journal.JournalHandler(
        SYSLOG_IDENTIFIER=IDENT, SYSLOG_FACILITY=str(code)
    )
    handler.addFilter(_JournalFields())
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


class _StderrFormatter(logging.Formatter):
    """`2026-12-01T08:40:00.123+00:00 vcpusched[PID]: LEVEL message`: a time with milliseconds
    and its UTC offset, so `vcpusched audit` can place the line on the clock exactly."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        local = time.localtime(record.created)
        offset = time.strftime("%z", local)
        return (
            time.strftime("%Y-%m-%dT%H:%M:%S", local)
            + f".{int(record.msecs):03d}{offset[:3]}:{offset[3:]}"
        )


def setup(target: str, level: str, facility: str) -> None:
    """Send the `vcpusched` logger to `target`: stderr, syslog, or auto.

    auto: under journald, the journal itself (each audit line with its fields), or stderr when
    python-systemd is missing; journald forwards either to syslog, so nothing goes there
    directly. Otherwise stderr, plus syslog when a syslog socket exists.
    Raises OSError when syslog was asked for and cannot be reached.
    """
    log.handlers.clear()
    log.propagate = False
    log.setLevel(level.upper())
    handlers: list[logging.Handler] = []
    journald = target == "auto" and under_journald()
    chosen = journal_handler(facility) if journald else None
    if chosen is not None:
        handlers.append(chosen)
    elif target in ("stderr", "auto"):
        stream = logging.StreamHandler(sys.stderr)
        if journald:
            stream.setFormatter(_PriorityFormatter("%(message)s"))
        else:
            line = "%(asctime)s " + IDENT + "[%(process)d]: %(levelname)s %(message)s"
            stream.setFormatter(_StderrFormatter(line))
        handlers.append(stream)
    want_syslog = target == "syslog" or (
        target == "auto" and not journald and os.path.exists(SYSLOG_SOCKET)
    )
    if want_syslog:
        handlers.append(syslog_handler(facility))
    for handler in handlers:
        log.addHandler(handler)


class _PriorityFormatter(logging.Formatter):
    """stderr under journald without python-systemd: `<N>` prefixes journald turns into
    levels (sd-daemon(3))."""

    PRIORITY: ClassVar[dict[int, int]] = {
        logging.DEBUG: 7,
        logging.INFO: 6,
        logging.WARNING: 4,
        logging.ERROR: 3,
        logging.CRITICAL: 2,
    }

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def syslog_handler(facility: str) -> logging.Handler:
    code = logging.handlers.SysLogHandler.facility_names[facility]
    handler = logging.handlers.SysLogHandler(address=SYSLOG_SOCKET, facility=code)
    # SysLogHandler adds no program name; %(process)d is read per record, so it is right
    # after a fork as well.
    handler.setFormatter(logging.Formatter(IDENT + "[%(process)d]: %(levelname)s %(message)s"))
    return handler
