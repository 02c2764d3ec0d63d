"""`vcpusched` and `python -m vcpusched`: SIGINT is taken before the command line loads, so
Ctrl-C at any moment is a quiet exit 130 (the modules take a tenth of a second to import)."""

from __future__ import annotations

from vcpusched import interrupt


def main() -> int:
    interrupt.install()
    try:
        from vcpusched import cli
    except BaseException:
        # Python 3.11 turns a KeyboardInterrupt raised while a class is built (in a
        # `__set_name__`) into a RuntimeError: after a SIGINT, any failure is its doing.
        if interrupt.interrupted():
            return interrupt.EXIT_INTERRUPTED
        raise
    if interrupt.interrupted():
        return interrupt.EXIT_INTERRUPTED
    return cli.main()


if __name__ == "__main__":
    raise SystemExit(main())
