"""The tempomq command line: help lists every option, bad values exit 2 with a clear message."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from broker_core import dirlock
from tempomq import cli
from tempomq.config import OPTIONS, HostPort, Settings


def test_serve_help_lists_every_option_and_its_env_var(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    # argparse wraps help text, which may split a long variable name across lines.
    flat = " ".join(out.split())
    for opt in OPTIONS:
        if opt.env_only:  # a secret: no flag, and not shown
            assert opt.cli not in flat
            continue
        assert opt.cli in flat
        assert opt.env in flat


def test_top_level_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_no_command_prints_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tempomq")
    for name in cli.COMMANDS:
        assert name in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert re.fullmatch(r"tempomq \S+\n", capsys.readouterr().out)


def test_invalid_flag_value_exits_2_naming_flag_and_env(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["serve", "--segment-bytes", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tempomq: error: --segment-bytes / TEMPOMQ_SEGMENT_BYTES:")
    assert "'lots'" in err
    assert "Traceback" not in err


def test_invalid_env_value_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEMPOMQ_HTTP", "nowhere")
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "--http / TEMPOMQ_HTTP" in err
    assert "from the environment" in err


def test_unknown_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--data-directory", "x"]) == 2
    assert "unrecognized arguments: --data-directory" in capsys.readouterr().err


def test_serve_runs_the_app_with_loaded_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_data_dir: Path
) -> None:
    seen: list[Settings] = []

    def fake_run(settings: Settings) -> int:
        seen.append(settings)
        return 0

    # serve imports tempomq.app when it runs; a stand-in module keeps the server out of this test.
    monkeypatch.setitem(sys.modules, "tempomq.app", types.SimpleNamespace(run=fake_run))
    monkeypatch.setattr(cli, "configure_logging", lambda **_: None)
    monkeypatch.setenv("TEMPOMQ_FLUSH", "sync")
    code = cli.main(["serve", "--http", "127.0.0.1:0", "--data-dir", str(tmp_data_dir)])
    assert code == 0
    assert seen[0].http == HostPort("127.0.0.1", 0)
    assert seen[0].data_dir == tmp_data_dir
    assert seen[0].flush == "sync"


def test_python_dash_m_tempomq() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tempomq", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: tempomq serve")


def test_serve_holds_the_data_directory_lock_while_the_app_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_data_dir: Path
) -> None:
    refused: list[str] = []

    def fake_run(settings: Settings) -> int:
        # While the app runs, the directory is taken.
        with pytest.raises(dirlock.DataDirInUse) as info:
            dirlock.acquire(settings.data_dir)
        refused.append(str(info.value))
        return 0

    monkeypatch.setitem(sys.modules, "tempomq.app", types.SimpleNamespace(run=fake_run))
    monkeypatch.setattr(cli, "configure_logging", lambda **_: None)
    assert cli.main(["serve", "--http", "127.0.0.1:0", "--data-dir", str(tmp_data_dir)]) == 0
    assert refused == [f"data directory {tmp_data_dir} is in use by pid {os.getpid()}"]
    dirlock.acquire(tmp_data_dir).release()  # and it is given back when the app returns


def test_serve_on_a_taken_data_directory_exits_1_before_running_the_app(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_data_dir: Path
) -> None:
    ran: list[Settings] = []
    monkeypatch.setitem(sys.modules, "tempomq.app", types.SimpleNamespace(run=ran.append))
    monkeypatch.setattr(cli, "configure_logging", lambda **_: None)
    with dirlock.acquire(tmp_data_dir):
        code = cli.main(["serve", "--http", "127.0.0.1:0", "--data-dir", str(tmp_data_dir)])
    assert code == 1
    assert ran == []
    err = capsys.readouterr().err
    assert err == f"data directory {tmp_data_dir} is in use by pid {os.getpid()}\n"


def test_auth_token_prints_a_token_and_the_line_for_the_auth_file(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tempomq.auth import hash_token

    assert cli.main(["auth", "token"]) == 0
    token_line, hash_line = capsys.readouterr().out.splitlines()
    token = token_line.split()[1]
    assert token.startswith("tmq_") and len(token) >= 40
    assert hash_line == f'tokens_sha256: ["{hash_token(token)}"]'


def test_auth_token_file_is_made_once_private_and_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tempomq.auth import hash_token

    path = tmp_path / "admin-token"
    assert cli.main(["auth", "token", "--file", str(path)]) == 0
    token = path.read_text().strip()
    assert path.stat().st_mode & 0o777 == 0o600
    assert token not in capsys.readouterr().out  # the token itself is never printed
    assert cli.main(["auth", "token", "--file", str(path)]) == 0
    assert path.read_text().strip() == token, "an existing token is kept"
    assert hash_token(token) in capsys.readouterr().out
    assert cli.main(["auth", "token", "--file", str(tmp_path / "no" / "dir")]) == 1
