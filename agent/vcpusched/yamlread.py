"""A bounded YAML reader for the agent's config: plain mappings, lists and scalars, nothing else.

The config is read as root on every hypervisor, so the reader refuses what could make it use
unbounded time or memory (aliases, deep nesting, huge numbers, big files) or read a value
other than the one the operator sees (duplicate keys, YAML 1.1's octal and base-60 numbers,
tags). It walks the parser's event stream itself, without building a node graph, so every
limit holds before anything is expanded.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.nodes import ScalarNode

MAX_BYTES = 1 << 20
MAX_DEPTH = 8
# Far more values than any config needs (a long `exclude` list is a few hundred names), few
# enough to read in well under a second.
MAX_VALUES = 20_000
# A number longer than this is no interval or threshold anyone means.
MAX_DIGITS = 30
# Keys are option names; an error naming a longer one would be a line of any length.
MAX_KEY = 100

# libyaml's parser when PyYAML has it (Debian's and PyPI's both do): a hundred times faster
# than the pure-Python one, which needs half a second for 1 MiB.
_PARSER: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = getattr(
    yaml, "CSafeLoader", yaml.SafeLoader
)
_RESOLVER = yaml.resolver.Resolver()
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
# What YAML 1.1 reads as a number but a reader may not: 010 (octal 8), 0x1f, 0b11, 1_000,
# 2:3 (base 60, 123). Plain decimal numbers are fine.
_PLAIN_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_PLAIN_FLOAT = re.compile(
    r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)"
)
_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}


class YamlError(Exception):
    """One line naming the problem, and where it is when the parser knows."""


def _line(mark: Any) -> int:
    return int(mark.line) + 1 if mark is not None else 0


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""


def decode(raw: bytes) -> str:
    """The file's text: UTF-8 only, so what `check-config`, diffs and grep show is what counts."""
    for bom, name in _BOMS.items():
        if raw.startswith(bom):
            raise YamlError(f"file is {name} (byte order mark); save it as UTF-8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlError(
            f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start}"
        ) from None
    return text.removeprefix("\ufeff")


def _scalar(event: Any, path: str) -> Any:
    value: str = event.value
    if event.tag not in (None, "!"):
        raise YamlError(
            f"{_where(event.start_mark)}{path}: YAML tags ({event.tag}) are not allowed"
        )
    plain = bool(event.implicit[0]) and not event.style
    if not plain:
        return value
    tag: str = _RESOLVER.resolve(ScalarNode, value, (True, False))  # type: ignore[no-untyped-call]
    if tag == "tag:yaml.org,2002:int":
        if not _PLAIN_INT.fullmatch(value):
            raise YamlError(
                f"{_where(event.start_mark)}{path}: {value} is a number in YAML 1.1 "
                f"({_CONSTRUCTOR.construct_yaml_int(ScalarNode(tag, value))}), not what it looks "
                f'like; quote it ("{value}") or write a plain decimal number'
            )
        if len(value.lstrip("+-")) > MAX_DIGITS:
            raise YamlError(
                f"{_where(event.start_mark)}{path}: number with {len(value.lstrip('+-'))} digits "
                "is out of range"
            )
    elif tag == "tag:yaml.org,2002:float":
        if not _PLAIN_FLOAT.fullmatch(value):
            raise YamlError(
                f"{_where(event.start_mark)}{path}: {value} is a number in YAML 1.1, not what it "
                f'looks like; quote it ("{value}") or write a plain decimal number'
            )
        if len(value) > MAX_DIGITS * 2:
            raise YamlError(f"{_where(event.start_mark)}{path}: number {value[:20]}... is too long")
    elif tag == "tag:yaml.org,2002:timestamp":
        return value
    return _CONSTRUCTOR.construct_object(ScalarNode(tag, value))


class _Mapping:
    def __init__(self, path: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        self.lines: dict[str, int] = {}
        self.key: str | None = None


def load(raw: bytes) -> Any:
    """Parse one YAML document of mappings, lists and scalars into Python values."""
    if len(raw) > MAX_BYTES:
        raise YamlError(f"file is larger than {MAX_BYTES // 1024} KiB ({len(raw)} bytes or more)")
    text = decode(raw)
    stack: list[_Mapping | list[Any]] = []
    paths: list[str] = []
    result: Any = None
    documents = 0
    values = 0

    def path_here() -> str:
        if not stack:
            return "top level"
        top = stack[-1]
        if isinstance(top, _Mapping):
            if top.key is None:
                return top.path or "top level"
            return f"{top.path}.{top.key}" if top.path else top.key
        return f"{paths[-1]}[{len(top)}]"

    def add(value: Any, mark: Any) -> None:
        nonlocal result
        if not stack:
            result = value
            return
        top = stack[-1]
        if isinstance(top, list):
            top.append(value)
            return
        assert top.key is not None
        top.data[top.key] = value
        top.key = None

    try:
        for event in yaml.parse(text, Loader=_PARSER):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise YamlError(
                    f"{_where(event.start_mark)}YAML anchors and aliases are not allowed"
                )
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise YamlError(f"{_where(event.start_mark)}more than one YAML document")
                continue
            if isinstance(event, yaml.NodeEvent):
                values += 1
                if values > MAX_VALUES:
                    raise YamlError(f"{_where(event.start_mark)}more than {MAX_VALUES} values")
            top = stack[-1] if stack else None
            wants_key = isinstance(top, _Mapping) and top.key is None
            if isinstance(event, yaml.ScalarEvent):
                if wants_key:
                    assert isinstance(top, _Mapping)
                    key = event.value
                    if len(key) > MAX_KEY:
                        raise YamlError(
                            f"{_where(event.start_mark)}a key of {len(key)} characters "
                            f"(options have names of at most {MAX_KEY})"
                        )
                    if key in top.lines:
                        where = f"{top.path}.{key}" if top.path else key
                        raise YamlError(
                            f"{_printable_key(where)}: duplicate key, on line {top.lines[key]} "
                            f"and again on line {_line(event.start_mark)}"
                        )
                    if event.tag not in (None, "!"):
                        raise YamlError(
                            f"{_where(event.start_mark)}YAML tags ({event.tag}) are not allowed"
                        )
                    top.lines[key] = _line(event.start_mark)
                    top.key = key
                    continue
                add(_scalar(event, path_here()), event.start_mark)
            elif isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
                if wants_key:
                    raise YamlError(
                        f"{_where(event.start_mark)}a key must be a name, not a list or mapping"
                    )
                if event.tag not in (None, "!"):
                    raise YamlError(
                        f"{_where(event.start_mark)}YAML tags ({event.tag}) are not allowed"
                    )
                if len(stack) >= MAX_DEPTH:
                    raise YamlError(
                        f"{_where(event.start_mark)}nested more than {MAX_DEPTH} levels deep"
                    )
                here = path_here()
                paths.append(here)
                if isinstance(event, yaml.MappingStartEvent):
                    stack.append(_Mapping("" if here == "top level" else here))
                else:
                    stack.append([])
            elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
                done = stack.pop()
                paths.pop()
                add(done.data if isinstance(done, _Mapping) else done, event.start_mark)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        problem = exc.problem or str(exc).splitlines()[0]
        raise YamlError(f"invalid YAML: {_where(mark)}{problem}") from None
    except yaml.YAMLError as exc:
        raise YamlError(f"invalid YAML: {str(exc).splitlines()[0]}") from None
    return result


def _printable_key(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
