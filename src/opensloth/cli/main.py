"""`os`: everything around training: rewards, environment info, the demo, eval, generate, export."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from opensloth.cli.common import user_errors as _user_errors

app = typer.Typer(
    name="os",
    help="OpenSloth tools: list rewards, inspect the environment, run the offline demo, evaluate, generate.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Commands are added below, one function each; keep them thin (parse, validate, dispatch).


@app.command("list-rewards")
@_user_errors
def list_rewards(
    reward_module: Optional[list[Path]] = typer.Option(
        None, "--reward-module", help="Python file with custom rewards to list too (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (rewards and presets) instead of tables."),
) -> None:
    """List every reward (built-in and from --reward-module files) and the --task presets."""
    import json

    from rich.console import Console
    from rich.table import Table

    from opensloth.rewards import load_reward_module
    from opensloth.rewards.base import rewards_catalog

    for path in reward_module or []:
        load_reward_module(path)
    catalog = rewards_catalog()
    if as_json:
        typer.echo(json.dumps(catalog, indent=2))
        return
    rewards = Table(title="Rewards (--rewards NAME,...)", title_justify="left")
    for column in ("name", "source", "description"):
        rewards.add_column(column, overflow="fold")
    for row in catalog["rewards"]:
        rewards.add_row(row["name"], row["source"], row["description"])
    presets = Table(title="Presets (--task NAME)", title_justify="left")
    presets.add_column("task")
    presets.add_column("rewards")
    for task, names in catalog["presets"].items():
        presets.add_row(task, ", ".join(names))
    console = Console()
    console.print(rewards, presets)

@app.command("info")
@_user_errors
def info(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables.")) -> None:
    """Versions, devices, which backends and rollout engines are usable here (and why not), the code sandbox level."""
    import json

    from opensloth.cli.info import collect_info, print_info

    data = collect_info()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        print_info(data)


@app.command("demo")
@_user_errors
def demo(
    output_dir: Path = typer.Option(Path("outputs/demo"), "--output-dir", "-o", help="Where the demo writes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous demo in --output-dir."),
    seed: int = typer.Option(0, "--seed", help="Seed for the model, the data and training."),
    max_staleness: Optional[int] = typer.Option(
        None, "--max-staleness", min=0, metavar="K", show_default="off: the trainer generates its own batches",
        help="Run the GRPO stage with one rollout worker process on the CPU (--rollout-devices cpu:1) that "
        "generates and scores batches while the trainer trains, each at most K policy versions behind the "
        "one it trains, corrected by truncated importance sampling (0: synchronous, taking turns)."),
) -> None:
    """Offline demo on the CPU: build a tiny model, SFT it on the format, GRPO it on the answers, compare."""
    from opensloth.demo import DemoSettings, run_demo

    run_demo(output_dir, DemoSettings(seed=seed, max_staleness=max_staleness), overwrite=overwrite)


# eval, generate, export, plot (cli/use.py).
from opensloth.cli import use as _use  # noqa: E402

_use.register(app)
