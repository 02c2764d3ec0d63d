"""The agent's configuration: `/etc/vcpusched.yaml`, validated with voluptuous.

One function, `load_config`, serves start-up, SIGHUP and `check-config`, so a file that the
command accepts is exactly a file the agent runs with.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import voluptuous as vol

from vcpusched import yamlread
from vcpusched.model import format_cpus

DEFAULT_PATH = Path("/etc/vcpusched.yaml")

LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
SYSLOG_FACILITIES = (
    "daemon",
    "user",
    "local0",
    "local1",
    "local2",
    "local3",
    "local4",
    "local5",
    "local6",
    "local7",
)


class ConfigError(Exception):
    """A config that cannot be used; `errors` holds one line per problem."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = _printable(source)
        # Keys and values come from the file: escape what could break the one-line promise.
        self.errors = [_printable(e) for e in errors]
        super().__init__("; ".join(f"{source}: {e}" for e in errors))


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass(frozen=True, slots=True)
class Config:
    interval: float = 1.0
    high: float = 90.0
    target: float = 80.0
    low: float = 70.0
    min_gain: float = 5.0
    # What a core delivers, in cores, when two of its threads are busy (see capacity.py).
    smt_pair_capacity: float = 1.25
    exclude: tuple[str, ...] = ()
    cpus: frozenset[int] | None = None
    uri: str = "qemu:///system"
    pidfile: Path = Path("/run/vcpusched/vcpusched.pid")
    dry_run: bool = False
    restore_on_exit: bool = False
    # Where each domain's emulator thread and iothreads go: "off" (left alone) or "node" (the
    # CPUs of the nodes its vCPUs run on).
    pin_emulator: str = "off"
    log_level: str = "info"
    syslog_facility: str = "daemon"
    # Prometheus metrics: a node_exporter textfile directory and/or a local listener.
    metrics_textfile_dir: Path | None = None
    metrics_listen: str | None = None

    def as_document(self) -> dict[str, Any]:
        """The config in the file's own shape, for `check-config` and the sample file."""
        return {
            "interval": self.interval,
            "thresholds": {"high": self.high, "target": self.target, "low": self.low},
            "min_gain": self.min_gain,
            "smt_pair_capacity": self.smt_pair_capacity,
            "exclude": list(self.exclude),
            "cpus": None if self.cpus is None else format_cpus(self.cpus),
            "uri": self.uri,
            "pidfile": str(self.pidfile),
            "dry_run": self.dry_run,
            "restore_on_exit": self.restore_on_exit,
            "pin_emulator": self.pin_emulator,
            "log_level": self.log_level,
            "syslog_facility": self.syslog_facility,
            "metrics": {
                "textfile_dir": None
                if self.metrics_textfile_dir is None
                else str(self.metrics_textfile_dir),
                "listen": self.metrics_listen,
            },
        }

    def changes(self, new: Config) -> list[str]:
        """`key:old->new` for each setting that differs, for the reload log line."""
        old_doc, new_doc = _flatten(self.as_document()), _flatten(new.as_document())
        return [
            f"{k}:{_short(old_doc[k])}->{_short(new_doc[k])}"
            for k in old_doc
            if old_doc[k] != new_doc[k]
        ]


def _flatten(doc: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def _show(value: Any) -> str:
    """A value as the YAML file spells it, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + "..." + text[-10:]


def _number(lo: float, hi: float, *, lo_open: bool = False) -> vol.All:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise vol.Invalid(f"expected a number, got {_show(value)}")
        lo_text = f"above {lo:g}" if lo_open else f"at least {lo:g}"
        # Compared before any float(): an int too large for a float is simply out of range.
        if (isinstance(value, float) and not math.isfinite(value)) or not (
            lo <= value <= hi and not (lo_open and value == lo)
        ):
            raise vol.Invalid(f"must be {lo_text} and at most {hi:g}, got {_show(value)}")
        return float(value)

    return vol.All(check)


def _boolean(value: Any) -> bool:
    # YAML already turns yes/no/true/false into bools; anything else is a typo worth naming.
    if isinstance(value, bool):
        return value
    raise vol.Invalid(f"expected true or false, got {_show(value)}")


# PATH_MAX: no URI, path or domain name the agent deals with is longer.
MAX_TEXT = 4096


def _text(value: Any) -> str:
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise vol.Invalid(f"longer than {MAX_TEXT} characters ({len(value)})")
    if isinstance(value, str) and value.strip():
        return value
    raise vol.Invalid(f"expected a non-empty string, got {_show(value)}")


KERNEL_MAX = Path("/sys/devices/system/cpu/kernel_max")
# Linux's own upper bound on NR_CPUS, for when sysfs cannot say.
FALLBACK_CPU_CEILING = 8192


def cpu_ceiling() -> int:
    """How many CPUs this kernel can ever have: no pCPU list may name one beyond it."""
    try:
        return int(KERNEL_MAX.read_text().strip()) + 1
    except (OSError, ValueError):
        return FALLBACK_CPU_CEILING


_CPU_PART = re.compile(r"\s*(\^?)\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?")


def _cpus(value: Any) -> frozenset[int] | None:
    if value is None:
        return None
    expected = f'expected a pCPU list such as "0-3,8", got {_show(value)}'
    if isinstance(value, bool):
        raise vol.Invalid(expected)
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        if any(v < 0 for v in value):
            raise vol.Invalid(expected)
        value = ",".join(str(v) for v in value)
    if not isinstance(value, str):
        raise vol.Invalid(expected)
    return _parse_cpus(value, cpu_ceiling())


def _parse_cpus(spec: str, ceiling: int) -> frozenset[int]:
    """parse_cpus with every number bounded by the kernel's CPU count before anything is
    expanded ("0-1000000000" would be a billion ints), in time linear in the text."""
    include = bytearray(ceiling)
    exclude = bytearray(ceiling)
    # Each distinct part once: a list that repeats itself costs no more than saying it once.
    for raw in dict.fromkeys(spec.split(",")):
        if not raw.strip():
            continue
        match = _CPU_PART.fullmatch(raw)
        if match is None:
            raise vol.Invalid(f"invalid cpu range {_show(raw.strip())}")
        numbers = [n for n in match.group(2, 3) if n is not None]
        for number in numbers:
            if len(number) > 6 or int(number) >= ceiling:
                raise vol.Invalid(
                    f"pCPU {number[:12]} in {_show(raw.strip())} is beyond what this kernel "
                    f"supports (0-{ceiling - 1})"
                )
        first, last = int(numbers[0]), int(numbers[-1])
        if last < first:
            raise vol.Invalid(f"invalid cpu range {_show(raw.strip())}")
        target = exclude if match.group(1) else include
        target[first : last + 1] = b"\x01" * (last + 1 - first)
    result = frozenset(i for i in range(ceiling) if include[i] and not exclude[i])
    if not result:
        raise vol.Invalid(f"cpu list {_show(spec)} selects no pCPU")
    return result


def _glob_problem(pattern: str) -> str | None:
    """Why fnmatch would not read `pattern` as meant: it takes a broken `[` literally."""
    i, n = 0, len(pattern)
    while i < n:
        if pattern[i] != "[":
            i += 1
            continue
        j = i + 1
        if j < n and pattern[j] == "!":
            j += 1
        first = j
        if j < n and pattern[j] == "]":
            j += 1
        while j < n and pattern[j] != "]":
            j += 1
        if j >= n:
            return f"unclosed '[' at position {i + 1}"
        body = pattern[first:j]
        for k in range(1, len(body) - 1):
            if body[k] == "-" and body[k - 1] > body[k + 1]:
                return f"empty range '{body[k - 1]}-{body[k + 1]}' in '[...]'"
        i = j + 1
    return None


def _patterns(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise vol.Invalid(f"expected a list of domain names or glob patterns, got {_show(value)}")
    for item in value:
        if not isinstance(item, str) or not item:
            raise vol.Invalid(f"expected domain names or glob patterns, got {_show(item)}")
        if len(item) > MAX_TEXT:
            raise vol.Invalid(f"pattern longer than {MAX_TEXT} characters ({len(item)})")
        problem = _glob_problem(item)
        if problem is not None:
            raise vol.Invalid(f"invalid glob pattern {_show(item)}: {problem}")
    return tuple(value)


def _path(value: Any) -> Path:
    if isinstance(value, str) and value.startswith("/") and len(value) <= MAX_TEXT:
        return Path(value)
    raise vol.Invalid(f"expected an absolute path, got {_show(value)}")


def _optional_path(value: Any) -> Path | None:
    return None if value is None else _path(value)


def listen_address(text: str) -> tuple[str, int]:
    """Split "127.0.0.1:9101" or "[::1]:9101" into (address, port). Raises ValueError.

    Only IP literals: a name would need a resolver, and the listener is meant to be local.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f'expected an address such as "127.0.0.1:9101", got {text!r}')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"expected an IP address before the port, got {text!r}") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"expected a port from 1 to 65535 after the address, got {text!r}")
    return str(address), int(port_text)


def _listen(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise vol.Invalid(f'expected an address such as "127.0.0.1:9101", got {value!r}')
    try:
        listen_address(value)
    except ValueError as exc:
        raise vol.Invalid(str(exc)) from None
    return value


def _choice(options: tuple[str, ...] | dict[str, int]) -> Any:
    def check(value: Any) -> str:
        if isinstance(value, str) and value.lower() in options:
            return value.lower()
        raise vol.Invalid(f"expected one of {', '.join(options)}, got {_show(value)}")

    return check


PIN_EMULATOR = ("off", "node")


def _pin_emulator(value: Any) -> str:
    # YAML 1.1 reads a bare `off` as false: take it as meant.
    if value is False:
        return "off"
    if isinstance(value, str) and value.lower() in PIN_EMULATOR:
        return value.lower()
    raise vol.Invalid(f"expected off or node, got {_show(value)}")


_DEFAULT = Config()

THRESHOLDS_SCHEMA = vol.Schema(
    {
        vol.Optional("high", default=_DEFAULT.high): _number(0, 100, lo_open=True),
        vol.Optional("target", default=_DEFAULT.target): _number(0, 100, lo_open=True),
        vol.Optional("low", default=_DEFAULT.low): _number(0, 100, lo_open=True),
    }
)


METRICS_SCHEMA = vol.Schema(
    {
        vol.Optional("textfile_dir", default=None): _optional_path,
        vol.Optional("listen", default=None): _listen,
    }
)


def _section(schema: vol.Schema, keys: str) -> Any:
    """A nested mapping of options: null is an empty one, anything else but a mapping an error."""

    def check(value: Any) -> dict[str, Any]:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise vol.Invalid(f"expected a mapping of {keys}")
        result: dict[str, Any] = schema(value)
        return result

    return check


CONFIG_SCHEMA = vol.Schema(
    {
        vol.Optional("interval", default=_DEFAULT.interval): _number(0.1, 3600),
        vol.Optional("thresholds", default={}): _section(THRESHOLDS_SCHEMA, "high, target and low"),
        vol.Optional("min_gain", default=_DEFAULT.min_gain): _number(0, 100),
        vol.Optional("smt_pair_capacity", default=_DEFAULT.smt_pair_capacity): _number(1, 2),
        vol.Optional("exclude", default=[]): _patterns,
        vol.Optional("cpus", default=None): _cpus,
        vol.Optional("uri", default=_DEFAULT.uri): _text,
        vol.Optional("pidfile", default=str(_DEFAULT.pidfile)): _path,
        vol.Optional("dry_run", default=False): _boolean,
        vol.Optional("restore_on_exit", default=False): _boolean,
        vol.Optional("pin_emulator", default=_DEFAULT.pin_emulator): _pin_emulator,
        vol.Optional("log_level", default=_DEFAULT.log_level): _choice(LOG_LEVELS),
        vol.Optional("syslog_facility", default=_DEFAULT.syslog_facility): _choice(
            SYSLOG_FACILITIES
        ),
        vol.Optional("metrics", default={}): _section(METRICS_SCHEMA, "textfile_dir and listen"),
    }
)


def _describe(error: vol.Invalid) -> str:
    path = ".".join(str(p) for p in error.path)
    message = error.error_message
    if message == "extra keys not allowed":
        where = ".".join(str(p) for p in error.path[:-1]) or "top level"
        return f"{path}: unknown option (not allowed at {where})"
    if message.startswith("expected a dictionary"):
        return f"{path or 'top level'}: expected a mapping of options"
    return f"{path}: {message}" if path else message


MAX_ERRORS = 20


def _capped(errors: list[str]) -> list[str]:
    # One line per problem, but a file of 20,000 unknown keys needs no 20,000-line answer.
    if len(errors) <= MAX_ERRORS:
        return errors
    return [*errors[:MAX_ERRORS], f"... and {len(errors) - MAX_ERRORS} more problems"]


def validate(document: Any, source: str = "<config>") -> Config:
    """Turn a parsed YAML document into a Config, or raise ConfigError with every problem."""
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(
            source, [f"top level must be a mapping of options, got {type(document).__name__}"]
        )
    try:
        data = CONFIG_SCHEMA(document)
    except vol.MultipleInvalid as exc:
        raise ConfigError(source, _capped(sorted({_describe(e) for e in exc.errors}))) from None
    thresholds = data["thresholds"]
    high, target, low = thresholds["high"], thresholds["target"], thresholds["low"]
    errors = []
    if not low < target:
        errors.append(f"thresholds.low: must be below thresholds.target ({target:g}), got {low:g}")
    if not target < high:
        errors.append(
            f"thresholds.high: must be above thresholds.target ({target:g}), got {high:g}"
        )
    if errors:
        raise ConfigError(source, errors)
    return Config(
        interval=data["interval"],
        high=high,
        target=target,
        low=low,
        min_gain=data["min_gain"],
        smt_pair_capacity=data["smt_pair_capacity"],
        exclude=data["exclude"],
        cpus=data["cpus"],
        uri=data["uri"],
        pidfile=data["pidfile"],
        dry_run=data["dry_run"],
        restore_on_exit=data["restore_on_exit"],
        pin_emulator=data["pin_emulator"],
        log_level=data["log_level"],
        syslog_facility=data["syslog_facility"],
        metrics_textfile_dir=data["metrics"]["textfile_dir"],
        metrics_listen=data["metrics"]["listen"],
    )


def online_problem(config: Config, online: frozenset[int]) -> str | None:
    """Why `config` cannot run on a host with these online pCPUs, or None."""
    if config.cpus is None or config.cpus & online:
        return None
    return (
        f"cpus: {format_cpus(config.cpus)} selects no online pCPU of this host "
        f"(online: {format_cpus(online) if online else 'none'})"
    )


def load_config(path: Path, *, strict_owner: bool | None = None) -> Config:
    """Read and validate `path`. Raises ConfigError with one line per problem, never more.

    When running as root the file must be owned by root and not writable by group or others
    (as sshd's StrictModes): whoever can write it decides which vCPUs move where.
    """
    source = str(path)
    try:
        # Non-blocking, so that a FIFO at the path cannot hang the open; a config is a file.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror or exc}"]) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(source, ["not a regular file"])
        if info.st_size > yamlread.MAX_BYTES:
            raise ConfigError(
                source,
                [f"file is larger than {yamlread.MAX_BYTES // 1024} KiB ({info.st_size} bytes)"],
            )
        with os.fdopen(os.dup(fd), "rb") as handle:
            raw = handle.read(yamlread.MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror or exc}"]) from None
    finally:
        os.close(fd)
    if strict_owner is None:
        strict_owner = os.geteuid() == 0
    if strict_owner:
        if info.st_uid != 0:
            raise ConfigError(source, [f"must be owned by root, is owned by uid {info.st_uid}"])
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(
                source,
                [
                    f"must not be writable by group or others, mode is "
                    f"{stat.S_IMODE(info.st_mode):04o}"
                ],
            )
    try:
        document = yamlread.load(raw)
    except yamlread.YamlError as exc:
        raise ConfigError(source, [str(exc)]) from None
    return validate(document, source)


def override(config: Config, **changes: Any) -> Config:
    """A copy with command-line overrides applied (ignoring those left unset)."""
    known = {f.name for f in fields(Config)}
    values = {k: v for k, v in changes.items() if v is not None and k in known}
    return replace(config, **values) if values else config
