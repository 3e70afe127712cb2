"""The ``tempomq`` command line: one subcommand per entry in :data:`COMMANDS`.

``serve`` runs the service, after locking its data directory (:mod:`broker_core.dirlock`): a
second server on a directory in use exits 1 naming the owner's pid. The operator commands
(topic, send, receive, ..., probe) are defined as data in :mod:`tempomq.ops` and joined into the
same registry here; they speak HTTP through the SDK, which is why ``serve`` imports the server
only when it runs.

Exit codes: 0 ok, 1 runtime or server failure, 2 usage error, 3 not found, 4 conflict, 5 the
probe found a problem, 6 not allowed, 130 interrupted (:mod:`tempomq.ops` has the details).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from broker_core import dirlock
from tempomq import config, ops
from tempomq.logs import configure_logging, get_logger

PROG = "tempomq"

EPILOG = """\
exit codes: 0 ok; 1 server failure or unreachable; 2 usage error; 3 not found;
4 conflict; 5 the probe found lost, duplicated or unexpected messages; 6 not allowed
(401/403); 130 interrupted.
Client commands talk to --url (env TEMPOMQ_URL, default http://127.0.0.1:8080) with the
token in TEMPOMQ_TOKEN.
"""


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


@dataclass(frozen=True, slots=True)
class Command:
    """A leaf (``run``) or a noun with commands under it (``subcommands``)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    run: Callable[[argparse.Namespace], int] | None = None
    subcommands: Mapping[str, Command] = field(default_factory=dict)


def _serve(args: argparse.Namespace) -> int:
    settings = config.load_settings(vars(args), os.environ)
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    log = get_logger("tempomq.cli")
    for name in config.unknown_env_vars(os.environ):
        if name not in ops.CLIENT_ENV_VARS:
            log.warning("environment variable sets no option; misspelt?", variable=name)
    # One owner per data directory, taken before anything in it is opened and before the port
    # is bound: a second server started by mistake exits here without touching the files.
    try:
        lock = dirlock.acquire(settings.data_dir)
    except dirlock.DataDirInUse as exc:
        print(exc, file=sys.stderr)
        return 1
    from tempomq.app import run

    with lock:
        return run(settings)


def _token_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--file",
        metavar="PATH",
        help="write the token to PATH (mode 600) unless PATH exists already; print only its hash",
    )


def _token(args: argparse.Namespace) -> int:
    """A new token and the line for the auth file; with --file, kept in a file, not shown."""
    from tempomq.auth.principals import hash_token, new_token

    if args.file is None:
        token = new_token()
        print(f"token:         {token}\ntokens_sha256: [\"{hash_token(token)}\"]")
        return 0
    path = Path(args.file)
    try:
        # O_EXCL: a token once written is never replaced (a restarted stack keeps its token).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        print(f"{PROG}: error: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 1
    else:
        token = new_token()
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
    print(f"tokens_sha256: [\"{hash_token(token)}\"]")
    return 0


def _verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("TEMPOMQ_DATA_DIR", "./data"),
        help="the data directory to check (env TEMPOMQ_DATA_DIR, default ./data)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _verify(args: argparse.Namespace) -> int:
    import orjson

    from broker_core.verify import verify

    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        print(f"tempomq verify: no data directory at {data_dir}", file=sys.stderr)
        return 2
    report = verify(data_dir)
    if args.json:
        print(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        print("\n".join(report.lines()))
    return 1 if report.damaged else 0


def _from_op(entry: ops.Op | ops.OpGroup) -> Command:
    if isinstance(entry, ops.OpGroup):
        return Command(entry.help, subcommands={n: _from_op(e) for n, e in entry.ops.items()})
    return Command(entry.help, add_arguments=entry.add_arguments, run=entry.run)


COMMANDS: dict[str, Command] = {
    "serve": Command(
        help="run the broker and its HTTP API in this process",
        add_arguments=config.add_arguments,
        run=_serve,
    ),
    "verify": Command(
        help="check every file of a stopped server's data directory; exit 1 on damage",
        add_arguments=_verify_arguments,
        run=_verify,
    ),
    **{name: _from_op(entry) for name, entry in ops.OPERATIONS.items()},
    "auth": Command(
        help="credentials for the auth file (docs/security.md)",
        subcommands={
            "token": Command(
                help="make a random token and print it with its SHA-256 for tokens_sha256",
                add_arguments=_token_arguments,
                run=_token,
            )
        },
    ),
}


def _add_commands(
    parser: argparse.ArgumentParser, commands: Mapping[str, Command], dest: str
) -> None:
    metavar = "COMMAND" if dest == "command" else "ACTION"
    subparsers = parser.add_subparsers(dest=dest, metavar=metavar, required=True)
    for name, command in commands.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
        if command.subcommands:
            _add_commands(sub, command.subcommands, f"{dest}_{name}")
        else:
            sub.set_defaults(_run=command.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Delayed and transactional messages on a durable embedded broker core.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    _add_commands(parser, COMMANDS, "command")
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("tempomq")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


def _negative_values_kept(argv: Sequence[str]) -> list[str]:
    """``--delay -5s`` as ``--delay=-5s``: argparse would read ``-5s`` as an unknown option and
    say only "expected one argument"; joined, the option's own parser says what is wrong."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE.match(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


_NEGATIVE = re.compile(r"-\d")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 runtime failure, 2 usage error,
    3-5 and 130 as listed in :mod:`tempomq.ops`)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_help()
        return 0
    try:
        args = parser.parse_args(_negative_values_kept(argv))
    except SystemExit as exc:
        # argparse exits on --help (0) and on usage errors (2); return the code instead, so
        # callers and tests get an int from main() whatever happened.
        return exc.code if isinstance(exc.code, int) else 2
    run: Callable[[argparse.Namespace], int] = args._run
    try:
        return run(args)
    except config.ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
