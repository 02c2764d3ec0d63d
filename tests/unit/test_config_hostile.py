"""Every hostile input of tests/hostile.py, and the rules behind them, checked in-process.

Time and memory are not asserted here (they vary with the machine); `python -m tests.hostile`
prints them for each input, in a fresh process.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from tests.hostile import CASES, Case, materialize
from vcpusched import config as config_module
from vcpusched.config import Config, ConfigError, load_config, online_problem, validate
from vcpusched.yamlread import YamlError, load

FILE_CASES = [c for c in CASES if not c.run]


@pytest.mark.parametrize("case", FILE_CASES, ids=[c.name for c in FILE_CASES])
def test_hostile_input(tmp_path: Path, case: Case) -> None:
    path = materialize(case, tmp_path)
    if case.code == 0:
        assert isinstance(load_config(path, strict_owner=False), Config)
        return
    with pytest.raises(ConfigError) as info:
        load_config(path, strict_owner=False)
    errors = info.value.errors
    assert len(errors) == 1, errors
    assert case.says in errors[0], errors[0]
    assert "\n" not in errors[0]


def test_cpu_list_bounded_by_the_kernels_ceiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel_max = tmp_path / "kernel_max"
    kernel_max.write_text("7\n")
    monkeypatch.setattr(config_module, "KERNEL_MAX", kernel_max)
    assert validate({"cpus": "0-7"}).cpus == frozenset(range(8))
    with pytest.raises(ConfigError, match=r"pCPU 8 in '4-8' is beyond .* supports \(0-7\)"):
        validate({"cpus": "0,4-8"})
    with pytest.raises(ConfigError, match="pCPU 9 in '9'"):
        validate({"cpus": [1, 9]})
    # Without sysfs, Linux's own largest NR_CPUS.
    monkeypatch.setattr(config_module, "KERNEL_MAX", tmp_path / "absent")
    assert config_module.cpu_ceiling() == 8192


@pytest.mark.parametrize(
    ("spec", "cpus"),
    [("0-3,^2", {0, 1, 3}), (" 1 , 3 - 4 ", {1, 3, 4}), ("5,5,5,5", {5}), ("0-3,^ 0-1", {2, 3})],
)
def test_cpu_list_syntax_unchanged(spec: str, cpus: set[int]) -> None:
    assert validate({"cpus": spec}).cpus == cpus


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("3-1", "invalid cpu range '3-1'"),
        ("1-", "invalid cpu range '1-'"),
        ("x", "'x'"),
        ("-1", "invalid cpu range '-1'"),
        ("1,^1", "cpu list '1,^1' selects no pCPU"),
    ],
)
def test_cpu_list_errors(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate({"cpus": spec})


@pytest.mark.parametrize(
    "key", ["interval", "min_gain", "smt_pair_capacity", "thresholds.high", "thresholds.low"]
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinities_rejected_everywhere(key: str, value: float) -> None:
    document: dict[str, object] = {key: value}
    if "." in key:
        outer, inner = key.split(".")
        document = {outer: {inner: value}}
    with pytest.raises(ConfigError) as info:
        validate(document)
    assert info.value.errors[0].startswith(f"{key}: must be")


def test_huge_integer_in_range_check_is_not_a_float_overflow() -> None:
    with pytest.raises(ConfigError, match=r"interval: must be at least 0\.1 and at most 3600"):
        validate({"interval": 10**300})


def test_duplicate_nested_key_named_with_both_lines() -> None:
    with pytest.raises(
        YamlError, match=r"^thresholds\.high: duplicate key, on line 2 and again on line 3$"
    ):
        load(b"thresholds:\n  high: 95\n  high: 96\n")


def test_quoted_values_are_text_as_written() -> None:
    assert load(b'cpus: "010"\nx: "2:3"\n') == {"cpus": "010", "x": "2:3"}
    assert validate({"cpus": "010"}).cpus == {10}
    # Plain decimals, booleans and null read as YAML 1.2 would read them too.
    assert load(b"a: 10\nb: -2.5\nc: true\nd: null\ne: 1.0e+3\n") == {
        "a": 10,
        "b": -2.5,
        "c": True,
        "d": None,
        "e": 1000.0,
    }


def test_keys_are_names() -> None:
    assert load(b"1: a\nnull: b\n") == {"1": "a", "null": "b"}
    with pytest.raises(YamlError, match="a key must be a name"):
        load(b"? [a]\n: b\n")


def test_utf8_byte_order_mark_is_fine() -> None:
    assert load("\ufeffinterval: 2\n".encode()) == {"interval": 2}


def test_many_errors_are_capped() -> None:
    with pytest.raises(ConfigError) as info:
        validate({f"k{i}": 1 for i in range(100)})
    assert len(info.value.errors) == 21
    assert info.value.errors[-1] == "... and 80 more problems"


def test_nulls_where_null_means_something() -> None:
    # cpus: null is all online pCPUs, the default; empty containers are empty.
    cfg = validate({"cpus": None, "exclude": None, "thresholds": None})
    assert cfg == Config()


def test_cpus_selecting_no_online_pcpu() -> None:
    cfg = validate({"cpus": "8-15"})
    assert online_problem(cfg, frozenset({0, 1})) == (
        "cpus: 8-15 selects no online pCPU of this host (online: 0-1)"
    )
    assert online_problem(cfg, frozenset({0, 9})) is None
    assert online_problem(Config(), frozenset()) is None
