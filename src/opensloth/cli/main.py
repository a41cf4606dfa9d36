"""`os`: everything around training: rewards, environment info, the demo, eval, generate, export."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="os",
    help="OpenSloth tools: list rewards, inspect the environment, run the offline demo, evaluate, generate.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Commands are added below, one function each; keep them thin (parse, validate, dispatch).

# eval, generate, export, plot (cli/use.py).
from opensloth.cli import use as _use  # noqa: E402

_use.register(app)
