"""Command line: `run`, `check-config`, `status` and `bench`.

Errors a user can fix are one line on stderr, `vcpusched: ...`, and exit 1; never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from vcpusched import __version__, policy, stats
from vcpusched.config import DEFAULT_PATH, Config, ConfigError, load_config, override
from vcpusched.host import Host, HostError
from vcpusched.model import Snapshot, Vcpu, excluded, format_cpus

PROG = "vcpusched"


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 1


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0.1 and 3600 seconds, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Keep libvirt guests' vCPUs balanced across the host's pCPUs."
    )
    parser.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="balance, every interval, until stopped (the default)")
    run.add_argument(
        "-c",
        "--config",
        type=Path,
        help=f"config file (default {DEFAULT_PATH}; defaults apply if absent)",
    )
    run.add_argument("-i", "--interval", type=_positive, help="seconds between cycles")
    run.add_argument(
        "-n",
        "--dry-run",
        action="store_true",
        default=None,
        help="log the moves it would make, pin nothing",
    )
    run.add_argument("--once", action="store_true", help="run one cycle and exit")
    run.add_argument(
        "-d",
        "--daemon",
        action="store_true",
        help="detach and log to syslog (under systemd, do not)",
    )
    run.add_argument("-p", "--pidfile", type=Path, help="pidfile (overrides the config)")
    run.add_argument(
        "--log-target",
        choices=("auto", "stderr", "syslog"),
        default="auto",
        help="auto: stderr, plus syslog when not under journald",
    )

    check = sub.add_parser("check-config", help="validate a config file and print it")
    check.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH)
    check.add_argument("-q", "--quiet", action="store_true", help="print nothing when valid")

    status = sub.add_parser("status", help="sample once and print each pCPU with its vCPUs")
    status.add_argument("-c", "--config", type=Path)
    status.add_argument("-i", "--interval", type=_positive)

    sub.add_parser("bench", help="run the simulator benchmark (options: bench --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else list(argv)
    # The original tool took the interval as its only argument: keep that shorthand.
    if len(args_list) == 1 and args_list[0].replace(".", "", 1).isdigit():
        args_list = ["run", "--interval", args_list[0]]
    if not args_list:
        args_list = ["run"]
    if args_list[0] == "bench":
        # The benchmark parses its own options; it and its plotting stay out of the agent's
        # own imports.
        bench = importlib.import_module("vcpusched_sim.bench")
        code: int = bench.main(args_list[1:])
        return code
    args = _parser().parse_args(args_list)
    if args.command == "check-config":
        return check_config(args.path, args.quiet)
    if args.command == "status":
        return status(args.config, args.interval)
    return run(args)


def _load(path: Path | None) -> tuple[Config, Path | None]:
    if path is None:
        if not DEFAULT_PATH.exists():
            return Config(), None
        path = DEFAULT_PATH
    return load_config(path), path


def check_config(path: Path, quiet: bool) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for error in exc.errors:
            print(f"{PROG}: {exc.source}: {error}", file=sys.stderr)
        return 1
    if not quiet:
        print(f"# {path}: valid")
        print(yaml.safe_dump(config.as_document(), sort_keys=False), end="")
    return 0


def _host(uri: str) -> Host:
    from vcpusched.libvirt_host import LibvirtHost

    return LibvirtHost(uri)


def run(args: argparse.Namespace) -> int:
    from vcpusched import logs, notify
    from vcpusched.pidfile import PidFile, PidfileError
    from vcpusched.service import Runner, Signals

    try:
        config, path = _load(args.config)
    except ConfigError as exc:
        for error in exc.errors:
            print(f"{PROG}: {exc.source}: {error}", file=sys.stderr)
        return 1
    overrides: dict[str, Any] = {
        "interval": args.interval,
        "dry_run": args.dry_run,
        "pidfile": args.pidfile,
    }
    config = override(config, **overrides)
    log_target = "syslog" if args.daemon else args.log_target
    if log_target == "syslog" and not os.path.exists(logs.SYSLOG_SOCKET):
        return _fail(
            f"cannot log to syslog: {logs.SYSLOG_SOCKET} does not exist "
            "(run in the foreground, or with --log-target stderr)"
        )
    pidfile = PidFile(config.pidfile)
    try:
        pidfile.acquire()
    except PidfileError as exc:
        return _fail(str(exc))
    signals = Signals()
    handlers = {
        signal.SIGTERM: lambda *_: signals.request_stop("SIGTERM"),
        signal.SIGINT: lambda *_: signals.request_stop("SIGINT"),
        signal.SIGHUP: lambda *_: signals.request_reload(),
    }
    try:
        if args.daemon:
            import daemon

            # Locked and validated before detaching, so those errors still reach the terminal
            # and the exit code; the lock is inherited by the detached process.
            context = daemon.DaemonContext(
                umask=0o022,
                working_directory="/",
                files_preserve=[pidfile.fd],
                signal_map=dict(handlers),
                detach_process=True,
            )
            context.open()
            pidfile.write()
        else:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        try:
            logs.setup(log_target, config.log_level, config.syslog_facility)
        except OSError as exc:
            return _fail(f"cannot open the log: {exc}")
        runner = Runner(config, path, overrides, _host, signals)
        # Only now can a SIGHUP no longer kill us: tell systemd we are up.
        notify.ready()
        return runner.run(once=args.once)
    finally:
        pidfile.release()


def status(path: Path | None, interval: float | None) -> int:

    try:
        config, _ = _load(path)
    except ConfigError as exc:
        for error in exc.errors:
            print(f"{PROG}: {exc.source}: {error}", file=sys.stderr)
        return 1
    config = override(config, interval=interval)
    host = _host(config.uri)
    try:
        first = host.sample()
        time.sleep(config.interval)
        second = host.sample()
    except HostError as exc:
        return _fail(str(exc))
    finally:
        host.close()
    snapshot = stats.snapshot(first, second, lambda d: excluded(config.exclude, d))
    if snapshot is None:
        return _fail("clock did not advance between samples")
    allowed = policy.allowed_pcpus(config, snapshot.util)
    print(render_status(snapshot, allowed))
    return 0


def render_status(snapshot: Snapshot, allowed: frozenset[int]) -> str:
    demand = policy.pcpu_demand(snapshot)
    by_pcpu: dict[int | None, list[Vcpu]] = {}
    for vcpu in snapshot.vcpus:
        by_pcpu.setdefault(vcpu.pcpu, []).append(vcpu)
    lines = [f"{'pcpu':>4} {'util%':>6} {'demand%':>8}  vcpus (domain/vcpu received%)"]
    for pcpu in sorted(snapshot.util):
        mark = "" if pcpu in allowed else " (not in cpus)"
        members = " ".join(_vcpu_text(v) for v in by_pcpu.get(pcpu, []))
        lines.append(
            f"{pcpu:>4} {snapshot.util[pcpu]:>6.1f} {demand[pcpu]:>8.1f}  {members or '-'}{mark}"
        )
    floating = by_pcpu.get(None, [])
    if floating:
        lines.append("unpinned: " + " ".join(_vcpu_text(v) for v in floating))
    util = [snapshot.util[p] for p in sorted(allowed)]
    sd = statistics.pstdev(util) if util else 0.0
    if any(v.excluded for v in snapshot.vcpus):
        lines.append("* excluded: never re-pinned, demand still counted")
    lines.append(f"pcpus {format_cpus(allowed)}  mean {statistics.fmean(util):.1f}%  sd {sd:.1f}")
    return "\n".join(lines)


def _vcpu_text(vcpu: Vcpu) -> str:
    return f"{vcpu.ref}{'*' if vcpu.excluded else ''}:{vcpu.received:.0f}"
