"""docs/operations.md documents every option the server accepts, with its variable."""

from __future__ import annotations

from pathlib import Path

from tempomq import config

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_option_is_documented_with_its_environment_variable() -> None:
    text = (DOCS / "operations.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| `--", "| — | `TEMPOMQ_"))]
    # A flag's row is keyed by the flag; an environment-only option's row by its variable.
    documented = {row.split("`")[1]: row for row in rows}
    for option in config.OPTIONS:
        key = option.env if option.env_only else f"--{option.flag}"
        assert key in documented, f"{key} is missing from docs/operations.md"
        assert option.env in documented[key], f"{option.env} is missing from the {key} row"
    assert len(documented) == len(config.OPTIONS), "a documented option does not exist"
