"""Scrape a Prometheus endpoint and read the text exposition format (version 0.0.4).

Small on purpose: names, labels and values are all a test needs, and reading the format here
keeps the role test free of the metrics library whose output it is checking.
"""

from __future__ import annotations

import json
import math
import re
import urllib.request
from dataclasses import dataclass

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse(text: str) -> list[Sample]:
    samples = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise ValueError(f"not an exposition line: {line!r}")
        name, labels_text, value = match.groups()
        labels = {}
        if labels_text:
            pos = 0
            while pos < len(labels_text):
                label = _LABEL.match(labels_text, pos)
                if label is None:
                    raise ValueError(f"bad labels in {line!r}")
                labels[label[1]] = json.loads(f'"{label[2]}"')
                pos = label.end()
        number = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}.get(value)
        samples.append(Sample(name, labels, float(value) if number is None else number))
    return samples


def scrape(url: str, timeout: float = 10.0) -> list[Sample]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse(response.read().decode())


def series(samples: list[Sample], name: str) -> list[Sample]:
    return [s for s in samples if s.name == name]
