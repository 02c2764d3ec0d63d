"""`vcpusched audit` on logs written here: every format, restarts, domains that come and go,
several hosts in one file, both field vocabularies, and bad input."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from vcpusched import audit
from vcpusched.audit import AuditError, Entry, parse_time, pins_at, read
from vcpusched.cli import main
from vcpusched.logs import event

T0 = parse_time("2026-12-01T08:00:00+00:00")


def syslog(host: str, pid: int, seconds: float, line: str, level: str = "") -> str:
    """An rsyslog line (Debian's RFC 3339 format)."""
    at = audit.datetime.fromtimestamp(T0 + seconds, audit.datetime.now().astimezone().tzinfo)
    return f"{at.isoformat(timespec='microseconds')} {host} vcpusched[{pid}]: {level}{line}"


def entries(text: str) -> list[Entry]:
    return list(read(io.StringIO(text), "test"))


def pins(text: str, seconds: float) -> dict[tuple[str, str, int], tuple[str | None, str]]:
    found = pins_at(entries(text), T0 + seconds)
    return {
        (p.host, p.domain, p.vcpu): (p.as_dict()["pcpus"], p.basis.split(";")[0].split(" ")[0])
        for p in found
    }


# One host's day: a start, a guest placed and moved, a restart, a reload, the guest gone and
# back with the same name, another guest's vCPU known only from the from= of its first move;
# a second host's lines and another program's lines in between.
LOG = "\n".join(
    [
        syslog("hv1", 10, 0, event("start", version="0.1.0", interval=1.0, dry_run=0)),
        syslog("hv1", 10, 1, event("new", domain="web-1", vcpus=2)),
        syslog("hv1", 10, 1, event("new", domain="db", vcpus=1)),
        syslog("hv1", 10, 1, event("connected", uri="qemu:///system", pcpus="0-1")),
        "2026-12-01T08:00:01.500000+00:00 hv1 sshd[99]: vcpusched[10]: move domain=web-1 vcpu=0",
        syslog("hv1", 10, 2, event("place", domain="web-1", vcpu=0, to=1, vcpu_load=50.0)),
        syslog("hv2", 20, 2.5, event("move", domain="web-1", vcpu=0, to=3, reason="relieve")),
        syslog("hv1", 10, 3, event("place", domain="web-1", vcpu=1, **{"from": "0-1"}, to=0)),
        syslog("hv1", 10, 10, event("move", domain="web-1", vcpu=0, **{"from": 1}, to=0)),
        syslog("hv1", 10, 20, event("stop", signal="SIGTERM", moves=3)),
        syslog("hv1", 11, 30, event("start", version="0.1.0", interval=1.0, dry_run=0)),
        syslog("hv1", 11, 31, event("new", domain="web-1", vcpus=2)),
        syslog("hv1", 11, 31, event("new", domain="db", vcpus=1)),
        syslog("hv1", 11, 31, event("connected", uri="qemu:///system", pcpus="0-1")),
        syslog("hv1", 11, 40, event("reload", changed="dry_run:False->True")),
        syslog("hv1", 11, 41, event("move", domain="web-1", vcpu=1, to=1, dry_run=1)),
        syslog("hv1", 11, 50, event("gone", domain="web-1")),
        syslog("hv1", 11, 60, event("new", domain="web-1", vcpus=1)),
        syslog("hv1", 11, 70, event("move", domain="db", vcpu=0, **{"from": 1}, to=0)),
        syslog("hv1", 11, 80, event("new", domain="late", vcpus=1)),
        syslog("hv1", 11, 81, event("place", domain="late", vcpu=0, **{"from": "0-1"}, to=1)),
        syslog("hv1", 11, 4000, event("move", domain="db", vcpu=0, **{"from": 0}, to=1)),
    ]
)


def test_pins_follow_places_and_moves_per_host() -> None:
    at = pins(LOG, 5)
    assert at[("hv1", "web-1", 0)] == ("1", "place")
    assert at[("hv1", "web-1", 1)] == ("0", "place")
    assert at[("hv2", "web-1", 0)] == ("3", "move")
    assert pins(LOG, 11)[("hv1", "web-1", 0)] == ("0", "move")


def test_a_vcpu_not_yet_moved_is_known_from_its_first_move() -> None:
    # db/0 was never touched before 08:01:10; that move says it came from pCPU 1.
    assert pins(LOG, 5)[("hv1", "db", 0)] == ("1", "from=")
    assert pins(LOG, 71)[("hv1", "db", 0)] == ("0", "move")


def test_a_domain_that_arrives_later_was_not_there_before() -> None:
    # The roll call of a (re)started agent is no arrival: db was running before 08:00:30.
    assert pins(LOG, 25)[("hv1", "db", 0)] == ("1", "from=")
    assert pins(LOG, 75)[("hv1", "late", 0)] == (None, "not")
    assert pins(LOG, 82)[("hv1", "late", 0)] == ("1", "place")


def test_pins_survive_a_restart_and_say_so() -> None:
    (pin,) = [
        p
        for p in pins_at(entries(LOG), T0 + 35)
        if (p.host, p.domain, p.vcpu) == ("hv1", "web-1", 0)
    ]
    assert pin.as_dict()["pcpus"] == "0"
    assert pin.basis == "move; agent restarted since"


def test_dry_run_lines_change_no_pin() -> None:
    assert pins(LOG, 45)[("hv1", "web-1", 1)] == ("0", "place")


def test_a_gone_domain_has_no_pins_and_its_return_starts_afresh() -> None:
    assert pins(LOG, 55)[("hv1", "web-1", 0)] == (None, "gone")
    # Back with the same name: the old life's pins do not carry over.
    assert pins(LOG, 65)[("hv1", "web-1", 0)] == (None, "not")


def test_moves_in_a_range_with_reasons_and_both_vocabularies(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "syslog"
    path.write_text(LOG + "\n")
    assert (
        main(
            [
                "audit",
                "moves",
                "--since",
                "2026-12-01T08:00:02+00:00",
                "--until",
                "2026-12-01T08:00:10+00:00",
                str(path),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4, lines
    assert lines[0].endswith(" hv1 place web-1/0 ?->1 demand=50.0")  # vcpu_load read as demand
    assert lines[1].endswith(" hv2 move web-1/0 ?->3 reason=relieve")
    assert lines[3].endswith(" hv1 move web-1/0 1->0")
    assert main(["audit", "moves", "--all", "--host", "hv1", "--domain", "web-1", str(path)]) == 0
    shown = capsys.readouterr().out
    assert " hv1 gone domain=web-1" in shown
    assert "dry_run=1" in shown
    assert " start " not in shown  # filtered: a start names no domain


def test_counts_per_domain_and_hour(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "syslog"
    path.write_text(LOG + "\n")
    assert main(["audit", "count", str(path)]) == 0
    out = capsys.readouterr().out
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in out.splitlines()}
    assert rows[("hv1", "web-1")] == ["2", "1"]  # 2 places, 1 move; the dry run not counted
    assert rows[("hv1", "db")] == ["0", "2"]
    assert rows[("hv2", "web-1")] == ["0", "1"]
    hours = [line.split() for line in out.splitlines() if line.startswith("  2026-")]
    assert [h[1:] for h in hours] == [["3", "3"], ["0", "1"]]  # 08:00 and 09:00
    assert "agent hv1: 2 starts, 1 reloads" in out


def test_stderr_and_traditional_syslog_and_journal_json_agree() -> None:
    line = event("move", domain="a b", vcpu=1, **{"from": 0}, to=1, demand=20.0)
    stderr = f"2026-12-01T08:00:02.250+00:00 vcpusched[5]: INFO {line}"
    traditional = f"Dec  1 08:00:02 hv1 vcpusched[5]: INFO {line}"
    record = {
        "__REALTIME_TIMESTAMP": str(int((T0 + 2.25) * 1e6)),
        "_HOSTNAME": "hv1",
        "_PID": "5",
        "SYSLOG_IDENTIFIER": "vcpusched",
        "MESSAGE": line,
        "VCPUSCHED_EVENT": "move",
    }
    other = {**record, "SYSLOG_IDENTIFIER": "sshd"}
    journal = json.dumps(other) + "\n" + json.dumps(record)
    (a,) = entries(stderr)
    (b,) = list(read(io.StringIO(traditional), "t", year=2026))
    (c,) = entries(journal)
    assert (
        a.fields
        == b.fields
        == c.fields
        == {"domain": "a b", "vcpu": "1", "from": "0", "to": "1", "demand": "20.0"}
    )
    assert a.at == c.at == T0 + 2.25
    assert (a.host, c.host) == ("-", "hv1")


def test_journal_byte_array_messages_are_read() -> None:
    record = {
        "__REALTIME_TIMESTAMP": "1",
        "SYSLOG_IDENTIFIER": "vcpusched",
        "MESSAGE": list(b"gone domain=x"),
    }
    (entry,) = entries(json.dumps(record))
    assert (entry.event, entry.fields) == ("gone", {"domain": "x"})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param("just some text\n", "no vcpusched audit lines", id="no-agent-lines"),
        pytest.param('{"MESSAGE": 1}\nnot json\n', "test:2: not journal JSON", id="bad-json"),
        pytest.param("x" * (audit.MAX_LINE + 10), "test:1: line longer than", id="long-line"),
        pytest.param(
            '{"SYSLOG_IDENTIFIER": "vcpusched", "MESSAGE": "gone domain=x"}\n',
            "without __REALTIME_TIMESTAMP",
            id="no-time",
        ),
    ],
)
def test_bad_input_is_one_error(content: str, message: str) -> None:
    with pytest.raises(AuditError, match=message):
        pins_at(read(io.StringIO(content), "test"), T0)


def test_command_line_errors_are_one_line_and_exit_1(tmp_path: Path) -> None:
    (tmp_path / "log").write_text(LOG)
    binary = tmp_path / "binary"
    binary.write_bytes(bytes(range(256)) * 100)
    for args, message in [
        (["pins", str(tmp_path / "absent")], "absent: No such file or directory"),
        (["pins", str(tmp_path)], "Is a directory"),
        (["pins", "--at", "yesterday", str(tmp_path / "log")], "not a time: 'yesterday'"),
        (["moves", str(binary)], "no vcpusched audit lines"),
        (["count", "--since", "2030-01-01", str(tmp_path / "log")], "no vcpusched audit lines"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "vcpusched", "audit", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 1, (args, result)
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("vcpusched: audit: ")
        assert message in result.stderr


class _Generated(io.TextIOBase):
    """A long log made on the fly, so the test itself holds none of it."""

    def __init__(self, moves: int, vcpus: int) -> None:
        self._lines: Iterator[str] = (
            syslog(
                "hv1",
                1,
                i * 0.01,
                event(
                    "move",
                    domain=f"d{i % vcpus}",
                    vcpu=0,
                    **{"from": i % 2},
                    to=(i + 1) % 2,
                    reason="refine",
                ),
            )
            + "\n"
            for i in range(moves)
        )

    def readline(self, size: int | None = -1) -> str:
        return next(self._lines, "")


def test_memory_follows_vcpus_not_log_length() -> None:
    tracemalloc.start()
    try:
        found = pins_at(read(_Generated(100_000, 50), "generated"), T0 + 10**6)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(found) == 50
    # 100,000 lines of ~150 bytes are 15 MB; what is kept is 50 vCPUs' last lines.
    assert peak < 3_000_000, peak
