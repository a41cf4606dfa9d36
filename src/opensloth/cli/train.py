"""`os-train`: one command per stage (sft, grpo) and `os-train data` to prepare without training."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from opensloth.cli.common import config_command
from opensloth.config import RunConfig

app = typer.Typer(
    name="os-train",
    help="Train an LLM with SFT or GRPO (LoRA), on one GPU, many, or the CPU.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Prepare (download, format, tokenize, cache, shard) a dataset without training.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")

DRY_RUN = typer.Option(False, "--dry-run", help="Print the resolved config and the plan, then exit.",
                       rich_help_panel="General")


@app.command("sft")
@config_command("sft")
def sft(cfg: RunConfig, dry_run: bool = DRY_RUN) -> None:
    """Supervised fine-tuning with TRL's SFTTrainer: data prep + training in one command."""
    from opensloth.launch import launch_training

    launch_training(cfg, dry_run=dry_run)


@app.command("grpo")
@config_command("grpo")
def grpo(cfg: RunConfig, dry_run: bool = DRY_RUN) -> None:
    """GRPO reinforcement learning: generate, score with rewards, update; data prep included."""
    from opensloth.launch import launch_training

    launch_training(cfg, dry_run=dry_run)


OUTPUT_PATH = typer.Option(None, "--output-path", help="Also save the prepared dataset to this directory "
                           "(pass it to --dataset later).", rich_help_panel="General")
NUM_WORKERS = typer.Option(None, "--num-workers", help="Shard for this many workers (default: from --devices).",
                           rich_help_panel="General")


@data_app.command("sft")
@config_command("sft")
def data_sft(cfg: RunConfig, output_path: Optional[Path] = OUTPUT_PATH,
             num_workers: Optional[int] = NUM_WORKERS) -> None:
    """Prepare an SFT dataset: format, apply the chat template, tokenize, cache and shard."""
    from opensloth.launch import prepare_only

    prepare_only(cfg, output_path=output_path, num_workers=num_workers)


@data_app.command("grpo")
@config_command("grpo")
def data_grpo(cfg: RunConfig, output_path: Optional[Path] = OUTPUT_PATH,
              num_workers: Optional[int] = NUM_WORKERS) -> None:
    """Prepare a GRPO prompt dataset: format, apply the chat template, cache and shard."""
    from opensloth.launch import prepare_only

    prepare_only(cfg, output_path=output_path, num_workers=num_workers)
