"""The docs say what the code does: docs/cli.md equals `--help`, and every `os` / `os-train` command
shown in README.md, grpo_tutorial/ and docs/ parses with the real CLI (flags and types)."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
# docs/cli.md is generated (checked above); its usage lines are not commands.
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "grpo_tutorial").glob("*.md")),
             *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "cli.md")]


def test_cli_reference_is_generated_from_help():
    from gen_cli_docs import render

    assert (ROOT / "docs" / "cli.md").read_text() == render(), "run: python tools/gen_cli_docs.py"


def _commands(text: str) -> list[str]:
    """`os ...` / `os-train ...` lines inside fenced code blocks, with continuation lines joined."""
    found = []
    for block in re.findall(r"```(?:bash|console|sh)?\n(.*?)```", text, flags=re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ")
            line = line.split("  #")[0].strip()
            if re.match(r"^(os|os-train)\s", line):
                found.append(line)
    return found


DOC_COMMANDS = [(path.relative_to(ROOT).as_posix(), cmd) for path in DOC_FILES for cmd in _commands(path.read_text())]


def test_docs_show_commands():
    assert len(DOC_COMMANDS) >= 10


@pytest.mark.parametrize("where, command", DOC_COMMANDS, ids=[f"{w}:{c[:50]}" for w, c in DOC_COMMANDS])
def test_documented_command_parses(where: str, command: str):
    from opensloth.cli.main import app as os_app
    from opensloth.cli.train import app as train_app

    argv = shlex.split(command)
    app = train_app if argv[0] == "os-train" else os_app
    command = typer.main.get_command(app)
    # `...` stands for "the rest of your options" in prose examples; `$VAR` for a value.
    args = [a if not a.startswith("$") else "x" for a in argv[1:] if a != "..."]
    ctx = command.make_context(argv[0], [], resilient_parsing=True)
    while hasattr(command, "get_command"):  # a group: os-train data sft -> the leaf command
        name, args = args[0], args[1:]
        command = command.get_command(ctx, name)
        assert command is not None, f"{where}: unknown command {name!r} in: {command}"
    # Parses every option and converts its type; raises on an unknown flag. No callback runs.
    command.make_context(name, list(args), parent=ctx)


def _install_commands(path: Path) -> list[str]:
    """The `pip install` lines of a page's bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("pip install")]


def test_quickstart_installs_with_the_readmes_command():
    readme = _install_commands(ROOT / "README.md")
    quickstart = _install_commands(ROOT / "grpo_tutorial" / "QUICKSTART.md")
    assert readme and quickstart == readme[:1], (quickstart, readme)
