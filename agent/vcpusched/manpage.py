"""vcpusched(8), generated from the argument parser so that the page cannot drift from it.

    python -m vcpusched.manpage > man/vcpusched.8

tests/unit/test_manpage.py fails when the shipped page differs from what this prints.
"""

from __future__ import annotations

import argparse
import sys

from vcpusched import __version__, cli

_SIGNALS = (
    (
        "SIGHUP",
        "re-read and validate the config; if valid, apply it from the next regular tick, "
        "else keep the old one and log every error (see the reload command)",
    ),
    (
        "SIGTERM, SIGINT",
        "finish the cycle, restore the original pins if restore_on_exit, "
        "remove the pidfile, exit 0",
    ),
)
_FILES = (
    ("/etc/vcpusched.yaml", "the configuration; check it with vcpusched check-config"),
    ("/run/vcpusched/vcpusched.pid", "the pidfile, locked while an agent runs"),
    (
        "/run/vcpusched/reload-verdict.json",
        "the running agent's answer to its last SIGHUP, read by vcpusched reload",
    ),
    (
        "/run/vcpusched/vcpusched.state.json",
        "the running agent's live state, rewritten every cycle, read by vcpusched status",
    ),
    (
        "/var/lib/prometheus/node-exporter/vcpusched.prom",
        "its Prometheus metrics, when metrics.textfile_dir names that directory",
    ),
)


def _esc(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    # A line starting with a dot or quote would be read as a request.
    return "\\&" + text if text[:1] in (".", "'") else text


def _option_label(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"\\fI{_esc(str(action.metavar or action.dest)).upper()}\\fR"
    names = ", ".join(f"\\fB{_esc(s)}\\fR" for s in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or (
        "{" + ",".join(action.choices) + "}" if action.choices else action.dest.upper()
    )
    return f"{names} \\fI{_esc(str(metavar))}\\fR"


def _options(parser: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        lines += [".TP", _option_label(action), _esc(action.help or "")]
    return lines


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=10_000)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, "")
    return " ".join(formatter.format_help().split())


def render() -> str:
    parser = cli._parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    out = [
        f'.TH VCPUSCHED 8 "" "vcpusched {__version__}" "System Administration"',
        ".SH NAME",
        f"vcpusched \\- {_esc(parser.description or '')}",
        ".SH SYNOPSIS",
    ]
    for command in sub.choices.values():
        out += [".PP", _esc(_usage(command))]
    out += [
        ".PP",
        "\\fBvcpusched\\fR \\fISECONDS\\fR "
        "(shorthand for \\fBrun \\-\\-interval\\fR \\fISECONDS\\fR)",
        ".SH DESCRIPTION",
        "vcpusched measures, every interval, each physical CPU's utilization and each virtual "
        "CPU's load through libvirt, and re\\-pins vCPUs so that no pCPU is overloaded while "
        "another idles; once balanced it leaves the pins alone. Every decision is one log line.",
        ".SH OPTIONS",
        *_options(parser),
        ".SH COMMANDS",
    ]
    for name, command in sub.choices.items():
        out += [".SS " + name, _esc(command.description or helps.get(name) or "")]
        if name == "bench":
            out += [".PP", "Options: \\fBvcpusched bench \\-\\-help\\fR."]
            continue
        out += _options(command)
    out += [".SH EXIT STATUS"]
    for code, what in cli.EXIT_CODES:
        out += [".TP", f"\\fB{code}\\fR", _esc(what)]
    out += [".SH SIGNALS"]
    for name, what in _SIGNALS:
        out += [".TP", f"\\fB{name}\\fR", _esc(what)]
    out += [".SH FILES"]
    for path, what in _FILES:
        out += [".TP", f"\\fI{_esc(path)}\\fR", _esc(what)]
    out += [
        ".SH SEE ALSO",
        "\\fBsystemctl\\fR(1), \\fBvirsh\\fR(1), \\fBsystemd.service\\fR(5)",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
