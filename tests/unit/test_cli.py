"""The crib command line."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from cri import __version__
from cri.config import Config, load

ROOT = Path(__file__).resolve().parents[2]


def crib(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cri", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_version() -> None:
    done = crib("version")
    assert done.returncode == 0 and done.stdout.strip() == f"crib {__version__}"


def test_config_prints_defaults_that_load_back(tmp_path: Path) -> None:
    done = crib("config")
    assert done.returncode == 0
    tomllib.loads(done.stdout)
    f = tmp_path / "c.toml"
    f.write_text(done.stdout)
    assert load(f, tmp_path / "none.d") == Config()


def test_config_error_exit_code(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[streaming]\nport = 'x'\n")
    done = crib("--config", str(f), "--config-dir", str(tmp_path / "d"),
                "--runroot", str(tmp_path / "run"), "--root", str(tmp_path / "root"))
    assert done.returncode == 2
    assert f"{f}: streaming.port: 'x' is not an integer" in done.stderr
