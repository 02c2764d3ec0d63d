"""The agent's configuration: `/etc/vcpusched.yaml`, validated with voluptuous.

One function, `load_config`, serves start-up, SIGHUP and `check-config`, so a file that the
command accepts is exactly a file the agent runs with.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import voluptuous as vol
import yaml

from vcpusched.model import format_cpus, parse_cpus

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
    exclude: tuple[str, ...] = ()
    cpus: frozenset[int] | None = None
    uri: str = "qemu:///system"
    pidfile: Path = Path("/run/vcpusched/vcpusched.pid")
    dry_run: bool = False
    restore_on_exit: bool = False
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
            "exclude": list(self.exclude),
            "cpus": None if self.cpus is None else format_cpus(self.cpus),
            "uri": self.uri,
            "pidfile": str(self.pidfile),
            "dry_run": self.dry_run,
            "restore_on_exit": self.restore_on_exit,
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


def _number(lo: float, hi: float, *, lo_open: bool = False) -> vol.All:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise vol.Invalid(f"expected a number, got {value!r}")
        number = float(value)
        if number < lo or (lo_open and number == lo) or number > hi:
            lo_text = f"above {lo:g}" if lo_open else f"at least {lo:g}"
            raise vol.Invalid(f"must be {lo_text} and at most {hi:g}, got {value!r}")
        return number

    return vol.All(check)


def _boolean(value: Any) -> bool:
    # YAML already turns yes/no/true/false into bools; anything else is a typo worth naming.
    if isinstance(value, bool):
        return value
    raise vol.Invalid(f"expected true or false, got {value!r}")


def _text(value: Any) -> str:
    if isinstance(value, str) and value.strip():
        return value
    raise vol.Invalid(f"expected a non-empty string, got {value!r}")


def _cpus(value: Any) -> frozenset[int] | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise vol.Invalid(f'expected a pCPU list such as "0-3,8", got {value!r}')
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        value = ",".join(str(v) for v in value)
    if not isinstance(value, str):
        raise vol.Invalid(f'expected a pCPU list such as "0-3,8", got {value!r}')
    try:
        return parse_cpus(value)
    except ValueError as exc:
        raise vol.Invalid(str(exc)) from None


def _patterns(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise vol.Invalid(f"expected a list of domain names or glob patterns, got {value!r}")
    for item in value:
        if not isinstance(item, str) or not item:
            raise vol.Invalid(f"expected domain names or glob patterns, got {item!r}")
    return tuple(value)


def _path(value: Any) -> Path:
    if isinstance(value, str) and value.startswith("/"):
        return Path(value)
    raise vol.Invalid(f"expected an absolute path, got {value!r}")


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
        raise vol.Invalid(f"expected one of {', '.join(options)}, got {value!r}")

    return check


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


def _metrics(value: Any) -> dict[str, Any]:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise vol.Invalid("expected a mapping of textfile_dir and listen")
    result: dict[str, Any] = METRICS_SCHEMA(value)
    return result


def _thresholds(value: Any) -> dict[str, float]:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise vol.Invalid("expected a mapping of high, target and low")
    result: dict[str, float] = THRESHOLDS_SCHEMA(value)
    return result


CONFIG_SCHEMA = vol.Schema(
    {
        vol.Optional("interval", default=_DEFAULT.interval): _number(0.1, 3600),
        vol.Optional("thresholds", default={}): _thresholds,
        vol.Optional("min_gain", default=_DEFAULT.min_gain): _number(0, 100),
        vol.Optional("exclude", default=[]): _patterns,
        vol.Optional("cpus", default=None): _cpus,
        vol.Optional("uri", default=_DEFAULT.uri): _text,
        vol.Optional("pidfile", default=str(_DEFAULT.pidfile)): _path,
        vol.Optional("dry_run", default=False): _boolean,
        vol.Optional("restore_on_exit", default=False): _boolean,
        vol.Optional("log_level", default=_DEFAULT.log_level): _choice(LOG_LEVELS),
        vol.Optional("syslog_facility", default=_DEFAULT.syslog_facility): _choice(
            SYSLOG_FACILITIES
        ),
        vol.Optional("metrics", default={}): _metrics,
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
        raise ConfigError(source, sorted({_describe(e) for e in exc.errors})) from None
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
        exclude=data["exclude"],
        cpus=data["cpus"],
        uri=data["uri"],
        pidfile=data["pidfile"],
        dry_run=data["dry_run"],
        restore_on_exit=data["restore_on_exit"],
        log_level=data["log_level"],
        syslog_facility=data["syslog_facility"],
        metrics_textfile_dir=data["metrics"]["textfile_dir"],
        metrics_listen=data["metrics"]["listen"],
    )


def load_config(path: Path, *, strict_owner: bool | None = None) -> Config:
    """Read and validate `path`. Raises ConfigError with one line per problem, never more.

    When running as root the file must be owned by root and not writable by group or others
    (as sshd's StrictModes): whoever can write it decides which vCPUs move where.
    """
    source = str(path)
    try:
        with path.open("rb") as handle:
            info = os.fstat(handle.fileno())
            raw = handle.read()
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror or exc}"]) from None
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
        document = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(source, [f"invalid YAML: {where}{problem}"]) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(source, [f"invalid YAML: {exc}"]) from None
    return validate(document, source)


def override(config: Config, **changes: Any) -> Config:
    """A copy with command-line overrides applied (ignoring those left unset)."""
    known = {f.name for f in fields(Config)}
    values = {k: v for k, v in changes.items() if v is not None and k in known}
    return replace(config, **values) if values else config
