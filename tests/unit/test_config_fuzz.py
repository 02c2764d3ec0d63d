"""Random documents and values through `check-config`: a verdict and a one-line reason, never
a traceback."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vcpusched.cli import main

KEYS = [
    "interval",
    "thresholds",
    "min_gain",
    "smt_pair_capacity",
    "exclude",
    "cpus",
    "uri",
    "pidfile",
    "dry_run",
    "restore_on_exit",
    "log_level",
    "syslog_facility",
    "metrics",
    "textfile_dir",
    "listen",
    "high",
    "low",
    "target",
    "bogus",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        [
            "0-3",
            "^1",
            "1-0",
            "info",
            "daemon",
            "/run/x.pid",
            "qemu:///system",
            "1e400",
            ".inf",
            "nan",
            "~",
            "yes",
            "0x10",
            "127.0.0.1:9101",
            "[::1]:0",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=4),
    ),
    max_leaves=12,
)
documents = st.one_of(values, st.dictionaries(st.sampled_from(KEYS), values, max_size=8))


def _check(text: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_bytes(text)
        path.chmod(0o644)
        code = main(["check-config", "--quiet", str(path)])
    _out, err = capsys.readouterr()
    assert code in (0, 3)
    assert "Traceback" not in err
    if code == 3:
        lines = err.splitlines()
        assert lines, "rejected without a reason"
        assert all(line.startswith(f"vcpusched: {path}: ") for line in lines)
    else:
        assert err == ""


@given(documents)
@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_random_documents(capsys: pytest.CaptureFixture[str], document: object) -> None:
    try:
        text = yaml.safe_dump(document).encode()
    except (yaml.YAMLError, ValueError):
        return
    _check(text, capsys)


@given(st.binary(max_size=200))
@settings(
    max_examples=800, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_random_bytes(capsys: pytest.CaptureFixture[str], raw: bytes) -> None:
    _check(raw, capsys)


@given(st.text(alphabet=st.sampled_from(list("{}[]:,-#&*!|>'\"%@` \n\tabc01.")), max_size=60))
@settings(
    max_examples=800, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_yaml_syntax_soup(capsys: pytest.CaptureFixture[str], text: str) -> None:
    _check(text.encode(), capsys)
