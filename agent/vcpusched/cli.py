"""Command line: `run`, `check-config`, `status`, `reload` and `bench`.

Errors a user can fix are one line on stderr, `vcpusched: ...`, and a non-zero exit code that
says which kind (see EXIT_CODES); never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from vcpusched import __version__, interrupt, policy, state, stats
from vcpusched.config import DEFAULT_PATH, Config, ConfigError, load_config, override
from vcpusched.host import Host, HostError
from vcpusched.model import excluded as excluded_by
from vcpusched.pidfile import PidfileError, check_directory, open_regular

PROG = "vcpusched"

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_RUNNING = 4
EXIT_UNREACHABLE = 5
EXIT_INTERRUPTED = interrupt.EXIT_INTERRUPTED
EXIT_CODES = (
    (0, "success"),
    (EXIT_FAILURE, "any other error (pidfile unusable, no syslog, no answer to a reload)"),
    (EXIT_USAGE, "bad command line"),
    (EXIT_CONFIG, "bad config: invalid, or not runnable on this host (a reload rejected too)"),
    (EXIT_RUNNING, "another instance is running"),
    (EXIT_UNREACHABLE, "libvirt unreachable at start"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
)


def _fail(message: str, code: int = EXIT_FAILURE) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def _config_failed(exc: ConfigError) -> int:
    for error in exc.errors:
        print(f"{PROG}: {exc.source}: {error}", file=sys.stderr)
    return EXIT_CONFIG


def _absolute(text: str) -> Path:
    # The same rule as the config's `pidfile` key.
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"expected an absolute path, got {text!r}")
    return Path(text)


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
        prog=PROG,
        description="Keep libvirt guests' vCPUs balanced across the host's pCPUs.",
        epilog="exit codes:\n" + "\n".join(f"  {c:<4} {what}" for c, what in EXIT_CODES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    run.add_argument(
        "-p", "--pidfile", type=_absolute, help="pidfile, an absolute path (overrides the config)"
    )
    run.add_argument(
        "--log-target",
        choices=("auto", "stderr", "syslog"),
        default="auto",
        help="auto: stderr, plus syslog when not under journald",
    )

    check = sub.add_parser("check-config", help="validate a config file and print it")
    check.add_argument(
        "path", nargs="?", type=Path, default=DEFAULT_PATH, help=f"default {DEFAULT_PATH}"
    )
    check.add_argument("-q", "--quiet", action="store_true", help="print nothing when valid")

    status = sub.add_parser(
        "status",
        help="the running daemon's state (or a sample of its own): each pCPU with its vCPUs",
    )
    status.add_argument("-c", "--config", type=Path, help=f"config file (default {DEFAULT_PATH})")
    status.add_argument(
        "-i",
        "--interval",
        type=_positive,
        help="seconds to sample over when no daemon runs (default: the config's)",
    )
    status.add_argument("--json", action="store_true", help="print the state as JSON")

    reload = sub.add_parser(
        "reload",
        help="validate the config, then SIGHUP the running agent and wait for its verdict",
        description="Validate the config, send SIGHUP to the running agent and wait for its "
        "answer; exit 0 if it applied the file, 3 with its reason if it rejected it. "
        "This is the unit's ExecReload.",
    )
    reload.add_argument(
        "-c",
        "--config",
        type=Path,
        default=DEFAULT_PATH,
        help=f"config file (default {DEFAULT_PATH})",
    )
    reload.add_argument(
        "--pid", type=int, help="the agent's PID (default: read from the pidfile the config names)"
    )
    reload.add_argument(
        "-p", "--pidfile", type=_absolute, help="pidfile, when the agent runs with -p"
    )
    reload.add_argument(
        "-t",
        "--timeout",
        type=float,
        default=RELOAD_TIMEOUT,
        help=f"seconds to wait for the agent's answer (default {RELOAD_TIMEOUT:g})",
    )

    audit = sub.add_parser(
        "audit",
        help="replay the audit log: pins at an instant, moves and their reasons, counts",
        description="Replay the agent's audit lines from the journal, or from syslog files.",
    )
    from vcpusched import audit as audit_module

    audit_module.add_arguments(audit)

    sub.add_parser("bench", help="run the simulator benchmark (options: bench --help)")
    return parser


# Below the unit's TimeoutStartSec (which also bounds ExecReload); a cycle in progress, even
# on a large host, ends well within it.
RELOAD_TIMEOUT = 20.0


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C is an answer, not a crash: no traceback.
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `vcpusched status | head`: the reader left; say nothing more.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception:
        # Raised by a KeyboardInterrupt that Python wrapped (see vcpusched.__main__).
        if interrupt.interrupted():
            return EXIT_INTERRUPTED
        raise
    # A SIGINT whose exception a finalizer swallowed (see vcpusched.interrupt) still counts.
    return EXIT_INTERRUPTED if interrupt.interrupted() else code


def _main(argv: list[str] | None = None) -> int:
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
        return status(args.config, args.interval, args.json)
    if args.command == "reload":
        return reload(args)
    if args.command == "audit":
        return audit(args)
    return run(args)


def audit(args: argparse.Namespace) -> int:
    from vcpusched import audit as audit_module

    try:
        return audit_module.main(args, sys.stdout)
    except audit_module.AuditError as exc:
        return _fail(f"audit: {exc}")
    except BrokenPipeError:  # `vcpusched audit moves | head`
        sys.stderr.close()
        return 0


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
        return _config_failed(exc)
    interrupt.check()
    if not quiet:
        print(f"# {path}: valid")
        print(yaml.safe_dump(config.as_document(), sort_keys=False), end="")
    return 0


def _host(uri: str) -> Host:
    from vcpusched.libvirt_host import LibvirtHost

    return LibvirtHost(uri)


def run(args: argparse.Namespace) -> int:
    from vcpusched import logs, notify
    from vcpusched.pidfile import PidFile
    from vcpusched.service import Runner, Signals, StartError

    try:
        config, path = _load(args.config)
    except ConfigError as exc:
        return _config_failed(exc)
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
        return _fail(str(exc), EXIT_RUNNING if exc.running else EXIT_FAILURE)
    signals = Signals()
    handlers = {
        signal.SIGTERM: lambda *_: signals.request_stop("SIGTERM"),
        signal.SIGINT: lambda *_: signals.request_stop("SIGINT"),
        signal.SIGHUP: lambda *_: signals.request_reload(),
    }
    try:
        if args.daemon:
            import daemon

            # The start checks, before detaching, so that their exit code reaches the caller;
            # a libvirt connection does not survive a fork, so this one is only a probe.
            probe = Runner(config, path, overrides, _host, Signals())
            try:
                probe.start()
            except StartError as exc:
                return _fail(str(exc), EXIT_UNREACHABLE if exc.unreachable else EXIT_CONFIG)
            finally:
                probe.host.close()

            # Locked and validated before detaching, so those errors still reach the terminal
            # and the exit code; the lock is inherited by the detached process.
            context = daemon.DaemonContext(
                umask=0o022,
                working_directory="/",
                files_preserve=[pidfile.fd, *signals.fds],
                signal_map=dict(handlers),
                detach_process=True,
            )
            context.open()
            pidfile.write()
        else:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            # A Ctrl-C before these handlers whose exception was swallowed: stop, not run.
            interrupt.check()
        try:
            logs.setup(log_target, config.log_level, config.syslog_facility)
        except OSError as exc:
            return _fail(f"cannot open the log: {exc}")
        runner = Runner(config, path, overrides, _host, signals)
        try:
            runner.exporter.start()
        except OSError as exc:
            return _fail(
                f"metrics.listen: cannot listen on {config.metrics_listen}: {exc.strerror or exc}"
                " (under systemd the unit needs the network drop-in in the README)"
            )
        try:
            runner.start()
        except StartError as exc:
            return _fail(str(exc), EXIT_UNREACHABLE if exc.unreachable else EXIT_CONFIG)
        # Only now can a SIGHUP no longer kill us: tell systemd we are up.
        notify.ready()
        return runner.run(once=args.once)
    finally:
        pidfile.release()


def reload(args: argparse.Namespace) -> int:
    """Validate, SIGHUP the agent, wait for its verdict: the unit's ExecReload."""
    from vcpusched.service import VERDICT_FILE

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _config_failed(exc)
    pidfile: Path = args.pidfile or config.pidfile
    directory = pidfile.parent
    try:
        check_directory(directory)
        pid = args.pid or _pid_from(pidfile)
    except (OSError, PidfileError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        return _fail(f"no running agent found through {pidfile}: {reason}")
    verdict_path = directory / VERDICT_FILE
    sent = time.monotonic()
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        return _fail(f"cannot signal the agent (pid {pid}): {exc.strerror}")
    deadline = sent + args.timeout
    while time.monotonic() < deadline:
        state = _read_verdict(verdict_path)
        if state is not None and state.get("pid") == pid:
            last = state.get("last_reload")
            if isinstance(last, dict) and float(state.get("reload_started", 0)) >= sent:
                if last.get("accepted"):
                    print(f"{PROG}: reloaded {args.config} (generation {last.get('generation')})")
                    return 0
                return _fail(f"reload rejected: {args.config}: {last.get('error')}", EXIT_CONFIG)
        time.sleep(0.05)
    return _fail(f"no answer from the agent (pid {pid}) within {args.timeout:g} s")


def _pid_from(pidfile: Path) -> int:
    fd = open_regular(pidfile, os.O_RDONLY)
    try:
        text = os.read(fd, 32).decode(errors="replace").strip()
    finally:
        os.close(fd)
    if not text.isdigit():
        raise ValueError(f"it holds {text!r}, not a PID")
    pid = int(text)
    # A pidfile left by a killed agent may name a PID since reused by something else:
    # signal only a process that is this program.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        raise ValueError(f"pid {pid} is not running") from None
    if b"vcpusched" not in cmdline:
        raise ValueError(f"pid {pid} is not a vcpusched agent (stale pidfile)")
    return pid


def _read_verdict(path: Path) -> dict[str, Any] | None:
    try:
        fd = open_regular(path, os.O_RDONLY)
    except (OSError, PidfileError):
        return None  # not written yet, or being replaced
    try:
        data = json.loads(os.read(fd, 65536))
    except ValueError:
        return None
    finally:
        os.close(fd)
    return data if isinstance(data, dict) else None


def status(path: Path | None, interval: float | None, as_json: bool = False) -> int:
    """The running daemon's state when one runs (read from its state file), else a sample."""
    try:
        config, _ = _load(path)
    except ConfigError as exc:
        return _config_failed(exc)
    config = override(config, interval=interval)
    try:
        live, age = state.read_running(config.pidfile)
        source: dict[str, Any] = {"kind": "daemon", "pid": live.pid, "age_seconds": round(age, 3)}
        header = (
            f"daemon pid {live.pid}: its state of {age:.1f} s ago "
            f"(config generation {live.generation})"
        )
    except state.StateUnavailable as exc:
        note = str(exc)
        try:
            live = sample_state(config)
        except HostError as host_exc:
            return _fail(f"{note}; sampling: {host_exc}", EXIT_UNREACHABLE)
        except ValueError as value_exc:
            return _fail(f"{note}; sampling: {value_exc}")
        source = {"kind": "sample", "note": note, "seconds": config.interval}
        header = f"{note}: sampled by itself over {config.interval:g} s"
    interrupt.check()
    if as_json:
        print(json.dumps({"source": source, **live.as_json()}, indent=2, sort_keys=True))
    else:
        print(header)
        print(state.render(live))
    return 0


def sample_state(config: Config) -> state.LiveState:
    """A LiveState from two samples of our own, one interval apart (no plan: no daemon)."""
    host = _host(config.uri)
    try:
        first = host.sample()
        interrupt.check()  # before the wait, however long the interval
        time.sleep(config.interval)
        second = host.sample()
    finally:
        host.close()

    def excluded(domain: str) -> bool:
        return excluded_by(config.exclude, domain)

    snapshot = stats.snapshot(first, second, excluded)
    if snapshot is None:
        raise ValueError("clock did not advance between samples")
    allowed = policy.allowed_pcpus(config, snapshot.util)
    pcpus, vcpus = state.measured(second, snapshot, policy.pcpu_demand(snapshot), allowed, excluded)
    return state.LiveState(
        version=__version__,
        pid=None,
        written=time.time(),
        interval=config.interval,
        generation=0,
        running=True,
        connected=True,
        disconnected_since=None,
        error=None,
        last_reload=None,
        last_cycle=time.time(),
        pcpus=pcpus,
        vcpus=vcpus,
        moves=(),
        held={},
        dry_run=config.dry_run,
    )
