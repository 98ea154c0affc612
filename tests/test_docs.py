"""The README documents every setting and every CLI command (datasette's test_docs idea)."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import typer.main

from sharedcare.cli import app as cli_app
from sharedcare.settings import ENV_PREFIX, Settings

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


def _documented_settings() -> set[str]:
    return set(re.findall(r"^\|\s*`(SHAREDCARE_[A-Z0-9_]+)`", README, flags=re.MULTILINE))


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_is_in_the_readme_table(field: str) -> None:
    assert f"{ENV_PREFIX}{field.upper()}" in _documented_settings()


def test_readme_table_has_no_settings_that_do_not_exist() -> None:
    known = {f"{ENV_PREFIX}{f.upper()}" for f in Settings.model_fields}
    assert _documented_settings() - known == set()


def _commands(group: click.Group, prefix: str = "sharedcare") -> list[str]:
    out = []
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            out += _commands(command, f"{prefix} {name}")
        else:
            out.append(f"{prefix} {name}")
    return out


@pytest.mark.parametrize("command", _commands(typer.main.get_command(cli_app)))  # type: ignore[arg-type]
def test_every_cli_command_is_in_the_readme(command: str) -> None:
    assert f"`{command}" in README


def test_readme_opens_with_exactly_two_setup_commands() -> None:
    head = README.split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", head, flags=re.DOTALL)
    assert len(blocks) == 2
    assert "sharedcare demo" in blocks[0]
    assert "pytest" in blocks[1]
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert blocks[1].strip() in ci
