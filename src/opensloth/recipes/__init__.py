"""The training recipes, one module each (sft.py, grpo.py; grpo_rollout.py is GRPO's rollout role), and what the launcher asks of them.

A recipe module is the whole of one training method, readable top to bottom. Besides `run`, which
every worker calls, it answers the launcher (`opensloth.launch`), which never branches on the
recipe's name:

    prepare_data(cfg, tokenizer, num_shards) -> PreparedDataset
        the recipe's dataset, prepared once in the parent (or reused from the cache);
    resolve_for_workers(cfg, world_size) -> cfg
        cfg with the values that need the worker count (GRPO: --steps-per-generation);
    check_world_size(cfg, world_size) -> None
        raise UserError when the batch cannot be split across this many workers (the launcher
        calls it before anything starts, the recipe again in each worker);
    check_before_start(cfg) -> None
        what can be checked before data prep and model loading (GRPO: the rewards resolve);
    plan_rows(cfg, world_size) -> list[PlanRow]
        the recipe's rows of the plan printed at start (the global batch, ...);
    run(cfg, ctx) -> None
        train in this worker.

Checks that need no worker count belong to the config's validators (`opensloth.config`), so
`--dry-run` and the Python API run them too.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple


class PlanRow(NamedTuple):
    """One row of the plan table: a label, its text, and an optional rich style (a warning's)."""

    label: str
    text: str
    style: str | None = None


def load_recipe(name: str) -> ModuleType:
    """The module `opensloth.recipes.<name>` ("sft" or "grpo"), which holds the functions above."""
    return importlib.import_module(f"opensloth.recipes.{name}")
