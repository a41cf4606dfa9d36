"""RewardFunction, the reward registry, presets and custom reward modules.

A reward follows TRL's calling convention, as TRL 1.16's GRPOTrainer calls it, so a TRL or
Unsloth-notebook reward function works unchanged:

    fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., log_extra=...,
       log_metric=..., **columns) -> list[float | None]

`prompts[i]` and `completions[i]` belong together (a prompt is repeated once per completion of
its group). A prompt is as the dataset holds it: a string, or a list of chat messages. A
completion is `[{"role": "assistant", "content": "..."}]` when the prompt is a conversation and
a string when it is text (`as_completions`). `completion_ids[i]` are its token ids;
`trainer_state` is a transformers `TrainerState`; `log_metric(name, value)` logs a scalar and
`log_extra(column, values)` a column beside the logged completions. Every other dataset column
arrives as a keyword argument holding one value per completion (`answer=[...]`). `None` means
"not applicable to this sample": it is left out of that reward's mean and counts as 0 in the total.
An `async def` reward is awaited, concurrently with the other async ones (see RewardSet).

Registry: built-ins register themselves when `opensloth.rewards` is imported; user files are
imported with `load_reward_module(path)` (`--reward-module`), and every `RewardFunction`
instance or TRL-style function (`**kwargs` and a parameter of the calling convention, usually
`completions`) defined at their top level becomes available by name.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from opensloth.errors import UserError

BUILTIN = "built-in"

# Keyword arguments of the calling convention itself: a dataset column cannot also have one of these names.
CALL_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
                  "reward_scores")

# Task presets: --task NAME expands to these rewards (in this order).
PRESETS: dict[str, list[str]] = {
    "math": ["math_format", "math_answer", "math_number"],
    "code": ["code_correctness", "length_penalty"],
    "general": ["length_penalty"],
    "reasoning": ["math_format", "length_penalty"],
}


class RewardFunction:
    """A named reward: `__call__(prompts, completions, **columns) -> list[float | None]`.

    Subclass it and implement `score`, or wrap a plain TRL-style function with
    `register_reward_function`.

    Attributes:
        name: registry name (what `--rewards` takes).
        description: one line for `os list-rewards`.
        source: "built-in", or the file the reward came from (set when registered).
        self_limited: True when the reward bounds its own running time (e.g. math_answer's
            per-check limit, the code sandbox), so RewardSet may call it in the caller's thread;
            other rewards run in a worker thread with a time limit.
        wants_scores: True when the reward reads the other rewards' scores for the same batch
            (keyword argument `reward_scores: dict[name, list]`); RewardSet calls it last.
    """

    name: str = ""
    description: str = ""
    source: str | None = None  # filled in on registration
    self_limited: bool = False
    wants_scores: bool = False

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list:
        return self.score(prompts, completions, **columns)

    @property
    def is_async(self) -> bool:
        """True when calling it returns a coroutine (`async def score`): RewardSet awaits it."""
        return is_async_callable(self.score)

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list:
        raise NotImplementedError

    def check_dataset(self, rows: Any, where: str, row_name: Callable[[int], str]) -> None:
        """Refuse, when the data is prepared, a dataset this reward could not score: raise a UserError
        naming the row and the fix, rather than fail mid-run. The default accepts every dataset.

        Called once for --dataset and once for --eval-dataset, with the source rows as loaded (before
        formatting), for each of the run's rewards (the --task preset's and --rewards).

        Args:
            rows: the dataset (a `datasets.Dataset`: `rows.column_names`, `rows[column]` the values).
            where: the option and dataset, for the message (e.g. "--dataset data.jsonl").
            row_name: how the message names 0-based row i ("row 3", or "row 3 (line 5)" in a .jsonl file).

        Raises:
            UserError: the dataset has a row this reward cannot score.
        """

    def __repr__(self) -> str:
        return f"<reward {self.name} ({self.source})>"


class FunctionReward(RewardFunction):
    """Adapts a plain TRL-style reward function to a RewardFunction."""

    def __init__(self, fn: Callable, name: str | None = None, description: str | None = None,
                 source: str | None = None):
        self.fn = fn
        self.name = name or fn.__name__
        doc = inspect.getdoc(fn) or ""
        self.description = description if description is not None else (doc.splitlines() or [""])[0]
        self.source = source or _source_of(fn)

    def score(self, prompts, completions, **columns):
        return self.fn(prompts=prompts, completions=completions, **columns)

    @property
    def is_async(self) -> bool:
        return is_async_callable(self.fn)


def is_async_callable(fn: Any) -> bool:
    """An `async def` function, a partial of one, or an object whose `__call__` is one (as TRL checks)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _source_of(obj: Any) -> str:
    try:
        path = inspect.getsourcefile(obj)
    except TypeError:
        path = None
    if path and Path(path).resolve().is_relative_to(Path(__file__).resolve().parent):
        return BUILTIN
    return str(path) if path else "unknown"


# ---------------------------------------------------------------------------------------------
# Text helpers: both completion shapes everywhere.
# ---------------------------------------------------------------------------------------------


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal parts: [{"type": "text", "text": ...}]
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)


def completion_text(completion: Any) -> str:
    """The text of one completion: a string, or the assistant content of a message list.

    >>> completion_text([{"role": "assistant", "content": "42"}])
    '42'
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        messages = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in messages if m.get("role", "assistant") == "assistant"] or messages
        return "".join(_content_text(m.get("content")) for m in assistant)
    return "" if completion is None else str(completion)


def is_conversational(prompt: Any) -> bool:
    """True for a list of chat messages (`[{"role": ..., "content": ...}, ...]`), False for text."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(
        isinstance(m, dict) and "role" in m for m in prompt)


def as_completions(prompts: Sequence[Any], texts: Sequence[str]) -> list:
    """Completions in the form TRL passes them: messages when the prompts are conversations, else strings.

    >>> as_completions([[{"role": "user", "content": "2+2?"}]], ["4"])
    [[{'role': 'assistant', 'content': '4'}]]
    >>> as_completions(["2+2="], ["4"])
    ['4']
    """
    if prompts and is_conversational(prompts[0]):
        return [[{"role": "assistant", "content": text}] for text in texts]
    return list(texts)


def prompt_text(prompt: Any) -> str:
    """The text of one prompt: a string, or the content of the last message of a chat."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[-1], dict):
        return _content_text(prompt[-1].get("content"))
    return "" if prompt is None else str(prompt)


def reference_answers(columns: dict[str, Any], n: int) -> list[Any]:
    """The `answer` column, else TRL's `solution` column, else Nones (reward not applicable)."""
    for key in ("answer", "solution"):
        if columns.get(key) is not None:
            return list(columns[key])
    return [None] * n


# ---------------------------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------------------------

_REGISTRY: dict[str, RewardFunction] = {}
_LOADED_MODULES: dict[Path, list[str]] = {}


def register_reward_function(fn: Any = None, *, name: str | None = None, description: str | None = None,
                             source: str | None = None):
    """Register a reward under its name; works on RewardFunction instances and plain functions.

    Usable directly (`register_reward_function(my_fn)`) or as a decorator, with or without
    arguments (`@register_reward_function(name="brevity")`).

    Raises:
        UserError: another reward from a different source already has this name.
    """
    if fn is None:
        return lambda f: register_reward_function(f, name=name, description=description, source=source)
    reward = fn if isinstance(fn, RewardFunction) else FunctionReward(fn, name, description, source)
    if isinstance(fn, RewardFunction):
        reward.name = name or reward.name or type(fn).__name__
        if description is not None:
            reward.description = description
        reward.source = source or reward.source or _source_of(type(fn))
    _add(reward)
    return fn


def _add(reward: RewardFunction) -> None:
    if not reward.name.isidentifier():
        raise UserError(f"Reward name {reward.name!r} (from {reward.source}) must be a Python identifier.")
    old = _REGISTRY.get(reward.name)
    if old is not None and old is not reward and old.source != reward.source:
        raise UserError(
            f"Two rewards are named {reward.name!r}: one from {old.source}, one from {reward.source}. "
            "Rename one of them (RewardFunction.name, or register_reward_function(fn, name=...))."
        )
    _REGISTRY[reward.name] = reward


def get_reward_functions(names: Sequence[str]) -> list[RewardFunction]:
    """Look rewards up by name.

    Raises:
        UserError: an unknown name; the message lists every registered reward.
    """
    out = []
    for name in names:
        if name not in _REGISTRY:
            raise UserError(
                f"Unknown reward {name!r} in --rewards. Available: {', '.join(sorted(_REGISTRY))}. "
                "Add your own with --reward-module FILE.py; see them with `os list-rewards`."
            )
        out.append(_REGISTRY[name])
    return out


def registered_rewards(names: Sequence[str]) -> list[RewardFunction]:
    """The registered rewards among `names`, each once, in order; names not registered are left out
    (`get_reward_functions` is the lookup that refuses them)."""
    return [_REGISTRY[name] for name in dict.fromkeys(names) if name in _REGISTRY]


def list_reward_functions() -> list[RewardFunction]:
    """Every registered reward: built-ins first, then custom ones, each group by name."""
    return sorted(_REGISTRY.values(), key=lambda r: (r.source != BUILTIN, r.source, r.name))


def _looks_like_trl_reward(obj: Any) -> bool:
    """A plain function with TRL's reward signature: `**kwargs` and at least one of the calling
    convention's parameters (usually `completions`; `completion_ids` or `trainer_state` will do)."""
    if not inspect.isfunction(obj):
        return False
    params = inspect.signature(obj).parameters
    named = set(params) & (set(CALL_ARGUMENTS) - {"reward_scores"})
    return bool(named) and any(p.kind is p.VAR_KEYWORD for p in params.values())


def load_reward_module(path: Path | str) -> list[str]:
    """Import a user's reward file and register what it defines (`--reward-module`).

    Registered: every RewardFunction instance at the file's top level, every function it
    registers itself with `register_reward_function`, and every public top-level function with
    TRL's reward signature (`**kwargs` and a parameter of the calling convention: prompts,
    completions, completion_ids, trainer_state, log_extra or log_metric). Loading a file twice is a
    no-op.

    Returns:
        The names the file made available.

    Raises:
        UserError: the file is missing, has a syntax error or fails while importing (the
            message names the file and line), or a name clashes with another reward.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"--reward-module {path}: the file does not exist. Check the path (relative paths start "
                        f"from {Path.cwd()}).")
    if not path.is_file() or path.suffix != ".py":
        raise UserError(f"--reward-module {path}: not a Python file. Pass the path of a .py file with rewards.")
    path = path.resolve()
    if path in _LOADED_MODULES:
        return list(_LOADED_MODULES[path])
    module_name = f"opensloth_user_rewards_{len(_LOADED_MODULES)}_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    before = set(_REGISTRY)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except UserError:
        sys.modules.pop(module_name, None)
        raise
    except SyntaxError as exc:
        sys.modules.pop(module_name, None)
        raise UserError(f"--reward-module {exc.filename or path}, line {exc.lineno}: syntax error: {exc.msg}.") from None
    except Exception as exc:  # noqa: BLE001 - the user's code: report where in their file it failed
        sys.modules.pop(module_name, None)
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path]
        where = f", line {frames[-1].lineno}" if frames else ""
        raise UserError(
            f"--reward-module {path}{where}: importing it raised {type(exc).__name__}: {exc}"
        ) from None
    names = sorted(set(_REGISTRY) - before)
    for name in names:  # registered while the file ran: it is their source
        _REGISTRY[name].source = str(path)
    for attr, obj in vars(module).items():
        if attr.startswith("_"):
            continue
        if isinstance(obj, RewardFunction):
            if _REGISTRY.get(obj.name) is obj:
                continue  # registered already (by the file itself, or a re-exported built-in)
            obj.source = str(path)
            obj.name = obj.name or attr
            _add(obj)
            names.append(obj.name)
        elif _looks_like_trl_reward(obj) and not any(
            isinstance(r, FunctionReward) and r.fn is obj for r in _REGISTRY.values()
        ):
            _add(FunctionReward(obj, attr, source=str(path)))
            names.append(attr)
    _LOADED_MODULES[path] = sorted(set(names))
    return list(_LOADED_MODULES[path])


def rewards_catalog() -> dict[str, Any]:
    """Every reward (name, source, description) and every preset, as plain data (`os list-rewards --json`)."""
    return {
        "rewards": [{"name": r.name, "source": r.source, "description": r.description}
                    for r in list_reward_functions()],
        "presets": {task: list(names) for task, names in PRESETS.items()},
    }
