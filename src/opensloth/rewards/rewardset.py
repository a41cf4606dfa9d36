"""RewardSet: score a batch with several weighted rewards, containing every failure.

Every reward gets TRL 1.16's arguments (see `opensloth.rewards.base`): prompts, completions,
completion_ids, trainer_state, log_extra, log_metric and every dataset column. Synchronous
rewards are called one after the other; `async def` rewards are then awaited concurrently
(asyncio.gather, as TRL does); rewards that read the others' scores (demo_reward) go last.

A reward that raises (any exception, SystemExit included; only KeyboardInterrupt passes
through), returns the wrong number of values, NaN/inf or a non-number, or runs past its time
limit (`--reward-timeout`) does not stop training: it scores None for the whole batch, the failure is
counted in `rewards/<name>/failures`, and the first failure of each reward is logged with its
traceback (later ones only at debug level). With `strict=True` (the GRPO recipe's first step) a
failure other than the time limit raises `RewardError` instead: the reward's name and file, its
traceback and a hint for the usual causes (a string where messages were expected, a missing
column, a missing parameter), before any update has been made.

Time limit: rewards that do not bound their own time (user rewards, TRL functions) run in a
daemon worker thread and are waited for at most `time_limit_s`. A Python thread cannot be
killed, so a hung reward's thread is abandoned and keeps running in the background. Built-ins
that bound their own time (math_answer's per-check limit, the code sandbox) run in the
caller's thread, where math-verify's signal-based timeouts work; if one still overruns, its
scores are discarded in the same way. Async rewards share one worker thread and event loop, each
with the same limit.
"""

from __future__ import annotations

import asyncio
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
from opensloth.rewards.base import (
    CALL_ARGUMENTS,
    PRESETS,
    RewardFunction,
    get_reward_functions,
    is_conversational,
    load_reward_module,
)

logger = logging.getLogger(__name__)

_OUR_FILES = (str(Path(__file__).resolve()), str(Path(__file__).resolve().with_name("base.py")))


@dataclass
class RewardResult:
    """Scores of one batch of N completions.

    Attributes:
        total: N floats, sum over rewards of weight x value, None counted as 0 (TRL's nansum).
        per_reward: reward name -> N values (float, or None where not applicable or failed).
        metrics: `rewards/<name>/mean` and `/std` (over non-None values; left out when there are
            none), `rewards/<name>/none_fraction` (share of the N values that are None),
            `rewards/<name>/failures` (1 if the reward failed on this batch, else 0),
            `rewards/total/mean`, `rewards/total/std` and `rewards/none_fraction`.
        failures: reward name -> the RewardFailure of each reward that failed on this batch.
        logged: what the rewards passed to `log_metric`: `rewards/<name>` -> (sum, count) of the
            values (the caller averages them, across workers too).
        extra: what the rewards passed to `log_extra`: column -> its values (one per completion).
    """

    total: list[float]
    per_reward: dict[str, list[float | None]]
    metrics: dict[str, float] = field(default_factory=dict)
    failures: dict[str, RewardFailure] = field(default_factory=dict)
    logged: dict[str, tuple[float, int]] = field(default_factory=dict)
    extra: dict[str, list] = field(default_factory=dict)


class RewardFailure(Exception):
    """A reward misbehaved; the message says how.

    Attributes:
        kind: "raised" (an exception), "output" (wrong count, type or value) or "time" (over the limit).
        details: the reward's traceback (its own frames) and a hint, or "".
    """

    def __init__(self, message: str, kind: str = "output", details: str = ""):
        super().__init__(message)
        self.kind, self.details = kind, details


class RewardError(UserError):
    """A reward failed on the first step: the run stops before any update (the message says why and how to fix it)."""


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
        raise RewardFailure(f"returned {plural(len(values), 'value')} for {plural(n, 'completion')} "
                            "(it must return one value per completion, None where it does not apply)")
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


def failure_hint(exc: BaseException, completions: Sequence[Any], columns: Sequence[str]) -> str:
    """A hint for the usual causes of a reward's exception, or "" (pure: used in the error message).

    Args:
        exc: what the reward raised.
        completions: what it was given (their form decides the string-vs-messages hints).
        columns: the keyword arguments it was given, dataset columns and the calling convention's.
    """
    text = str(exc)
    conversational = bool(completions) and is_conversational(completions[0])
    dataset_columns = sorted(c for c in columns if c not in CALL_ARGUMENTS)
    listed = ", ".join(dataset_columns) or "none"
    if isinstance(exc, TypeError) and "unexpected keyword argument" in text:
        return ("TRL passes prompts, completions, completion_ids, trainer_state, log_extra, log_metric and every "
                "dataset column as keyword arguments: end the reward's parameters with **kwargs.")
    if isinstance(exc, TypeError) and "required" in text and "argument" in text:
        wanted = text.split("'")[1::2]
        missing = [w for w in wanted if w not in columns]
        if missing:
            return (f"the reward needs {', '.join(map(repr, missing))}, which the dataset does not have (its "
                    f"columns: {listed}). Rename the column or the parameter, or give it a default.")
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str) and exc.args[0] not in columns \
            and exc.args[0] not in ("content", "role"):
        return f"there is no column {exc.args[0]!r} (the dataset's columns: {listed})."
    if not conversational and isinstance(exc, (TypeError, KeyError, IndexError)) and (
            "string indices" in text or "str" in text or isinstance(exc, IndexError)):
        return ("prompts and completions are strings here, because the dataset's prompt is text (as TRL, "
                "messages are passed only when the prompt is a conversation: the prompt's messages, and each "
                "completion as [{'role': 'assistant', 'content': ...}]). Read "
                "`completion if isinstance(completion, str) else completion[0]['content']`, or give the dataset "
                "conversational prompts (a `prompt` column of messages).")
    if conversational and isinstance(exc, (AttributeError, TypeError)) and "list" in text:
        return ("completions are lists of messages here, because the dataset's prompt is a conversation: read "
                "the text as completion[0]['content'] (as TRL passes it).")
    return ""


def _own_traceback(exc: BaseException) -> str:
    """The exception's traceback without RewardSet's own frames (the reward's frames, then the error)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename not in _OUR_FILES]
    if not frames:  # it failed in the call itself (its signature): there is no frame of its own to show
        return "".join(traceback.format_exception_only(type(exc), exc))
    lines = traceback.format_list(frames) + traceback.format_exception_only(type(exc), exc)
    return "Traceback (most recent call last):\n" + "".join(lines)


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
              columns: dict[str, Sequence[Any]] | None = None, *,
              completion_ids: Sequence[Sequence[int]] | None = None, trainer_state: Any = None,
              strict: bool = False) -> RewardResult:
        """Score N completions.

        Args:
            prompts: N prompts (each repeated per completion of its group), strings or chats.
            completions: N completions, strings or `[{"role": "assistant", "content": ...}]`.
            columns: other dataset columns, each N values, passed as keyword arguments. When
                `answer` is present and `solution` is not, `solution` is added as an alias, so
                TRL rewards that read `solution` work on OpenSloth datasets.
            completion_ids: N lists of token ids, passed as `completion_ids` (left out when None).
            trainer_state: passed as `trainer_state` (the recipe's transformers TrainerState).
            strict: raise RewardError on a reward's failure (other than its time limit) instead
                of containing it.

        Returns:
            RewardResult (see its docstring).

        Raises:
            RewardError: with `strict`, a reward raised or returned something other than N values.
        """
        n = len(completions)
        # Names the calling convention itself uses cannot also be columns.
        columns = {k: list(v) for k, v in (columns or {}).items() if k not in CALL_ARGUMENTS}
        if "answer" in columns and "solution" not in columns:
            columns["solution"] = columns["answer"]
        shared: dict[str, Any] = dict(columns)
        if completion_ids is not None:
            shared["completion_ids"] = [list(ids) for ids in completion_ids]
        for key, values in {"prompts": prompts, **shared}.items():
            if len(values) != n:
                raise ValueError(f"{key} has {len(values)} values for {n} completions")
        logged: dict[str, list[float]] = {}
        extra: dict[str, list] = {}

        def log_metric(name: str, value: float) -> None:
            key = name if name.startswith("rewards/") else f"rewards/{name}"
            logged.setdefault(key, []).append(float(value))

        def log_extra(column: str, values: list) -> None:
            extra.setdefault(str(column), []).extend(values)

        shared.update(trainer_state=trainer_state, log_extra=log_extra, log_metric=log_metric)
        prompts, completions = list(prompts), list(completions)
        outcomes: dict[str, tuple[list[float | None], RewardFailure | None]] = {}
        # Synchronous rewards first, then the async ones together, then those reading the others' scores.
        sync = [r for r in self.rewards if not r.is_async and not r.wants_scores]
        for reward in sync:
            outcomes[reward.name] = self._call_contained(reward, prompts, completions, dict(shared), n, strict)
        async_rewards = [r for r in self.rewards if r.is_async]
        if async_rewards:
            outcomes.update(self._call_async(async_rewards, prompts, completions, shared, n, strict))
        for reward in self.rewards:
            if reward.wants_scores and not reward.is_async:
                kwargs = {**shared, "reward_scores": {name: values for name, (values, _) in outcomes.items()}}
                outcomes[reward.name] = self._call_contained(reward, prompts, completions, kwargs, n, strict)

        per_reward = {r.name: outcomes[r.name][0] for r in self.rewards}
        metrics: dict[str, float] = {}
        for name, values in per_reward.items():
            present = [v for v in values if v is not None]
            if present:
                metrics[f"rewards/{name}/mean"], metrics[f"rewards/{name}/std"] = _mean_std(present)
            metrics[f"rewards/{name}/none_fraction"] = (n - len(present)) / n if n else 0.0
            metrics[f"rewards/{name}/failures"] = float(outcomes[name][1] is not None)
        total = [sum(w * (values[j] or 0.0) for w, values in zip(self.weights, per_reward.values()))
                 for j in range(n)]
        if n:
            metrics["rewards/total/mean"], metrics["rewards/total/std"] = _mean_std(total)
            nones = sum(v is None for values in per_reward.values() for v in values)
            metrics["rewards/none_fraction"] = nones / (n * max(1, len(per_reward)))
        failures = {name: failure for name, (_, failure) in outcomes.items() if failure is not None}
        return RewardResult(total, per_reward, metrics, failures,
                            {key: (sum(v), len(v)) for key, v in logged.items()}, extra)

    def _call_contained(self, reward: RewardFunction, prompts: list, completions: list, kwargs: dict,
                        n: int, strict: bool) -> tuple[list[float | None], RewardFailure | None]:
        """Call one reward; on a failure return N Nones and the failure (reported), or raise it (strict)."""
        start = time.monotonic()
        try:
            if reward.self_limited:
                raw = reward(prompts, completions, **kwargs)
            else:
                raw = _call_with_time_limit(reward, prompts, completions, kwargs, self.time_limit_s)
            elapsed = time.monotonic() - start
            if elapsed > self.time_limit_s:
                raise RewardFailure(f"took {elapsed:.1f} s, over its time limit of {self.time_limit_s:g} s", "time")
            return check_values(raw, n), None
        except KeyboardInterrupt:  # Ctrl-C stays Ctrl-C
            raise
        except BaseException as exc:  # noqa: BLE001 - containment is the point: SystemExit too, any reward
            failure = self._failure(exc, completions, kwargs)
            self._report(reward, failure, strict)
            return [None] * n, failure

    def _call_async(self, rewards: list[RewardFunction], prompts: list, completions: list, kwargs: dict,
                    n: int, strict: bool) -> dict[str, tuple[list[float | None], RewardFailure | None]]:
        """Await the async rewards concurrently (one event loop in a worker thread), each with the time limit."""
        limit = self.time_limit_s

        async def one(reward: RewardFunction) -> Any:
            try:
                return await asyncio.wait_for(reward(prompts, completions, **kwargs), limit)
            except (asyncio.TimeoutError, TimeoutError):
                return RewardFailure(f"exceeded its time limit of {limit:g} s", "time")
            except BaseException as exc:  # noqa: BLE001 - handed back: SystemExit must not stop the loop
                return exc

        async def gather() -> list:
            return await asyncio.gather(*(one(r) for r in rewards))

        box: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: box.setdefault("value", asyncio.run(gather())),
                                  name="reward-async", daemon=True)
        thread.start()
        thread.join(limit + 1.0)  # wait_for ends each coroutine in time unless one blocks the loop itself
        raws = box.get("value") or [RewardFailure(
            f"exceeded its time limit of {limit:g} s (it blocked the event loop; its thread is abandoned)", "time")
        ] * len(rewards)
        out = {}
        for reward, raw in zip(rewards, raws):
            try:
                if isinstance(raw, BaseException):
                    raise raw
                out[reward.name] = (check_values(raw, n), None)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - as in _call_contained
                failure = self._failure(exc, completions, kwargs)
                self._report(reward, failure, strict)
                out[reward.name] = ([None] * n, failure)
        return out

    @staticmethod
    def _failure(exc: BaseException, completions: list, kwargs: dict) -> RewardFailure:
        """The RewardFailure for what a reward did: its own message, or the exception with traceback and hint."""
        if isinstance(exc, RewardFailure):
            return exc
        hint = failure_hint(exc, completions, list(kwargs))
        details = _own_traceback(exc) + (f"Hint: {hint}\n" if hint else "")
        return RewardFailure(f"raised {type(exc).__name__}: {exc}", "raised", details)

    def _report(self, reward: RewardFunction, failure: RewardFailure, strict: bool) -> None:
        self.failures[reward.name] += 1
        if strict and failure.kind != "time":
            raise RewardError(
                f"Reward {reward.name!r} ({reward.source}) {failure} on the first step, so the run stops before "
                f"any update.\n{failure.details}See docs/rewards.md (\"What a reward receives\")."
            ) from None
        message = f"Reward {reward.name!r} ({reward.source}) {failure}; it scores None for this batch."
        if self.failures[reward.name] == 1:
            logger.warning("%s Failures are counted in rewards/%s/failures; this is reported once.%s",
                           message, reward.name, "\n" + failure.details if failure.details else "")
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
            f"exceeded its time limit of {time_limit_s:g} s (its thread cannot be killed and is abandoned)", "time"
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
