"""The `sharedcare` command as an operator runs it: a real process, real database."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sharedcare import __version__
from sharedcare.settings import Settings


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sharedcare.cli", *args],
        check=False,  # the tests assert on the exit code themselves
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_version() -> None:
    out = run("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"sharedcare {__version__}"


def test_db_upgrade_is_idempotent_and_reversible(settings: Settings) -> None:
    env = {"SHAREDCARE_DATABASE_URL": settings.database, "SHAREDCARE_DATA_DIR": str(settings.data_dir)}
    first = run("db", "upgrade", env=env)
    assert first.returncode == 0, first.stderr
    again = run("db", "upgrade", env=env)  # a second run changes nothing
    assert again.returncode == 0, again.stderr
    assert "already at revision" in again.stderr
    current = run("db", "current", env=env)
    assert "(current)" in current.stdout
    down = run("db", "downgrade", "base", env=env)
    assert down.returncode == 0, down.stderr
    assert "empty" in run("db", "current", env=env).stdout
    up = run("db", "upgrade", env=env)
    assert up.returncode == 0 and "migrated from empty" in up.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SHAREDCARE_PORT": "not-a-port"}, "port"),
        ({"SHAREDCARE_LOG_LEVEL": "chatty"}, "log_level"),
        ({"SHAREDCARE_CONFIG_FILE": "/nonexistent/sharedcare.toml"}, "SHAREDCARE_CONFIG_FILE"),
    ],
)
def test_bad_settings_are_reported_not_tracebacks(env: dict[str, str], message: str) -> None:
    out = run("db", "current", env=env)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_config_file_is_read(tmp_path: pytest.TempPathFactory) -> None:
    config = tmp_path / "sharedcare.toml"  # type: ignore[operator]
    config.write_text('data_dir = "%s"\nport = 9123\n' % (tmp_path / "from-file"))  # type: ignore[operator]
    env = {"SHAREDCARE_CONFIG_FILE": str(config)}
    settings = subprocess.run(
        [sys.executable, "-c", "from sharedcare.settings import load_settings as l; s=l(); print(s.port, s.public_base_url)"],
        capture_output=True, text=True, env={**os.environ, **env}, check=True,
    ).stdout.split()
    assert settings == ["9123", "http://127.0.0.1:9123"]
