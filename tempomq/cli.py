"""The ``tempomq`` command line: one subcommand per entry in :data:`COMMANDS`.

``serve`` runs the service. Client commands (topic, send, receive, ...) are meant to join the
registry later; they will speak HTTP through the SDK, which is why ``serve`` imports the server
only when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tempomq import config
from tempomq.logs import configure_logging, get_logger

PROG = "tempomq"


@dataclass(frozen=True, slots=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _serve(args: argparse.Namespace) -> int:
    settings = config.load_settings(vars(args), os.environ)
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    log = get_logger("tempomq.cli")
    for name in config.unknown_env_vars(os.environ):
        log.warning("environment variable sets no option; misspelt?", variable=name)
    from tempomq.app import run

    return run(settings)


COMMANDS: dict[str, Command] = {
    "serve": Command(
        help="run the broker and its HTTP API in this process",
        add_arguments=config.add_arguments,
        run=_serve,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Delayed and transactional messages on a durable embedded broker core.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 runtime failure, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # argparse exits on --help (0) and on usage errors (2); return the code instead, so
        # callers and tests get an int from main() whatever happened.
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return COMMANDS[args.command].run(args)
    except config.ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
