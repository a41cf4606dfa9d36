"""RewardSet: score a batch with several weighted rewards, containing every failure.

A reward that raises (any exception, SystemExit included; only KeyboardInterrupt passes
through), returns the wrong number of values, NaN/inf or a non-number, or runs past its time
limit (`--reward-timeout`) does not stop training: it scores None for the whole batch, the failure is
counted in `rewards/<name>/failures`, and the first failure of each reward is logged with its
traceback (later ones only at debug level).

Time limit: rewards that do not bound their own time (user rewards, TRL functions) run in a
daemon worker thread and are waited for at most `time_limit_s`. A Python thread cannot be
killed, so a hung reward's thread is abandoned and keeps running in the background. Built-ins
that bound their own time (math_answer's per-check limit, the code sandbox) run in the
caller's thread, where math-verify's signal-based timeouts work; if one still overruns, its
scores are discarded in the same way.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opensloth.errors import UserError, plural
from opensloth.rewards.base import PRESETS, RewardFunction, get_reward_functions, load_reward_module

logger = logging.getLogger(__name__)


@dataclass
class RewardResult:
    """Scores of one batch of N completions.

    Attributes:
        total: N floats, sum over rewards of weight x value, None counted as 0 (TRL's nansum).
        per_reward: reward name -> N values (float, or None where not applicable or failed).
        metrics: `rewards/<name>/mean` and `/std` (over non-None values; left out when there are
            none), `rewards/<name>/failures` (1 if the reward failed on this batch, else 0),
            `rewards/total/mean`, `rewards/total/std` and `rewards/none_fraction`.
    """

    total: list[float]
    per_reward: dict[str, list[float | None]]
    metrics: dict[str, float] = field(default_factory=dict)


class RewardFailure(Exception):
    """A reward misbehaved; the message says how."""


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def check_values(values: Any, n: int) -> list[float | None]:
    """Validate a reward's output: a list of N numbers or None, all finite.

    Raises:
        RewardFailure: wrong type or length, a non-number, NaN or inf.
    """
    if hasattr(values, "tolist"):  # a tensor or array
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardFailure(f"returned {type(values).__name__}, expected a list of {n} floats")
    if len(values) != n:
        raise RewardFailure(f"returned {plural(len(values), 'value')} for {plural(n, 'completion')}")
    out: list[float | None] = []
    for i, value in enumerate(values):
        if value is None:
            out.append(None)
            continue
        if not isinstance(value, numbers.Real):
            raise RewardFailure(f"value {i + 1} (completion {i + 1}) is {type(value).__name__} {value!r}, not a number or None")
        if not math.isfinite(value):
            raise RewardFailure(f"value {i + 1} (completion {i + 1}) is {value}; rewards must be finite (or None)")
        out.append(float(value))
    return out


class RewardSet:
    """Weighted rewards, scored together with containment.

    Args:
        rewards: the reward functions.
        weights: one per reward (default: all 1.0).
        time_limit_s: per-call limit for each reward.
    """

    def __init__(self, rewards: Sequence[RewardFunction], weights: Sequence[float] | None = None,
                 time_limit_s: float = 120.0):
        self.rewards = list(rewards)
        self.weights = [float(w) for w in weights] if weights else [1.0] * len(self.rewards)
        if len(self.weights) != len(self.rewards):
            raise UserError(
                f"--reward-weights has {plural(len(self.weights), 'value')} but there are "
                f"{plural(len(self.rewards), 'reward')} "
                f"({', '.join(r.name for r in self.rewards)}). Give one weight per reward, in that order."
            )
        self.time_limit_s = time_limit_s
        self.failures = {r.name: 0 for r in self.rewards}  # failed calls since the start

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    def __repr__(self) -> str:
        return "RewardSet(" + ", ".join(f"{r.name}x{w:g}" for r, w in zip(self.rewards, self.weights)) + ")"

    def score(self, prompts: Sequence[Any], completions: Sequence[Any],
              columns: dict[str, Sequence[Any]] | None = None) -> RewardResult:
        """Score N completions.

        Args:
            prompts: N prompts (each repeated per completion of its group), strings or chats.
            completions: N completions, strings or `[{"role": "assistant", "content": ...}]`.
            columns: other dataset columns, each N values, passed as keyword arguments. When
                `answer` is present and `solution` is not, `solution` is added as an alias, so
                TRL rewards that read `solution` work on OpenSloth datasets.

        Returns:
            RewardResult (see its docstring).
        """
        n = len(completions)
        # Names the calling convention itself uses cannot also be columns.
        columns = {k: list(v) for k, v in (columns or {}).items()
                   if k not in ("prompts", "completions", "reward_scores")}
        if "answer" in columns and "solution" not in columns:
            columns["solution"] = columns["answer"]
        for key, values in {"prompts": prompts, **columns}.items():
            if len(values) != n:
                raise ValueError(f"{key} has {len(values)} values for {n} completions")
        per_reward: dict[str, list[float | None]] = {}
        metrics: dict[str, float] = {}
        # Rewards that read the others' scores (demo_reward) go last.
        order = sorted(range(len(self.rewards)), key=lambda i: self.rewards[i].wants_scores)
        for i in order:
            reward = self.rewards[i]
            kwargs = dict(columns)
            if reward.wants_scores:
                kwargs["reward_scores"] = dict(per_reward)
            values, failed = self._call_contained(reward, list(prompts), list(completions), kwargs, n)
            per_reward[reward.name] = values
            present = [v for v in values if v is not None]
            if present:
                metrics[f"rewards/{reward.name}/mean"], metrics[f"rewards/{reward.name}/std"] = _mean_std(present)
            metrics[f"rewards/{reward.name}/failures"] = float(failed)
        per_reward = {r.name: per_reward[r.name] for r in self.rewards}
        total = [sum(w * (values[j] or 0.0) for w, values in zip(self.weights, per_reward.values()))
                 for j in range(n)]
        if n:
            metrics["rewards/total/mean"], metrics["rewards/total/std"] = _mean_std(total)
            nones = sum(v is None for values in per_reward.values() for v in values)
            metrics["rewards/none_fraction"] = nones / (n * max(1, len(per_reward)))
        return RewardResult(total, per_reward, metrics)

    def _call_contained(self, reward: RewardFunction, prompts: list, completions: list, kwargs: dict,
                        n: int) -> tuple[list[float | None], bool]:
        """Call one reward; on any failure return N Nones and True (and report it)."""
        start = time.monotonic()
        try:
            if reward.self_limited:
                raw = reward(prompts, completions, **kwargs)
            else:
                raw = _call_with_time_limit(reward, prompts, completions, kwargs, self.time_limit_s)
            elapsed = time.monotonic() - start
            if elapsed > self.time_limit_s:
                raise RewardFailure(f"took {elapsed:.1f} s, over its time limit of {self.time_limit_s:g} s")
            return check_values(raw, n), False
        except KeyboardInterrupt:  # Ctrl-C stays Ctrl-C
            raise
        except BaseException as exc:  # noqa: BLE001 - containment is the point: SystemExit too, any reward
            self._report(reward, exc)
            return [None] * n, True

    def _report(self, reward: RewardFunction, exc: BaseException) -> None:
        self.failures[reward.name] += 1
        if isinstance(exc, RewardFailure):
            what, tb = str(exc), ""
        else:
            what = f"raised {type(exc).__name__}: {exc}"
            tb = "\n" + "".join(traceback.format_exception(exc))
        message = f"Reward {reward.name!r} ({reward.source}) {what}; it scores None for this batch."
        if self.failures[reward.name] == 1:
            logger.warning("%s Failures are counted in rewards/%s/failures; this is reported once.%s",
                           message, reward.name, tb)
        else:
            logger.debug("%s (failure %d)", message, self.failures[reward.name])


def _call_with_time_limit(reward: RewardFunction, prompts: list, completions: list, kwargs: dict,
                          time_limit_s: float) -> Any:
    """Run the reward in a daemon thread; a thread cannot be killed, so one that overruns is abandoned."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = reward(prompts, completions, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"reward-{reward.name}", daemon=True)
    thread.start()
    thread.join(time_limit_s)
    if thread.is_alive():
        raise RewardFailure(
            f"exceeded its time limit of {time_limit_s:g} s (its thread cannot be killed and is abandoned)"
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


def _check_modules_used(defined: dict, selected: list[str]) -> None:
    """Refuse a --reward-module none of whose rewards the run uses: TRL runs exactly the reward
    functions it is given, and a file loaded for nothing is a forgotten --rewards, not a choice."""
    for module, names in defined.items():
        if not names:
            raise UserError(f"--reward-module {module} defines no reward: give it a function with TRL's signature "
                            "fn(completions, **kwargs) -> list[float], a RewardFunction instance, or a "
                            "register_reward_function call (see docs/rewards.md).")
        if not set(names) & set(selected):
            raise UserError(f"--reward-module {module} defines {', '.join(names)}, but the run uses none of them "
                            f"(--task presets hold built-in rewards only). Name the ones to use: --rewards "
                            f"{','.join(names)}.")


def resolve_rewards(task: str | None = None, names: Sequence[str] = (), weights: Sequence[float] = (),
                    modules: Sequence[Path | str] = (), time_limit_s: float = 120.0) -> RewardSet:
    """The rewards of a GRPO run: the task preset, then --rewards, with --reward-weights.

    `task` and `names` combine: the preset's rewards come first, then the named ones not already
    in it (so `--task math --rewards length_penalty` adds a length penalty to the math preset).
    Weights, when given, are one per reward of that combined list, in that order.

    Args:
        task: a preset name (math, code, general, reasoning) or None.
        names: reward names (built-in or from `modules`).
        weights: one per reward, or empty for all 1.0.
        modules: user .py files to load first (--reward-module).
        time_limit_s: per-call limit for each reward.

    Raises:
        UserError: no rewards, unknown task or reward (lists the valid ones), a weight count that
            does not match, or a bad reward module.
    """
    defined = {module: load_reward_module(module) for module in modules}
    selected: list[str] = []
    if task is not None:
        if task not in PRESETS:
            raise UserError(f"Unknown --task {task!r}. Choose one of: {', '.join(PRESETS)} "
                            "(or leave it out and pass --rewards).")
        selected += PRESETS[task]
    selected += [name for name in dict.fromkeys(names) if name not in selected]
    if not selected:
        raise UserError("GRPO needs at least one reward: pass --task (math, code, general, reasoning) and/or "
                        "--rewards NAME,... (see `os list-rewards`).")
    _check_modules_used(defined, selected)
    rewards = get_reward_functions(selected)
    if weights and len(weights) != len(rewards):
        raise UserError(
            f"--reward-weights has {plural(len(weights), 'value')} but the run has {plural(len(rewards), 'reward')} "
            f"({', '.join(selected)}). Give one weight per reward, in that order."
        )
    return RewardSet(rewards, list(weights) or None, time_limit_s)
