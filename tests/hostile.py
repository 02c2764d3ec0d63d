"""Hostile inputs: configs meant to exhaust, hang, crash or mislead the agent.

`tests/unit/test_config_hostile.py` checks each one's message in-process. Run this module to
see, for each, what the agent says, its exit code, its time and its peak memory, each in a
fresh process (the table in docs/reliability.md):

    .venv/bin/python -m tests.hostile [--python PYTHON] [--timeout S]

`--python` runs another install of the agent (an older checkout, to compare).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20


def _bomb(key: str) -> bytes:
    # "Billion laughs": nine levels of nine aliases, 9**9 values when expanded.
    lines = ['a0: &a0 ["x"]']
    for i in range(1, 10):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    lines.append(f"{key}: *a9")
    return ("\n".join(lines) + "\n").encode()


def _just_under(line: bytes, head: bytes = b"") -> bytes:
    count = (MiB - len(head)) // len(line)
    return head + line * count


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    # Bytes, or a function making them (the 50 MB inputs are made only when written).
    content: bytes | Callable[[], bytes] | None
    # The exit code and a piece of the one line the agent must print.
    code: int
    says: str
    # check-config (the default) or a one-cycle run against libvirt's test driver.
    run: bool = False
    special: Callable[[Path], None] | None = None


def _fifo(path: Path) -> None:
    os.mkfifo(path, 0o644)


CASES: list[Case] = [
    Case("cpus-10M", 'cpus: "0-10000000"', b'cpus: "0-10000000"\n', 3, "beyond what this kernel"),
    Case(
        "cpus-1G", 'cpus: "0-1000000000"', b'cpus: "0-1000000000"\n', 3, "beyond what this kernel"
    ),
    Case(
        "cpus-many-ranges",
        'cpus: "0-255,0-255,..." (1 MiB)',
        _just_under(b"0-255,", b'cpus: "')[:-1] + b'"\n',
        0,
        "valid",
    ),
    Case("alias-interval", "billion laughs under interval", _bomb("interval"), 3, "aliases"),
    Case("alias-cpus", "billion laughs under cpus", _bomb("cpus"), 3, "aliases"),
    Case(
        "big-file",
        "50 MB of exclude names",
        lambda: b"exclude:\n" + b"  - vm\n" * (50 * MiB // 7),
        3,
        "larger than 1024 KiB",
    ),
    Case(
        "big-comments",
        "50 MB of comments",
        lambda: b"# x\n" * (50 * MiB // 4),
        3,
        "larger than 1024 KiB",
    ),
    Case("comments-1MiB", "1 MiB of comments", _just_under(b"# a comment line\n"), 0, "valid"),
    Case(
        "exclude-1MiB",
        "1 MiB of exclude names",
        _just_under(b"  - vm\n", b"exclude:\n"),
        3,
        "more than 20000 values",
    ),
    Case(
        "keys-1MiB",
        "1 MiB of distinct unknown keys",
        b"".join(f"k{i}: 1\n".encode() for i in range(MiB // 10)),
        3,
        "more than 20000 values",
    ),
    Case("string-1MiB", "a 1 MiB uri", b"uri: " + b"x" * (MiB - 16) + b"\n", 3, "longer than 4096"),
    Case(
        "long-key",
        "a key of 1 MiB",
        b"? " + b"k" * (MiB - 16) + b"\n: 1\n",
        3,
        "a key of 1048560 characters",
    ),
    Case(
        "nested",
        "50,000 nested brackets",
        b"interval: " + b"[" * 50_000 + b"\n",
        3,
        "nest",
    ),
    Case("nested-1MiB", "1 MiB of nested brackets", b"[" * (MiB - 1), 3, "nest"),
    Case(
        "huge-int",
        "interval: (400 digits)",
        b"interval: " + b"9" * 400 + b"\n",
        3,
        "400 digits is out of range",
    ),
    Case("huge-float", "interval: 1.0e+400", b"interval: 1.0e+400\n", 3, "got .inf"),
    Case("nan-interval", "interval: .nan", b"interval: .nan\n", 3, "got .nan"),
    Case("nan-min-gain", "min_gain: .nan", b"min_gain: .nan\n", 3, "got .nan"),
    Case("inf-high", "thresholds: {high: .inf}", b"thresholds: {high: .inf}\n", 3, "got .inf"),
    Case("neg-inf-low", "thresholds: {low: -.inf}", b"thresholds: {low: -.inf}\n", 3, "got -.inf"),
    Case(
        "dup-key",
        "interval twice",
        b"interval: 1\ninterval: 2\n",
        3,
        "interval: duplicate key, on line 1 and again on line 2",
    ),
    Case(
        "dup-block",
        "a second thresholds: block",
        b"thresholds:\n  high: 95\nmin_gain: 3\nthresholds:\n  low: 10\n",
        3,
        "thresholds: duplicate key, on line 1 and again on line 4",
    ),
    Case("glob-bracket", 'exclude: ["["]', b'exclude: ["["]\n', 3, "unclosed '['"),
    Case("glob-open-range", 'exclude: ["db-[a-"]', b'exclude: ["db-[a-"]\n', 3, "unclosed '['"),
    Case(
        "glob-empty-range",
        'exclude: ["db-[z-a]"]',
        b'exclude: ["db-[z-a]"]\n',
        3,
        "empty range 'z-a'",
    ),
    Case("octal", "cpus: 010", b"cpus: 010\n", 3, "010 is a number in YAML 1.1 (8)"),
    Case("base60", "cpus: 2:3", b"cpus: 2:3\n", 3, "2:3 is a number in YAML 1.1 (123)"),
    Case("hex", "interval: 0x10", b"interval: 0x10\n", 3, "0x10 is a number in YAML 1.1 (16)"),
    Case("underscore", "min_gain: 1_0", b"min_gain: 1_0\n", 3, "1_0 is a number in YAML 1.1 (10)"),
    Case("tag", "interval: !!float 1", b"interval: !!float 1\n", 3, "YAML tags"),
    Case(
        "python-tag",
        "!!python/object/apply:os.system",
        b'interval: !!python/object/apply:os.system ["true"]\n',
        3,
        "YAML tags",
    ),
    Case(
        "two-documents",
        "two YAML documents",
        b"interval: 1\n---\ninterval: 2\n",
        3,
        "more than one YAML document",
    ),
    Case("utf16", "UTF-16 with a byte order mark", "interval: 2\n".encode("utf-16"), 3, "UTF-16"),
    Case(
        "utf16-nobom",
        "UTF-16 without a byte order mark",
        "interval: 2\n".encode("utf-16-le"),
        3,
        "invalid YAML",
    ),
    Case("latin1", "Latin-1 bytes", b"uri: caf\xe9\n", 3, "not UTF-8 text: byte 0xe9"),
    Case(
        "null-interval",
        "interval: null",
        b"interval: null\n",
        3,
        "interval: expected a number, got null",
    ),
    Case(
        "null-empty-value",
        "interval: (nothing)",
        b"interval:\n",
        3,
        "interval: expected a number, got null",
    ),
    Case("null-cpus", "cpus: null (all pCPUs)", b"cpus: null\n", 0, "valid"),
    Case("null-document", "null (the whole file)", b"null\n", 0, "valid"),
    Case("empty", "an empty file", b"", 0, "valid"),
    Case("binary", "random binary bytes", bytes(range(256)) * 64, 3, "not UTF-8 text"),
    Case("fifo", "a FIFO at the config's path", None, 3, "not a regular file", special=_fifo),
    Case(
        "cpus-offline",
        'cpus: "100-200" on a 16-pCPU host (run --once)',
        b'cpus: "100-200"\n',
        3,
        "selects no online pCPU",
        run=True,
    ),
]


def materialize(case: Case, directory: Path) -> Path:
    path = directory / f"{case.name}.yaml"
    if case.special is not None:
        case.special(path)
    else:
        assert case.content is not None
        path.write_bytes(case.content() if callable(case.content) else case.content)
        path.chmod(0o644)
    return path


def measure(
    python: str, case: Case, directory: Path, timeout: float
) -> tuple[str, str, float, float, int]:
    """(exit code, first line, seconds, CPU seconds, peak RSS in MiB) of one fresh process."""
    path = materialize(case, directory)
    if case.run:
        full = path.read_text() + f"uri: test:///default\npidfile: {directory}/{case.name}.pid\n"
        path.write_text(full)
        args = [python, "-m", "vcpusched", "run", "--once", "-c", str(path)]
    else:
        args = [python, "-m", "vcpusched", "check-config", str(path)]
    out = directory / "out"
    result = subprocess.run(
        [sys.executable, "-S", "-c", _LAUNCHER, str(timeout), str(out), *args],
        capture_output=True,
        text=True,
        check=True,
    )
    code, elapsed, cpu, rss_kib = result.stdout.split()
    text = out.read_text(errors="replace").splitlines()
    said = [line for line in text if line.startswith("vcpusched: ")]
    lines = said or [line for line in text if not line.startswith("# ")] or text or [""]
    if "Traceback" in "\n".join(text):
        first = f"Traceback ... {text[-1][:80]} ({len(text)} lines)"
    else:
        first = lines[0][:140] + (f" (+{len(lines) - 1} lines)" if len(lines) > 1 else "")
    first = first.replace(str(directory) + "/", "")
    return code, first, float(elapsed), float(cpu), int(rss_kib) // 1024


# Peak RSS is read from wait4() in a small launcher: a child inherits its parent's
# high-water mark across fork and exec, and this module's parent holds 50 MB inputs.
_LAUNCHER = """
import os, sys, time
timeout, out, args = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
sink = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
start = time.monotonic()
pid = os.fork()
if pid == 0:
    import resource
    # An older agent expands "0-1000000000" in memory: cap it rather than the machine.
    cap = 3 << 30
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    os.dup2(sink, 1); os.dup2(sink, 2)
    devnull = os.open(os.devnull, os.O_RDONLY); os.dup2(devnull, 0)
    os.execv(args[0], args)
code = None
while code is None:
    got, status, usage = os.wait4(pid, os.WNOHANG)
    if got:
        code = str(os.waitstatus_to_exitcode(status))
    elif time.monotonic() - start > timeout:
        os.kill(pid, 9)
        _, _, usage = os.wait4(pid, 0)
        code = "killed-after-%ds" % timeout
    else:
        time.sleep(0.005)
cpu = usage.ru_utime + usage.ru_stime
print(code, "%.3f" % (time.monotonic() - start), "%.3f" % cpu, usage.ru_maxrss)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("cases", nargs="*", help="case names (default: all)")
    args = parser.parse_args(argv)
    chosen = [c for c in CASES if not args.cases or c.name in args.cases]
    # CPU time beside wall time: on a busy machine the wall clock also counts the waiting.
    print("| input | exit | time (s) | CPU (s) | peak RSS (MiB) | what the agent says |")
    print("| --- | --- | --- | --- | --- | --- |")
    worst_time = worst_mem = 0.0
    for case in chosen:
        with tempfile.TemporaryDirectory() as tmp:
            code, says, elapsed, cpu, rss = measure(args.python, case, Path(tmp), args.timeout)
        worst_time, worst_mem = max(worst_time, elapsed), max(worst_mem, rss)
        says = says.replace("|", "\\|")
        print(
            f"| {case.what} | {code} | {elapsed:.2f} | {cpu:.2f} | {rss} | `{says}` |", flush=True
        )
    print(f"\nworst: {worst_time:.2f} s, {worst_mem:.0f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
