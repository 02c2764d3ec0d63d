from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vcpusched import logs
from vcpusched.logs import event, journal_fields, parse_event, quote


def test_plain_values_are_bare() -> None:
    assert event("move", domain="web1", vcpu=0, load=42.04) == "move domain=web1 vcpu=0 load=42.0"


def test_hostile_domain_names_cannot_forge_fields_or_lines() -> None:
    for name in ["evil\nmove domain=x vcpu=0 from=0 to=1", "a b=c", 'q"uote', "tab\tx", "é"]:
        line = event("move", domain=name, vcpu=0)
        assert "\n" not in line
        assert "\t" not in line
        fields = re.findall(r' (\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)
        assert [k for k, _ in fields] == ["domain", "vcpu"]


def test_quote() -> None:
    assert quote("0-3,8") == "0-3,8"
    assert quote("") == '""'
    assert quote("a=b") == '"a=b"'


# -- reading lines back, and the journal fields derived from them

_KEYS = st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True)
_VALUES = st.one_of(st.text(max_size=20), st.integers(), st.floats(allow_nan=False, width=32))


@given(st.dictionaries(_KEYS, _VALUES, max_size=6), st.sampled_from(["move", "place", "gone"]))
@settings(max_examples=300, deadline=None)
def test_parse_event_reads_back_what_event_wrote(fields: dict[str, Any], name: str) -> None:
    parsed = parse_event(event(name, **fields))
    assert parsed == (
        name,
        {k: json.loads(quote(v)) if quote(v)[:1] == '"' else quote(v) for k, v in fields.items()},
    )


def test_parse_event_rejects_what_is_not_an_audit_line() -> None:
    for text in [
        "",
        "Started vcpusched.service",
        "move domain=",
        "move domain=a junk",
        'move domain="unterminated',
        "MOVE domain=a",
        "move domain=a  vcpu=1",
    ]:
        if text == "move domain=":
            assert parse_event(text) == ("move", {"domain": ""})
            continue
        assert parse_event(text) is None, text


def test_journal_fields_are_derived_from_any_key() -> None:
    line = event(
        "move",
        domain="web 1",
        vcpu=0,
        **{"from": "0-3"},
        to=2,
        demand=41.96,
        reason="relieve",
        priority=3,
        new_key="x",
    )
    assert journal_fields(*parse_event(line)) == {  # type: ignore[misc]
        "VCPUSCHED_EVENT": "move",
        "DOMAIN": "web 1",
        "VCPU": "0",
        "FROM": "0-3",
        "TO": "2",
        "DEMAND": "42.0",
        "REASON": "relieve",
        # A name the journal uses itself keeps the agent's prefix instead.
        "VCPUSCHED_PRIORITY": "3",
        "NEW_KEY": "x",
    }


def test_journal_handler_sends_each_line_with_its_fields() -> None:
    handler = logs.journal_handler("local3")
    assert handler is not None, "systemd-python is installed with the venv ([journal] extra)"
    sent: list[tuple[str, dict[str, Any]]] = []
    handler.send = lambda *text, **fields: sent.append((text[0], fields))  # type: ignore[attr-defined]
    logger = logging.getLogger("vcpusched.test-journal")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info(event("move", domain="web-1", vcpu=1, to=0, reason="refine"))
        logger.warning("not an audit line")
    finally:
        logger.removeHandler(handler)
    (message, fields), (plain, other) = sent
    assert message == "move domain=web-1 vcpu=1 to=0 reason=refine"
    assert fields["VCPUSCHED_EVENT"] == "move"
    assert (fields["DOMAIN"], fields["VCPU"], fields["TO"]) == ("web-1", "1", "0")
    assert fields["SYSLOG_IDENTIFIER"] == "vcpusched"
    assert fields["SYSLOG_FACILITY"] == "19"  # local3, as configured
    assert fields["PRIORITY"] == "6"
    assert plain == "not an audit line"
    assert "VCPUSCHED_EVENT" not in other
    assert other["PRIORITY"] == "4"


@pytest.fixture
def agent_logger() -> Iterator[logging.Logger]:
    """The agent's logger, put back as it was (other tests count on its records)."""
    saved = (list(logs.log.handlers), logs.log.level, logs.log.propagate)
    try:
        yield logs.log
    finally:
        for handler in logs.log.handlers:
            handler.close()
        logs.log.handlers[:] = saved[0]
        logs.log.setLevel(saved[1])
        logs.log.propagate = saved[2]


@pytest.mark.usefixtures("agent_logger")
def test_under_journald_one_handler_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """journald forwards to syslog: a second handler would write every line twice."""
    sock = tmp_path / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(str(sock))
        monkeypatch.setattr(logs, "SYSLOG_SOCKET", str(sock))
        monkeypatch.setattr(logs, "under_journald", lambda: True)
        logs.setup("auto", "info", "daemon")
        assert len(logs.log.handlers) == 1
        assert type(logs.log.handlers[0]).__name__ == "JournalHandler"
        # Without python-systemd: stderr with priority prefixes, still alone.
        monkeypatch.setattr(logs, "journal_handler", lambda facility: None)
        logs.setup("auto", "info", "daemon")
        (only,) = logs.log.handlers
        assert isinstance(only, logging.StreamHandler)
        assert only.format(logging.makeLogRecord({"msg": "x", "levelno": 30})) == "<4>x"
        # Not under journald: stderr plus syslog, as before.
        monkeypatch.setattr(logs, "under_journald", lambda: False)
        logs.setup("auto", "info", "daemon")
        assert len(logs.log.handlers) == 2


def test_journal_stream_must_be_our_stderr(tmp_path: Path) -> None:
    """A child of a service inherits JOURNAL_STREAM with stderr sent elsewhere."""
    out = tmp_path / "err"
    code = "from vcpusched import logs; print(logs.under_journald())"
    with open(out, "w") as err:
        st_ = os.fstat(err.fileno())
        for stream, expected in [(f"{st_.st_dev}:{st_.st_ino}", "True"), ("1:2", "False")]:
            env = {**os.environ, "JOURNAL_STREAM": stream}
            result = subprocess.run(
                [sys.executable, "-c", code],
                stderr=err,
                capture_output=False,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                check=True,
            )
            assert result.stdout.strip() == expected


def test_stderr_time_has_milliseconds_and_offset() -> None:
    formatter = logs._StderrFormatter("%(asctime)s %(message)s")
    record = logging.makeLogRecord({"msg": "start", "created": 1764578400.25, "msecs": 250.0})
    text = formatter.format(record)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.250[+-]\d\d:\d\d start", text), text
