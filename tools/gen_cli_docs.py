"""Regenerate docs/cli.md from the Typer apps (`python tools/gen_cli_docs.py`).

tests/test_docs.py fails when docs/cli.md differs from what this prints, so the CLI reference
cannot drift from `--help`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from typer.cli import get_docs_for_click

HEADER = """# CLI reference

Generated from `--help` by `python tools/gen_cli_docs.py`; a test keeps it in sync.
Every `os-train sft` / `os-train grpo` option can also be given in a YAML file (`--config`), nested
by section or flat; the command line wins over the file, the file over the defaults.

"""


def render() -> str:
    from opensloth.cli.main import app as os_app
    from opensloth.cli.train import app as train_app

    parts = [HEADER]
    for app, name in ((train_app, "os-train"), (os_app, "os")):
        command = typer.main.get_command(app)
        ctx = typer.Context(command, info_name=name)
        parts.append(get_docs_for_click(obj=command, ctx=ctx, name=name, title=None).strip() + "\n\n")
    return "".join(parts).replace("&#x27;", "'").rstrip() + "\n"


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    out.write_text(render())
    sys.stdout.write(f"wrote {out}\n")
