"""The CLI reference stays honest: every command has help, and docs/cli.md is fresh.

docs/cli.md is generated from ``--help`` by ``python -m txengine.cli --doc
docs/cli.md``; these tests fail when a command is undocumented, has no help
text, or the page no longer matches what the generator prints.
"""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from txengine.cli import cli, render_docs

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
COMMANDS = sorted(cli.commands)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help(name: str) -> None:
    command = cli.commands[name]
    assert command.help and command.help.strip(), f"txengine {name} has no help text"
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"txengine {name} {param.opts[0]} has no help text"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_is_in_the_reference(name: str) -> None:
    assert f"\n## txengine {name}\n" in DOC.read_text("utf-8"), (
        f"txengine {name} is missing from docs/cli.md:"
        " run `python -m txengine.cli --doc docs/cli.md`")


def test_global_options_have_help() -> None:
    for param in cli.params:
        if isinstance(param, click.Option):
            assert param.help, f"txengine {param.opts[0]} has no help text"


def test_reference_is_not_stale() -> None:
    assert DOC.read_text("utf-8") == render_docs(), (
        "docs/cli.md is stale: run `python -m txengine.cli --doc docs/cli.md`")


def test_issue_commands_exist() -> None:
    wanted = {"init", "revision", "write", "upgrade", "downgrade", "current", "heads",
              "branches", "history", "show", "stamp", "merge", "revert", "audit", "verify",
              "export", "demo"}
    assert wanted <= set(COMMANDS)
