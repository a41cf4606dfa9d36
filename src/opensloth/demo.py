"""`os demo`: the two-stage recipe (SFT teaches the format, GRPO improves the answers), offline on a CPU.

Nothing is downloaded. The demo builds a tiny random Qwen2 with a byte-level tokenizer
(`opensloth.models.tiny`), writes small arithmetic datasets in the schemas of the tutorial's two
hub datasets (`opensloth.data.synthetic`), then runs the same code paths as the tutorial:

    1. os-train sft  --format openmath-reasoning --full-finetune   (from random weights: language + format)
    2. os-train grpo --format dapo-math --task math                (LoRA on the SFT model)
    3. os eval on held-out problems, before and after each stage

and prints a table of format rate and answer accuracy. `os demo --max-staleness K` runs stage 2 with one
rollout worker process on the CPU (`--rollout-devices cpu:1 --max-staleness K`; everything else the
same): it generates while the trainer trains, at most K policy versions behind.

Like most SFT data written by people or by other models, the demo's worked solutions contain a
systematic mistake: most subtraction answers are off by one (`sft_mistake_rate`). SFT imitates
its data, mistakes included; GRPO optimises the verified answer reward (math_answer), so it can
unlearn them. That is the point of the second stage, made visible on a model small enough for a
CPU. Deviation from the tutorial: the tiny
model starts from random weights, so stage 1 trains every weight (the tutorial trains a LoRA
adapter on a pretrained model); stage 2 trains a LoRA adapter as the tutorial does.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.table import Table

from opensloth.config import resolve_config
from opensloth.errors import UserError

console = Console()


@dataclass
class DemoSettings:
    """Sizes of the demo; the defaults run in about 2 minutes on 2 idle CPU cores."""

    seed: int = 0
    sft_rows: int = 3000
    grpo_rows: int = 1000
    eval_rows: int = 100
    hidden_size: int = 128
    num_layers: int = 2
    sft_steps: int = 400
    sft_batch_size: int = 64
    sft_learning_rate: float = 2e-3
    grpo_steps: int = 100
    grpo_prompts_per_step: int = 8
    grpo_group_size: int = 8
    grpo_learning_rate: float = 5e-4
    max_new_tokens: int = 16
    # The byte-level tiny model pays one token per character: a short system prompt keeps every
    # sequence about 70 tokens instead of 200 (the reasoning template's default prompt is long).
    system_prompt: str = "Think, then answer."
    sft_mistake_rate: float = 0.6  # share of SFT subtraction rows whose answer is one too high
    # GRPO with one rollout worker process on the CPU (`--rollout-devices cpu:1`) that generates up to
    # this many policy versions ahead while the trainer trains; None: the colocated run.
    max_staleness: Optional[int] = None


def add_teacher_mistakes(rows: list[dict[str, str]], rate: float, seed: int) -> list[dict[str, str]]:
    """Make `rate` of the subtraction rows (OpenMathReasoning schema) answer one too high.

    >>> add_teacher_mistakes([{"problem": "What is 7 - 3?", "generated_solution": "7-3=4",
    ...                        "expected_answer": "4"}], rate=1.0, seed=0)[0]["generated_solution"]
    '7-3=5'
    """
    import random

    rng = random.Random(seed)
    out = []
    for row in rows:
        if " - " in row["problem"] and rng.random() < rate:
            wrong = str(int(row["expected_answer"]) + 1)
            lhs = row["generated_solution"].split("=")[0]
            row = {**row, "generated_solution": f"{lhs}={wrong}", "expected_answer": wrong}
        out.append(row)
    return out


@dataclass
class DemoResult:
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per evaluated model
    output_dir: Optional[Path] = None


def _train(recipe: str, overrides: dict[str, Any]) -> None:
    from opensloth.launch import launch_training

    cfg = resolve_config(recipe, None, overrides)
    launch_training(cfg, dry_run=False)


def _evaluate(model_dir: Path, data_file: Path, settings: DemoSettings, out_file: Path) -> dict[str, float]:
    """Greedy answers on the held-out problems: format rate (exact format) and answer accuracy."""
    from opensloth.evaluate import evaluate

    cfg = resolve_config("grpo", None, {
        "model": str(model_dir), "dataset": str(data_file), "format": "dapo-math", "task": "math",
        "max_new_tokens": settings.max_new_tokens, "seed": settings.seed,
        "cache_dir": str(out_file.parent / "cache"), "prompt_length_percentile": 1.0,
        "system_prompt": settings.system_prompt,
    })
    result = evaluate(cfg, num_samples=1, output_file=out_file)
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    exact = [r["rewards"].get("math_format") == 1.0 for r in records]
    return {"format_rate": sum(exact) / len(exact), "accuracy": result.summary["pass@1"]}


def grpo_overrides(s: DemoSettings, common: dict[str, Any], sft_dir: Path, grpo_file: Path,
                   grpo_dir: Path) -> dict[str, Any]:
    """The demo's `os-train grpo` options; with `s.max_staleness` set, one CPU rollout worker too."""
    overrides = {**common, "model": str(sft_dir), "dataset": str(grpo_file), "format": "dapo-math",
                 "task": "math", "max_steps": s.grpo_steps, "rollout_batch_size": s.grpo_prompts_per_step,
                 "group_size": s.grpo_group_size, "learning_rate": s.grpo_learning_rate,
                 "max_new_tokens": s.max_new_tokens, "beta": 0.0, "temperature": 1.0,
                 "per_device_train_batch_size": s.grpo_prompts_per_step * s.grpo_group_size,
                 "print_sample_every": 0, "prompt_length_percentile": 1.0, "output_dir": str(grpo_dir)}
    if s.max_staleness is not None:
        overrides.update(rollout_devices="cpu:1", max_staleness=s.max_staleness)
    return overrides


def run_demo(output_dir: Path, settings: Optional[DemoSettings] = None, overwrite: bool = False) -> DemoResult:
    """Build, SFT, GRPO, evaluate; returns the before/after rows (also printed as a table)."""
    from opensloth.data.synthetic import make_arithmetic_rows, write_rows
    from opensloth.models.tiny import build_tiny_model

    s = settings or DemoSettings()
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        if not overwrite:
            raise UserError(f"{output_dir} is not empty. Pass --overwrite to replace the previous demo, "
                            "or --output-dir to choose another directory.")
        shutil.rmtree(output_dir)
    data_dir, eval_dir = output_dir / "data", output_dir / "eval"
    eval_dir.mkdir(parents=True)

    console.rule("[bold]OpenSloth demo[/]: SFT teaches the format, GRPO improves the answers (offline, CPU)")
    console.print("[bold]0.[/] Building a tiny random Qwen2 and arithmetic datasets in the tutorial's schemas "
                  f"(SFT data: {s.sft_mistake_rate:.0%} of subtraction answers off by one)")
    base = build_tiny_model(output_dir / "base_model", hidden_size=s.hidden_size, num_layers=s.num_layers,
                            seed=s.seed)
    sft_rows = add_teacher_mistakes(make_arithmetic_rows(s.sft_rows, seed=s.seed, schema="openmath"),
                                    s.sft_mistake_rate, s.seed)
    sft_file = write_rows(sft_rows,
                          data_dir / "openmath_reasoning_mini.jsonl")
    grpo_file = write_rows(make_arithmetic_rows(s.grpo_rows, seed=s.seed + 1, schema="dapo"),
                           data_dir / "dapo_math.jsonl")
    eval_file = write_rows(make_arithmetic_rows(s.eval_rows, seed=s.seed + 2, schema="dapo"),
                           data_dir / "held_out.jsonl")
    common = {"devices": "cpu", "seed": s.seed, "cache_dir": str(output_dir / "cache"), "overwrite": True,
              "logging_steps": 5, "system_prompt": s.system_prompt}

    console.print("[bold]1.[/] SFT: os-train sft --format openmath-reasoning --full-finetune")
    sft_dir = output_dir / "sft_model"
    _train("sft", {**common, "model": str(base), "dataset": str(sft_file), "format": "openmath-reasoning",
                   "full_finetune": True, "max_steps": s.sft_steps, "per_device_train_batch_size": s.sft_batch_size,
                   "learning_rate": s.sft_learning_rate, "warmup_ratio": 0.05, "lr_scheduler_type": "cosine",
                   "max_seq_length": 256, "output_dir": str(sft_dir)})

    grpo_dir = output_dir / "grpo_model"
    grpo = grpo_overrides(s, common, sft_dir, grpo_file, grpo_dir)
    layout = "" if s.max_staleness is None else f" --rollout-devices cpu:1 --max-staleness {s.max_staleness}"
    console.print(f"[bold]2.[/] GRPO: os-train grpo --format dapo-math --task math{layout} (LoRA on the SFT model)")
    _train("grpo", grpo)

    console.print("[bold]3.[/] Evaluating on held-out problems (greedy)")
    result = DemoResult(output_dir=output_dir)
    for name, model_dir in (("base (random)", base), ("after SFT", sft_dir), ("after SFT + GRPO", grpo_dir)):
        scores = _evaluate(model_dir, eval_file, s, eval_dir / f"{model_dir.name}.jsonl")
        result.rows.append({"model": name, **scores})

    table = Table(title=f"Held-out arithmetic ({s.eval_rows} problems, greedy)")
    table.add_column("model")
    table.add_column("format rate", justify="right")
    table.add_column("answer accuracy", justify="right")
    for row in result.rows:
        table.add_row(row["model"], f"{row['format_rate']:.0%}", f"{row['accuracy']:.0%}")
    console.print(table)
    console.print(f"Outputs: SFT model {sft_dir}, GRPO adapter {grpo_dir}")
    curves = grpo_dir / "training_curves.png"
    console.print(f"Training curves: {sft_dir / 'training_curves.png'} and {curves}")
    console.print(f"Per-problem completions and scores: {eval_dir}/")
    return result
