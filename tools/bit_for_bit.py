"""Same seeds, same metrics: run 8 tiny GRPO configs with two source trees and compare every non-timing value.

For refactors that must not change behaviour (issue 27). Each tree's CLI runs the same configs on the same
tiny Qwen2 (opensloth.models.tiny, seed 0) and 48 `a+b=` rows; then every key the two metrics.jsonl files
share, except timings, must be equal, row by row.

    git worktree add --detach /tmp/old 293e0b4
    python tools/bit_for_bit.py /tmp/old .            # prints one line per config and the total

Exits 1 if any value differs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

BASE = ["grpo", "--rewards", "math_answer", "--report-to", "none", "--group-size", "4", "--rollout-batch-size", "2",
        "--max-new-tokens", "8", "--print-sample-every", "0", "--max-steps", "4", "--seed", "3",
        "--learning-rate", "1e-3", "--logging-steps", "1"]
CONFIGS = {  # options every tree since 293e0b4 knows
    "default": ["--devices", "cpu"],
    "beta0": ["--devices", "cpu", "--beta", "0"],
    "micro": ["--devices", "cpu", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "2"],
    "filter": ["--devices", "cpu", "--filter-zero-std"],
    "eval": ["--devices", "cpu", "--eval-dataset", "{eval}", "--eval-steps", "2"],
    "two_workers": ["--devices", "cpu:2"],
    "reinforce": ["--devices", "cpu", "--loss-type", "reinforce_with_baseline"],
    "iterations": ["--devices", "cpu", "--epochs-per-rollout-batch", "2", "--temperature", "0.7"],
}
TIMING = re.compile(r"time|seconds|per_second|_s$|/s$|throughput|elapsed|memory", re.I)


def make_inputs(root: Path) -> dict[str, str]:
    """The tiny model and the train/eval rows, built with this checkout's opensloth."""
    from opensloth.models.tiny import build_tiny_model

    build_tiny_model(root / "model", seed=0)
    rng = random.Random(0)
    for name, n in (("data", 48), ("eval", 8)):
        with open(root / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                a, b = rng.randint(0, 9), rng.randint(0, 9)
                f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    return {"model": str(root / "model"), "data": str(root / "data.jsonl"), "eval": str(root / "eval.jsonl")}


def run_tree(tree: Path, out: Path, inputs: dict[str, str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve() / "src"), "CUDA_VISIBLE_DEVICES": ""}
    for name, options in CONFIGS.items():
        args = [*BASE, "--model", inputs["model"], "--dataset", inputs["data"], "--output-dir", str(out / name),
                "--cache-dir", str(out / f"cache-{name}"), *[o.format(**inputs) for o in options]]
        proc = subprocess.run([sys.executable, "-c", "from opensloth.cli.train import app; app()", *args],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{tree} {name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def compare(old: Path, new: Path) -> int:
    """Print one line per config; return how many shared non-timing values differ."""
    differing = 0
    for name in CONFIGS:
        a = [json.loads(line) for line in (old / name / "metrics.jsonl").read_text().splitlines()]
        b = [json.loads(line) for line in (new / name / "metrics.jsonl").read_text().splitlines()]
        if len(a) != len(b):
            print(f"{name}: {len(a)} rows != {len(b)} rows")
            differing += 1
            continue
        compared = bad = 0
        for ra, rb in zip(a, b):
            for key in sorted((ra.keys() & rb.keys()) - {k for k in ra if TIMING.search(k)}):
                compared += 1
                if ra[key] != rb[key]:
                    bad += 1
                    print(f"  {name} step {ra['step']} {key}: {ra[key]} != {rb[key]}")
        only = sorted({k for r in a for k in r} ^ {k for r in b for k in r})
        print(f"{name}: {len(a)} rows, {compared} values compared, {bad} differ; keys on one side only: {only}")
        differing += bad
    print(f"differing values: {differing}")
    return differing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old_tree", type=Path, help="a checkout (e.g. a git worktree) of the version before")
    parser.add_argument("new_tree", type=Path, help="the checkout after")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bit-for-bit-") as tmp:
        root = Path(tmp)
        inputs = make_inputs(root)
        run_tree(args.old_tree, root / "old", inputs)
        run_tree(args.new_tree, root / "new", inputs)
        sys.exit(1 if compare(root / "old", root / "new") else 0)


if __name__ == "__main__":
    main()
