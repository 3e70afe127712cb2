"""The Makefile's own checks: a Python older than 3.11 is refused with a clear message, and a
.venv made by another Python is rebuilt. Run with a throwaway VENV; nothing is installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60
    )


def test_an_old_python_is_refused_saying_which_is_needed(tmp_path: Path) -> None:
    old = tmp_path / "python3.10"
    old.write_text(
        "#!/bin/sh\n"
        'case "$1" in --version) echo "Python 3.10.12";; -c) exit 1;; esac\n'
        "exit 1\n"
    )
    old.chmod(0o755)
    venv = tmp_path / "venv"
    done = make("install", f"PYTHON={old}", f"VENV={venv}")
    assert done.returncode != 0
    assert "tempomq needs Python >= 3.11" in done.stderr
    assert "Python 3.10.12" in done.stderr
    assert not venv.exists()


def test_a_venv_of_another_python_is_rebuilt(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".python-id").write_text("/usr/bin/python3.99 3 99 0\n")
    (venv / "marker").write_text("old")
    # -n: parse the Makefile (where the check runs) and print the recipes without running them.
    done = make("-n", "install", f"PYTHON={sys.executable}", f"VENV={venv}")
    assert done.returncode == 0, done.stderr
    assert "rebuilding it with" in done.stdout + done.stderr
    assert not (venv / "marker").exists()


def test_a_venv_of_the_same_python_is_kept(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    venv.mkdir()
    version = " ".join(str(n) for n in sys.version_info[:3])
    (venv / ".python-id").write_text(f"{sys.executable} {version}\n")
    (venv / "marker").write_text("kept")
    done = make("-n", "install", f"PYTHON={sys.executable}", f"VENV={venv}")
    assert done.returncode == 0, done.stderr
    assert (venv / "marker").exists()


def _venv_of_this_python(tmp_path: Path) -> Path:
    """A .venv the Makefile takes as made by this Python (nothing installed in it)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    version = " ".join(str(n) for n in sys.version_info[:3])
    (venv / ".python-id").write_text(f"{sys.executable} {version}\n")
    return venv


def _installs(target: str, venv: Path) -> list[str]:
    """The pip install lines ``make -n target`` would run."""
    done = make("-n", target, f"PYTHON={sys.executable}", f"VENV={venv}")
    assert done.returncode == 0, done.stderr
    pip = f"{venv}/bin/python -m pip install"
    return [line for line in done.stdout.splitlines() if line.startswith(pip)]


def test_make_run_installs_the_server_alone_and_make_test_the_dev_tools(tmp_path: Path) -> None:
    venv = _venv_of_this_python(tmp_path)
    [run] = _installs("run", venv)
    assert "-e ." in run and "dev" not in run
    [test] = _installs("test", venv)
    assert "-e '.[dev]'" in test


def test_switching_between_run_and_test_installs_only_what_is_missing(tmp_path: Path) -> None:
    venv = _venv_of_this_python(tmp_path)
    (venv / ".tempomq-server").touch()  # after make run
    assert _installs("run", venv) == []
    assert len(_installs("test", venv)) == 1  # the dev tools are still missing
    (venv / ".tempomq-dev").touch()  # after make test: it holds everything run needs
    assert _installs("test", venv) == []
    assert _installs("run", venv) == []
