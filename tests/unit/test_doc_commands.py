"""Every command shown in README.md and docs/*.md is valid, and exercised where that is cheap.

The fenced ``sh``/``bash``/``shell`` blocks (every line) and ``console`` blocks (the ``$ `` lines)
are read, and each command is checked by its program:

- ``tempomq ...`` parses with the real CLI parser (``serve`` options also go through the same
  settings loader the server uses, so a bad value fails here too);
- ``make TARGET... [VAR=value...]`` names targets the Makefile defines;
- ``docker compose -f FILE ...`` names a compose file that exists (tests/unit/test_compose.py
  checks its contents);
- ``curl ...`` in the README has a call with the same method and path in docs/walkthrough.sh,
  which tests/e2e/test_walkthrough.py runs against a real server;
- ``python bench/X.py ...`` names a script that exists and accepts every ``--flag`` used
  (tests/e2e/test_bench_scripts.py runs the scripts for real);
- ``compose/.../X.sh`` is an executable script in the repository (``make compose-test`` runs
  compose/local/build-images.sh).

Any other program fails, so a new kind of command cannot reach the docs unchecked. No server, no
network: only the bench scripts' ``--help`` runs in a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from tempomq import cli, config

ROOT = Path(__file__).resolve().parents[2]
README = "README.md"
WALKTHROUGH = ROOT / "docs" / "walkthrough.sh"
MAKEFILE = ROOT / "Makefile"

SHELL_LANGS = frozenset({"sh", "bash", "shell"})
CONSOLE_LANGS = frozenset({"console"})
# Fenced blocks that hold no commands. A tag in neither set fails test_every_fence_tag_is_known,
# so e.g. a new ```zsh block is classified on purpose instead of being skipped in silence.
NOT_COMMAND_LANGS = frozenset({"", "python", "yaml", "mermaid", "sql", "json", "text", "java"})

FENCE = re.compile(r"^\s{0,3}(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
PROMPT = "$ "
ECHO_STATUS = re.compile(r";\s*echo \$\?\s*$")
PLACEHOLDER = re.compile(r"^<[A-Za-z_][\w-]*>$")
SHELL_VAR = re.compile(r"\$(?:\{(?P<braced>\w+)\}|(?P<plain>\w+))")
SHELL_DEFAULT = re.compile(r'^(?P<name>\w+)="\$\{(?P=name):-(?P<value>[^}"$]*)\}"\s*$')


def doc_files() -> list[Path]:
    """README.md and docs/*.md; docs/bench-results/ is a subfolder, so the glob leaves it out."""
    return [ROOT / README, *sorted((ROOT / "docs").glob("*.md"))]


# -- extraction ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    lang: str
    lines: tuple[str, ...]  # the block's body, line `line + 1` first


@dataclass(frozen=True, slots=True)
class DocCommand:
    doc: str  # path relative to the repository root
    line: int  # 1-based line where the command starts
    text: str  # as written, continuation lines joined
    argv: tuple[str, ...]  # shell words, comments removed

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def fenced_blocks(path: Path) -> Iterator[Block]:
    doc = path.relative_to(ROOT).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence = opening["fence"]
        info = opening["info"].split()
        start = i
        i += 1
        while i < len(lines):
            closing = FENCE.match(lines[i])
            if closing and closing["fence"].startswith(fence) and not closing["info"].strip():
                break
            i += 1
        else:
            raise AssertionError(f"{doc}:{start + 1}: fenced block is never closed")
        yield Block(doc, start + 1, info[0].lower() if info else "", tuple(lines[start + 1 : i]))
        i += 1


def _logical_lines(block: Block) -> Iterator[tuple[int, str]]:
    """(line number, text) with lines ending in a backslash joined to the next."""
    pending: list[str] = []
    first = 0
    for number, line in enumerate(block.lines, start=block.line + 1):
        if not pending:
            first = number
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped.strip())
        yield first, " ".join(part for part in pending if part)
        pending = []
    if pending:
        yield first, " ".join(part for part in pending if part)


def block_commands(block: Block) -> Iterator[DocCommand]:
    for number, text in _logical_lines(block):
        if block.lang in CONSOLE_LANGS:
            if not text.startswith(PROMPT):
                continue  # the command's output
            text = ECHO_STATUS.sub("", text[len(PROMPT) :]).strip()
        elif block.lang not in SHELL_LANGS:
            continue
        argv = tuple(shlex.split(text, comments=True))
        if argv:  # blank or comment-only lines are not commands
            yield DocCommand(block.doc, number, text, argv)


#: Whole commands written inline in prose (`python bench/x.py --flag`, `make run RUN_ARGS=...`):
#: a span starting with one of these programs. Fragments such as `tempomq ack` are not matched.
INLINE = re.compile(
    r"`(?P<cmd>(?:\.venv/bin/)?python3? (?:bench|docs/examples)/[^`]+"
    r"|\.venv/bin/tempomq [^`]+|make (?:run|test|lint|bench)\b[^`]*)`"
)


def inline_commands(path: Path) -> Iterator[DocCommand]:
    doc = path.relative_to(ROOT).as_posix()
    in_fence = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for m in INLINE.finditer(line):
            yield DocCommand(doc, number, m["cmd"], tuple(shlex.split(m["cmd"])))


def collect() -> list[DocCommand]:
    fenced = [
        cmd
        for path in doc_files()
        for block in fenced_blocks(path)
        for cmd in block_commands(block)
    ]
    return fenced + [cmd for path in doc_files() for cmd in inline_commands(path)]


COMMANDS = collect()


# -- classification -----------------------------------------------------------------------------


def _is_program(word: str, name: str) -> bool:
    return word == name or word.endswith(f"/{name}")


def kind_of(argv: tuple[str, ...]) -> str:
    program = argv[0]
    if _is_program(program, "tempomq"):
        return "tempomq"
    if program == "make":
        return "make"
    if program == "docker" and argv[1:2] == ("compose",):
        return "docker compose"
    if program == "curl":
        return "curl"
    if program.startswith("compose/") and program.endswith(".sh"):
        return "compose script"
    if (
        any(_is_program(program, py) for py in ("python", "python3"))
        and len(argv) > 1
        and argv[1].startswith(("bench/", "docs/examples/"))
    ):
        return "bench"
    return "unknown"


# -- checks: each returns None when the command is fine, else what is wrong ---------------------


@cache
def cli_parser() -> argparse.ArgumentParser:
    return cli.build_parser()


def check_tempomq(cmd: DocCommand) -> str | None:
    parser = cli_parser()
    args = list(cmd.argv[1:])
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            namespace = parser.parse_args(args)
    except SystemExit as exc:
        if exc.code == 0 and ("--help" in args or "-h" in args):
            return None
        return f"the tempomq parser refused it (exit {exc.code}): {err.getvalue().strip()}"
    if namespace.command == "serve":
        try:  # what `tempomq serve` does next: values are parsed and cross-checked here
            config.load_settings(vars(namespace), {})
        except (config.ConfigError, ValueError) as exc:
            return f"tempomq serve would refuse its options: {exc}"
    return None


MAKE_RULE = re.compile(r"^(?P<targets>[^\s#:=][^#:=]*?)\s*::?(?!=)")


@cache
def make_targets() -> frozenset[str]:
    targets: set[str] = set()
    for line in MAKEFILE.read_text(encoding="utf-8").splitlines():
        rule = MAKE_RULE.match(line)
        if rule:
            targets.update(t for t in rule["targets"].split() if not t.startswith((".", "$")))
    return frozenset(targets)


def check_make(cmd: DocCommand) -> str | None:
    problems = []
    for word in cmd.argv[1:]:
        if word.startswith("-"):
            problems.append(f"make option {word!r} is not supported by this check")
        elif "=" in word:
            continue  # a variable, e.g. RUN_ARGS="..."
        elif word not in make_targets():
            problems.append(f"no target {word!r} in the Makefile (has {sorted(make_targets())})")
    return "; ".join(problems) or None


def check_docker_compose(cmd: DocCommand) -> str | None:
    files: list[str] = []
    words = iter(cmd.argv[2:])
    for word in words:
        if word in ("-f", "--file"):
            files.append(next(words, ""))
        elif word.startswith("--file="):
            files.append(word.removeprefix("--file="))
    if not files:
        return "docker compose without -f FILE: it would look for a compose file in the cwd"
    missing = [f for f in files if not f or not (ROOT / f).is_file()]
    return f"compose file(s) not in the repository: {missing}" if missing else None


CURL_OPTS_WITH_ARG = frozenset(
    {
        "-X", "--request", "-d", "--data", "--data-raw", "--data-binary", "-H", "--header",
        "-o", "--output", "-w", "--write-out", "-m", "--max-time", "-u", "--user",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class CurlCall:
    method: str
    path: tuple[str, ...]  # the URL path's segments, without host and query


def parse_curl(argv: tuple[str, ...], variables: dict[str, str] | None = None) -> CurlCall:
    """Method and path of a curl call. ``variables`` (shell defaults) are substituted first."""
    method: str | None = None
    has_data = False
    urls: list[str] = []
    words = iter(argv[1:])
    for word in words:
        if word in CURL_OPTS_WITH_ARG:
            value = next(words, "")
            if word in ("-X", "--request"):
                method = value
            elif word.startswith(("-d", "--data")):
                has_data = True
        elif word.startswith("-"):
            continue
        else:
            urls.append(word)
    if len(urls) != 1:
        raise ValueError(f"expected one URL in {shlex.join(argv)}, found {urls}")
    url = urls[0]
    if variables:
        url = SHELL_VAR.sub(lambda m: variables.get(m["braced"] or m["plain"], m[0]), url)
    url = re.sub(r"^[a-z]+://", "", url).split("?", 1)[0].split("#", 1)[0]
    _, slash, path = url.partition("/")
    if not slash:
        raise ValueError(f"no path in the URL {urls[0]!r}")
    return CurlCall(method or ("POST" if has_data else "GET"), tuple(path.split("/")))


def _segment_matches(doc: str, script: str) -> bool:
    if doc == script:
        return True
    # A placeholder in the doc (<id>, <receipt>) stands for a value the script computes.
    return bool(PLACEHOLDER.match(doc)) and bool(SHELL_VAR.fullmatch(script))


def curl_matches(doc: CurlCall, script: CurlCall) -> bool:
    return (
        doc.method == script.method
        and len(doc.path) == len(script.path)
        and all(_segment_matches(d, s) for d, s in zip(doc.path, script.path, strict=True))
    )


@cache
def walkthrough_calls() -> tuple[CurlCall, ...]:
    text = WALKTHROUGH.read_text(encoding="utf-8")
    block = Block(WALKTHROUGH.name, 0, "sh", tuple(text.splitlines()))
    variables: dict[str, str] = {}
    calls: list[CurlCall] = []
    for _, line in _logical_lines(block):
        if line.startswith("#"):
            continue
        default = SHELL_DEFAULT.match(line)
        if default:  # TOPIC="${TOPIC:-orders}": the script's own default stands for the value
            variables[default["name"]] = default["value"]
        start = re.search(r"(?:^|[\s($])curl\s", line)
        if start is None:
            continue
        punct = shlex.shlex(line[start.start() :], posix=True, punctuation_chars=";()|&")
        punct.whitespace_split = True
        words: list[str] = []
        for word in punct:
            if word and set(word) <= set(";()|&"):
                if words and words[0] == "curl":
                    break
                words = []
                continue
            words.append(word)
        if words and words[0] == "curl":
            calls.append(parse_curl(tuple(words), variables))
    return tuple(calls)


def check_curl(cmd: DocCommand) -> str | None:
    if cmd.doc != README:
        return (
            f"curl outside {README} is not checked: add it to a script a test runs, and extend "
            "this test to compare against it"
        )
    try:
        call = parse_curl(cmd.argv)
    except ValueError as exc:
        return str(exc)
    if any(curl_matches(call, script) for script in walkthrough_calls()):
        return None
    return (
        f"no {call.method} /{'/'.join(call.path)} in docs/walkthrough.sh, so no test runs it "
        f"(the script has {[(c.method, '/'.join(c.path)) for c in walkthrough_calls()]})"
    )


@cache
def bench_help(script: str) -> str:
    done = subprocess.run(
        [sys.executable, script, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"{script} --help exited {done.returncode}: {done.stderr}")
    return done.stdout


def check_bench(cmd: DocCommand) -> str | None:
    script = cmd.argv[1]
    if not (ROOT / script).is_file():
        return f"no script {script}"
    usage = bench_help(script)
    unknown = [
        flag
        for flag in (word.split("=", 1)[0] for word in cmd.argv[2:] if word.startswith("--"))
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", usage)
    ]
    return f"{script} does not accept {unknown}" if unknown else None


def check_compose_script(cmd: DocCommand) -> str | None:
    script = ROOT / cmd.argv[0]
    if not script.is_file():
        return f"{cmd.argv[0]} is not a file in the repository"
    return None if os.access(script, os.X_OK) else f"{cmd.argv[0]} is not executable"


def check_unknown(cmd: DocCommand) -> str | None:
    return (
        f"no check for the program {cmd.argv[0]!r}: add one to tests/unit/test_doc_commands.py "
        "(or show the command outside a sh/console block if it is not meant to be run)"
    )


CHECKS: dict[str, Callable[[DocCommand], str | None]] = {
    "tempomq": check_tempomq,
    "make": check_make,
    "docker compose": check_docker_compose,
    "curl": check_curl,
    "bench": check_bench,
    "compose script": check_compose_script,
    "unknown": check_unknown,
}


def check(cmd: DocCommand) -> str | None:
    return CHECKS[kind_of(cmd.argv)](cmd)


# -- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", COMMANDS, ids=[cmd.where for cmd in COMMANDS])
def test_doc_command_is_valid(cmd: DocCommand) -> None:
    problem = check(cmd)
    assert problem is None, f"{cmd.where}: `{cmd.text}`: {problem}"


def test_every_fence_tag_is_known() -> None:
    known = SHELL_LANGS | CONSOLE_LANGS | NOT_COMMAND_LANGS
    unknown = [
        f"{block.doc}:{block.line} ```{block.lang}"
        for path in doc_files()
        for block in fenced_blocks(path)
        if block.lang not in known
    ]
    assert not unknown, f"classify these fenced blocks in test_doc_commands.py: {unknown}"


def test_collection_finds_the_known_examples() -> None:
    kinds = Counter(kind_of(cmd.argv) for cmd in COMMANDS)
    assert kinds["tempomq"] >= 20, kinds
    assert kinds["curl"] >= 10, kinds
    assert kinds["docker compose"] >= 2, kinds
    found = {(cmd.doc, cmd.argv) for cmd in COMMANDS}
    assert (README, ("make", "run")) in found  # its trailing comment stripped
    assert (README, ("make", "test")) in found
    # a console block: "$ " removed, "; echo $?" dropped, output lines left out
    assert ("docs/cli.md", ("tempomq", "topic", "create", "orders")) in found
    assert not any(cmd.argv[0] in {"name", "msg_id", "tempomq:"} for cmd in COMMANDS)
    # continuation lines joined: the README's send carries its -d body from the next line
    send = next(c for c in COMMANDS if c.doc == README and c.line == 38)
    assert send.argv[-2:] == (
        "-d",
        '{"body": "order 17 created", "tags": "created", "keys": ["order-17"]}',
    )
    # other fences are not commands: the python, mermaid and untagged blocks give nothing
    assert not any(cmd.doc in ("docs/sdk.md", "docs/architecture.md") for cmd in COMMANDS)
    assert not any(cmd.doc.startswith("docs/bench-results/") for cmd in COMMANDS)


def test_walkthrough_calls_are_found() -> None:
    calls = walkthrough_calls()
    assert len(calls) == 11, calls
    assert CurlCall("POST", ("v1", "topics", "orders", "groups", "billing", "receive")) in calls
    assert CurlCall("DELETE", ("v1", "delayed", "$id")) in calls


def _cmd(text: str, doc: str = README) -> DocCommand:
    return DocCommand(doc, 0, text, tuple(shlex.split(text, comments=True)))


@pytest.mark.parametrize(
    "text",
    [
        ".venv/bin/tempomq serve --help",
        "tempomq serve --http 127.0.0.1:9090 --flush sync",
        'make run RUN_ARGS="--flush sync --http 127.0.0.1:9090"',
        "docker compose --file=compose/docker-compose.yml down -v",
        "curl -s localhost:8080/v1/delayed/<receipt>",
        "curl -s 'localhost:8080/v1/topics/orders/messages?key=other'",
        "python bench/wheel_bench.py --max-pending 1000000",
        ".venv/bin/python bench/delay_release.py --save=x.json --memory 10",
        ".venv/bin/python docs/examples/consumer.py --seconds 10",
        "compose/local/build-images.sh",
    ],
)
def test_checks_accept_valid_forms(text: str) -> None:
    assert check(_cmd(text)) is None


@pytest.mark.parametrize(
    ("text", "doc", "expected"),
    [
        ("tempomq frobnicate", README, "parser refused"),
        ("tempomq send", README, "parser refused"),
        ("tempomq send orders hi --delay soon", README, "parser refused"),
        ("tempomq serve --http nohost", README, "would refuse"),
        ("make run deploy", README, "no target 'deploy'"),
        ("make -j4 test", README, "option"),
        ("docker compose -f compose/nope.yml up", README, "not in the repository"),
        ("docker compose up", README, "without -f"),
        ("curl -s -X PUT localhost:8080/v1/topics", README, "no PUT /v1/topics"),
        ("curl -s localhost:8080/v1/delayed/17", README, "no GET /v1/delayed/17"),
        ("curl -s localhost:8080/v1/topics", "docs/operations.md", "outside README.md"),
        ("python bench/nope.py", README, "no script"),
        ("python bench/wheel_bench.py --max-pendng 10", README, "--max-pendng"),
        ("rm -rf data", README, "no check for the program 'rm'"),
        ("python docs/examples/consumer.py --frobnicate", README, "does not accept"),
        (".venv/bin/python scripts/other.py", README, "no check for the program"),
        ("compose/local/nope.sh", README, "not a file in the repository"),
        ("compose/healthcheck.py", README, "no check for the program"),
    ],
)
def test_checks_reject_invalid_forms(text: str, doc: str, expected: str) -> None:
    problem = check(_cmd(text, doc))
    assert problem is not None
    assert expected in problem
