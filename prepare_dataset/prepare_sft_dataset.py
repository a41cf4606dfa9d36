"""Prepare the SFT dataset for the tutorial: a thin wrapper over `os-train data sft`.

    python prepare_dataset/prepare_sft_dataset.py --model Qwen/Qwen2.5-0.5B-Instruct \
        --dataset unsloth/OpenMathReasoning-mini --dataset-split cot --num-samples 1000 \
        --output-path outputs/data/sft_prepared

Rows in the OpenMathReasoning-mini schema (`problem`, `generated_solution`, `expected_answer`) become
conversations whose assistant turn is
`<start_working_out>{solution}<end_working_out><SOLUTION>{answer}</SOLUTION>`, rendered with the `reasoning`
chat template and tokenized with labels on the assistant turn only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opensloth.cli.common import user_errors
from opensloth.config import resolve_config
from opensloth.launch import prepare_only


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Model whose tokenizer and chat template are used.")
    parser.add_argument("--dataset", default="unsloth/OpenMathReasoning-mini", help="Hub name or local file.")
    parser.add_argument("--dataset-split", default="train", help='Split ("cot" for OpenMathReasoning-mini).')
    parser.add_argument("--num-samples", type=int, help="Use this many rows.")
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--num-workers", type=int, default=1, help="Shard for this many training workers (GPUs).")
    parser.add_argument("--output-path", type=Path, required=True, help="Where to save the prepared dataset.")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


@user_errors
def main(argv: list[str]) -> None:
    args = parse_args(argv)
    cfg = resolve_config("sft", None, {
        "model": args.model,
        "dataset": args.dataset,
        "dataset_split": args.dataset_split,
        "format": "openmath-reasoning",
        "chat_template": "reasoning",
        "num_samples": args.num_samples,
        "max_seq_length": args.max_seq_length,
        "seed": args.seed,
    })
    prepare_only(cfg, output_path=args.output_path, num_workers=args.num_workers)


if __name__ == "__main__":
    main(sys.argv[1:])
