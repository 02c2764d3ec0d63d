"""The role test's reader of the Prometheus text format, on text as node_exporter serves it."""

from __future__ import annotations

import math

import pytest

from tests.role.scrape import parse, series

TEXT = """# HELP node_textfile_scrape_error 1 if there was an error opening or reading a file.
# TYPE node_textfile_scrape_error gauge
node_textfile_scrape_error 0
vcpusched_pin_changes_total{kind="move",reason="relieve \\"high\\""} 3
vcpusched_pcpu_utilization_ratio{pcpu="0"} 0.97
vcpusched_cycle_duration_seconds_bucket{le="+Inf"} 12
go_gc_duration_seconds{quantile="1"} NaN
node_time_seconds 1.7e+09 1700000000000
"""


def test_names_labels_and_values() -> None:
    samples = parse(TEXT)
    assert [s.value for s in series(samples, "node_textfile_scrape_error")] == [0.0]
    (changes,) = series(samples, "vcpusched_pin_changes_total")
    assert changes.labels == {"kind": "move", "reason": 'relieve "high"'}
    assert changes.value == 3.0
    assert series(samples, "vcpusched_pcpu_utilization_ratio")[0].labels == {"pcpu": "0"}
    assert math.isnan(series(samples, "go_gc_duration_seconds")[0].value)
    assert series(samples, "node_time_seconds")[0].value == 1.7e9  # the timestamp is dropped


def test_what_is_not_the_format_is_refused() -> None:
    with pytest.raises(ValueError, match="not an exposition line"):
        parse("<html>error</html>\n")
    with pytest.raises(ValueError, match="bad labels"):
        parse("x{a=unquoted} 1\n")
