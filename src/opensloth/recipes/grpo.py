"""GRPO recipe: sample prompts, generate a group of completions each, score, update. One file.

Reads top to bottom like a single-file RL script. `run(cfg, ctx)` is called in every worker
after the process group is up (see `opensloth.launch`); the data was prepared by the parent.

One training step (what `--max-steps` counts and what is logged once):

    1. sample   `rollout_batch_size` prompts in all (each worker takes rollout_batch_size / world
                from its own shard of the prepared dataset);
    2. generate `group_size` completions per prompt with the rollout engine (LoRA active);
    3. score    with the reward set, in TRL's calling convention (weighted sum; a failing reward counts
                as 0 and is reported; on the first step it stops the run, see "Rewards" below);
    4. advantages per group: A = (r - mean) / (std + eps), or r - mean with --no-std-normalization;
    5. filter   (--filter-zero-std) drop groups whose rewards are all equal (max == min, the test
                frac_reward_zero_std counts): their advantage is 0;
    6. old and reference log-probs, once per rollout batch, without gradients;
    7. update   --epochs-per-rollout-batch passes over the batch; each pass is cut into optimizer
                mini-batches and each mini-batch into micro-batches (see below);
    8. log      metrics reduced across workers; a sample now and then; evaluation every --eval-steps.

Rewards. Each reward gets what TRL 1.16's GRPOTrainer passes (opensloth.rewards.base): prompts as the
dataset holds them, completions as messages when the prompt is a conversation and as strings when it
is text, completion_ids, a transformers TrainerState (global_step = steps done, max_steps = --max-steps
or the steps the epochs make, epoch), log_metric, log_extra and every other column. A reward that fails
on the first step (raises, or returns the wrong number of values) stops the run before any update with
its traceback and a hint; later failures are contained and counted, and MAX_REWARD_FAILURES_IN_A_ROW
failed steps in a row stop the run after a checkpoint. Alarms (a warning once, then a `!name` mark in
the progress line, and `alarms/<name>` in metrics.jsonl): more than half of the completions hit
--max-new-tokens for ALARM_STEPS steps in a row (`truncated`); every group had zero reward std for
ALARM_STEPS steps (`zero_std`); a reward was None for every completion of a step (`reward_none`, the
number of such rewards).

Micro-batches and optimizer steps. A micro-batch is `--per-device-train-batch-size` sequences
(one forward/backward). An optimizer mini-batch is `--gradient-accumulation-steps` micro-batches
per worker, so one optimizer step sees per_device_train_batch_size x gradient_accumulation_steps
x world_size sequences, as in TRL. A pass over a rollout batch of N sequences per worker therefore
makes ceil(N / (per_device_train_batch_size x gradient_accumulation_steps)) optimizer steps. Only
when that is 1 is the update exactly on-policy; the defaults (8 prompts x 8 completions, micro-batch
8, no accumulation) make 8 on one worker and 1 on eight, and the plan printed at start says how many
(set --gradient-accumulation-steps to cover the rollout batch for one update). Every loss is divided by
counts of the whole optimizer mini-batch summed over workers (tokens for token_mean, sequences for
seq_mean and constant), so the gradients of the micro-batches, summed locally and then summed
across workers (one flat all-reduce of the LoRA gradients), are exactly the gradient of the
mini-batch loss; clipping and the optimizer step follow.

Old log-probs. With one optimizer step per rollout batch the policy that generated is the policy
being updated, so old = current.detach() and rho = 1 (the clipped objective's gradient is then the
plain policy gradient). With more than one update per rollout batch (--epochs-per-rollout-batch > 1
or several mini-batches per pass) the old log-probs are computed once, before the first update, for a
loss that takes a ratio. What each --loss-type needs (advantages or raw rewards, old log-probs or not)
is its entry in the loss registry (opensloth.grpo.core `PolicyLoss`); this file asks it, never the name.

Deviations from the papers (and from TRL), stated so nobody has to discover them:
  - DAPO's dynamic sampling re-samples until the batch is full; --filter-zero-std only drops the
    zero-std groups, so a step may update on fewer sequences (counted in `frac_reward_zero_std`
    and `num_filtered_sequences`), and skips the update when every group is filtered.
  - The KL term is the k3 estimator added per token inside the aggregation (as TRL and DeepSeekMath
    do), not a KL penalty folded into the reward as in PPO-RLHF.
  - Log-probs for the loss are taken at the sampling temperature (logits / temperature, as TRL),
    so rho compares the same distributions that generated the completions, unless --top-k, --top-p,
    --min-p or --repetition-penalty reshape the sampler's (as in TRL, the loss does not model them;
    the plan says so: docs/GRPO_TRAINING.md "Sampling options").
  - Per-step sampling is from each worker's shard, reshuffled each pass over it; the global batch
    is the union of the workers' draws.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from opensloth.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from opensloth.config import GRPORunConfig
from opensloth.distributed import WorkerContext, all_reduce_gradients, all_reduce_scalars, reduce_metrics
from opensloth.errors import TrainingStopped, UserError, plural
from opensloth.grpo.core import (
    POLICY_LOSS_REGISTRY,
    aggregate_loss,
    compute_group_advantages,
    compute_high_entropy_mask,
    compute_kl_k3,
    compute_policy_loss,
    compute_sampler_logprob_diff,
    compute_vllm_is_weights,
    compute_zero_std_groups,
    get_policy_loss,
    mask_truncated_completions,
)
from opensloth.rundir import StopSignal, record_run_config, stop_requested, stopped_message

logger = logging.getLogger("opensloth")

# Updates in a row with a NaN/inf gradient norm (each skipped) before the run stops.
MAX_NONFINITE_UPDATES_IN_A_ROW = 3
# Steps in a row on which one reward failed (scored None for the batch) before the run stops.
MAX_REWARD_FAILURES_IN_A_ROW = 3
# Steps in a row a silent failure (truncation, zero reward std) must last to raise its alarm.
ALARM_STEPS = 3
COMPLETIONS_FILE = "completions.jsonl"


# ---------------------------------------------------------------------------------------------
# Small helpers (pure or nearly): the loop below reads better without their details.
# ---------------------------------------------------------------------------------------------


def prompt_sampler(num_rows: int, per_step: int, seed: int) -> Iterator[list[int]]:
    """Yield `per_step` row indices at a time, reshuffling at each pass over the rows.

    A step that crosses the end of a pass takes the rest of this pass and the start of the next,
    so every prompt is seen once per pass.
    """
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while True:
        while len(order) < per_step:
            order += torch.randperm(num_rows, generator=generator).tolist()
        yield order[:per_step]
        order = order[per_step:]


def split_evenly(n: int, parts: int) -> list[slice]:
    """Cut range(n) into `parts` contiguous slices whose sizes differ by at most one (some may be empty)."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(slice(start, start + size))
        start += size
    return out


def schedule_lr(step: int, total: int, warmup: int, kind: str) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based) of `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)  # linear


@dataclass
class Batch:
    """One rollout batch on this worker, flattened to sequences (B = local prompts x G).

    Attributes:
        input_ids: (B, P + T) left-padded prompt then right-padded completion.
        attention_mask: (B, P + T) 1 on real tokens.
        completion_mask: (B, T) 1 on completion tokens up to and including EOS.
        advantages: (B,) what the loss weighs each sequence by: the group-relative advantages, or the raw
            total rewards for a loss whose `PolicyLoss.signal` is "rewards" (no_baseline).
        old_log_probs: (B, T) or None (then old = current.detach()).
        ref_log_probs: (B, T) or None (beta 0).
        sampler_log_probs: (B, T) log-probs reported by a separate sampler (vLLM), or None (hf).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    advantages: torch.Tensor
    old_log_probs: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None
    sampler_log_probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: Any) -> Batch:
        """Rows `index` (a slice or a (k,) index tensor) of every field."""
        return Batch(**{k: (v[index] if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()})


@dataclass
class Produced:
    """Phases 1-4 of one step on one worker's share (`GRPORecipe.produce`): what the update needs.

    Attributes:
        rows: the sampled prompt rows (a datasets.Dataset selection).
        rollout: the engine's RolloutBatch (B = local prompts x G sequences).
        scores: the reward set's scores of its completions.
        rewards: (B,) total rewards; advantages: (B,) what the loss weighs each sequence by.
        adv_meta: `compute_group_advantages`' metadata (0-dim tensors).
        generation_time, reward_time: seconds; engine_timings: the engine's own (prefill/decode).
        version: the policy version (the GRPO step whose update made it) that generated it, and
            rollout_idle_fraction: the share of the rollout worker's time spent waiting, and rng_state: the
            torch RNG state after generating (the trainer adopts it, so a checkpoint resumes the stream);
            all three set by a rollout worker.
    """

    rows: Any
    rollout: Any
    scores: Any
    rewards: torch.Tensor
    advantages: torch.Tensor
    adv_meta: dict[str, torch.Tensor]
    generation_time: float
    reward_time: float
    engine_timings: dict[str, float]
    version: int = -1
    rollout_idle_fraction: float = 0.0
    rng_state: torch.Tensor | None = None


@dataclass
class UpdateStats:
    """Sums over the optimizer steps of one rollout batch, from this worker; `reduce` makes the logged means.

    Each step adds its loss and per-token statistics as this worker's share of the step's global value (the
    losses are divided by the step's global counts already, token sums by the step's global token count), so
    one sum over workers gives the global figures. grad_norm and nonfinite are taken after the gradient
    all-reduce: they are the same on every worker and are not summed again.

    Attributes:
        steps: optimizer steps taken.
        loss: sum over steps of this worker's share of the step's loss.
        kl, entropy: sums over steps of this worker's share of the step's token mean.
        clip_low, clip_high, clip: the same for the clip masks (the share of tokens clipped).
        grad_norm: sum over steps of the global gradient norm (before clipping).
        nonfinite: steps whose gradient norm was NaN/inf (skipped).
    """

    steps: int = 0
    loss: float = 0.0
    kl: float = 0.0
    entropy: float = 0.0
    clip_low: float = 0.0
    clip_high: float = 0.0
    clip: float = 0.0
    grad_norm: float = 0.0
    nonfinite: float = 0.0

    def add(self, step: UpdateStats) -> None:
        """Add the sums of one more optimizer step (or of several)."""
        for name, value in vars(step).items():
            setattr(self, name, getattr(self, name) + value)

    def reduce(self, with_kl: bool) -> dict[str, float]:
        """Means over the steps, summed over workers in one collective (every worker must call it).

        Returns:
            loss, grad_norm, entropy, clip_ratio, clip_ratio/low_mean, clip_ratio/high_mean,
            nonfinite_grad_updates (a count, not a mean), skipped_update (1 when no step was taken) and kl
            (only `with_kl` and after a step: where no KL was measured none is logged, rather than a flat 0).
        """
        n = max(self.steps, 1)
        loss, kl, entropy, clip_low, clip_high, clip = all_reduce_scalars(
            [self.loss / n, self.kl / n, self.entropy / n, self.clip_low / n, self.clip_high / n, self.clip / n],
            op="sum")
        out = {"loss": loss, "grad_norm": self.grad_norm / n, "entropy": entropy, "clip_ratio": clip,
               "clip_ratio/low_mean": clip_low, "clip_ratio/high_mean": clip_high,
               "nonfinite_grad_updates": self.nonfinite, "skipped_update": float(self.steps == 0)}
        if with_kl and self.steps:
            out["kl"] = kl
        return out


# ---------------------------------------------------------------------------------------------
# What the launcher asks of this recipe (opensloth.recipes): computed here once, used by both.
# ---------------------------------------------------------------------------------------------

# --rollout-batch-size counts prompts (as verl's train_batch_size); CS336's rollout_batch_size and TRL's
# generation_batch_size count completions. A value that is a multiple of --group-size and makes at least
# this many completions per step reads like such a count: the plan says so.
RESPONSE_COUNT_NOTE_MIN = 1024


def prepare_data(cfg: GRPORunConfig, tokenizer: Any, num_shards: int) -> Any:
    """The prompt set, prepared once in the parent (or reused from the cache), one shard per worker."""
    from opensloth.data import prepare_grpo_dataset

    return prepare_grpo_dataset(cfg, tokenizer, num_shards)


def resolve_for_workers(cfg: GRPORunConfig, world_size: int) -> GRPORunConfig:
    """cfg with what needs the worker count: --steps-per-generation (TRL's) becomes --rollout-batch-size,
    per_device_train_batch_size x workers x steps_per_generation completions, divided by the group size."""
    g = cfg.grpo
    if g.steps_per_generation is None:
        return cfg
    completions = cfg.training.per_device_train_batch_size * world_size * g.steps_per_generation
    if completions % g.group_size:
        raise UserError(f"--steps-per-generation {g.steps_per_generation}: --per-device-train-batch-size "
                        f"{cfg.training.per_device_train_batch_size} x {plural(world_size, 'worker')} x "
                        f"{g.steps_per_generation} = {completions} completions per step, not a multiple of "
                        f"--group-size {g.group_size}. Change one of them, or give --rollout-batch-size.")
    logger.info("--steps-per-generation %d: --rollout-batch-size %d (%d completions per step over %s)",
                g.steps_per_generation, completions // g.group_size, completions, plural(world_size, "worker"))
    # Recorded as the rollout batch it gave (config.yaml, the workers): the two cannot both be set.
    grpo = g.model_copy(update={"rollout_batch_size": completions // g.group_size, "steps_per_generation": None})
    return cfg.model_copy(update={"grpo": grpo})


def check_world_size(cfg: GRPORunConfig, world_size: int) -> None:
    """Each worker generates for an equal share of the step's prompts: the count must divide."""
    if cfg.grpo.rollout_batch_size % world_size:
        n = cfg.grpo.rollout_batch_size
        raise UserError(f"--rollout-batch-size {n} must be a multiple of the number of workers: {n} prompts cannot "
                        f"be split evenly across {world_size} workers. Use a multiple of {world_size}, "
                        "or change --devices.")


def check_loss_options(cfg: GRPORunConfig) -> None:
    """Options the chosen loss cannot honour, from what its registry entry says it needs."""
    g = cfg.grpo
    loss = get_policy_loss(g.loss_type)
    if g.filter_zero_std and loss.signal == "rewards":
        with_advantages = [name for name, spec in POLICY_LOSS_REGISTRY.items() if spec.signal == "advantages"]
        raise UserError(f"--filter-zero-std drops groups whose advantage is zero, but --loss-type {g.loss_type} uses "
                        f"raw rewards, not advantages. Use --loss-type {' or '.join(with_advantages)}, or drop the flag.")
    if loss.aggregation is not None and "loss_agg" in g.model_fields_set:
        raise UserError(f"--loss-type {g.loss_type} aggregates as TRL's {g.loss_type} does, so --loss-agg "
                        f"{g.loss_agg} contradicts it: drop --loss-agg, or use --loss-type grpo_clip with it.")
    if not loss.uses_old_log_probs:
        ratio_options = {"--importance-sampling-level sequence": g.importance_sampling_level == "sequence",
                         "--delta": g.delta is not None,
                         "--use-bias-correction-kl": g.use_bias_correction_kl}
        for flag, given in ratio_options.items():
            if given:
                raise UserError(f"{flag} uses the clipped loss's ratio, but --loss-type {g.loss_type} takes no "
                                "ratio: use grpo_clip or one of TRL's grpo, bnpo, dr_grpo, dapo.")


def check_before_start(cfg: GRPORunConfig) -> None:
    """Before anything is prepared or written (and in --dry-run): the loss options, an unknown reward or a
    broken --reward-module."""
    from opensloth.rewards import resolve_rewards

    check_loss_options(cfg)
    g = cfg.grpo
    resolve_rewards(g.task, g.rewards, g.reward_weights, g.reward_modules)


def updates_per_rollout(cfg: GRPORunConfig, world_size: int) -> int:
    """Optimizer steps one rollout batch makes: ceil(sequences per worker / mini-batch) per pass x passes."""
    g, t = cfg.grpo, cfg.training
    sequences = g.rollout_batch_size // world_size * g.group_size
    minibatch = t.per_device_train_batch_size * t.gradient_accumulation_steps
    return math.ceil(sequences / minibatch) * g.epochs_per_rollout_batch


def rollout_batch_note(cfg: GRPORunConfig) -> str | None:
    """A note when --rollout-batch-size reads like a count of completions (see RESPONSE_COUNT_NOTE_MIN)."""
    n, group = cfg.grpo.rollout_batch_size, cfg.grpo.group_size
    if n % group or n * group < RESPONSE_COUNT_NOTE_MIN:
        return None
    return (f"--rollout-batch-size counts prompts: {n} prompts x {group} = {n * group} completions per step. "
            f"If {n} was meant as completions per step (CS336's rollout_batch_size, TRL's generation_batch_size), "
            f"pass --rollout-batch-size {n // group}.")


def sampling_note(cfg: GRPORunConfig) -> str | None:
    """What the loss assumes when the sampler's distribution is not softmax(logits / temperature) over the
    full vocabulary (--top-k, --top-p, --min-p, --repetition-penalty), as TRL's loss also does; None otherwise."""
    g = cfg.grpo
    changed = [name for name, on in (("--top-k", g.top_k), ("--top-p", g.top_p < 1), ("--min-p", g.min_p > 0),
                                     ("--repetition-penalty", g.repetition_penalty != 1)) if on]
    if not changed:
        return None
    correction = ("; with the vllm engine, its truncated importance weights correct this in part"
                  if g.rollout_engine != "hf" and g.vllm_importance_sampling else "")
    verb = "reshapes" if len(changed) == 1 else "reshape"
    return (f"{', '.join(changed)} {verb} the sampling distribution, but the loss's log-probs are "
            f"softmax(logits / temperature) over the full vocabulary (as in TRL): the update is off-policy by "
            f"that difference{correction} (docs/GRPO_TRAINING.md)")


def plan_rows(cfg: GRPORunConfig, world_size: int) -> list[Any]:
    """The plan's rows for GRPO: the global batch in prompts and completions, a note, the updates per rollout."""
    from opensloth.recipes import PlanRow

    g = cfg.grpo
    rows = [PlanRow("global batch", f"{plural(g.rollout_batch_size, 'prompt')} x {plural(g.group_size, 'completion')} "
                    f"= {plural(g.rollout_batch_size * g.group_size, 'completion')} per step "
                    f"({plural(g.rollout_batch_size // world_size, 'prompt')} per worker)")]
    note = rollout_batch_note(cfg)
    if note:
        rows.append(PlanRow("note", note, "yellow"))
    note = sampling_note(cfg)
    if note:
        rows.append(PlanRow("sampling", note, "yellow"))
    updates = updates_per_rollout(cfg, world_size)
    rows.append(PlanRow("updates", "1 optimizer step per rollout (on-policy)" if updates == 1 else
                        f"{plural(updates, 'optimizer step')} per rollout (after the first, off-policy: "
                        "clipped to the old log-probs)"))
    return rows


# ---------------------------------------------------------------------------------------------
# The recipe: __init__ checks, setup() builds, train() loops, save() and cleanup() finish.
# ---------------------------------------------------------------------------------------------


class GRPORecipe:
    """GRPO with LoRA (or full fine-tuning) on one worker of a possibly multi-worker job."""

    def __init__(self, cfg: GRPORunConfig, ctx: WorkerContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        g, t = cfg.grpo, cfg.training
        # Most flag checks ran when the config was built (opensloth.config); these need the loss registry
        # or the worker count.
        check_loss_options(cfg)
        check_world_size(cfg, ctx.world_size)
        self.policy_loss = get_policy_loss(g.loss_type)  # what it needs: advantages or rewards, pi_old or not
        self.local_prompts = g.rollout_batch_size // ctx.world_size
        self.minibatch_size = t.per_device_train_batch_size * t.gradient_accumulation_steps
        self.global_step = 0
        self.optimizer_step = 0
        self.nonfinite_updates_in_a_row = 0
        self.reward_failures_in_a_row: dict[str, int] = {}
        self.rewards_checked = False  # until a first step has scored without failure, a failing reward stops the run
        self.ref_model, self.ref_adapter = None, None  # the KL reference, chosen in setup()
        self.share_prompts = False  # set in setup() from the backend
        self.rollout_link = None  # --rollout-devices: where phases 1-4 come from (opensloth.recipes.grpo_rollout)
        self.sampler_diffs: list[torch.Tensor] = []  # |log pi_old - log mu| per micro-batch, when pi_old is its forward
        self.stopped = False

    # -- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        """Data, model + tokenizer, reference, optimizer, LR schedule, rollout engine, rewards, logger."""
        from opensloth.data import load_prepared
        from opensloth.models.loading import add_reference_adapter, read_adapter_config
        from opensloth.rollout import get_rollout_engine
        from opensloth.tracking import MetricsLogger

        cfg, ctx, g, t = self.cfg, self.ctx, self.cfg.grpo, self.cfg.training
        torch.manual_seed(t.seed + ctx.rank)

        if ctx.prepared_data_path is None:
            raise RuntimeError("the launcher must prepare the data and set ctx.prepared_data_path")
        self.data = load_prepared(ctx.prepared_data_path)
        self.train_rows = self.data.load_shard(ctx.rank)
        self.eval_rows = self.data.load_eval() if t.eval_steps > 0 else None
        if len(self.train_rows) == 0:
            raise UserError("No prompts left after filtering (see the data prep report): raise "
                            "--max-prompt-length / --prompt-length-percentile or use a larger --dataset.")
        self.sampler = prompt_sampler(len(self.train_rows), self.local_prompts, t.seed + 1000 * ctx.rank)

        self._load_rewards_and_policy()
        # The KL reference is the policy GRPO starts from (DeepSeekMath's pi_ref, verl's initial actor):
        # a fresh LoRA: the base with the adapter disabled (B = 0 at the start, so no copy is needed);
        # a continued adapter (--model an SFT adapter dir): a frozen second copy of that adapter;
        # a full fine-tune: a frozen copy of the starting weights.
        if g.beta > 0 and cfg.model.full_finetune:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        elif g.beta > 0 and read_adapter_config(cfg.model.model) is not None:
            self.ref_adapter = add_reference_adapter(self.model, cfg.model.model)

        self.total_steps = self._count_steps()
        self.updates_per_rollout = updates_per_rollout(cfg, ctx.world_size)
        total_updates = self.total_steps * self.updates_per_rollout
        self.optimizer = torch.optim.AdamW(self.params, lr=t.learning_rate, weight_decay=t.weight_decay)
        warmup = math.ceil(t.warmup_ratio * total_updates)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: schedule_lr(s, total_updates, warmup, t.lr_scheduler_type)
        )

        from opensloth.recipes.grpo_rollout import TrainerLink, in_rollout_layout

        # With rollout workers the trainer generates only for --eval-steps: the hf engine, so a vLLM
        # engine (--rollout-engine vllm) runs on the rollout devices alone.
        remote = bool(g.rollout_devices) or in_rollout_layout()
        self.engine = get_rollout_engine("hf" if remote else g.rollout_engine, self.model, self.tokenizer,
                                         ctx.device, cfg)

        from opensloth.tracking import Alarm

        self.trainer_state = self._trainer_state()
        self.alarms = {"truncated": Alarm("truncated", ALARM_STEPS), "zero_std": Alarm("zero_std", ALARM_STEPS)}
        self.none_warned: set[str] = set()
        self.marks: list[str] = []

        # Resume last: loading a checkpoint restores the RNG streams, which nothing above may consume.
        self.start_step = 1
        resume_from = resolve_resume(t.output_dir, t.resume, t.resume_from)
        if resume_from is not None:
            saved = load_checkpoint(resume_from, model=self.model, optimizer=self.optimizer,
                                    scheduler=self.scheduler, rank=ctx.rank, world_size=ctx.world_size)
            self.start_step = saved["step"] + 1
            self.optimizer_step = saved["state"].get("optimizer_step", 0)
            # The alarms' and reward failures' streaks carry over, so a resumed run warns and stops as the
            # uninterrupted one would (and logs the same alarms/* values).
            for name, (streak, warned) in saved["state"].get("alarms", {}).items():
                self.alarms[name].streak, self.alarms[name].warned = streak, warned
            self.none_warned = set(saved["state"].get("none_warned", []))
            self.reward_failures_in_a_row = dict(saved["state"].get("reward_failures_in_a_row", {}))
            for _ in range(saved["step"]):  # the sampler is deterministic: replay it to the same position
                next(self.sampler)
            logger.info("Resumed from %s at step %d", resume_from, self.start_step)
        # Phases 1-4 on the rollout workers (--rollout-devices, or OPENSLOTH_ROLE=rollout ranks under
        # torchrun), which get the weights from here.
        if remote:
            self.rollout_link = TrainerLink(cfg, ctx, self.params, start_step=self.start_step,
                                            total_steps=self.total_steps)
        # Everything loaded: only now the first writes into the output dir (a failed start leaves none).
        if ctx.is_main:
            record_run_config(cfg, resume_from)
        self.metrics_logger = MetricsLogger(t.output_dir, cfg.logging.report_to, cfg.logging.run_name, ctx.is_main,
                                            start_step=self.start_step, restart=True)
        logger.info("GRPO: %s, %s x %s per step, %s per step", plural(self.total_steps, "step"),
                    plural(g.rollout_batch_size, "prompt"), plural(g.group_size, "completion"),
                    plural(self.updates_per_rollout, "optimizer update"))

    def setup_rollout(self, share_from: GRPORecipe | None = None) -> None:
        """What `produce` needs, for a rollout worker producing this training rank's share
        (--rollout-devices): its data shard and sampler, the rewards, the model (same LoRA structure;
        the weights come from training rank 0) and the engine. Writes nothing."""
        from opensloth.data import load_prepared
        from opensloth.rollout import get_rollout_engine

        cfg, ctx, g, t = self.cfg, self.ctx, self.cfg.grpo, self.cfg.training
        self.data = load_prepared(ctx.prepared_data_path)
        self.train_rows = self.data.load_shard(ctx.rank)
        self.sampler = prompt_sampler(len(self.train_rows), self.local_prompts, t.seed + 1000 * ctx.rank)
        self.total_steps = self._count_steps()
        if share_from is not None:  # another training rank served by the same rollout worker: one model
            for name in ("rewards", "model", "tokenizer", "params", "share_prompts", "engine"):
                setattr(self, name, getattr(share_from, name))
        else:
            self._load_rewards_and_policy()
            self.engine = get_rollout_engine(g.rollout_engine, self.model, self.tokenizer, ctx.device, cfg)
        self.trainer_state = self._trainer_state()

    def _load_rewards_and_policy(self) -> None:
        """The rewards, then the model and tokenizer (the trained chat template set), its trainable params."""
        from opensloth.models import load_model_and_tokenizer
        from opensloth.models.loading import resolve_backend
        from opensloth.rewards import resolve_rewards, set_code_test_timeout

        cfg, ctx, g = self.cfg, self.ctx, self.cfg.grpo
        # Rewards before the model: a bad --rewards or --reward-module fails fast.
        self.rewards = resolve_rewards(g.task, g.rewards, g.reward_weights, g.reward_modules, g.reward_timeout)
        set_code_test_timeout(g.code_test_timeout)
        self.model, self.tokenizer = load_model_and_tokenizer(cfg.model, cfg.lora, ctx.device)
        if self.data.chat_template:
            # Saved with the tokenizer, so eval and generate render prompts as training did.
            self.tokenizer.chat_template = self.data.chat_template
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # The G rows of a group share their prompt: the log-prob forwards run it once per group
        # (grpo/forward.py). Only on the hf backend, the one this is tested with.
        self.share_prompts = resolve_backend(cfg.model.backend, ctx.device) == "hf"

    def _trainer_state(self):
        """What TRL passes rewards as `trainer_state` (a transformers TrainerState), kept current by train_step."""
        from transformers import TrainerState

        t, g, ctx = self.cfg.training, self.cfg.grpo, self.ctx
        return TrainerState(max_steps=self.total_steps, logging_steps=t.logging_steps, eval_steps=t.eval_steps,
                            save_steps=t.save_steps, train_batch_size=t.per_device_train_batch_size,
                            num_train_epochs=math.ceil(self.total_steps * g.rollout_batch_size
                                                       / max(1, self.data.num_rows)),
                            is_local_process_zero=ctx.local_rank == 0, is_world_process_zero=ctx.is_main)

    def _count_steps(self) -> int:
        t, g = self.cfg.training, self.cfg.grpo
        if t.max_steps > 0:
            return t.max_steps
        return max(1, math.ceil(t.num_train_epochs * self.data.num_rows / g.rollout_batch_size))

    # -- the loop ------------------------------------------------------------------------------

    def train(self) -> None:
        """Steps start_step..total_steps (one rollout batch each), with checkpoints."""
        from opensloth.tracking import TrainingProgress

        t = self.cfg.training
        shown = ("reward", *(f"rewards/{name}/mean" for name in self.rewards.names), "loss", "kl",
                 "completions/mean_length", "step_time")
        with StopSignal() as stop, TrainingProgress(self.total_steps, self.ctx.is_main, "grpo",
                                                    show_keys=shown) as progress:
            progress.update(self.start_step - 1)
            self.set_trainer_state(self.start_step - 1)
            if t.eval_steps > 0 and self.start_step == 1:
                # A baseline, so the eval curve shows what GRPO changed (logged as step 0).
                self.metrics_logger.log(0, self.evaluate())
            for step in range(self.start_step, self.total_steps + 1):
                self.global_step = step
                metrics = self.train_step(step)
                progress.update(step, metrics, self.marks)
                self.stop_on_failing_rewards(step, metrics)
                # Checkpoint every --save-steps, and at once when Ctrl-C/SIGTERM reached any worker.
                stopping = stop_requested(stop)
                if (t.save_steps and step % t.save_steps == 0 and step < self.total_steps) or stopping:
                    self.save_checkpoint(step)
                if stopping:
                    self.stopped = True
                    break

    def train_step(self, step: int) -> dict[str, float]:
        """One GRPO step: sample, generate, score, advantages, filter, update, log; returns its metrics."""
        cfg, g, t = self.cfg, self.cfg.grpo, self.cfg.training
        step_start = time.perf_counter()
        # 1-4 here, or (--rollout-devices) received from a rollout worker that ran the same `produce`.
        produced = self.produce(step) if self.rollout_link is None else self.rollout_link.receive(step)
        rows, rollout, scores, rewards = produced.rows, produced.rollout, produced.scores, produced.rewards
        advantages, adv_meta = produced.advantages, produced.adv_meta
        gen_time, reward_time = produced.generation_time, produced.reward_time

        completion_mask = rollout.completion_mask.to(self.ctx.device)
        if g.mask_truncated_completions:  # completions cut at --max-new-tokens count nowhere in the loss (TRL's)
            completion_mask = mask_truncated_completions(completion_mask, rollout.is_eos_terminated)
        batch = Batch(
            input_ids=rollout.input_ids.to(self.ctx.device),
            attention_mask=rollout.attention_mask.to(self.ctx.device),
            completion_mask=completion_mask,
            advantages=advantages.to(self.ctx.device),
            sampler_log_probs=(rollout.sampler_log_probs.to(self.ctx.device)
                               if rollout.sampler_log_probs is not None else None),
        )

        # 5. DAPO dynamic-sampling filter: groups with all-equal rewards carry no signal (the same
        #    test as frac_reward_zero_std, so the two always agree).
        num_before = len(batch)
        if g.filter_zero_std:
            keep = ~compute_zero_std_groups(rewards, g.group_size)  # (B / G,)
            batch = batch.select(keep.repeat_interleave(g.group_size).nonzero().squeeze(1).to(self.ctx.device))

        # 6 + 7. Old and reference log-probs, then the policy updates (their metrics come back global).
        learning_rate = self.scheduler.get_last_lr()[0]  # the rate of this step's first update
        self.model.train()
        update_start = time.perf_counter()
        update_metrics = self.update(batch)
        update_time = time.perf_counter() - update_start
        link_metrics = self.rollout_link.after_update(step, produced) if self.rollout_link is not None else {}

        # 8. Log (this worker's metrics averaged over workers, then the global ones), print a sample,
        #    evaluate now and then.
        timings = {
            "step_time": time.perf_counter() - step_start,
            "generation_time": gen_time,
            **produced.engine_timings,  # hf lean decoder: prefill_time, decode_time
            "reward_time": reward_time,
            "reference_time": update_metrics.pop("reference_time"),  # old + reference log-probs
            "update_time": update_time,  # reference_time + policy forward + backward + optimizer
        }
        local = self.step_metrics(rollout, scores, adv_meta, num_filtered=num_before - len(batch),
                                  learning_rate=learning_rate, timings=timings)
        metrics = reduce_metrics(local) | update_metrics
        if link_metrics:  # the worst worker's (staleness, idle, sync time): every worker has the same keys
            metrics.update(reduce_metrics(link_metrics, op="max"))
        # The job's throughput: the sum of the workers' rates (their mean, logged as it is, times the workers).
        metrics["tokens_per_second"] = metrics["tokens_per_second_per_worker"] * self.ctx.world_size
        metrics.update(self.reduce_logged(scores.logged))  # what rewards passed to log_metric
        metrics.update(self.check_alarms(step, metrics))
        self.set_trainer_state(step)
        last = step == self.total_steps
        evaluate = t.eval_steps > 0 and (step % t.eval_steps == 0 or last)
        logged = evaluate or step % t.logging_steps == 0 or last
        sample = bool(cfg.logging.print_sample_every) and step % cfg.logging.print_sample_every == 0
        if sample and self.ctx.is_main:
            self.print_sample(rows[0]["prompt_text"], rollout.completions_text[: g.group_size], scores)
        if g.log_completions and logged:  # TRL's log_completions: every worker's completions, each logged step
            self.log_completions(step, rows, rollout, scores, advantages, every_worker=True)
        elif sample:
            self.log_completions(step, rows, rollout, scores, advantages)
        if evaluate:
            metrics.update(self.evaluate())
        if logged:
            self.metrics_logger.log(step, metrics)
        return metrics

    def produce(self, step: int) -> Produced:
        """Phases 1-4 of step `step` for this worker's share: sample, generate, score, advantages.

        Run by the training worker itself, or (--rollout-devices) by a rollout worker on the training
        worker's behalf (`opensloth.recipes.grpo_rollout`), with the same sampler, engine and rewards.
        """
        g = self.cfg.grpo
        step_start = time.perf_counter()
        self.set_trainer_state(step - 1)  # what rewards see: the steps done so far, as TRL's global_step

        # 1. Sample this worker's prompts for the step.
        rows = self.train_rows.select(next(self.sampler))

        # 2. Generate G completions per prompt with the current policy (LoRA active).
        self.model.eval()
        self.engine.sync_weights()  # a no-op for hf, which generates through the policy itself
        with torch.no_grad():
            rollout = self.engine.generate(
                [list(ids) for ids in rows["prompt_ids"]],
                group_size=g.group_size,
                max_new_tokens=g.max_new_tokens,
                temperature=g.temperature,
                top_p=g.top_p,
                min_p=g.min_p,
                top_k=g.top_k,
                repetition_penalty=g.repetition_penalty,
                stop_strings=g.stop_strings,
            )
        gen_time = time.perf_counter() - step_start

        # 3. Score every completion; columns repeat G times so row i of a column matches completion i.
        #    Until one step has scored cleanly, a failing reward stops the run here, before any update.
        reward_start = time.perf_counter()
        scores = self.score(rows, rollout, g.group_size, strict=not self.rewards_checked)
        self.rewards_checked = True
        rewards = torch.as_tensor(scores.total, dtype=torch.float32)  # (B,)
        reward_time = time.perf_counter() - reward_start

        # 4. Group-relative advantages (groups are contiguous: completions of one prompt); a loss
        #    without a baseline (its spec's signal is "rewards") weighs each sequence by its raw reward.
        #    --scale-rewards batch divides by the std of every worker's rewards of the step.
        scaling = g.reward_scaling
        advantages, _, adv_meta = compute_group_advantages(
            rewards, g.group_size, normalize_by_std=scaling != "none", eps=g.advantage_eps,
            scale_std=self.global_reward_std(rewards) if scaling == "batch" else None,
        )
        if self.policy_loss.signal == "rewards":
            advantages = rewards.clone()

        return Produced(rows=rows, rollout=rollout, scores=scores, rewards=rewards, advantages=advantages,
                        adv_meta=adv_meta, generation_time=gen_time, reward_time=reward_time,
                        engine_timings=dict(getattr(self.engine, "last_timings", {})))

    def step_metrics(self, rollout: Any, scores: Any, adv_meta: dict[str, torch.Tensor], *, num_filtered: int,
                     learning_rate: float, timings: dict[str, float]) -> dict[str, float]:
        """This worker's metrics of a step, under TRL's names where TRL has one (the caller averages them).

        Args:
            rollout: the step's RolloutBatch (B = local prompts x G sequences).
            scores: the reward set's scores of its completions.
            adv_meta: `compute_group_advantages`' metadata of the step's rewards (0-dim tensors).
            num_filtered: sequences --filter-zero-std dropped.
            learning_rate: the rate of the step's first optimizer update.
            timings: seconds per phase; `step_time` also gives tokens_per_second_per_worker.
        """
        completion_lengths = rollout.completion_mask.sum(dim=1).float()  # (B,)
        return {
            "reward": adv_meta["mean"].item(),
            "reward_std": adv_meta["std"].item(),
            "frac_reward_zero_std": float(adv_meta["frac_zero_std"]),
            "completions/mean_length": completion_lengths.mean().item(),
            "completions/min_length": completion_lengths.min().item(),
            "completions/max_length": completion_lengths.max().item(),
            "completions/clipped_ratio": (~rollout.is_eos_terminated).float().mean().item(),
            "num_filtered_sequences": float(num_filtered),
            "learning_rate": learning_rate,
            **timings,
            "tokens_per_second_per_worker": float(rollout.attention_mask.sum()) / timings["step_time"],
            **self.reward_metrics(scores),
        }

    def score(self, rows: Any, rollout: Any, group_size: int, strict: bool = False) -> Any:
        """Reward every completion as TRL 1.16 calls rewards (evaluate.score_completions: prompt i's columns
        repeated for its G completions), with completion_ids up to and including EOS (as TRL's)."""
        from opensloth.evaluate import score_completions

        completion_ids = [ids[mask.bool()].tolist() for ids, mask in zip(rollout.completion_ids,
                                                                          rollout.completion_mask)]
        return score_completions(self.rewards, rows, rollout.completions_text, group_size,
                                 completion_ids=completion_ids, trainer_state=self.trainer_state, strict=strict)

    def set_trainer_state(self, steps_done: int) -> None:
        """Keep the TrainerState rewards get current: global_step (GRPO steps done) and epoch (passes over the data)."""
        self.trainer_state.global_step = steps_done
        self.trainer_state.epoch = steps_done * self.cfg.grpo.rollout_batch_size / max(1, self.data.num_rows)

    def reward_metrics(self, scores: Any) -> dict[str, float]:
        """The reward set's metrics with the same keys on every worker (NaN where a reward had no value)."""
        keys = [f"rewards/{name}/{stat}" for name in self.rewards.names
                for stat in ("mean", "std", "none_fraction", "failures")]
        return {key: scores.metrics.get(key, float("nan")) for key in keys}

    def reduce_logged(self, logged: dict[str, tuple[float, int]]) -> dict[str, float]:
        """log_metric values averaged over every call on every worker (as TRL does), by name."""
        from opensloth.distributed import all_gather_objects

        names = sorted({name for names in all_gather_objects(sorted(logged)) for name in names})
        sums = all_reduce_scalars([float(x) for name in names for x in logged.get(name, (0.0, 0))], op="sum")
        return {name: sums[2 * i] / max(sums[2 * i + 1], 1.0) for i, name in enumerate(names)}

    def check_alarms(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """The silent failures of a run, from the step's global metrics: warn once, mark the progress line.

        Returns:
            `alarms/truncated`, `alarms/zero_std` (1 while active) and `alarms/reward_none` (how many
            rewards were None for every completion of this step without failing).
        """
        g = self.cfg.grpo
        clipped, zero_std = metrics["completions/clipped_ratio"], metrics["frac_reward_zero_std"]
        active = {"truncated": self.alarms["truncated"].update(clipped > 0.5),
                  "zero_std": self.alarms["zero_std"].update(zero_std >= 1.0)}
        warnings = {
            "truncated": f"more than half of the completions ({clipped:.0%} on step {step}) hit --max-new-tokens "
                         f"{g.max_new_tokens} for {ALARM_STEPS} steps in a row: their answers are cut off, so their "
                         "rewards mean little. Raise --max-new-tokens (or ask for shorter answers).",
            "zero_std": f"every group had zero reward std for {ALARM_STEPS} steps in a row (step {step}): all "
                        f"{g.group_size} completions of each prompt scored the same, so every advantage is 0 and "
                        "nothing is learned. Use a reward that separates them (partial credit), prompts the model "
                        "sometimes solves, or a larger --group-size / --temperature.",
        }
        for name, on in active.items():
            if on and self.alarms[name].first() and self.ctx.is_main:
                logger.warning("Alarm %s: %s", name, warnings[name])
        none_everywhere = [r for r in self.rewards.rewards if metrics.get(f"rewards/{r.name}/none_fraction") == 1.0
                           and not metrics.get(f"rewards/{r.name}/failures")]
        for reward in none_everywhere:
            if reward.name not in self.none_warned and self.ctx.is_main:
                logger.warning("Reward %r (%s) returned None for every completion of step %d: it gives no signal "
                               "(None means \"does not apply\"). Check the columns it reads against the dataset's "
                               "(docs/rewards.md, \"What a reward receives\").", reward.name, reward.source, step)
            self.none_warned.add(reward.name)
        self.marks = [name for name, on in active.items() if on] + (["reward_none"] if none_everywhere else [])
        return {"alarms/truncated": float(active["truncated"]), "alarms/zero_std": float(active["zero_std"]),
                "alarms/reward_none": float(len(none_everywhere))}

    def stop_on_failing_rewards(self, step: int, metrics: dict[str, float]) -> None:
        """Count each reward's failed steps in a row (global: every worker agrees); at
        MAX_REWARD_FAILURES_IN_A_ROW, save a checkpoint and stop.

        Raises:
            UserError: a reward failed on that many steps in a row.
        """
        for name in self.rewards.names:
            failed = (metrics.get(f"rewards/{name}/failures") or 0.0) > 0
            self.reward_failures_in_a_row[name] = self.reward_failures_in_a_row.get(name, 0) + 1 if failed else 0
        stuck = [n for n, count in self.reward_failures_in_a_row.items() if count >= MAX_REWARD_FAILURES_IN_A_ROW]
        if not stuck:
            return
        self.save_checkpoint(step)
        reward = self.rewards.rewards[self.rewards.names.index(stuck[0])]
        raise UserError(
            f"Training stopped at step {step}: reward {reward.name!r} ({reward.source}) failed on "
            f"{MAX_REWARD_FAILURES_IN_A_ROW} steps in a row, so those steps trained without it (the warning above "
            f"shows its first failure and traceback). A checkpoint of step {step} is saved: fix the reward, then "
            "run the same command with --resume."
        )

    def log_completions(self, step: int, rows: Any, rollout: Any, scores: Any, advantages: torch.Tensor,
                        every_worker: bool = False) -> None:
        """Append the step's completions to completions.jsonl: prompt, completion, each reward, the total,
        the advantage and the columns rewards added with log_extra. Rank 0's own, or with `every_worker`
        (--log-completions; every worker must call it then) all of them, also sent to wandb as a table."""
        import json

        g = self.cfg.grpo
        records = []
        for i, text in enumerate(rollout.completions_text):
            record = {"step": step, "prompt": rows[i // g.group_size]["prompt"], "completion": text,
                      "rewards": {name: values[i] for name, values in scores.per_reward.items()},
                      "reward": float(scores.total[i]), "advantage": float(advantages[i])}
            if scores.extra:
                record["extra"] = {c: (v[i] if i < len(v) else None) for c, v in scores.extra.items()}
            records.append(record)
        if every_worker:
            from opensloth.distributed import all_gather_objects

            records = [record for part in all_gather_objects(records) for record in part]
        if not self.ctx.is_main:
            return
        with open(self.cfg.training.output_dir / COMPLETIONS_FILE, "a") as fh:
            fh.writelines(json.dumps(record, default=str) + "\n" for record in records)
        if every_worker:
            self.metrics_logger.log_table(step, "completions", records)

    def update(self, batch: Batch) -> dict[str, float]:
        """Phases 6 and 7 on this worker's share of a rollout batch: old and reference log-probs, then
        --epochs-per-rollout-batch passes of optimizer steps over its mini-batches.

        Every worker takes the same number of optimizer steps (each ends in an all-reduce), sized by the
        largest share: --filter-zero-std may leave workers different numbers of sequences, or none at all.

        Returns:
            The update's metrics, global (the same on every worker; see `UpdateStats.reduce`), the vLLM
            sampler mismatch when the batch has a sampler's log-probs, and `reference_time`: this worker's
            seconds for the old and reference log-probs.
        """
        g = self.cfg.grpo
        n_max = int(all_reduce_scalars([float(len(batch))], op="max")[0])
        num_minibatches = math.ceil(n_max / self.minibatch_size)
        num_updates = num_minibatches * g.epochs_per_rollout_batch
        if num_updates == 0:  # every group filtered on every worker: no update, and no KL measured
            return UpdateStats().reduce(with_kl=False) | {"reference_time": 0.0}

        reference_start = time.perf_counter()
        self.add_old_and_reference_log_probs(batch, off_policy=num_updates > 1)
        reference_time = time.perf_counter() - reference_start
        self.sampler_diffs = []

        # TRL's dapo normalises by the rollout batch's tokens (every worker's) per optimizer step of a pass.
        rollout_tokens = all_reduce_scalars([float(batch.completion_mask.sum())], op="sum")[0]
        stats = UpdateStats()
        for _epoch in range(g.epochs_per_rollout_batch):
            order = torch.randperm(len(batch)) if num_minibatches > 1 else torch.arange(len(batch))
            for part in split_evenly(len(batch), num_minibatches):
                stats.add(self.optimizer_step_on(batch.select(order[part].to(batch.input_ids.device)),
                                                 rollout_tokens_per_update=rollout_tokens / num_minibatches))
        mismatch = self.sampler_mismatch(batch) if batch.sampler_log_probs is not None else {}
        return stats.reduce(with_kl=g.beta > 0) | mismatch | {"reference_time": reference_time}

    @torch.no_grad()
    def add_old_and_reference_log_probs(self, batch: Batch, off_policy: bool) -> None:
        """Set batch.old_log_probs and batch.ref_log_probs, (B, T) each, where the update reads them.

        pi_old is computed when the batch is updated more than once (`off_policy`) and either the loss
        takes a ratio (its spec's uses_old_log_probs) or a separate sampler's log-probs came with the batch
        (vLLM, a rollout worker: the importance weights compare them with pi_old). Otherwise the update
        takes old = current.detach(): with one update the weights have not moved, so that is pi_old
        without a second forward (rho = 1). pi_ref is computed when beta > 0 (see reference_log_probs).
        """
        if not len(batch):
            return
        if off_policy and (self.policy_loss.uses_old_log_probs or batch.sampler_log_probs is not None):
            batch.old_log_probs = self.log_probs(batch, self.model, with_entropy=False)[0]
        if self.cfg.grpo.beta > 0:
            batch.ref_log_probs = self.reference_log_probs(batch)

    def optimizer_step_on(self, minibatch: Batch, rollout_tokens_per_update: float | None = None) -> UpdateStats:
        """One optimizer step on this worker's part of a mini-batch (b sequences, possibly 0).

        Forward and backward per micro-batch (`accumulate_gradients`), each loss divided by the mini-batch's
        global counts; then the gradients summed over workers, the global norm clipped, the AdamW step
        (skipped when the norm is NaN/inf) and the LR step.

        Args:
            minibatch: this worker's sequences of the step.
            rollout_tokens_per_update: the rollout batch's global token count / optimizer steps per pass
                (the normaliser of TRL's dapo); None: this mini-batch's global token count.

        Returns:
            This step's UpdateStats (steps = 1), as this worker's shares of the global values.
        """
        t = self.cfg.training
        loss_sum, token_sums, n_tok = self.accumulate_gradients(minibatch, rollout_tokens_per_update)
        # Sum the gradients over workers (each is already its share of the global mean),
        # clip the global norm, step.
        all_reduce_gradients(self.params, op="sum")
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
        )
        # A NaN/inf gradient would make every weight NaN: skip that update (the norm is
        # global, so every worker skips it) and stop after a few in a row.
        skipped = not torch.isfinite(grad_norm)
        if skipped:
            self.skip_nonfinite_update(float(grad_norm))
        else:
            self.optimizer.step()
            self.nonfinite_updates_in_a_row = 0
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_step += 1
        tok = max(n_tok, 1.0)  # token sums -> this worker's share of the step's global token means
        return UpdateStats(steps=1, loss=loss_sum, grad_norm=float(grad_norm), nonfinite=float(skipped),
                           **{key: value / tok for key, value in token_sums.items()})

    def accumulate_gradients(self, minibatch: Batch, rollout_tokens_per_update: float | None = None
                             ) -> tuple[float, dict[str, float], float]:
        """Forward and backward of every micro-batch of this worker's part of a mini-batch, leaving the
        summed gradients in `.grad` (not yet all-reduced over workers).

        The per-token loss is the registered loss with --importance-sampling-level and --delta, kept on the
        top --top-entropy-quantile tokens, weighted by the vLLM importance ratio, plus beta x KL (times rho
        with --use-bias-correction-kl); it is
        reduced by the loss's own aggregation (TRL's loss types) or --loss-agg, with the mini-batch's global
        counts. With --top-entropy-quantile < 1 every worker runs as many micro-batches as the largest
        share (an empty one only joins the entropy gather), since the threshold is taken over all of them.

        Returns:
            This worker's share of the loss, its token sums (kl, entropy, clip_low, clip_high, clip) and
            the mini-batch's global token count.
        """
        g, t = self.cfg.grpo, self.cfg.training
        aggregation = self.policy_loss.aggregation or g.loss_agg
        bs = t.per_device_train_batch_size
        # Global counts of this optimizer mini-batch: the loss normalisers on every worker.
        n_seq, n_tok, n_micro = all_reduce_scalars(
            [float(len(minibatch)), float(minibatch.completion_mask.sum()), float(math.ceil(len(minibatch) / bs))],
            op="sum")
        num_micro_local = math.ceil(len(minibatch) / bs)
        by_entropy = g.top_entropy_quantile < 1.0
        if by_entropy:  # the entropy gather is a collective: the same number of micro-batches everywhere
            num_micro_local = int(all_reduce_scalars([float(num_micro_local)], op="max")[0])
        loss_sum, token_sums = 0.0, dict.fromkeys(("kl", "entropy", "clip_low", "clip_high", "clip"), 0.0)
        for index in range(num_micro_local):
            micro = minibatch.select(slice(index * bs, (index + 1) * bs))
            if not len(micro):
                self.gather_entropies(None)
                continue
            log_probs, entropy = self.log_probs(micro, self.model)  # (b, T) each
            mask = micro.completion_mask
            old = micro.old_log_probs if micro.old_log_probs is not None else log_probs.detach()
            is_weights = None
            if micro.sampler_log_probs is not None and micro.old_log_probs is None:  # pi_old is this forward
                self.sampler_diffs.append(compute_sampler_logprob_diff(old, micro.sampler_log_probs, mask))
            if micro.sampler_log_probs is not None and g.vllm_importance_sampling:  # sampler correction
                is_weights = compute_vllm_is_weights(
                    old, micro.sampler_log_probs, mask, g.vllm_importance_sampling_mode,
                    g.vllm_importance_sampling_cap, g.vllm_importance_sampling_clip_min)
            entropy_mask = None
            if by_entropy:
                entropy_mask = compute_high_entropy_mask(entropy, mask, 1.0 - g.top_entropy_quantile,
                                                         pool=self.gather_entropies(entropy[mask.bool()]))
            per_token, clip_meta = compute_policy_loss(
                g.loss_type, log_probs, old, micro.advantages, epsilon_low=g.epsilon,
                epsilon_high=g.epsilon_high if g.epsilon_high is not None else g.epsilon,
                importance_weights=is_weights, mask=mask, importance_sampling_level=g.importance_sampling_level,
                delta=g.delta, token_mask=entropy_mask,
            )
            if micro.ref_log_probs is not None:
                kl = compute_kl_k3(log_probs, micro.ref_log_probs)  # (b, T)
                if g.use_bias_correction_kl:  # TRL's: the KL of tokens sampled from pi_old, importance-weighted
                    kl = kl * clip_meta["ratio"]
                per_token = per_token + g.beta * kl
                token_sums["kl"] += float((kl.detach() * mask).sum())
            loss = aggregate_loss(per_token, mask, aggregation, num_sequences=n_seq, num_tokens=n_tok,
                                  max_new_tokens=g.max_new_tokens, num_micro_batches=n_micro,
                                  rollout_tokens_per_update=rollout_tokens_per_update)
            loss.backward()
            loss_sum += loss.item()
            token_sums["entropy"] += float((entropy.detach() * mask).sum())
            for key in ("clip_low", "clip_high", "clip"):
                token_sums[key] += float((clip_meta[key].float() * mask).sum())
        return loss_sum, token_sums, n_tok

    def gather_entropies(self, local: torch.Tensor | None) -> torch.Tensor:
        """Every worker's completion-token entropies of the current micro-batch, (N,) (one collective)."""
        from opensloth.distributed import all_gather_objects

        parts = all_gather_objects(None if local is None else local.detach().float().cpu())
        pool = torch.cat([p for p in parts if p is not None] or [torch.zeros(0)])
        return pool if local is None else pool.to(local.device)

    def global_reward_std(self, rewards: torch.Tensor) -> torch.Tensor:
        """The unbiased std of every worker's rewards of the step (TRL's scale_rewards="batch"), 0-dim."""
        total, count = all_reduce_scalars([float(rewards.double().sum()), float(rewards.numel())], op="sum")
        mean = total / count
        squares = all_reduce_scalars([float(((rewards.double() - mean) ** 2).sum())], op="sum")[0]
        return torch.tensor(math.sqrt(squares / max(count - 1.0, 1.0)), dtype=torch.float32)

    def skip_nonfinite_update(self, grad_norm: float) -> None:
        """Drop the gradients of an update whose global norm is NaN/inf, leaving the weights and the
        optimizer state as they were; after MAX_NONFINITE_UPDATES_IN_A_ROW such updates, stop.

        Raises:
            UserError: that many updates in a row had a non-finite gradient norm.
        """
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_updates_in_a_row += 1
        if self.ctx.is_main:
            logger.warning("Step %d: the gradient norm is %s; this update was skipped and the weights are "
                           "unchanged.", self.global_step, grad_norm)
        if self.nonfinite_updates_in_a_row >= MAX_NONFINITE_UPDATES_IN_A_ROW:
            raise UserError(
                f"Training stopped at step {self.global_step}: the gradient norm was {grad_norm} in "
                f"{self.nonfinite_updates_in_a_row} optimizer updates in a row, so none of them was applied and "
                "the weights are those of the last good update (the checkpoints are intact). Try a lower "
                "--learning-rate, or --dtype float32."
            )

    def sampler_mismatch(self, batch: Batch) -> dict[str, float]:
        """Global mean and max of |log pi_old - log pi_sampler| over every worker's completion tokens.

        Every worker calls this (its batch may be empty after --filter-zero-std) so the collectives
        match; the results are the same on every worker.
        """
        if len(batch) and batch.old_log_probs is not None:
            diff = compute_sampler_logprob_diff(batch.old_log_probs, batch.sampler_log_probs,
                                                batch.completion_mask)  # (tokens,)
        else:  # one update: its forward gave pi_old, micro-batch by micro-batch (accumulate_gradients)
            diff = torch.cat(self.sampler_diffs) if self.sampler_diffs else torch.zeros(0)
        total, count = all_reduce_scalars([float(diff.sum()), float(diff.numel())], op="sum")
        largest = all_reduce_scalars([float(diff.max()) if diff.numel() else 0.0], op="max")[0]
        return {"rollout/logprob_diff_mean": total / max(count, 1.0), "rollout/logprob_diff_max": largest}

    def log_probs(self, batch: Batch, model: torch.nn.Module, with_entropy: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs and entropies (None without `with_entropy`) of the completion tokens, (b, T)."""
        from opensloth.grpo.forward import compute_model_log_probs

        return compute_model_log_probs(
            model, batch.input_ids, batch.attention_mask, num_completion_tokens=batch.completion_mask.shape[1],
            temperature=self.cfg.grpo.temperature, chunk_size=self.cfg.grpo.logprob_chunk_size,
            with_entropy=with_entropy, share_prompts=self.share_prompts,
        )

    def reference_log_probs(self, batch: Batch) -> torch.Tensor:
        """Log-probs under the starting policy (see setup): a frozen copy, the frozen starting
        adapter, or the base model with the fresh adapter disabled."""
        if self.ref_model is not None:
            return self.log_probs(batch, self.ref_model, with_entropy=False)[0]
        if self.ref_adapter is not None:
            from opensloth.models.loading import adapter_active

            with adapter_active(self.model, self.ref_adapter):
                return self.log_probs(batch, self.model, with_entropy=False)[0]
        disable = getattr(self.model, "disable_adapter", None)
        with (disable() if disable is not None else contextlib.nullcontext()):
            return self.log_probs(batch, self.model, with_entropy=False)[0]

    # -- evaluation and samples ----------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """What `os eval` reports on the held-out set, from this run's rewards: one greedy completion per
        prompt, tallied on this worker's share and summed across workers (`evaluate.EvalTally`).

        Logged with an `eval/` prefix: eval/reward/mean, eval/rewards/<name>/mean, eval/pass@1 (when the run
        has an accuracy reward: the task's, else its first answer-checking one; `evaluate.default_accuracy_reward`)
        and eval/mean_completion_chars.
        """
        from opensloth.evaluate import EvalTally, default_accuracy_reward

        if self.eval_rows is None or len(self.eval_rows) == 0:
            return {}
        rows = self.eval_rows.shard(self.ctx.world_size, self.ctx.rank, contiguous=True)
        self.model.eval()
        tally = EvalTally(self.rewards.names, default_accuracy_reward(self.cfg.grpo.task, self.rewards.names), 1)
        bs = max(1, self.cfg.grpo.rollout_batch_size * self.cfg.grpo.group_size // self.ctx.world_size)
        for start in range(0, len(rows), bs):
            chunk = rows.select(range(start, min(start + bs, len(rows))))
            rollout = self.engine.generate([list(ids) for ids in chunk["prompt_ids"]], group_size=1,
                                           max_new_tokens=self.cfg.grpo.max_new_tokens, greedy=True)
            tally.add(self.score(chunk, rollout, 1, strict=not self.rewards_checked), rollout.completions_text)
        # The same keys on every worker (one may hold no eval rows), so the sums reduce in one collective.
        keys = sorted(tally.totals)
        tally.totals = dict(zip(keys, all_reduce_scalars([tally.totals[k] for k in keys], op="sum")))
        out = {f"eval/{key}": value for key, value in tally.summary().items()}
        if self.ctx.is_main:
            from opensloth.distributed import print0

            print0(f"[bold]eval[/] step {self.global_step}: "
                   + ", ".join(f"{k.removeprefix('eval/')}={v:.3f}" for k, v in out.items()))
        return out

    def print_sample(self, prompt: str, completions: list[str], scores: Any) -> None:
        """One prompt, its G completions and their scores, as a rich table (rank 0)."""
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"step {self.global_step}: {prompt[-200:]}", show_lines=True)
        names = list(scores.per_reward)
        table.add_column("completion", overflow="fold")
        for name in names:
            table.add_column(name, justify="right")
        table.add_column("total", justify="right")
        totals = torch.as_tensor(scores.total).tolist()
        for i, text in enumerate(completions):
            values = [scores.per_reward[n][i] for n in names]
            table.add_row(text[:500], *["-" if v is None else f"{v:.2f}" for v in values], f"{totals[i]:.2f}")
        Console().print(table)

    # -- save and cleanup ----------------------------------------------------------------------

    def save_checkpoint(self, step: int) -> None:
        """Weights, optimizer, scheduler, RNG and loop position (every worker calls it)."""
        save_checkpoint(self.cfg.training.output_dir, step, model=self.model, optimizer=self.optimizer,
                        scheduler=self.scheduler, state={
                            "optimizer_step": self.optimizer_step,
                            "alarms": {name: (a.streak, a.warned) for name, a in self.alarms.items()},
                            "none_warned": sorted(self.none_warned),
                            "reward_failures_in_a_row": self.reward_failures_in_a_row},
                        save_total_limit=self.cfg.training.save_total_limit, tokenizer=self.tokenizer)

    def save(self) -> None:
        """Rank 0 writes the adapter (or full model), tokenizer and chat template to --output-dir."""
        from opensloth.checkpoint import save_final_model

        if self.ctx.is_main:
            self.metrics_logger.close()  # flush metrics.jsonl before the curves are drawn from it
            save_final_model(self.model, self.tokenizer, self.cfg.training.output_dir,
                             full_model=self.cfg.model.full_finetune)

    def cleanup(self) -> None:
        """Close the metrics files and the rollout engine (vLLM must shut down before the group does)."""
        for part in ("metrics_logger", "engine", "rollout_link"):
            close = getattr(getattr(self, part, None), "close", None)
            try:
                if close is not None:
                    close()
            except Exception as exc:  # noqa: BLE001 - never hide the error that ended the run
                logger.warning("Closing the %s failed: %s", part, exc)


def run(cfg: GRPORunConfig, ctx: WorkerContext) -> None:
    """Entry point called by the launcher in every worker."""
    recipe = GRPORecipe(cfg, ctx)
    try:
        recipe.setup()  # inside the try: a setup that fails still closes what it opened (the vLLM engine)
        recipe.train()
        if recipe.stopped:
            raise TrainingStopped(stopped_message(cfg.training.output_dir, recipe.global_step, recipe.total_steps))
        recipe.save()
    finally:
        recipe.cleanup()
