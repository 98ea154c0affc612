"""`sharedcare participants` on a real database: keygen, add, list, show, suspend, activate."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from joserfc.jwk import KeySet
from typer.testing import CliRunner

from sharedcare.cli import app as cli_app
from sharedcare.settings import Settings


@pytest.fixture
def cli(settings: Settings):
    env = {"SHAREDCARE_DATABASE_URL": settings.database, "SHAREDCARE_DATA_DIR": str(settings.data_dir)}
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str, str]:
        result = runner.invoke(cli_app, ["participants", *args], env=env)
        return result.exit_code, result.stdout, result.stderr

    return run


def test_keygen_writes_a_private_key_and_prints_the_jwks(cli, tmp_path: Path) -> None:
    code, out, _ = cli("keygen", "--alg", "RS384", "--kid", "k-1", "--out", str(tmp_path))
    assert code == 0
    printed = json.loads(out)
    assert [k["kid"] for k in printed["keys"]] == ["k-1"] and "d" not in printed["keys"][0]
    assert json.loads((tmp_path / "k-1.jwks.json").read_text()) == printed
    private = tmp_path / "k-1.private.jwk.json"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert json.loads(private.read_text())["d"]
    KeySet.import_key_set(printed)  # a usable public key set
    assert cli("keygen", "--kid", "k-1", "--out", str(tmp_path))[0] != 0  # never overwrites a key


def test_add_list_show_suspend_activate(cli, tmp_path: Path) -> None:
    assert cli("keygen", "--kid", "pas-1", "--out", str(tmp_path))[0] == 0
    code, _, err = cli(
        "add", "--id", "leeds-pas", "--kind", "both", "--name", "Leeds PAS", "--organization", "RR8",
        "--fhir-base", "https://pas.example/fhir", "--identifier-system", "https://leeds.example/Id/mrn",
        "--identifier-system", "https://leeds.example/Id/ae", "--messaging-endpoint", "https://pas.example/msg",
        "--jwks-file", str(tmp_path / "pas-1.jwks.json"), "--scopes", "system/Patient.rs system/*.read",
        "--environment", "test",
    )
    assert code == 0, err
    assert "Registered leeds-pas" in err
    code, out, _ = cli("list", "--json")
    (listed,) = json.loads(out)
    assert listed["id"] == "leeds-pas" and listed["status"] == "active" and listed["environment"] == "test"
    assert listed["identifier_systems"] == ["https://leeds.example/Id/mrn", "https://leeds.example/Id/ae"]
    assert "leeds-pas" in cli("list")[1]
    assert cli("suspend", "leeds-pas")[0] == 0
    shown = json.loads(cli("show", "leeds-pas")[1])
    assert shown["status"] == "suspended" and shown["fhir_base"] == "https://pas.example/fhir"
    assert shown["messaging_endpoint"] == "https://pas.example/msg" and shown["organization"] == "RR8"
    assert cli("activate", "leeds-pas")[0] == 0
    assert json.loads(cli("show", "leeds-pas")[1])["status"] == "active"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--jwks-url", "https://k.example/j", "--jwks-file", "x.json"], 2, "exactly one of --jwks-url and --jwks-file"),
        (["--jwks-url", "https://k.example/j", "--scopes", "everything"], 2, "SMART system scopes"),
        (["--jwks-file", "/nonexistent.json"], 2, "Cannot read"),
    ],
)
def test_bad_registrations_are_explained(cli, args: list[str], code: int, message: str) -> None:
    base = ["add", "--id", "c1", "--kind", "consumer", "--name", "C1"]
    if "--scopes" not in args:
        args = [*args, "--scopes", "system/*.read"]
    result = cli(*base, *args)
    assert result[0] == code
    assert message in " ".join(result[2].split())  # rich may wrap long lines


def test_unknown_and_duplicate_ids(cli) -> None:
    add = ["add", "--id", "dup", "--kind", "consumer", "--name", "D", "--jwks-url", "https://k.example/j",
           "--scopes", "system/*.read"]
    assert cli(*add)[0] == 0
    code, _, err = cli(*add)
    assert code == 1 and "already registered" in err
    assert cli("show", "nobody")[0] == 1
    assert cli("suspend", "nobody")[0] == 1
