from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from vcpusched.cli import main
from vcpusched.config import Config, ConfigError, listen_address, load_config, validate

SAMPLE = Path(__file__).resolve().parents[2] / "etc" / "vcpusched.yaml"


def test_sample_config_is_every_default() -> None:
    assert load_config(SAMPLE, strict_owner=False) == Config()
    documented = yaml.safe_load(SAMPLE.read_text())
    assert documented == Config().as_document()


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("")
    assert load_config(path, strict_owner=False) == Config()


def test_values_and_coercions() -> None:
    cfg = validate(
        {
            "interval": 2,
            "thresholds": {"high": 95, "low": 60},
            "cpus": "0-3,^1",
            "exclude": "db-*",
            "dry_run": True,
            "log_level": "DEBUG",
        }
    )
    assert cfg.interval == 2.0
    assert cfg.high == 95
    assert cfg.low == 60
    assert cfg.target == 80
    assert cfg.cpus == frozenset({0, 2, 3})
    assert cfg.exclude == ("db-*",)
    assert cfg.dry_run
    assert cfg.log_level == "debug"
    assert validate({"cpus": [1, 3]}).cpus == frozenset({1, 3})


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"interval": 0}, "interval: must be at least 0.1 and at most 3600, got 0"),
        ({"interval": "fast"}, "interval: expected a number, got 'fast'"),
        ({"interval": True}, "interval: expected a number, got true"),
        (
            {"thresholds": {"high": 150}},
            "thresholds.high: must be above 0 and at most 100, got 150",
        ),
        (
            {"thresholds": {"low": 85}},
            "thresholds.low: must be below thresholds.target (80), got 85",
        ),
        (
            {"thresholds": {"high": 75}},
            "thresholds.high: must be above thresholds.target (80), got 75",
        ),
        (
            {"thresholds": {"hihg": 95}},
            "thresholds.hihg: unknown option (not allowed at thresholds)",
        ),
        ({"thresholds": [90]}, "thresholds: expected a mapping of high, target and low"),
        ({"intervall": 1}, "intervall: unknown option (not allowed at top level)"),
        ({"cpus": "3-1"}, "cpus: invalid cpu range '3-1'"),
        ({"cpus": "a"}, "cpus: invalid cpu range 'a'"),
        ({"cpus": "1,^1"}, "cpus: cpu list '1,^1' selects no pCPU"),
        ({"exclude": [1]}, "exclude: expected domain names or glob patterns, got 1"),
        ({"dry_run": "yes please"}, "dry_run: expected true or false, got 'yes please'"),
        ({"pidfile": "run/x.pid"}, "pidfile: expected an absolute path, got 'run/x.pid'"),
        (
            {"log_level": "loud"},
            "log_level: expected one of debug, info, warning, error, got 'loud'",
        ),
        ({"syslog_facility": "kern"}, "syslog_facility: expected one of daemon, user, local0,"),
        ({"uri": ""}, "uri: expected a non-empty string, got ''"),
        ({"min_gain": -1}, "min_gain: must be at least 0 and at most 100, got -1"),
        (
            {"smt_pair_capacity": 2.5},
            "smt_pair_capacity: must be at least 1 and at most 2, got 2.5",
        ),
        ({"smt_pair_capacity": "1.25"}, "smt_pair_capacity: expected a number, got '1.25'"),
        ({"metrics": "on"}, "metrics: expected a mapping of textfile_dir and listen"),
        (
            {"metrics": {"textfile_dir": "prom"}},
            "metrics.textfile_dir: expected an absolute path, got 'prom'",
        ),
        (
            {"metrics": {"listen": "localhost:9101"}},
            "metrics.listen: expected an IP address before the port, got 'localhost:9101'",
        ),
        (
            {"metrics": {"listen": "127.0.0.1:70000"}},
            "metrics.listen: expected a port from 1 to 65535 after the address",
        ),
        ({"metrics": {"listen": 9101}}, "metrics.listen: expected an address such as"),
        ({"metrics": {"port": 1}}, "metrics.port: unknown option (not allowed at metrics)"),
    ],
)
def test_each_bad_value_names_key_value_and_expectation(document: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(document, "f.yaml")
    assert len(info.value.errors) == 1
    assert info.value.errors[0].startswith(message)


def test_every_error_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        validate({"interval": -1, "uri": 3, "bogus": 1})
    assert [e.split(":")[0] for e in info.value.errors] == ["bogus", "interval", "uri"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- 1\n- 2\n", "top level must be a mapping of options, got list"),
        ("interval: [1\n", "invalid YAML: line 2, column 1:"),
        ("a: b: c\n", "invalid YAML: line 1, column 5:"),
    ],
)
def test_bad_yaml_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, strict_owner=False)
    assert info.value.errors[0].startswith(message)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read: No such file"):
        load_config(tmp_path / "none.yaml")


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks apply when running as root")
def test_group_writable_file_refused_as_root(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("interval: 1\n")
    path.chmod(0o664)
    with pytest.raises(ConfigError, match="must not be writable by group or others, mode is 0664"):
        load_config(path)
    path.chmod(0o644)
    os.chown(path, 1, 1)
    with pytest.raises(ConfigError, match="must be owned by root, is owned by uid 1"):
        load_config(path)


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("interval: 3\n")
    good.chmod(0o644)
    assert main(["check-config", str(good)]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["interval"] == 3.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("interval: 3\nthresholds: {low: 95}\nextra: 1\n")
    bad.chmod(0o644)
    assert main(["check-config", str(bad)]) == 3
    err = capsys.readouterr().err.splitlines()
    assert (
        err
        == [
            f"vcpusched: {bad}: extra: unknown option (not allowed at top level)",
        ]
        or len(err) == 1
    )  # unknown keys stop validation before cross-field checks
    assert all(line.startswith(f"vcpusched: {bad}: ") for line in err)


def test_changes_lists_what_differs() -> None:
    old, new = Config(), validate({"interval": 2, "thresholds": {"high": 95}, "exclude": ["a"]})
    assert old.changes(new) == [
        "interval:1.0->2.0",
        "thresholds.high:90.0->95.0",
        "exclude:[]->[a]",
    ]


def test_metrics_keys() -> None:
    config = validate({"metrics": {"textfile_dir": "/var/lib/x", "listen": "[::1]:9101"}})
    assert config.metrics_textfile_dir == Path("/var/lib/x")
    assert config.metrics_listen == "[::1]:9101"
    assert listen_address("[::1]:9101") == ("::1", 9101)
    assert listen_address("127.0.0.1:9101") == ("127.0.0.1", 9101)
    assert validate({"metrics": None}) == Config()


def test_ctrl_c_during_check_config_is_quiet_130(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import vcpusched.cli as cli

    def interrupted(*_args: object, **_kwargs: object) -> Config:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_config", interrupted)
    assert main(["check-config", str(tmp_path / "c.yaml")]) == 130
    assert capsys.readouterr() == ("", "")
