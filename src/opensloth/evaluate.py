"""Use and judge a trained model: `os eval`, `os generate`, `os export`.

Thin over the other layers: models/ loads the adapter (or a full model) with its saved chat
template, data/ prepares the eval prompts exactly as GRPO training does, rewards/ scores the
completions, models/ merges for export. What lives here is the part that is eval-specific:
batched generation of k samples per prompt, pass@k, the per-completion JSONL and the summary; and
`score_completions`, the one way completions are scored, which GRPO training uses too.

pass@k uses the unbiased estimator of Chen et al. (2021), per prompt with n samples of which c
are correct: pass@k = 1 - C(n - c, k) / C(n, k), averaged over prompts. pass@1 is then the
mean fraction of correct samples. "Correct" is the task's accuracy reward being > 0
(`math_answer` for --task math; without a task the first reward that checks the reference answer;
choose another with `accuracy_reward`). `EvalTally` sums what the summary is made of, so GRPO's
in-training eval, chunked and spread over workers, reports exactly what `os eval` reports.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opensloth.config import LoraConfig, ModelConfig, RunConfig
from opensloth.errors import UserError

logger = logging.getLogger("opensloth")

# The reward whose value > 0 means "this completion is correct", per task.
ACCURACY_REWARDS = {"math": "math_answer"}
# Built-in rewards that compare with the reference answer (1 right, 0 wrong; None without a reference).
ANSWER_REWARDS = ("math_answer", "r1_zero", "math_number")
# Columns of a prepared GRPO dataset that are the prompt itself; every other column goes to the rewards.
PROMPT_COLUMNS = ("prompt", "prompt_ids", "prompt_text")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt: n samples, c correct. 1 - C(n-c, k) / C(n, k).

    Example:
        >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 4), pass_at_k(4, 0, 2)
        (0.25, 1.0, 0.0)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# ------------------------------------------------------------------------------------------------
# What the model was trained with
# ------------------------------------------------------------------------------------------------

RUN_CONFIG_FILE = "config.yaml"  # the resolved config every training run writes to its --output-dir


@dataclass
class TrainedWith:
    """The prompt settings of the run that wrote a model, read from its config.yaml.

    Attributes:
        source: the config.yaml they come from.
        system_prompt: the run's --system-prompt, or the instruction of its --chat-template r1-zero (the
            system turn its rows had); None: the template's own.
        data_format: the run's --format when it is a GRPO (prompt) format, else None.
        max_new_tokens: the run's --max-new-tokens (GRPO runs), else None.
    """

    source: Path
    system_prompt: str | None
    data_format: str | None
    max_new_tokens: int | None


def find_run_config(model: str) -> Path | None:
    """The config.yaml of the OpenSloth run that wrote `model`: in the directory itself (an output
    dir, or a model exported from one), or in the run's dir above a checkpoint
    (OUT/checkpoints/checkpoint-N or OUT/checkpoints/checkpoint-N/adapter). None for a hub name
    or a model no OpenSloth run wrote."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return None
    candidates = [path] + [p.parent for p in path.resolve().parents if p.name == "checkpoints"][:1]
    return next((c / RUN_CONFIG_FILE for c in candidates if (c / RUN_CONFIG_FILE).is_file()), None)


def trained_with(model: str) -> TrainedWith | None:
    """The prompt settings `model` was trained with, or None when no run config is found."""
    import yaml

    from opensloth.config import GRPO_FORMATS

    source = find_run_config(model)
    if source is None:
        return None
    try:
        saved = yaml.safe_load(source.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"{source} (the config of the run that wrote --model) is not valid YAML: {err}") from None
    data, grpo = saved.get("data") or {}, saved.get("grpo") or {}
    fmt = data.get("format")
    from opensloth.data.templates import effective_system_prompt

    system_prompt = effective_system_prompt(data.get("chat_template"), data.get("system_prompt"))
    return TrainedWith(source=source, system_prompt=system_prompt,
                       data_format=fmt if fmt in GRPO_FORMATS else None,
                       max_new_tokens=grpo.get("max_new_tokens"))


def describe_settings(trained: TrainedWith | None, used: dict[str, Any], from_run: set[str]) -> str:
    """One line saying which prompt settings are used and where each came from."""
    parts = []
    for name, value in used.items():
        origin = "training run" if name in from_run else "flag" if value is not None else "default"
        parts.append(f"{name} {value!r} ({origin})")
    where = f"training run: {trained.source}" if trained else "no training run config found beside --model"
    return f"Prompt settings ({where}): " + ", ".join(parts)


# ------------------------------------------------------------------------------------------------
# Loading and generation
# ------------------------------------------------------------------------------------------------


def load_for_inference(model: str, device: str = "cpu", dtype: str = "auto",
                       backend: str = "hf") -> tuple[Any, Any]:
    """A saved adapter (applied to its base) or a full model, in eval mode, with its tokenizer."""
    from opensloth.models import load_model_and_tokenizer

    model_cfg = ModelConfig(model=model, dtype=dtype, backend=backend)
    loaded, tokenizer = load_model_and_tokenizer(model_cfg, LoraConfig(), torch.device(device), for_training=False)
    return loaded.eval(), tokenizer


def render_chat(tokenizer: Any, prompt: str, system_prompt: str | None = None) -> str:
    """The prompt as the model saw it in training: the saved chat template plus the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("This model's tokenizer has no chat template, so a chat prompt cannot be rendered. "
                        "Pass --raw to send the prompt text as is, or use a model saved by OpenSloth.")
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generate(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, num_samples: int = 1, batch_size: int = 16,
             seed: int = 0, engine: Any = None) -> list[list[str]]:
    """Completions for rendered prompts: `num_samples` per prompt, greedy when temperature is 0.

    Uses a rollout engine of GRPO training (stop tokens, full-vocabulary sampling with no top-k):
    `engine` if given (e.g. vLLM), else the hf engine over `model`; `batch_size` prompts at a time.

    Returns:
        One list of `num_samples` decoded completions (special tokens removed) per prompt.
    """
    from opensloth.rollout.hf import HFRolloutEngine

    if num_samples > 1 and temperature == 0:
        raise UserError(f"--num-samples {num_samples} with --temperature 0 would repeat one greedy completion: "
                        "set --temperature above 0 (e.g. 1.0) for pass@k.")
    engine = engine or HFRolloutEngine(model, tokenizer)
    out: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        batch = engine.generate(chunk, group_size=num_samples, max_new_tokens=max_new_tokens,
                                temperature=temperature if temperature > 0 else 1.0, top_p=top_p,
                                seed=seed + start, greedy=temperature == 0)
        texts = batch.completions_text  # (len(chunk) * num_samples,), prompt-major
        out.extend(texts[i * num_samples:(i + 1) * num_samples] for i in range(len(chunk)))
    return out


# ------------------------------------------------------------------------------------------------
# Scoring (training and evaluation alike)
# ------------------------------------------------------------------------------------------------


def score_completions(rewards: Any, rows: Any, completions: list[str], group_size: int, **kwargs: Any) -> Any:
    """Score `group_size` completions per row as TRL 1.16's GRPOTrainer calls rewards.

    Row i's prompt and every other column are repeated for its completions, so entry j of a column
    matches completion j. Prompts go as the dataset holds them (text or messages), completions as
    messages when the prompt is a conversation, else as strings. The GRPO recipe scores its rollouts
    and its in-training eval with this, and `os eval` its completions.

    Args:
        rewards: the run's RewardSet (opensloth.rewards.resolve_rewards).
        rows: prepared GRPO rows (a datasets.Dataset with the PROMPT_COLUMNS and the reward columns).
        completions: (len(rows) x group_size,) decoded completions, prompt-major like a GRPO group.
        group_size: completions per row.
        **kwargs: passed on to `RewardSet.score` (completion_ids, trainer_state, strict).

    Returns:
        The RewardSet's scores of the completions, in their order.
    """
    from opensloth.rewards.base import as_completions

    prompts = [p for p in rows["prompt"] for _ in range(group_size)]
    columns = {name: [v for v in rows[name] for _ in range(group_size)]
               for name in rows.column_names if name not in PROMPT_COLUMNS}
    return rewards.score(prompts, as_completions(prompts, completions), columns, **kwargs)


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


def default_accuracy_reward(task: str | None, reward_names: list[str]) -> str | None:
    """The reward that says "correct" when none is named: the task's (math_answer for --task math), else
    the first of the run's rewards that compares with the reference answer (ANSWER_REWARDS), else None."""
    if task:
        return ACCURACY_REWARDS.get(task)
    return next((name for name in reward_names if name in ANSWER_REWARDS), None)


class EvalTally:
    """Running sums behind the eval summary, so chunks and workers add up to what one pass would give.

    `os eval` and GRPO's in-training eval both fill one: `add` a scored chunk, sum `totals` across workers
    (same keys everywhere, even with no rows), then read `summary()`:
    `reward/mean` (the weighted total), `rewards/<name>/mean` (over the completions it scored, None left
    out), `pass@1` and `pass@k` (k = samples per prompt, when there is an accuracy reward: value > 0
    counts as correct) and `mean_completion_chars`.
    """

    def __init__(self, reward_names: list[str], accuracy_reward: str | None, num_samples: int) -> None:
        self.accuracy_reward, self.num_samples = accuracy_reward, num_samples
        keys = ["prompts", "completions", "reward", "completion_chars"]
        keys += [f"rewards/{name}/{part}" for name in reward_names for part in ("sum", "count")]
        if accuracy_reward is not None:
            keys += ["pass@1"] + ([f"pass@{num_samples}"] if num_samples > 1 else [])
        self.totals = dict.fromkeys(keys, 0.0)

    def add(self, scores: Any, completions: list[str]) -> list[bool] | None:
        """Add one chunk: (prompts x num_samples,) completions, prompt-major, and their RewardSet scores.
        Returns each completion's correctness (None without an accuracy reward)."""
        k, t = self.num_samples, self.totals
        t["prompts"] += len(completions) // k
        t["completions"] += len(completions)
        t["reward"] += float(torch.as_tensor(scores.total, dtype=torch.float64).sum())
        t["completion_chars"] += sum(len(c) for c in completions)
        for name, values in scores.per_reward.items():
            scored = [float(v) for v in values if v is not None]
            t[f"rewards/{name}/sum"] += sum(scored)
            t[f"rewards/{name}/count"] += len(scored)
        if self.accuracy_reward is None:
            return None
        correct = [(v or 0.0) > 0 for v in scores.per_reward[self.accuracy_reward]]
        per_prompt = [sum(correct[i:i + k]) for i in range(0, len(correct), k)]
        t["pass@1"] += sum(pass_at_k(k, c, 1) for c in per_prompt)
        if k > 1:
            t[f"pass@{k}"] += sum(pass_at_k(k, c, k) for c in per_prompt)
        return correct

    def summary(self) -> dict[str, float]:
        """The summary of everything added (NaN for a reward that scored nothing)."""
        t = self.totals
        out = {"reward/mean": t["reward"] / max(t["completions"], 1.0)}
        for key in t:
            if key.startswith("rewards/") and key.endswith("/sum"):
                count = t[key.removesuffix("/sum") + "/count"]
                out[key.removesuffix("/sum") + "/mean"] = t[key] / count if count else float("nan")
        for key in ("pass@1", f"pass@{self.num_samples}"):
            if key in t:
                out[key] = t[key] / max(t["prompts"], 1.0)
        out["mean_completion_chars"] = t["completion_chars"] / max(t["completions"], 1.0)
        return out


@dataclass
class EvalResult:
    """Summary numbers and where the per-completion JSONL went."""

    num_prompts: int
    num_samples: int
    summary: dict[str, float] = field(default_factory=dict)
    output_file: Path | None = None


def evaluate(cfg: RunConfig, *, num_samples: int = 1, temperature: float | None = None, batch_size: int = 16,
             output_file: Path | None = None, accuracy_reward: str | None = None,
             device: str = "cpu") -> EvalResult:
    """Generate for every prompt of cfg's dataset, score with every reward, report accuracy and pass@k.

    Args:
        cfg: a GRPO run config (model, dataset, format, chat template, rewards, max_new_tokens).
        num_samples: completions per prompt (k of pass@k).
        temperature: sampling temperature; default 0 (greedy) for k = 1, else cfg.grpo.temperature.
        output_file: JSONL with one line per completion (prompt, completion, answer, every reward).
        accuracy_reward: reward whose value > 0 counts as correct (default from the task).

    Returns:
        EvalResult with summary keys `pass@1`, `pass@k` (k > 1), `reward/mean`,
        `rewards/<name>/mean`, `mean_completion_chars`.
    """
    from opensloth.rewards import resolve_rewards, set_code_test_timeout

    g = cfg.grpo
    if temperature is None:
        temperature = 0.0 if num_samples == 1 else g.temperature
    if num_samples > 1 and temperature == 0:
        raise UserError(f"--num-samples {num_samples} with --temperature 0 would repeat one greedy completion: "
                        "set --temperature above 0 (e.g. 1.0) for pass@k.")
    # Rewards first: a bad --rewards / --reward-module fails before any model or data is loaded.
    rewards = resolve_rewards(g.task, g.rewards, g.reward_weights, g.reward_modules, g.reward_timeout)
    set_code_test_timeout(g.code_test_timeout)
    from opensloth.data import prepare_grpo_dataset
    model, tokenizer = load_for_inference(cfg.model.model, device, cfg.model.dtype, cfg.model.backend)
    rows = prepare_grpo_dataset(cfg, tokenizer, 1).load_shard(0)
    if len(rows) == 0:
        raise UserError(f"--dataset {cfg.data.dataset} has no prompts to evaluate.")
    acc_name = accuracy_reward or default_accuracy_reward(g.task, rewards.names)
    check_accuracy_reward(acc_name, rewards.names, rows, cfg.data.dataset)

    from opensloth.rollout import get_rollout_engine

    engine = get_rollout_engine(g.rollout_engine, model, tokenizer, device, cfg,
                                max_num_seqs=min(batch_size, len(rows)) * num_samples)
    try:
        completions = generate(model, tokenizer, list(rows["prompt_text"]), max_new_tokens=g.max_new_tokens,
                               temperature=temperature, top_p=g.top_p, num_samples=num_samples,
                               batch_size=batch_size, seed=cfg.training.seed, engine=engine)
    finally:
        engine.close()
    flat = [c for group in completions for c in group]  # (N * k,), prompt-major like a GRPO group
    scores = score_completions(rewards, rows, flat, num_samples)
    totals = [float(x) for x in torch.as_tensor(scores.total).tolist()]
    tally = EvalTally(rewards.names, acc_name, num_samples)
    correct = tally.add(scores, flat)
    summary = tally.summary()

    if output_file is not None:
        output_file = Path(output_file)
        output_file.parent.mkdir(parents=True, exist_ok=True)
        answers = rows["answer"] if "answer" in rows.column_names else [None] * len(rows)
        with open(output_file, "w") as fh:
            for i, text in enumerate(flat):
                record = {"index": i // num_samples, "sample": i % num_samples,
                          "prompt": rows[i // num_samples]["prompt_text"], "completion": text,
                          "answer": answers[i // num_samples], "reward": totals[i],
                          "rewards": {n: v[i] for n, v in scores.per_reward.items()}}
                if correct is not None:
                    record["correct"] = correct[i]
                fh.write(json.dumps(record, default=str) + "\n")
    return EvalResult(num_prompts=len(rows), num_samples=num_samples, summary=summary, output_file=output_file)


def check_accuracy_reward(acc_name: str | None, reward_names: list[str], rows: Any, dataset: str) -> None:
    """Before generating: the accuracy reward is one of the run's, and it has reference answers to
    compare with (without them every completion would count as wrong and pass@1 read 0.0).

    Raises:
        UserError: names --accuracy-reward, the dataset and the answer columns each format reads.
    """
    if acc_name is None:
        return
    if acc_name not in reward_names:
        raise UserError(f"--accuracy-reward {acc_name!r} is not one of this run's rewards: {', '.join(reward_names)}.")
    answers = rows["answer"] if "answer" in rows.column_names else []
    if acc_name in ANSWER_REWARDS and not any(a is not None and str(a).strip() for a in answers):
        raise UserError(
            f"--dataset {dataset} has no reference answers, so --accuracy-reward {acc_name} cannot tell a correct "
            "completion (pass@1 would read 0.0). Give each row its answer: an `answer` column (prompt-answer "
            "format), `solution` (dapo-math) or a final `#### n` line in `answer` (gsm8k); or pass "
            "--accuracy-reward NAME for a reward that needs no answer."
        )


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------


def export_merged(model_dir: Path, output_dir: Path, dtype: str = "bfloat16", overwrite: bool = False,
                  base_model: str | None = None) -> Path:
    """Merge a saved LoRA adapter into its base weights and save a plain transformers model.

    Args:
        base_model: where the adapter's base model is now (default: the path or hub name recorded in
            its adapter_config.json; pass this when that model was moved).

    Raises:
        UserError: not an adapter directory, --output is a file or a non-empty dir without overwrite,
            the base model was moved (names the recorded path and --base-model), weights cut short.
    """
    from opensloth.models import merge_and_save
    from opensloth.models.loading import (
        check_base_model,
        check_model_path,
        check_weights,
        read_adapter_config,
    )

    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if not (model_dir / "adapter_config.json").is_file():
        if (model_dir / "config.json").is_file():
            raise UserError(f"--model {model_dir} is already a full model (no LoRA adapter to merge); "
                            "use it as it is.")
        raise UserError(f"--model {model_dir} is not a saved adapter directory (no adapter_config.json). "
                        "Pass a training --output-dir or a checkpoint's adapter/ directory.")
    if output_dir.resolve() == model_dir.resolve():
        raise UserError("--output must differ from --model: exporting in place would mix the adapter and "
                        "the merged model.")
    if output_dir.exists() and not output_dir.is_dir():  # --overwrite writes into a directory, never over a file
        raise UserError(f"--output {output_dir} is a file, not a directory; the merged model is a directory of "
                        "files. Choose another --output (the file is kept).")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise UserError(f"--output {output_dir} exists and is not empty. Choose another --output, or pass "
                        "--overwrite to write into it.")
    check_weights(model_dir, f"--model {model_dir}")
    if base_model is not None:
        base_model = check_model_path(base_model, option="--base-model")
        check_weights(base_model, f"--base-model {base_model}")
    else:
        recorded = (read_adapter_config(str(model_dir)) or {}).get("base_model_name_or_path")
        if not recorded:
            raise UserError(f"--model {model_dir}: adapter_config.json records no base model. Pass --base-model "
                            "PATH (or a hub name).")
        check_base_model(str(model_dir), recorded, fix="Pass its new place with --base-model PATH (or a hub "
                         "name); the adapter is not changed.")
    merged = merge_and_save(model_dir, output_dir, dtype=dtype, base_model=base_model)
    run_config = find_run_config(str(model_dir))
    if run_config is not None:  # so eval and generate on the merged model use the training settings too
        shutil.copyfile(run_config, merged / RUN_CONFIG_FILE)
    return merged


def save_merged_after_training(cfg: RunConfig) -> Path | None:
    """`--save-merged`: merge the run's saved adapter into bf16 base weights in OUTPUT_DIR/merged.

    Runs in the launcher after every worker finished. A full fine-tune has nothing to merge: its
    output dir already holds the full model.
    """
    out = Path(cfg.training.output_dir)
    if cfg.model.full_finetune or not (out / "adapter_config.json").is_file():
        logger.info("--save-merged: %s holds a full model already; nothing to merge.", out)
        return None
    merged = export_merged(out, out / "merged", dtype="bfloat16", overwrite=True)
    logger.info("Saved the merged bf16 model to %s", merged)
    return merged
