"""Prepare a GRPO prompt dataset once, then train on it with `os-train grpo --dataset OUTPUT_PATH`.

    python prepare_dataset/prepare_grpo_dataset.py --task-type math --num-samples 1000 --output-path ./data/grpo_math
    python prepare_dataset/prepare_grpo_dataset.py --task-type custom --custom-file rows.jsonl --output-path ./data/mine

Without --model, the output is the prompt set: a saved dataset directory with `prompt` (the
conversation: the question as a user turn, plus --system-prompt when given), `answer` (the reference
answer) and the dataset's other columns, which the rewards receive. `os-train grpo --dataset DIR`
then renders each prompt with its chat template (`--task math`: the reasoning template and its system
prompt; `--chat-template r1-zero`: CS336's prompt) and tokenizes it, for any model.

With --model, the output is the prepared dataset of `os-train data grpo`: rendered with the model's
chat template (--chat-template), tokenized and sharded for --num-workers; training with another
tokenizer or worker count refuses it.

--task-type picks the dataset and its format:
  math    default open-r1/DAPO-Math-17k-Processed (config "en", from the hub); a --custom-file or
          --dataset in any math schema: `prompt` + `solution` (DAPO), `question` + `answer` (gsm8k
          when an answer holds "#### n", else taken as it is, as in CS336's MATH prompts), or `prompt` +
          `answer`. Rewards at training: --task math.
  code    no default dataset (none ships with OpenSloth that works offline): --custom-file with
          `prompt` and `tests` columns (assert lines, or {"inputs": [...], "outputs": [...]}). Rewards
          at training: --task code.
  custom  --custom-file with `prompt` (text or messages) and `answer`; other columns reach the rewards.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from opensloth.cli.common import user_errors
from opensloth.errors import UserError

TASK_DEFAULTS = {
    "math": {"dataset": "open-r1/DAPO-Math-17k-Processed", "dataset_config": "en", "task": "math"},
    "code": {"dataset": None, "task": "code"},
    "custom": {"dataset": None, "task": None},
}
NEEDS = {
    "code": "a --custom-file (.json/.jsonl) with `prompt` and `tests` columns (assert lines, or "
            '{"inputs": [...], "outputs": [...]})',
    "custom": "a --custom-file (.json/.jsonl) with `prompt` and `answer` columns",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task-type", choices=sorted(TASK_DEFAULTS), default="math")
    parser.add_argument("--custom-file", type=Path, help="Your rows, a .json or .jsonl file (instead of the default).")
    parser.add_argument("--dataset", help="Instead of the default: a hub name or any local dataset --dataset takes.")
    parser.add_argument("--dataset-config", help="Dataset configuration name (hub datasets).")
    parser.add_argument("--dataset-split", default="train", help="Split of a hub or saved dataset.")
    parser.add_argument("--format", help="Row format (dapo-math, gsm8k, question-answer, prompt-answer); "
                        "default: detected from the columns.")
    parser.add_argument("--num-samples", type=int, help="Use this many rows (selected with --seed).")
    parser.add_argument("--output-path", type=Path, required=True, help="Directory to write (new or empty).")
    parser.add_argument("--system-prompt", help="System turn of every prompt (default: the chat template's own).")
    parser.add_argument("--skip-bad-rows", action="store_true", help="Drop malformed rows (counted) instead of "
                        "stopping.")
    parser.add_argument("--seed", type=int, default=42)
    model = parser.add_argument_group("tokenized output (with --model)")
    model.add_argument("--model", help="Render and tokenize for this model (its tokenizer and chat template). "
                       "Default: write the prompt set, rendered and tokenized when training.")
    model.add_argument("--chat-template", help="With --model: the template that renders the prompts "
                       "(default: auto).")
    model.add_argument("--num-workers", type=int, help="With --model: shard for this many training workers "
                       "(GPUs; default 1).")
    return parser.parse_args(argv)


def choose_dataset(args: argparse.Namespace) -> tuple[str, str | None]:
    """(dataset, config) from --custom-file, --dataset or the task's default."""
    defaults = TASK_DEFAULTS[args.task_type]
    if args.custom_file and args.dataset:
        raise UserError("Pass either --custom-file or --dataset, not both.")
    if args.custom_file:
        if args.custom_file.suffix not in (".json", ".jsonl"):
            raise UserError(f"--custom-file must be a .json or .jsonl file, got {args.custom_file}.")
        if not args.custom_file.is_file():
            raise UserError(f"--custom-file {args.custom_file}: no such file (relative paths start from "
                            f"{Path.cwd()}).")
        return str(args.custom_file), args.dataset_config
    if args.dataset:
        return args.dataset, args.dataset_config
    if defaults["dataset"] is None:
        raise UserError(f"--task-type {args.task_type} has no default dataset (none ships with OpenSloth that works "
                        f"offline): pass {NEEDS[args.task_type]}, or --dataset NAME.")
    return defaults["dataset"], args.dataset_config or defaults["dataset_config"]


def check_output_path(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"--output-path {path} already exists and is not empty. Choose a new directory "
                        "(nothing was written).")


def write_prompt_set(args: argparse.Namespace, dataset: str, config: str | None) -> None:
    """Without --model: the prompt/answer rows, saved with `save_to_disk` (temporary dir, then renamed)."""
    from opensloth.config import DataConfig
    from opensloth.data import describe_drops
    from opensloth.data.grpo_prompts import prompt_set
    from opensloth.rewards.base import PRESETS

    for option, value in (("--chat-template", args.chat_template), ("--num-workers", args.num_workers)):
        if value is not None:
            raise UserError(f"{option} needs --model: without it the prompts are rendered and sharded when training "
                            f"(pass {option} to `os-train grpo`).")
    data = DataConfig(dataset=dataset, dataset_config=config, dataset_split=args.dataset_split, format=args.format,
                      num_samples=args.num_samples, system_prompt=args.system_prompt,
                      skip_bad_rows=args.skip_bad_rows)
    task = TASK_DEFAULTS[args.task_type]["task"]
    rows, stats = prompt_set(data, args.seed, PRESETS.get(task or "", []))
    out = args.output_path
    tmp = out.with_name(out.name + ".tmp-write")
    shutil.rmtree(tmp, ignore_errors=True)
    rows.save_to_disk(str(tmp))
    if out.exists():
        out.rmdir()  # empty, checked before
    tmp.rename(out)

    table = Table(title="prompt set", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("dataset", f"{dataset} ({stats.format} format)")
    table.add_row("rows", f"{stats.num_rows} of {stats.rows_in}")
    table.add_row("dropped", "; ".join(describe_drops(stats)) or "nothing (every row used whole)")
    table.add_row("columns", ", ".join(rows.column_names))
    task_flag = f" --task {task}" if task else ""
    table.add_row("saved to", f"{out} (train on it: os-train grpo --model MODEL --dataset {out}{task_flag} ...)")
    Console().print(table)


@user_errors
def main(argv: list[str]) -> None:
    args = parse_args(argv)
    dataset, config = choose_dataset(args)
    check_output_path(args.output_path)
    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num-samples {args.num_samples}: must be at least 1.")
    try:
        if args.model is None:
            write_prompt_set(args, dataset, config)
            return
        from opensloth.config import resolve_config
        from opensloth.launch import prepare_only

        overrides = {
            "model": args.model, "dataset": dataset, "dataset_config": config, "dataset_split": args.dataset_split,
            "format": args.format, "task": TASK_DEFAULTS[args.task_type]["task"], "num_samples": args.num_samples,
            "system_prompt": args.system_prompt, "skip_bad_rows": args.skip_bad_rows, "seed": args.seed,
        }
        if args.chat_template is not None:
            overrides["chat_template"] = args.chat_template
        cfg = resolve_config("grpo", None, overrides)
        prepare_only(cfg, output_path=args.output_path, num_workers=args.num_workers or 1)
    except UserError as exc:
        if args.custom_file or args.dataset or "could not be downloaded" not in str(exc):
            raise
        raise UserError(f"{exc} (It is the default dataset of --task-type {args.task_type}; offline, pass "
                        "--custom-file rows.jsonl with its columns, e.g. `prompt` and `solution`, or `question` "
                        "and `answer`.)") from None


if __name__ == "__main__":
    main(sys.argv[1:])
