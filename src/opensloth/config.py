"""Every option of every recipe, in one place: pydantic models, YAML loading, CLI overrides.

Each section is a pydantic model with `extra="forbid"`; a field's `description` is its only
help text: the CLI options of `os-train sft` and `os-train grpo` are generated from these
fields (`learning_rate` -> `--learning-rate`), so help is written once and cannot drift.

Precedence: field defaults < YAML file (`--config`) < CLI options. A YAML file may nest keys
under their section (`training: {learning_rate: 1e-4}`) or give them flat (`learning_rate: 1e-4`).
A recipe's own defaults (GRPO's learning rate 5e-6, its output dir) are its section models
(`GRPOTrainingConfig`), so a config built in Python gets the defaults the CLI shows.
Checks that need no worker count are validators here, so `--dry-run` and the Python API run them.

Field names are unique across sections, so a flat name maps to exactly one section.
"""

from __future__ import annotations

import difflib
import inspect
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from opensloth import trl_names
from opensloth.errors import UserError, plural

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SFT_FORMATS = ("chat", "prompt-completion", "text", "openmath-reasoning")
GRPO_FORMATS = ("dapo-math", "gsm8k", "question-answer", "prompt-answer")


# generation_kwargs keys (TRL: passed to GenerationConfig or vLLM's SamplingParams) -> the option each sets:
# the ones both rollout engines apply. Others are refused by name (REFUSED_GENERATION_KWARGS says why).
GENERATION_KWARGS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                     "repetition_penalty": "repetition_penalty", "stop_strings": "stop_strings", "stop": "stop_strings"}
REFUSED_GENERATION_KWARGS = {
    "seed": "sampling is seeded by --seed (each worker its own stream)",
    "max_new_tokens": "use --max-new-tokens", "max_tokens": "use --max-new-tokens",
    "do_sample": "GRPO rollouts always sample", "n": "use --group-size", "num_return_sequences": "use --group-size",
}


def _flags(*flags: str) -> dict:
    """Extra CLI spellings of a field (short aliases, TRL names)."""
    return {"flags": list(flags)}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    model: str = Field(
        description="Hub name or local path: a base model, or a saved LoRA adapter directory "
        "whose training then continues.",
        json_schema_extra=_flags("-m"),
    )
    backend: Literal["auto", "hf", "unsloth"] = Field(
        "auto", description="auto: unsloth when CUDA is present and it imports, else hf (transformers + PEFT)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype. auto: bfloat16 on CUDA, float32 on CPU."
    )
    load_in_4bit: bool = Field(False, description="Load the base model in 4 bits (QLoRA). CUDA only.")
    full_finetune: bool = Field(False, description="Train every weight instead of a LoRA adapter.")
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", description="Recompute activations in backward to save memory. auto: on for CUDA, off on CPU."
    )
    trust_remote_code: bool = Field(False, description="Allow custom model code from the hub.")


class LoraConfig(Section):
    lora_r: int = Field(16, gt=0, description="LoRA rank.", json_schema_extra=_flags("-r"))
    lora_alpha: int = Field(32, gt=0, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(ALL_LINEAR),
        description="Comma-separated module names that get LoRA. Default: every linear projection.",
    )


class DataConfig(Section):
    dataset: Optional[str] = Field(
        None,
        description="Hub dataset name, a local .json/.jsonl/.csv/.parquet file, a saved dataset "
        "directory, or a directory written by `os-train data`.",
        json_schema_extra=_flags("-d"),
    )
    dataset_split: str = Field("train", description="Split to load from a hub or saved dataset.")
    dataset_config: Optional[str] = Field(None, description="Dataset configuration name (hub datasets).")
    format: Optional[str] = Field(
        None,
        description="Row format. sft: chat, prompt-completion, text, openmath-reasoning; "
        "grpo: dapo-math, gsm8k, question-answer, prompt-answer. Default: detected from the columns "
        "(question + answer: gsm8k when an answer holds '####', else question-answer).",
    )
    num_samples: Optional[int] = Field(None, gt=0, description="Use this many rows, selected with --seed.")
    chat_template: str = Field(
        "auto",
        description="auto, model (the tokenizer's own), chatml, reasoning, r1-zero (CS336's r1_zero prompt: "
        "<think> ... </think> <answer> ... </answer>), or a path to a Jinja file. "
        "auto: reasoning for math formats and --task math, else the model's own (chatml if it has none).",
    )
    system_prompt: Optional[str] = Field(None, description="System prompt (default: the template's own).")
    chat_template_kwargs: dict[str, Union[bool, int, float, str, None]] = Field(
        default_factory=dict,
        description="Variables for the chat template, as TRL's chat_template_kwargs (JSON on the command line, "
        "e.g. '{\"enable_thinking\": false}' for Qwen3). Set at the top of the template, so data prep, "
        "training, eval, generate and the saved model all render with them.",
    )
    max_seq_length: int = Field(2048, gt=0, description="Truncate tokenized rows to this many tokens.")
    cache_dir: Optional[Path] = Field(
        None, description="Where prepared datasets are cached. Default: $OPENSLOTH_CACHE or ~/.cache/opensloth."
    )
    overwrite_cache: bool = Field(False, description="Rebuild the prepared dataset even if cached.")
    skip_bad_rows: bool = Field(False, description="Drop malformed rows (reported) instead of stopping.")
    eval_dataset: Optional[str] = Field(None, description="Held-out dataset (same kinds as --dataset).")
    eval_split_ratio: float = Field(
        0.0, ge=0.0, lt=1.0, description="Hold out this fraction of the train set for evaluation."
    )

    @field_validator("chat_template_kwargs")
    @classmethod
    def _check_chat_template_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = [name for name in value if not str(name).isidentifier()]
        if bad:  # each becomes `{% set name = value %}` in the template
            raise ValueError(f"chat template variable names must be identifiers, not {', '.join(map(repr, bad))}")
        return value


class TrainingConfig(Section):
    output_dir: Path = Field(Path("outputs/run"), description="Where the adapter, logs and checkpoints go.",
                             json_schema_extra=_flags("-o"))
    overwrite: bool = Field(False, description="Allow writing into a non-empty output dir.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.", json_schema_extra=_flags("-lr"))
    max_steps: int = Field(
        -1, description="Optimizer steps to train; -1 (as in HF TrainingArguments) means --num-train-epochs "
        "passes over the data. 0 and other negative values are refused."
    )
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the dataset when --max-steps is -1.")
    per_device_train_batch_size: int = Field(
        2, gt=0, description="Sequences per micro-batch on each worker.", json_schema_extra=_flags("-b")
    )
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0: off).")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Fraction of steps with linear warm-up.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warm-up."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    seed: int = Field(42, description="Seed for data selection, shuffling, sampling and init.")
    logging_steps: int = Field(1, gt=0, description="Log metrics every this many steps.")
    save_steps: int = Field(0, ge=0, description="Save a checkpoint every this many steps (0: only at the end).")
    save_total_limit: Optional[int] = Field(2, gt=0, description="Keep at most this many checkpoints.")
    eval_steps: int = Field(0, ge=0, description="Evaluate every this many steps (0: never).")
    resume: bool = Field(False, description="Continue from the newest complete checkpoint in --output-dir "
                         "(a finished run only with a larger --max-steps).")
    resume_from: Optional[Path] = Field(None, description="Continue from this checkpoint directory.")
    save_merged: bool = Field(False, description="Also save the LoRA merged into 16-bit base weights.")

    @field_validator("max_steps")
    @classmethod
    def _check_max_steps(cls, value: int) -> int:
        # HF's -1 means "use num_train_epochs"; 0 or -5 training a whole epoch would be a silent surprise.
        if value == 0 or value < -1:
            raise ValueError("give a number of steps of at least 1, or -1 to train for --num-train-epochs "
                             "passes over the data")
        return value


class DistributedConfig(Section):
    devices: str = Field(
        "auto",
        description="auto (every visible GPU, else one CPU worker), GPU ids like 0,1,3, cpu, or cpu:N.",
    )
    launcher: Literal["process", "tmux"] = Field(
        "process", description="process: child processes with rank-prefixed output; tmux: one pane per worker."
    )
    master_port: Optional[int] = Field(None, gt=0, lt=65536, description="Rendezvous port (default: a free one).")
    collective_timeout: int = Field(
        600, gt=0, description="Seconds before a stuck collective (all-reduce, barrier) fails the job."
    )

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu"):
            return value
        if value.startswith("cpu:") and value[4:].isdigit() and int(value[4:]) > 0:
            return value
        ids = value.split(",")
        if all(i.strip().isdigit() for i in ids) and len(set(ids)) == len(ids):
            return ",".join(i.strip() for i in ids)
        raise ValueError("expected auto, cpu, cpu:N (N > 0) or distinct GPU ids like 0,1,3")


class LoggingConfig(Section):
    report_to: list[Literal["tensorboard", "wandb", "none"]] = Field(
        default_factory=lambda: ["tensorboard"], description="Comma-separated: tensorboard, wandb, none."
    )
    run_name: Optional[str] = Field(None, description="Run name for TensorBoard and wandb.")
    print_sample_every: int = Field(10, ge=0, description="Print one prompt with its completions, and append the step's completions (with rewards' log_extra columns) to completions.jsonl, every N steps.")
    debug: bool = Field(False, description="Show full tracebacks for user errors.")

    @field_validator("report_to")
    @classmethod
    def _check_report_to(cls, value: list[str]) -> list[str]:
        import importlib.util

        if "none" in value and len(value) > 1:
            raise ValueError("'none' cannot be combined with other trackers; give none alone")
        # Checked here, before any data or model work, not when the first metric is logged.
        if "wandb" in value and importlib.util.find_spec("wandb") is None:
            raise ValueError("wandb is not installed: pip install 'opensloth[wandb]' (set WANDB_MODE=offline "
                             "to log without an account), or use --report-to tensorboard")
        return value


class SFTConfig(Section):
    packing: bool = Field(False, description="Pack several rows into each sequence.")
    assistant_only_loss: bool = Field(True, description="Train on assistant tokens only.")


class GRPOConfig(Section):
    task: Optional[str] = Field(None, description="Reward preset: math, code, general, reasoning.")
    rewards: list[str] = Field(default_factory=list, description="Comma-separated reward names (os list-rewards).")
    reward_weights: list[float] = Field(
        default_factory=list,
        description="Comma-separated weight per reward: the --task preset's rewards, then --rewards, in order.",
    )
    reward_modules: list[Path] = Field(
        default_factory=list, description="Python file with custom rewards (repeatable).",
        json_schema_extra=_flags("--reward-module"),
    )
    reward_timeout: float = Field(
        120.0, gt=0,
        description="Seconds one reward may take on one batch; past it the reward scores None for that batch.",
    )
    code_test_timeout: float = Field(
        2.0, gt=0,
        description="code_correctness: seconds each test may run (the solution's module code runs once, first).",
    )
    group_size: int = Field(8, description="Completions per prompt (G).", json_schema_extra=_flags("--num-generations"))
    rollout_batch_size: int = Field(8, gt=0, description="Prompts per step, across all workers; each makes "
                                    "--group-size completions (CS336's rollout_batch_size and TRL's "
                                    "generation_batch_size count completions: divide them by the group size).")
    steps_per_generation: Optional[int] = Field(
        None, gt=0, description="TRL's steps_per_generation: sets --rollout-batch-size to "
        "per-device-train-batch-size x workers x this / --group-size prompts once the worker count is known "
        "(then --per-device-train-batch-size x --gradient-accumulation-steps completions per optimizer step give "
        "this / --gradient-accumulation-steps updates per rollout). Default: off, give --rollout-batch-size.",
    )
    epochs_per_rollout_batch: int = Field(1, gt=0, description="Passes of updates over each rollout batch.")
    loss_type: Literal["no_baseline", "reinforce_with_baseline", "grpo_clip", "grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "grpo_clip", description="Policy-gradient loss: no_baseline, reinforce_with_baseline, grpo_clip (aggregated "
        "by --loss-agg), or TRL's grpo, bnpo, dr_grpo, dapo (the clipped loss with TRL 1.16's own aggregation; "
        "docs/GRPO_TRAINING.md)."
    )
    loss_agg: Literal["seq_mean", "token_mean", "constant"] = Field(
        "token_mean",
        description="seq_mean (GRPO), token_mean (the step's token mean), constant (Dr. GRPO: / max new tokens). "
        "Only for --loss-type no_baseline, reinforce_with_baseline and grpo_clip: TRL's loss types fix their own.",
    )
    epsilon: float = Field(0.2, gt=0, description="Lower clip range: rho >= 1 - epsilon.")
    epsilon_high: Optional[float] = Field(None, gt=0, description="Upper clip range (default: --epsilon).")
    beta: float = Field(0.04, ge=0, description="KL weight to the reference policy (0 skips the reference).")
    # TRL 1.16 GRPOConfig's loss-side options (docs/GRPO_TRAINING.md gives each one's formula).
    scale_rewards: Optional[Literal["group", "batch", "none"]] = Field(
        None, description="Advantage scaling (TRL's): group (/ group std), batch (/ std of every reward of the "
        "step), none. Default: group, or none with --no-std-normalization.",
    )
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="The clipped losses' ratio: per token, or per sequence (GSPO: exp of the mean "
        "log-ratio over the sequence's tokens).",
    )
    delta: Optional[float] = Field(
        None, gt=0, description="Two-sided clipping: cap the ratio of the unclipped term at delta "
        "(TRL recommends > 1 + --epsilon-high). Default: off.",
    )
    mask_truncated_completions: bool = Field(
        False, description="Leave completions that hit --max-new-tokens without EOS out of the loss (TRL's).",
    )
    top_entropy_quantile: float = Field(
        1.0, gt=0, le=1, description="Keep the policy loss only on the top q of completion tokens by entropy "
        "(per micro-batch, over every worker; 1 keeps all).",
    )
    use_bias_correction_kl: bool = Field(
        False, description="Multiply the KL term by the clipped loss's ratio rho (TRL's; TRL 1.16 defaults to on).",
    )
    vllm_importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = (
        Field("token_truncate", description="vLLM correction (TRL's modes): per token or per sequence; truncate "
              "clamps the ratio into [min, cap], mask drops what lies outside. TRL's default is sequence_mask."))
    vllm_importance_sampling_clip_min: Optional[float] = Field(
        None, ge=0, description="Lower bound of the vLLM importance-sampling ratio (default: none).",
    )
    std_normalization: bool = Field(True, description="Divide advantages by the group std (off: Dr. GRPO).")
    advantage_eps: float = Field(1e-4, gt=0, description="Added to the group std before dividing.")
    filter_zero_std: bool = Field(False, description="Drop groups whose rewards are all equal (DAPO).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    min_p: float = Field(0.0, ge=0, lt=1, description="Min-p sampling threshold (0: off).")
    # -- more sampling options, TRL's names (issue 20); generation_kwargs folds into them ---------------
    top_k: Optional[int] = Field(0, ge=0, description="Sample from the k likeliest tokens only (0: off, as TRL).")
    repetition_penalty: float = Field(
        1.0, gt=0, description="Divide the logit of every token already in the prompt or the completion (multiply "
        "it when negative) by this before sampling, as transformers and vLLM do (1.0: off; > 1 repeats less)."
    )
    stop_strings: list[str] = Field(
        default_factory=list,
        description="Comma-separated strings that end a completion, kept in it, like EOS (not truncated). "
        "Strings with commas or newlines: YAML, or --generation-kwargs '{\"stop\": [\"\\n\\n\"]}'.",
    )
    generation_kwargs: Optional[dict[str, Any]] = Field(
        None,
        description="TRL's generation_kwargs: a mapping in YAML, a JSON object on the command line. Only keys "
        "both rollout engines honour: " + ", ".join(GENERATION_KWARGS) + " (stop = stop_strings); each sets "
        "its option, and setting one both ways with different values is refused.",
    )

    @field_validator("scale_rewards", mode="before")
    @classmethod
    def _scale_rewards_bools(cls, value: Any) -> Any:
        return {True: "group", False: "none"}.get(value, value) if isinstance(value, bool) else value  # TRL's

    @field_validator("top_k")
    @classmethod
    def _top_k_none_is_off(cls, value: Optional[int]) -> int:
        return value or 0  # None is TRL's and transformers' other spelling of off

    @field_validator("stop_strings")
    @classmethod
    def _check_stop_strings(cls, value: list[str]) -> list[str]:
        if any(not text for text in value):
            raise ValueError("a stop string cannot be empty")
        return value

    @model_validator(mode="before")
    @classmethod
    def _fold_generation_kwargs(cls, data: Any) -> Any:
        """Check generation_kwargs' keys and set the options they name (validated as those options)."""
        if not isinstance(data, dict) or data.get("generation_kwargs") is None:
            return data
        kwargs = data["generation_kwargs"]
        if isinstance(kwargs, str):  # the command line's JSON
            try:
                kwargs = json.loads(kwargs)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--generation-kwargs is not JSON ({exc}); write an object like "
                                 "'{\"top_k\": 20, \"stop\": [\"</answer>\"]}'") from None
        if not isinstance(kwargs, dict):
            raise ValueError("--generation-kwargs must be a mapping of option: value (a JSON object on the command line)")
        data = {**data, "generation_kwargs": kwargs}
        for key, value in kwargs.items():
            if key not in GENERATION_KWARGS:
                hint = REFUSED_GENERATION_KWARGS.get(key, "OpenSloth passes only what both engines (hf and vllm) apply")
                raise ValueError(f"--generation-kwargs key {key!r} is not supported: {hint}. Supported keys: "
                                 f"{', '.join(GENERATION_KWARGS)}")
            field = GENERATION_KWARGS[key]
            if field == "stop_strings" and isinstance(value, str):
                value = [value]
            if field in data and data[field] != value:
                raise ValueError(f"{flag_name(field)} is set twice, to {data[field]!r} and by --generation-kwargs "
                                 f"{key!r} to {value!r}: set it once")
            data[field] = value
        return data

    max_new_tokens: int = Field(
        256, gt=0, description="Completion length limit.", json_schema_extra=_flags("--max-completion-length")
    )
    max_prompt_length: Optional[int] = Field(
        None, gt=0, description="Drop prompts longer than this (tokens; counted in the plan). Default: keep all."
    )
    prompt_length_percentile: Optional[float] = Field(
        None, gt=0, le=1, description="Also drop prompts longer than this quantile of the dataset's prompt "
        "lengths (e.g. 0.9 drops the longest 10%; counted in the plan). Default: off."
    )
    rollout_engine: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="Generation engine. auto: vllm on a GPU if installed and usable, else hf."
    )
    rollout_devices: Optional[str] = Field(
        None, description="Rollout workers on their own devices (GRPO; they run --rollout-engine): cpu:N (N CPU processes) or GPU "
        "ids like 2,3, none of them in --devices. They sample prompts, generate, score and compute advantages "
        "while the training workers train; weights are sent to them after each optimizer step. Under torchrun "
        "leave it unset and set OPENSLOTH_ROLE=rollout on the rollout ranks (docs/multi_gpu.md). Default: off "
        "(the training workers generate, as always).",
    )
    max_staleness: int = Field(
        0, ge=0, description="With rollout workers (--rollout-devices): how many policy versions a batch may lag. 0: synchronous "
        "(reproduces the colocated run); K >= 1: the rollout workers generate up to K batches ahead, corrected "
        "by truncated importance sampling (--vllm-importance-sampling-*).",
    )
    vllm_memory_utilization: Optional[float] = Field(
        None, gt=0, lt=1, description="vLLM's memory share (GPU memory, or RAM on CPU). Default per device kind."
    )
    vllm_importance_sampling: bool = Field(
        True, description="Correct the vLLM/train log-prob mismatch with truncated importance sampling."
    )
    vllm_importance_sampling_cap: float = Field(3.0, gt=0, description="Cap on the importance-sampling ratio.")
    log_completions: bool = Field(
        False, description="Append every completion of each logged step, from every worker, to completions.jsonl "
        "(and to wandb as a table), as TRL's log_completions. Off: rank 0's, every --print-sample-every steps.",
    )
    logprob_chunk_size: int = Field(
        1024, gt=0, description="Tokens per chunk when computing log-probs (memory vs speed)."
    )

    @field_validator("rollout_devices")
    @classmethod
    def _check_rollout_devices(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        value = value.strip().lower()
        if value.startswith("cpu:"):
            if value[4:].isdigit() and int(value[4:]) >= 1:
                return value
            raise ValueError("cpu:N needs N >= 1 (the number of rollout processes), e.g. cpu:1")
        ids = value.split(",")
        if all(i.strip().isdigit() for i in ids) and len(set(i.strip() for i in ids)) == len(ids):
            return ",".join(i.strip() for i in ids)
        raise ValueError("expected cpu:N (N >= 1) or distinct GPU ids like 2,3")

    @field_validator("group_size")
    @classmethod
    def _check_group_size(cls, value: int) -> int:
        if value < 2:
            raise ValueError("GRPO compares completions within a group: --group-size must be at least 2")
        return value

    @property
    def reward_scaling(self) -> str:
        """The advantage scaling in effect: --scale-rewards, else what --std-normalization says."""
        if self.scale_rewards is not None:
            return self.scale_rewards
        return "group" if self.std_normalization else "none"


def recipe_section(base: type[Section], name: str, **changes: dict[str, Any]) -> type[Section]:
    """`base` with some fields' default or description changed for one recipe (checks and flags kept).

    The defaults then live in the model itself, so `GRPORunConfig(model=...)` built in Python gets the
    same learning rate as `os-train grpo`, and --help reads them from the same place.
    """
    fields = {field: (base.model_fields[field].annotation, FieldInfo.merge_field_infos(base.model_fields[field], **kw))
              for field, kw in changes.items()}
    return create_model(name, __base__=base, __module__=__name__, **fields)


SFTTrainingConfig = recipe_section(TrainingConfig, "SFTTrainingConfig",
                                   output_dir={"default": Path("outputs/sft")})
GRPOTrainingConfig = recipe_section(
    TrainingConfig, "GRPOTrainingConfig",
    output_dir={"default": Path("outputs/grpo")},
    learning_rate={"default": 5e-6},
    per_device_train_batch_size={"default": 8},
    max_steps={"description": "GRPO steps to train, each one rollout batch (generate --rollout-batch-size x "
               "--group-size completions, score, then --epochs-per-rollout-batch passes of optimizer updates); "
               "-1 means --num-train-epochs passes over the prompts. 0 and other negative values are refused."},
)


class RunConfig(Section):
    model: ModelConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _check_run(self) -> "RunConfig":
        # Checks that need no worker count: here, so --dry-run and the Python API catch them too.
        if self.training.eval_steps and not (self.data.eval_dataset or self.data.eval_split_ratio):
            raise ValueError("--eval-steps needs evaluation data: pass --eval-dataset or --eval-split-ratio")
        if not self.model.full_finetune and not self.lora.target_modules:
            raise ValueError("--target-modules is empty: LoRA needs at least one module (or use --full-finetune)")
        return self


class SFTRunConfig(RunConfig):
    recipe: Literal["sft"] = "sft"
    training: SFTTrainingConfig = Field(default_factory=SFTTrainingConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)

    @model_validator(mode="after")
    def _check_format(self) -> "SFTRunConfig":
        if self.data.format is not None and self.data.format not in SFT_FORMATS:
            raise ValueError(f"--format {self.data.format!r} is not an SFT format; choose one of {', '.join(SFT_FORMATS)}")
        return self


class GRPORunConfig(RunConfig):
    recipe: Literal["grpo"] = "grpo"
    training: GRPOTrainingConfig = Field(default_factory=GRPOTrainingConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)

    @model_validator(mode="after")
    def _check_grpo(self) -> "GRPORunConfig":
        if self.data.format is not None and self.data.format not in GRPO_FORMATS:
            raise ValueError(f"--format {self.data.format!r} is not a GRPO format; choose one of {', '.join(GRPO_FORMATS)}")
        g = self.grpo
        # With --task, weights cover the preset's rewards and then --rewards; resolve_rewards checks that.
        if g.reward_weights and g.rewards and not g.task and len(g.reward_weights) != len(g.rewards):
            raise ValueError(
                f"--reward-weights has {plural(len(g.reward_weights), 'value')} but --rewards names "
                f"{plural(len(g.rewards), 'reward')}"
            )
        if g.scale_rewards is not None and "std_normalization" in g.model_fields_set and (
                g.std_normalization != (g.scale_rewards != "none")):
            flag = "--std-normalization" if g.std_normalization else "--no-std-normalization"
            raise ValueError(f"--scale-rewards {g.scale_rewards} contradicts {flag}: pass one of them")
        if g.steps_per_generation is not None and "rollout_batch_size" in g.model_fields_set:
            raise ValueError("--steps-per-generation sets --rollout-batch-size from the batch size and the worker "
                             "count: give one of them")
        return self


RUN_CONFIGS: dict[str, type[RunConfig]] = {"sft": SFTRunConfig, "grpo": GRPORunConfig}


def sections(run_cls: type[RunConfig]) -> dict[str, type[Section]]:
    """Section name -> section model, for one recipe's config."""
    out = {}
    for name, field in run_cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            out[name] = ann
    return out


def field_index(run_cls: type[RunConfig]) -> dict[str, tuple[str, Any]]:
    """Flat field name -> (section name, pydantic FieldInfo). Names are unique across sections."""
    index: dict[str, tuple[str, Any]] = {}
    for section, model in sections(run_cls).items():
        for name, info in model.model_fields.items():
            assert name not in index, f"config field {name!r} is defined twice"
            index[name] = (section, info)
    return index


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _nest(run_cls: type[RunConfig], flat: dict[str, Any], origin: str) -> dict[str, dict[str, Any]]:
    """Turn {'learning_rate': 1e-4, 'training': {...}} into {'training': {'learning_rate': 1e-4, ...}}."""
    index = field_index(run_cls)
    section_names = set(sections(run_cls))
    nested: dict[str, dict[str, Any]] = {}
    given_as_trl: dict[str, str] = {}  # our field -> the TRL key that set it in this layer

    def put(key: str, value: Any, shown: str, trl_key: str | None = None) -> None:
        # GRPO reads TRL's GRPOConfig names too (opensloth.trl_names): each maps onto ours or is refused.
        try:
            translated = (trl_names.translate(key, value, ours=key in index)
                          if run_cls is GRPORunConfig and trl_key is None else None)
        except UserError as exc:
            raise UserError(f"{exc} (in {origin})") from None
        if translated is not None:
            for name, sub_value in translated.items():
                if name == trl_names.DEFERRED:
                    nested.setdefault(name, {}).update(sub_value)
                else:
                    put(name, sub_value, shown, trl_key=key)
        elif key in index:
            already = nested.get(index[key][0], {})
            if key in already and already[key] != value and (trl_key or key in given_as_trl):
                first = given_as_trl.get(key, key)
                raise UserError(f"{origin} gives {first}: {already[key]!r} and {trl_key or key}: {value!r}, which "
                                f"set the same option ({flag_name(key)}). Keep one.")
            if trl_key:
                given_as_trl[key] = trl_key
            nested.setdefault(index[key][0], {})[key] = value
        else:
            _unknown_key(shown, key, index, origin)

    for key, value in flat.items():
        key_norm = str(key).replace("-", "_")
        if key_norm == "recipe":
            continue
        if key_norm in section_names and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                sub_norm = str(sub_key).replace("-", "_")
                if sub_norm in index and sub_norm not in sections(run_cls)[key_norm].model_fields:
                    _unknown_key(f"{key_norm}.{sub_key}", sub_norm, index, origin)  # ours, in the wrong section
                put(sub_norm, sub_value, f"{key_norm}.{sub_key}")
        else:
            put(key_norm, value, str(key))
    return nested


def _unknown_key(shown: str, key: str, index: dict, origin: str) -> None:
    if key in index:  # a real option under the wrong section (data.beta): name the right one
        section = index[key][0]
        raise UserError(f"Option {shown!r} in {origin} is in the wrong section: it belongs under "
                        f"{section!r} ({section}.{key}, or {key} at the top level, or {flag_name(key)}).")
    close = difflib.get_close_matches(key, list(index), n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UserError(f"Unknown option {shown!r} in {origin}.{hint} See --help for every option.")


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with clear errors for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Config file not found: {path}. Pass an existing YAML file to --config.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"Config file {path}, line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}). "
                        "Save it as UTF-8 (e.g. iconv -f latin1 -t utf-8).") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"Config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"Config file {path} must hold a mapping of option: value, not a {type(data).__name__}.")
    return data


def resolve_config(
    recipe: str, yaml_path: Optional[Path] = None, overrides: Optional[dict[str, Any]] = None
) -> RunConfig:
    """Build a validated run config: field defaults < YAML file < CLI overrides.

    Args:
        recipe: "sft" or "grpo".
        yaml_path: optional YAML file (nested by section or flat).
        overrides: flat field name -> value, as given on the command line (None values ignored).

    Raises:
        UserError: unknown keys, or values that fail validation (names the option, value and rule).
    """
    run_cls = RUN_CONFIGS[recipe]
    merged: dict[str, dict[str, Any]] = {}
    layers = []
    if yaml_path is not None:
        layers.append(_nest(run_cls, load_yaml(yaml_path), str(yaml_path)))
    if overrides:
        layers.append(_nest(run_cls, {k: v for k, v in overrides.items() if v is not None}, "the command line"))
    for layer in layers:
        for section, values in layer.items():
            merged.setdefault(section, {}).update(values)
    deferred = merged.pop(trl_names.DEFERRED, None)
    if deferred:  # TRL keys that need the merged values (generation_batch_size needs the group size)
        if "generation_batch_size" in deferred and "rollout_batch_size" in merged.get("grpo", {}):
            raise UserError("Both TRL's generation_batch_size (completions per step) and rollout_batch_size "
                            "(prompts per step) are given: keep one.")

        def get(name: str) -> Any:
            section, info = field_index(run_cls)[name]
            return merged.get(section, {}).get(name, info.get_default(call_default_factory=True))

        for name, value in trl_names.resolve_deferred(deferred, get).items():
            merged.setdefault(field_index(run_cls)[name][0], {})[name] = value
    if "model" not in merged.get("model", {}):
        raise UserError("Missing required option --model: a hub model name or a local model/adapter directory.")
    try:
        return run_cls.model_validate(merged)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, run_cls)) from None


def format_validation_error(exc: ValidationError, run_cls: type[RunConfig]) -> str:
    """One line per problem: the option, its YAML key, the value given and what is allowed."""
    lines = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"] if not isinstance(part, int)]
        field = loc[1] if len(loc) > 1 else (loc[0] if loc else "")
        key = ".".join(loc[:2]) if len(loc) > 1 else field
        msg = err["msg"].removeprefix("Value error, ")
        if field and field in field_index(run_cls):
            hint = _yaml_type_hint(err["type"], field, err.get("input"))
            lines.append(f"Invalid value for {flag_name(field)} ({key}): {err.get('input')!r}. {msg}.{hint}")
        else:
            lines.append(f"Invalid configuration: {msg}.")
    return "\n".join(lines)


def _yaml_type_hint(error_type: str, field: str, value: Any) -> str:
    """How to write the value in YAML when its type is wrong: list syntax, or quotes around a string
    that YAML read as a number, a boolean or a date (`run_name: 2024` -> `run_name: "2024"`)."""
    if error_type == "list_type":
        example = "[q_proj, v_proj]" if field == "target_modules" else "[a, b]"
        return (f" In YAML write a list as {field}: {example} (or one '- item' per line); on the command line, "
                f"comma-separated ({flag_name(field)} a,b).")
    kind = {"bool": "boolean (yes/no/on/off/true/false)", "int": "number", "float": "number", "date": "date",
            "datetime": "date"}.get(type(value).__name__)
    if error_type == "string_type" and kind:
        return f' YAML read it as a {kind}: put the text in quotes ({field}: "...").'
    if error_type.endswith("_parsing") and isinstance(value, str):
        return f" Write a plain {error_type.split('_')[0]} without quotes ({field}: ...)."
    return ""


def dump_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML (nested by section); `--config` reads it back."""
    data = json.loads(cfg.model_dump_json())
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# CLI options generated from the fields (used by opensloth.cli).
# ---------------------------------------------------------------------------------------------


def _cli_type(annotation: Any) -> tuple[Any, bool]:
    """Map a field annotation to (typer type, is_list_of_paths). Lists are comma-separated strings."""
    origin = get_origin(annotation)
    args = [a for a in get_args(annotation) if a is not type(None)]
    if origin is Literal or origin is dict:  # a dict is given as JSON text
        return str, False
    if origin in (list, tuple):
        if args and args[0] is Path:
            return list[Path], True
        return str, False
    if args and origin is not None:  # Optional[X]
        return _cli_type(args[0])
    if annotation in (int, float, str, bool, Path):
        return annotation, False
    return str, False


def config_cli_parameters(recipe: str) -> list[inspect.Parameter]:
    """Typer parameters, one per config field, all defaulting to None (= not given)."""
    import typer

    run_cls = RUN_CONFIGS[recipe]
    params = []
    for name, (section, info) in field_index(run_cls).items():
        cli_type, _ = _cli_type(info.annotation)
        extra = (info.json_schema_extra or {}).get("flags", [])
        if recipe == "grpo":  # TRL's name of the same option (--num-iterations for --epochs-per-rollout-batch)
            extra = [*extra, *(flag_name(f.name) for f in trl_names.FIELDS.values()
                               if f.status == "alias" and f.ours == name and flag_name(f.name) not in extra)]
        if cli_type is bool:
            decls = [f"{flag}/--no-{flag[2:]}" for flag in (flag_name(name), *extra)]
        else:
            decls = [flag_name(name), *extra]
        default = info.get_default(call_default_factory=True) if not info.is_required() else None
        choices = get_args(info.annotation) if get_origin(info.annotation) is Literal else ()
        description = info.description
        if choices:
            help_text = f"{description} (choices: {', '.join(map(str, choices))})"
        else:
            help_text = description or ""
        if isinstance(default, list):
            default = ",".join(map(str, default)) if default else None
        if default not in (None, "", {}) and cli_type is not bool:
            help_text += f" (default: {default})"
        elif cli_type is bool:
            help_text += f" (default: {'on' if default else 'off'})"
        option = typer.Option(None, *decls, help=help_text, rich_help_panel=section.capitalize(),
                              show_default=False)
        annotation = Optional[cli_type] if cli_type is not list[Path] else Optional[list[Path]]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


def overrides_from_cli(recipe: str, values: dict[str, Any]) -> dict[str, Any]:
    """Turn raw CLI values into field values: split comma-separated lists, drop unset ones."""
    index = field_index(RUN_CONFIGS[recipe])
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name not in index or value is None:
            continue
        annotation = index[name][1].annotation
        if get_origin(annotation) is dict and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise UserError(f"{flag_name(name)} {value}: not a JSON object ({exc.msg}). "
                                f"Give e.g. {flag_name(name)} '{{\"enable_thinking\": false}}'.") from None
            if not isinstance(value, dict):
                raise UserError(f"{flag_name(name)}: give a JSON object ({{\"name\": value, ...}}), not {value!r}.")
            if not value:
                continue
        if get_origin(annotation) in (list, tuple) and isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)) and not value:
            continue
        out[name] = value
    return out
