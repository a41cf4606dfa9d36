"""Prepare the GRPO prompt dataset for the tutorial: a thin wrapper over `os-train data grpo`.

    python prepare_dataset/prepare_grpo_dataset.py --task-type math --model Qwen/Qwen2.5-0.5B-Instruct \
        --num-samples 2000 --output-path outputs/data/grpo_prepared

--task-type picks the dataset format and the chat template:
  math    open-r1/DAPO-Math-17k-Processed (config "en"): `prompt` is the problem, `solution` the answer
  code    a JSON/JSONL file (--custom-file) or dataset with `prompt` and `tests` (assert lines) columns
  custom  a JSON/JSONL file (--custom-file) with `prompt` and `answer` columns; other columns reach the rewards
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opensloth.cli.common import user_errors
from opensloth.config import resolve_config
from opensloth.errors import UserError
from opensloth.launch import prepare_only

TASK_DEFAULTS = {
    "math": {"dataset": "open-r1/DAPO-Math-17k-Processed", "dataset_config": "en", "format": "dapo-math",
             "task": "math"},
    "code": {"dataset": None, "format": "prompt-answer", "task": "code"},
    "custom": {"dataset": None, "format": "prompt-answer", "task": None},
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task-type", choices=sorted(TASK_DEFAULTS), default="math")
    parser.add_argument("--model", required=True, help="Model whose tokenizer and chat template render the prompts.")
    parser.add_argument("--dataset", help="Override the task's default dataset (hub name or local file).")
    parser.add_argument("--dataset-config", help="Dataset configuration name (hub datasets).")
    parser.add_argument("--custom-file", type=Path, help="JSON/JSONL file for --task-type code or custom.")
    parser.add_argument("--num-samples", type=int, help="Use this many rows.")
    parser.add_argument("--num-workers", type=int, default=1, help="Shard for this many training workers (GPUs).")
    parser.add_argument("--output-path", type=Path, required=True, help="Where to save the prepared dataset.")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


@user_errors
def main(argv: list[str]) -> None:
    args = parse_args(argv)
    defaults = TASK_DEFAULTS[args.task_type]
    dataset = args.dataset or (str(args.custom_file) if args.custom_file else defaults["dataset"])
    if dataset is None:
        raise UserError(f"--task-type {args.task_type} needs --custom-file (a JSON/JSONL file) or --dataset.")
    if args.custom_file and args.custom_file.suffix not in (".json", ".jsonl"):
        raise UserError(f"--custom-file must be a .json or .jsonl file, got {args.custom_file}.")
    dataset_config = args.dataset_config or (defaults.get("dataset_config") if dataset == defaults["dataset"] else None)
    overrides = {
        "model": args.model,
        "dataset": dataset,
        "dataset_config": dataset_config,
        "format": defaults["format"],
        "task": defaults["task"],
        "num_samples": args.num_samples,
        "seed": args.seed,
    }
    cfg = resolve_config("grpo", None, overrides)
    prepare_only(cfg, output_path=args.output_path, num_workers=args.num_workers)


if __name__ == "__main__":
    main(sys.argv[1:])
