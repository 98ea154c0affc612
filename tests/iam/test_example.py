"""The README's integrator example, run as written against a real `sharedcare serve` socket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import RunningHub
from typer.testing import CliRunner

from sharedcare.cli import app as cli_app
from sharedcare.settings import Settings

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "get_token.py"


def test_example_gets_a_token_with_authlib_and_reads_patients(settings: Settings, tmp_path: Path) -> None:
    env = {"SHAREDCARE_DATABASE_URL": settings.database, "SHAREDCARE_DATA_DIR": str(settings.data_dir)}
    runner = CliRunner()
    keygen = runner.invoke(cli_app, ["participants", "keygen", "--kid", "portal-1", "--out", str(tmp_path)], env=env)
    assert keygen.exit_code == 0, keygen.output
    jwks_file = tmp_path / "portal-1.jwks.json"
    added = runner.invoke(
        cli_app,
        ["participants", "add", "--id", "example-portal", "--kind", "consumer", "--name", "Example Portal",
         "--organization", "RR8", "--jwks-file", str(jwks_file), "--scopes", "system/Patient.rs"],
        env=env,
    )
    assert added.exit_code == 0, added.output
    with RunningHub(env) as hub:
        run = subprocess.run(
            [sys.executable, str(EXAMPLE), "--fhir-base", f"{hub.url}/fhir", "--client-id", "example-portal",
             "--key", str(tmp_path / "portal-1.private.jwk.json"), "--scope", "system/Patient.rs"],
            capture_output=True, text=True, timeout=60, env={**os.environ}, check=False,
        )
    assert run.returncode == 0, run.stderr
    token_line, fhir_line = run.stdout.strip().splitlines()
    assert json.loads(token_line) == {"token_type": "bearer", "expires_in": 300, "scope": "system/Patient.rs"}
    assert fhir_line == "200 Bundle"
