from __future__ import annotations

import pytest

from vcpusched.model import format_cpus, parse_cpus


@pytest.mark.parametrize(
    ("spec", "cpus"),
    [
        ("0", {0}),
        ("0-3", {0, 1, 2, 3}),
        ("0-3,^2", {0, 1, 3}),
        (" 1 , ,3 ", {1, 3}),
        ("0-7,^0-3", {4, 5, 6, 7}),
        ("2-2", {2}),
    ],
)
def test_parse_cpus(spec: str, cpus: set[int]) -> None:
    assert parse_cpus(spec) == cpus


@pytest.mark.parametrize("spec", ["", "^1", "-1", "3-1", "x", "1-", "1-2-3"])
def test_parse_cpus_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="cpu"):
        parse_cpus(spec)


@pytest.mark.parametrize(
    ("cpus", "text"),
    [
        ({0, 1, 2, 3}, "0-3"),
        ({0, 2, 3, 8}, "0,2-3,8"),
        (set(), "none"),
        ({5}, "5"),
    ],
)
def test_format_cpus(cpus: set[int], text: str) -> None:
    assert format_cpus(frozenset(cpus)) == text
    if cpus:
        assert parse_cpus(text) == cpus
