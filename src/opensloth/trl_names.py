"""TRL's GRPOConfig field names, read in a config file: what each one becomes here.

A TRL user brings a GRPOConfig as YAML. Every one of its fields (TRL 1.16: its own and the
TrainingArguments it inherits) has one entry below, so none is ever silently ignored:

    same          our option of the same name and meaning (nothing to translate);
    alias         our option under another name (num_generations -> group_size);
    convert       a value that maps onto our options (use_vllm: true -> rollout_engine: vllm);
    default_only  no option here because TRL's default is what OpenSloth does: accepted at that
                  default, refused with the reason at any other value;
    refused       not supported: refused by name with the reason.

`translate(key, value)` applies one entry (`opensloth.config` calls it for a key that is not one
of ours). `generation_batch_size` counts completions and needs the group size, so it is returned
under DEFERRED and resolved once the whole config is merged (`resolve_deferred`).
docs/coming_from_trl.md is `markdown_table()`; tests/test_trl_names.py holds both equal to TRL 1.16's
field list (tests/fixtures/trl_grpo_fields.json, checked against TRL itself where it is installed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from opensloth.errors import UserError

Status = Literal["same", "alias", "convert", "default_only", "refused"]
DEFERRED = "_trl_deferred"  # the section name under which translate() returns what needs the merged config


@dataclass(frozen=True)
class TRLField:
    """One TRL GRPOConfig field: its status here, our option(s), and why when it has none."""

    name: str
    status: Status
    ours: str = ""  # our option(s), as the docs show them
    reason: str = ""  # default_only / refused / convert: what happens and why
    default: Any = None  # default_only: TRL 1.16's default, the one value accepted
    convert: Callable[[Any], dict[str, Any]] | None = None  # convert: TRL value -> our fields
    # A convert field with one of our names: the values that are TRL's spelling (the rest are ours).
    trl_value: Callable[[Any], bool] | None = None


def _same(name: str, note: str = "") -> TRLField:
    return TRLField(name, "same", name, note)


def _alias(name: str, ours: str, note: str = "") -> TRLField:
    return TRLField(name, "alias", ours, note, convert=lambda value: {ours: value})


def _default(name: str, default: Any, reason: str) -> TRLField:
    return TRLField(name, "default_only", "", reason, default)


def _refused(name: str, reason: str, ours: str = "") -> TRLField:
    return TRLField(name, "refused", ours, reason)


def _convert(name: str, ours: str, reason: str, fn: Callable[[Any], dict[str, Any]],
             trl_value: Callable[[Any], bool] | None = None) -> TRLField:
    return TRLField(name, "convert", ours, reason, convert=fn, trl_value=trl_value)


def _refuse_value(name: str, value: Any, why: str) -> UserError:
    return UserError(f"TRL option {name}: {value!r} is not supported here: {why}")


def _only(name: str, accepted: dict[Any, dict[str, Any]], why: str) -> Callable[[Any], dict[str, Any]]:
    """A converter that maps the listed values and refuses any other one with `why`."""
    def convert(value: Any) -> dict[str, Any]:
        for key, fields in accepted.items():
            if value == key and type(value) is type(key):
                return fields
        raise _refuse_value(name, value, why)
    return convert


def _warmup_steps(value: Any) -> dict[str, Any]:
    # transformers 5: an int counts steps, a float below 1 is a share of the steps (our --warmup-ratio).
    if value == 0:
        return {}
    if isinstance(value, float) and 0 < value < 1:
        return {"warmup_ratio": value}
    raise _refuse_value("warmup_steps", value, "OpenSloth warms up over a share of the steps: give "
                        "warmup_ratio (e.g. warmup_steps / max_steps), or warmup_steps as a float below 1.")


def _report_to(value: Any) -> dict[str, Any]:
    values = [value] if isinstance(value, str) else list(value or [])
    if values == ["all"]:
        raise _refuse_value("report_to", value, "name the integrations: tensorboard, wandb or none.")
    return {"report_to": values or ["none"]}


def _generation_batch_size(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    return {DEFERRED: {"generation_batch_size": value}}


NO_HUB = "OpenSloth does not push to the hub; upload the output dir (huggingface-cli upload)."
NO_DDP = "OpenSloth's launcher runs the workers (--devices, --launcher); there is no DDP/FSDP/DeepSpeed setting."
DATA_ONCE = "the dataset is prepared once by the launcher (opensloth.data), not by a DataLoader."
EVAL_HERE = "in-training eval is greedy generation scored by the run's rewards every --eval-steps (docs/GRPO_TRAINING.md)."
ADAMW = "the optimizer is torch's AdamW with its defaults (betas 0.9, 0.999; eps 1e-8), as TRL's default."
NO_VLLM_SERVER = "the vLLM engine runs in the worker (colocate); there is no vLLM server mode."
NO_LOSS = "this loss is not implemented here (the --loss-type choices are in docs/GRPO_TRAINING.md)."

FIELDS: dict[str, TRLField] = {f.name: f for f in [
    # ---- TrainingArguments --------------------------------------------------------------------
    _same("output_dir"),
    _same("per_device_train_batch_size", "sequences (completions) per micro-batch on each worker, as TRL"),
    _same("num_train_epochs"),
    _same("max_steps", "one step = one rollout batch (TRL: one optimizer step; equal when one update per rollout)"),
    _same("learning_rate", "default here 5e-6 for GRPO (TRL: 1e-6)"),
    _same("lr_scheduler_type", "linear, cosine, constant, constant_with_warmup"),
    _default("lr_scheduler_kwargs", None, "the schedules take no extra arguments here."),
    _convert("warmup_steps", "warmup_ratio", "a float below 1 is --warmup-ratio; a step count is refused "
             "(give warmup_ratio).", _warmup_steps),
    _convert("optim", "", "adamw_torch and adamw_torch_fused are AdamW, as here; other optimizers are refused.",
             _only("optim", {"adamw_torch": {}, "adamw_torch_fused": {}}, ADAMW)),
    _default("optim_args", None, ADAMW),
    _same("weight_decay"),
    _default("adam_beta1", 0.9, ADAMW),
    _default("adam_beta2", 0.999, ADAMW),
    _default("adam_epsilon", 1e-08, ADAMW),
    _default("optim_target_modules", None, ADAMW),
    _same("gradient_accumulation_steps", "micro-batches per optimizer step, as TRL"),
    _default("average_tokens_across_devices", True, "losses are always normalised by counts over every "
             "worker (the gradient-accumulation contract in docs/GRPO_TRAINING.md)."),
    _same("max_grad_norm"),
    _default("label_smoothing_factor", 0.0, "GRPO has no labels to smooth."),
    _convert("bf16", "dtype", "true: --dtype bfloat16; false or null: --dtype auto (bfloat16 on CUDA).",
             _only("bf16", {True: {"dtype": "bfloat16"}, False: {}, None: {}}, "give true, false or null.")),
    _convert("fp16", "dtype", "true: --dtype float16.",
             _only("fp16", {True: {"dtype": "float16"}, False: {}}, "give true or false.")),
    _default("bf16_full_eval", False, "eval runs in the training dtype."),
    _default("fp16_full_eval", False, "eval runs in the training dtype."),
    _default("tf32", None, "TF32 matmuls follow torch's default."),
    _convert("gradient_checkpointing", "gradient_checkpointing", "true: on; false: off (ours also has auto: "
             "on for CUDA).", _only("gradient_checkpointing", {True: {"gradient_checkpointing": "on"},
                                                               False: {"gradient_checkpointing": "off"}},
                                    "give true or false (or our on/off/auto)."),
             trl_value=lambda value: isinstance(value, bool)),
    _default("gradient_checkpointing_kwargs", None, "checkpointing is set up by opensloth.models (non-reentrant)."),
    _default("torch_compile", False, "the model is not compiled."),
    _default("torch_compile_backend", None, "the model is not compiled."),
    _default("torch_compile_mode", None, "the model is not compiled."),
    _default("use_liger_kernel", False, "log-probs use our chunked kernel (--logprob-chunk-size)."),
    _default("liger_kernel_config", None, "log-probs use our chunked kernel (--logprob-chunk-size)."),
    _default("use_cache", False, "the rollout engine manages its own KV cache."),
    _default("neftune_noise_alpha", None, "NEFTune is an SFT technique."),
    _default("torch_empty_cache_steps", None, "the CUDA cache is left to torch."),
    _default("auto_find_batch_size", False, "the batch is what you give."),
    _convert("logging_strategy", "logging_steps", "steps: every --logging-steps; other strategies are refused.",
             _only("logging_strategy", {"steps": {}}, "metrics are logged every --logging-steps.")),
    _same("logging_steps"),
    _default("logging_first_step", False, "step 1 is logged when --logging-steps divides it."),
    _default("log_on_each_node", True, "rank 0 logs the metrics reduced over every worker."),
    _default("logging_nan_inf_filter", True, "NaN/inf losses are logged as they are, and a NaN gradient "
             "skips the update with a warning."),
    _default("include_num_input_tokens_seen", "no", "tokens_per_second is logged instead."),
    _default("log_level", "passive", "logging is OpenSloth's (--debug for tracebacks)."),
    _default("log_level_replica", "warning", "workers other than rank 0 log warnings only."),
    _default("disable_tqdm", None, "one rich progress line on rank 0."),
    _convert("report_to", "report_to", "tensorboard, wandb or none (a string or a list).", _report_to,
             trl_value=lambda value: isinstance(value, str)),
    _same("run_name"),
    _default("project", "huggingface", "the wandb project is WANDB_PROJECT's."),
    _default("trackio_space_id", None, "trackio is not an integration here (--report-to)."),
    _default("trackio_bucket_id", None, "trackio is not an integration here (--report-to)."),
    _default("trackio_static_space_id", None, "trackio is not an integration here (--report-to)."),
    _convert("eval_strategy", "eval_steps", "steps: every --eval-steps; no: eval_steps 0; epoch is refused.",
             _only("eval_strategy", {"steps": {}, "no": {"eval_steps": 0}}, EVAL_HERE)),
    _same("eval_steps"),
    _default("eval_delay", 0, EVAL_HERE),
    _default("per_device_eval_batch_size", 8, "eval generates a rollout batch's worth of prompts at once."),
    _default("prediction_loss_only", False, EVAL_HERE),
    _convert("eval_on_start", "eval_steps", "true: with --eval-steps a baseline eval runs before the first step "
             "(logged as step 0), always; false is accepted only without eval (eval_steps 0).",
             lambda value: {DEFERRED: {"eval_on_start": value}}),
    _default("eval_do_concat_batches", True, EVAL_HERE),
    _default("eval_use_gather_object", False, EVAL_HERE),
    _default("eval_accumulation_steps", None, EVAL_HERE),
    _default("include_for_metrics", [], EVAL_HERE),
    _default("batch_eval_metrics", False, EVAL_HERE),
    _default("save_only_model", False, "checkpoints keep the optimizer, scheduler and RNG state, so "
             "--resume continues exactly."),
    _convert("save_strategy", "save_steps", "steps: every --save-steps; no: save_steps 0 (the final model "
             "only); epoch and best are refused.",
             _only("save_strategy", {"steps": {}, "no": {"save_steps": 0}}, "checkpoints are every --save-steps.")),
    _same("save_steps"),
    _default("save_on_each_node", False, "rank 0 writes the checkpoint's shared files."),
    _same("save_total_limit"),
    _default("enable_jit_checkpoint", False, "Ctrl-C (SIGINT/SIGTERM) writes a checkpoint already."),
    _default("push_to_hub", False, NO_HUB),
    _default("hub_token", None, NO_HUB),
    _default("hub_private_repo", None, NO_HUB),
    _default("hub_model_id", None, NO_HUB),
    _default("hub_strategy", "every_save", NO_HUB),
    _default("hub_always_push", False, NO_HUB),
    _default("hub_revision", None, NO_HUB),
    _default("load_best_model_at_end", False, "the final model is the last step's."),
    _default("metric_for_best_model", None, "the final model is the last step's."),
    _default("greater_is_better", None, "the final model is the last step's."),
    _default("ignore_data_skip", False, "--resume restores the sampler's position exactly."),
    _default("restore_callback_states_from_checkpoint", False, "there are no Trainer callbacks in GRPO here."),
    _default("full_determinism", False, "runs are seeded (--seed); same seed, same run on the CPU."),
    _same("seed"),
    _default("data_seed", None, "--seed seeds data selection and shuffling too."),
    _convert("use_cpu", "devices", "true: --devices cpu.",
             _only("use_cpu", {True: {"devices": "cpu"}, False: {}}, "give true or false.")),
    _default("accelerator_config", None, NO_DDP),
    _default("parallelism_config", None, NO_DDP),
    _default("dataloader_drop_last", False, DATA_ONCE),
    _default("dataloader_num_workers", 0, DATA_ONCE),
    _default("dataloader_pin_memory", True, DATA_ONCE),
    _default("dataloader_persistent_workers", False, DATA_ONCE),
    _default("dataloader_prefetch_factor", None, DATA_ONCE),
    _default("dataloader_multiprocessing_context", None, DATA_ONCE),
    _default("dataloader_in_order", True, DATA_ONCE),
    _default("remove_unused_columns", False, "every dataset column reaches the rewards, as TRL's GRPO default."),
    _default("label_names", None, "GRPO has no labels."),
    _default("train_sampling_strategy", "random", "prompts are sampled at random from each worker's shard, "
             "reshuffled each pass."),
    _default("length_column_name", "length", "length grouping is not used."),
    _default("ddp_find_unused_parameters", None, NO_DDP),
    _default("ddp_bucket_cap_mb", None, NO_DDP),
    _default("ddp_broadcast_buffers", None, NO_DDP),
    _default("ddp_static_graph", None, NO_DDP),
    _default("ddp_backend", None, "nccl on GPUs, gloo on the CPU, chosen by the launcher."),
    _default("ddp_timeout", 1800, "see --collective-timeout."),
    _default("fsdp", None, NO_DDP),
    _default("fsdp_config", None, NO_DDP),
    _default("deepspeed", None, NO_DDP),
    _convert("debug", "debug", "TRL's debug features (underflow_overflow, tpu_metrics_debug) are refused; "
             "our --debug shows full tracebacks.", _only("debug", {"": {}}, "it names TRL's debug features; "
                                                        "OpenSloth's --debug (true/false) shows tracebacks."),
             trl_value=lambda value: isinstance(value, str)),
    _default("skip_memory_metrics", True, "peak memory is measured by bench/gpu_grpo.py."),
    _default("do_train", False, "os-train grpo trains."),
    _default("do_eval", False, "see --eval-steps."),
    _default("do_predict", False, "see os eval."),
    _refused("resume_from_checkpoint", "give --resume (the newest checkpoint in --output-dir) or --resume-from "
             "DIR: they are checked against the run before anything starts.", "resume, resume_from"),
    _default("local_rank", -1, "set by the launcher."),
    # ---- GRPOConfig ---------------------------------------------------------------------------
    _default("model_init_kwargs", None, "give --dtype, --load-in-4bit, --trust-remote-code."),
    _same("trust_remote_code"),
    _default("router_aux_loss_coef", None, "MoE router losses are not added."),
    _default("disable_dropout", False, "dropout stays as the model has it (--lora-dropout for LoRA's)."),
    _default("cast_lm_head_to_fp32", False, "log-probs are computed in float32 chunk by chunk already."),
    _alias("num_generations", "group_size"),
    _default("num_generations_eval", None, "in-training eval makes one greedy completion per prompt."),
    _alias("max_completion_length", "max_new_tokens", "default here 256 (TRL: 512)"),
    _default("ds3_gather_for_generation", True, NO_DDP),
    _default("shuffle_dataset", True, "prompts are always shuffled (seeded)."),
    _default("pad_to_multiple_of", "auto", "padding is the rollout engine's."),
    _convert("generation_batch_size", "rollout_batch_size", "completions per step: --rollout-batch-size "
             "(prompts) = generation_batch_size / --group-size, which must divide it.", _generation_batch_size),
    _same("steps_per_generation", "sets rollout_batch_size = per_device_train_batch_size x workers x "
          "steps_per_generation / num_generations prompts, once the worker count is known"),
    _same("temperature"),
    _same("top_p"),
    _same("top_k", "0 or null: off, as TRL"),
    _convert("min_p", "min_p", "null (TRL's default) is off: 0.", lambda value: {"min_p": 0.0},
             trl_value=lambda value: value is None),
    _same("generation_kwargs", "only what both engines honour (sampling options, stop strings); others are refused by name (docs/GRPO_TRAINING.md)"),
    _same("chat_template_kwargs", "set at the top of the chat template, so eval, generate and the saved model "
          "render with them too; text prompts then go through the template"),
    _same("repetition_penalty", "over the prompt and completion tokens, as transformers and vLLM"),
    _default("cache_implementation", None, "the rollout engine manages its own KV cache."),
    _convert("use_vllm", "rollout_engine", "true: --rollout-engine vllm; false: hf (TRL's transformers "
             "generation).", _only("use_vllm", {True: {"rollout_engine": "vllm"}, False: {"rollout_engine": "hf"}},
                                   "give true or false.")),
    _convert("vllm_mode", "", "colocate is what the vLLM engine does here; server is refused.",
             _only("vllm_mode", {"colocate": {}}, NO_VLLM_SERVER)),
    _default("vllm_model_impl", "vllm", "vLLM's own model implementation."),
    _default("vllm_enable_sleep_mode", False, "the engine is not put to sleep between steps."),
    _default("vllm_structured_outputs_regex", None, "structured outputs are not offered."),
    _default("vllm_server_base_url", None, NO_VLLM_SERVER),
    _default("vllm_server_host", "0.0.0.0", NO_VLLM_SERVER),
    _default("vllm_server_port", 8000, NO_VLLM_SERVER),
    _default("vllm_server_timeout", 240.0, NO_VLLM_SERVER),
    _default("vllm_group_port", 51216, NO_VLLM_SERVER),
    _alias("vllm_gpu_memory_utilization", "vllm_memory_utilization", "default here per device kind (TRL: 0.3)"),
    _default("vllm_max_model_length", None, "the engine's context is the prompt limit plus --max-new-tokens."),
    _default("vllm_tensor_parallel_size", 1, "one engine per worker, on its own device."),
    _same("beta", "default here 0.04 (TRL 1.16: 0.0)"),
    _alias("num_iterations", "epochs_per_rollout_batch"),
    _same("epsilon"),
    _same("delta", "two-sided clipping of the unclipped term, as TRL"),
    _same("epsilon_high"),
    _default("sapo_temperature_neg", 1.05, NO_LOSS),
    _default("sapo_temperature_pos", 1.0, NO_LOSS),
    _default("vespo_k_pos", 2.0, NO_LOSS),
    _default("vespo_lambda_pos", 3.0, NO_LOSS),
    _default("vespo_k_neg", 3.0, NO_LOSS),
    _default("vespo_lambda_neg", 2.0, NO_LOSS),
    _same("importance_sampling_level", "sequence: GSPO's ratio, the exp of the mean token log-ratio"),
    _same("reward_weights", "one weight per reward: the --task preset's, then --rewards"),
    _default("multi_objective_aggregation", "sum_then_normalize", "the weighted sum of the rewards is "
             "normalised per group, as TRL's default."),
    _same("scale_rewards", "group, batch or none as TRL, and TRL's true / false for group / none; "
          "--std-normalization / --no-std-normalization still mean group / none"),
    _same("loss_type", "TRL's grpo, bnpo, dr_grpo and dapo with TRL's own normalisation, and ours: no_baseline, "
          "reinforce_with_baseline, grpo_clip (aggregated by --loss-agg). Default here grpo_clip with a token mean "
          "per micro-batch (TRL 1.16: dapo, the token mean over the whole step; docs/GRPO_TRAINING.md)"),
    _same("mask_truncated_completions", "completions that hit --max-new-tokens without EOS leave the loss"),
    _default("sync_ref_model", False, "the reference is the model (or adapter) training started from."),
    _default("ref_model_mixup_alpha", 0.6, "the reference is the model (or adapter) training started from."),
    _default("ref_model_sync_steps", 512, "the reference is the model (or adapter) training started from."),
    _same("top_entropy_quantile", "the quantile over the micro-batch's completion tokens, every worker's"),
    _default("entropy_coef", 0.0, "no entropy bonus is added to the loss."),
    _default("use_adaptive_entropy", False, "no entropy bonus is added to the loss."),
    _default("entropy_coef_min", 0.0, "no entropy bonus is added to the loss."),
    _default("entropy_coef_max", 1.0, "no entropy bonus is added to the loss."),
    _default("entropy_coef_delta", 0.005, "no entropy bonus is added to the loss."),
    _default("entropy_target", 0.2, "no entropy bonus is added to the loss."),
    _default("max_tool_calling_iterations", None, "tool calling in rollouts is not offered."),
    _alias("vllm_importance_sampling_correction", "vllm_importance_sampling"),
    _same("vllm_importance_sampling_mode", "the four modes as TRL; default here token_truncate (TRL 1.16: "
          "sequence_mask)"),
    _alias("vllm_importance_sampling_clip_max", "vllm_importance_sampling_cap"),
    _same("vllm_importance_sampling_clip_min"),
    _default("off_policy_mask_threshold", None, "off-policy sequences are not masked."),
    _same("use_bias_correction_kl", "default here off: the KL is DeepSeekMath's k3 estimator; TRL 1.16 defaults "
          "to on (it matters only with beta > 0, and TRL's beta default is 0)"),
    _same("log_completions", "every completion of each logged step, from every worker, to completions.jsonl "
          "and wandb"),
    _default("log_multimodal", True, "text only."),
    _default("num_completions_to_print", None, "see --print-sample-every."),
    _default("log_unique_prompts", False, "see --print-sample-every."),
    _default("log_completions_hub_repo", None, NO_HUB),
    _default("use_transformers_continuous_batching", False, "the hf engine has its own decoder (docs/rollout.md)."),
    _default("transformers_continuous_batching_config", None, "the hf engine has its own decoder."),
    _default("use_transformers_paged", False, "the hf engine has its own decoder."),
    _convert("vllm_importance_sampling_cap", "vllm_importance_sampling_cap", "TRL 1.16's deprecated name of "
             "vllm_importance_sampling_clip_max; null (its default) leaves ours (3.0).",
             lambda value: {}, trl_value=lambda value: value is None),
]}

# GRPOTrainer's own arguments: what gives each one here (the docs list them; they are not config keys).
TRAINER_ARGUMENTS: dict[str, str] = {
    "model": "--model (a hub name or a local path; a saved adapter continues)",
    "reward_funcs": "--task, --rewards, --reward-module (TRL reward functions run unchanged)",
    "args": "this config (os-train grpo --config FILE and its options)",
    "train_dataset": "--dataset (and --format, --dataset-split, --dataset-config)",
    "eval_dataset": "--eval-dataset or --eval-split-ratio",
    "processing_class": "the model's tokenizer; --chat-template chooses the template",
    "reward_processing_classes": "refused: reward models are not supported; a reward module may load its own",
    "callbacks": "refused: metrics go to metrics.jsonl, TensorBoard and wandb (--report-to)",
    "optimizers": "refused: AdamW with --learning-rate, --weight-decay, --lr-scheduler-type, --warmup-ratio",
    "quantization_config": "--load-in-4bit (QLoRA, CUDA only)",
    "peft_config": "--lora-r, --lora-alpha, --lora-dropout, --target-modules (--full-finetune for none)",
    "tools": "refused: tool calling in rollouts is not offered",
    "rollout_func": "refused: rollouts are the engine's (--rollout-engine hf or vllm)",
    "environment_factory": "refused: environments are not offered",
}


def translate(key: str, value: Any, ours: bool = False) -> dict[str, Any] | None:
    """Our fields for one TRL GRPOConfig key, or None when there is nothing to translate: `key` is no TRL
    field, or it is one of our options too (`ours`) and `value` is spelt our way.

    Raises:
        UserError: a refused field, or a value a default_only/convert field does not accept.
    """
    field = FIELDS.get(key)
    if field is None or (ours and not (field.trl_value and field.trl_value(value))):
        return None
    if field.status == "same":
        return {key: value}
    if field.status == "refused":
        hint = f" (here: {field.ours})" if field.ours else ""
        raise UserError(f"TRL option {key} is not supported{hint}: {field.reason}")
    if field.status == "default_only":
        if value == field.default:
            return {}
        raise UserError(f"TRL option {key}: {value!r} is not supported; only TRL's default {field.default!r} "
                        f"is accepted, because {field.reason}")
    return field.convert(value)


def resolve_deferred(deferred: dict[str, Any], get: Callable[[str], Any]) -> dict[str, Any]:
    """The fields of the TRL keys that need the merged config; `get(name)` gives one of its values.

    generation_batch_size counts completions: rollout_batch_size = it / group_size prompts.
    eval_on_start false is what happens without eval; with --eval-steps a baseline always runs here.
    """
    out: dict[str, Any] = {}
    if "generation_batch_size" in deferred and get("steps_per_generation") is not None:
        raise UserError("TRL options generation_batch_size and steps_per_generation both set the generation batch: "
                        "give one (as TRL requires).")
    if "generation_batch_size" in deferred:
        n, group = deferred["generation_batch_size"], get("group_size")
        if not isinstance(n, int) or n <= 0 or n % group:
            raise UserError(f"TRL option generation_batch_size: {n!r} completions must be a positive multiple of "
                            f"num_generations / --group-size ({group}): rollout_batch_size = "
                            "generation_batch_size / group_size prompts.")
        out["rollout_batch_size"] = n // group
    if deferred.get("eval_on_start") not in (None, True) and get("eval_steps"):
        raise UserError(f"TRL option eval_on_start: {deferred['eval_on_start']!r} is not supported with eval_steps: "
                        "here a baseline eval always runs before the first step (logged as step 0). Drop "
                        "eval_on_start.")
    return out


def markdown_table() -> str:
    """The GRPOConfig table of docs/coming_from_trl.md, one row per field, in TRL's order."""
    shown = {"same": "same name", "alias": "our name", "convert": "converted", "default_only": "TRL's default only",
             "refused": "refused"}
    lines = ["| TRL GRPOConfig field | here | our option | notes |", "|---|---|---|---|"]
    for field in FIELDS.values():
        ours = f"`{field.ours}`" if field.ours else ""
        note = field.reason
        if field.status == "default_only":
            note = f"accepted at `{field.default!r}`: {field.reason}"
        lines.append(f"| `{field.name}` | {shown[field.status]} | {ours} | {note} |")
    return "\n".join(lines)


def trainer_table() -> str:
    """The GRPOTrainer table of docs/coming_from_trl.md."""
    lines = ["| GRPOTrainer argument | here |", "|---|---|"]
    lines += [f"| `{name}` | {text} |" for name, text in TRAINER_ARGUMENTS.items()]
    return "\n".join(lines)


def write_docs(path: str = "docs/coming_from_trl.md") -> None:
    """Regenerate the two tables of docs/coming_from_trl.md (the text above them is kept)."""
    from pathlib import Path

    page = Path(path)
    text = page.read_text()
    head = text[:text.index("| GRPOTrainer argument")]
    page.write_text(head + trainer_table() + "\n\n## GRPOConfig fields\n\n" + markdown_table() + "\n")


if __name__ == "__main__":  # python -m opensloth.trl_names, from the repository root
    write_docs()
