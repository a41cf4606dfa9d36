"""What every training command goes through: devices, output-dir guard, data prep, workers.

`launch_training(cfg, dry_run)` (os-train sft / grpo):
1. resolve `--devices` into one entry per worker and check the batch splits evenly;
2. refuse a non-empty output dir unless --overwrite or --resume (nothing is ever deleted), and a
   --master-port that is taken;
3. load the tokenizer and prepare the data ONCE, here in the parent, sharded for the workers;
4. print the plan; `--dry-run` prints the resolved config and the plan and stops here,
   without preparing data or writing anything;
5. lock the output dir (`rundir.RunLock`: one live run per dir), refuse a --resume that would train
   over a finished run or change what was saved (`rundir.check_resume`), and run the recipe (it
   writes output_dir/config.yaml once everything is loaded): a single CPU worker runs in this process
   (plain tracebacks, Ctrl-C friendly); otherwise one worker process per device
   (`opensloth.launch.procs`). Both paths call the same `recipes.<recipe>.run(cfg, ctx)`.

GPU workers always run as child processes, each seeing only its own GPU
(CUDA_VISIBLE_DEVICES): a process that sees several GPUs makes the HF Trainer fall back to
DataParallel and libraries that assume cuda:0 pick the wrong device.

`prepare_only(cfg, output_path, num_workers)` (os-train data sft / grpo): steps 1 and 3 plus
the statistics, and a copy of the prepared directory at --output-path.

Nothing here branches on the recipe: what differs (its data prep, its batch-split rule, its checks
before start, its plan rows) is asked of the recipe module (`opensloth.recipes` lists the contract).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from rich.console import Console
from rich.table import Table

from opensloth.config import RunConfig, config_to_yaml, dump_config
from opensloth.errors import UserError, plural
from opensloth.launch.procs import Device, WorkerFailed, check_master_port, run_workers
from opensloth.recipes import load_recipe

__all__ = ["launch_training", "prepare_only", "resolve_devices", "check_output_dir", "WorkerFailed"]

console = Console()


def _visible_gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_devices(spec: str, gpu_count: Optional[int] = None) -> list[Device]:
    """`--devices` -> one entry per worker: GPU ids, or "cpu" repeated.

    Args:
        spec: auto (every visible GPU, else one CPU worker), cpu, cpu:N, or ids like "0,1,3"
            (already validated by config.py).
        gpu_count: GPUs visible here (default: asks torch).

    Raises:
        UserError: GPU ids that are not visible here (names the visible ones).
    """
    spec = spec.strip().lower()
    if spec == "cpu":
        return ["cpu"]
    if spec.startswith("cpu:"):
        return ["cpu"] * int(spec[4:])
    count = _visible_gpu_count() if gpu_count is None else gpu_count
    if spec == "auto":
        return list(range(count)) or ["cpu"]
    ids = [int(i) for i in spec.split(",")]
    if count == 0:
        raise UserError(f"--devices {spec}: no CUDA GPU is visible here. "
                        "Use --devices cpu (one CPU worker) or cpu:N (N CPU workers).")
    missing = [i for i in ids if i >= count]
    if missing:
        raise UserError(f"--devices {spec}: no GPU with id {', '.join(map(str, missing))}. "
                        f"Visible GPUs: {', '.join(map(str, range(count)))} (ids count from 0 among "
                        "CUDA_VISIBLE_DEVICES). Use --devices auto for all of them.")
    return ids


def check_output_dir(cfg: RunConfig) -> None:
    """Refuse to train into a non-empty output dir unless --overwrite or --resume; deletes nothing."""
    t = cfg.training
    out = Path(t.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is a file, not a directory. Choose another --output-dir.")
    from opensloth.rundir import LOCK_FILE

    holds = out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir())
    if holds and not (t.overwrite or t.resume or t.resume_from):
        raise UserError(f"--output-dir {out} is not empty. Pass --overwrite to write into it (its files are "
                        "kept unless the run replaces them), --resume to continue that run, "
                        "or choose another --output-dir.")


def check_batch(cfg: RunConfig, world_size: int) -> None:
    """The recipe's batch must split across the workers (it says how: `check_world_size`)."""
    load_recipe(cfg.recipe).check_world_size(cfg, world_size)


def load_tokenizer(cfg: RunConfig) -> Any:
    """The tokenizer of --model (a base model, or a saved adapter directory: its own tokenizer if it
    kept one, else its base model's), loaded in the parent: cheap, and data prep needs it."""
    from opensloth import models
    from opensloth.models.loading import check_model_path, check_weights, read_adapter_config

    name = check_model_path(cfg.model.model)
    check_weights(name, f"--model {cfg.model.model}")  # a cut-off download fails here, before data prep
    adapter = read_adapter_config(name)
    has_own = (Path(name) / "tokenizer_config.json").is_file() or (Path(name) / "tokenizer.json").is_file()
    if adapter and not has_own and adapter.get("base_model_name_or_path"):
        name = adapter["base_model_name_or_path"]
    return models.load_tokenizer(name, trust_remote_code=cfg.model.trust_remote_code)


def prepare_data(cfg: RunConfig, tokenizer: Any, num_shards: int) -> Any:
    """Prepare (or reuse from the cache) the recipe's dataset, split into `num_shards` shards."""
    return load_recipe(cfg.recipe).prepare_data(cfg, tokenizer, num_shards)


def cache_status(cfg: RunConfig) -> str:
    """For a dry run: would the data come from the cache? Computed as the data pipeline keys its
    cache, without loading the dataset or writing anything. A hub --model is not downloaded
    for this, so its status is left open."""
    from opensloth.data import cache_entry
    from opensloth.data.sources import PREPARED_META, is_prepared_dir

    d = cfg.data
    if not d.dataset:
        return "no --dataset given"
    if is_prepared_dir(d.dataset):
        return f"{d.dataset} (prepared by `os-train data`; its shard count is checked at start)"
    model = cfg.model.model
    if model.startswith((".", "/", "~")) and not Path(model).expanduser().exists():
        return f"{d.dataset} (cache not checked: --model {model} does not exist yet)"
    if not Path(model).expanduser().exists():
        return f"{d.dataset} (cache not checked: the hub model's tokenizer is not downloaded in a dry run)"
    entry = cache_entry(cfg, load_tokenizer(cfg))
    if (entry / PREPARED_META).is_file() and not d.overwrite_cache:
        return f"{d.dataset}: cache hit, {entry}"
    return f"{d.dataset}: cache miss (prepared when the run starts) into {entry}"


def print_plan(cfg: RunConfig, devices: list[Device], prepared: Any = None) -> None:
    """The devices, workers, data (with every drop and clamp counted), output dir and global batch."""
    from opensloth.data import describe_drops

    world = len(devices)
    table = Table(title=f"os-train {cfg.recipe}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    shown = "cpu" if devices[0] == "cpu" else "GPU " + ",".join(map(str, devices))
    table.add_row("devices", f"{shown} ({plural(world, 'worker')}, "
                  f"{'in this process' if devices == ['cpu'] else cfg.distributed.launcher + ' launcher'})")
    table.add_row("model", cfg.model.model)
    if prepared is None:
        table.add_row("data", cache_status(cfg))
    else:
        hit = "cache hit" if prepared.cache_hit else "prepared now (cache miss)"
        stats = prepared.stats
        read = f" of {stats.rows_in} read" if stats.rows_in is not None else ""
        table.add_row("data", f"{plural(prepared.num_rows, 'row')}{read}, {plural(prepared.num_shards, 'shard')}, "
                      f"{hit}: {prepared.path}")
        table.add_row("dropped", "; ".join(describe_drops(stats)) or "nothing (every row used whole)")
        if stats.prompt_rendering:  # GRPO: how the prompts reach the model
            table.add_row("prompts", stats.prompt_rendering)
    table.add_row("output dir", str(cfg.training.output_dir))
    for row in load_recipe(cfg.recipe).plan_rows(cfg, world):
        table.add_row(row.label, row.text, style=row.style)
    console.print(table)


@contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of an in-process run."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_in_process(cfg: RunConfig, prepared_path: Path) -> None:
    """One CPU worker, here: the same `run(cfg, ctx)` a worker process calls, without a process group."""
    import torch

    from opensloth.distributed import WorkerContext, setup_logging
    from opensloth.launch.worker import run_recipe

    setup_logging(is_main=True)
    ctx = WorkerContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                        prepared_data_path=Path(prepared_path))
    # The HF Trainer (SFT) would otherwise take a visible GPU although --devices says cpu.
    with _env(ACCELERATE_USE_CPU="true"):
        run_recipe(cfg, ctx)


def with_trained_system_prompt(cfg: RunConfig) -> RunConfig:
    """cfg, with the system prompt of the run that wrote --model when none is given.

    What a model was trained with is what it keeps being trained with: GRPO on the tutorial's SFT
    output renders its prompts with the system prompt SFT taught, not the template's default.
    --system-prompt overrides it; the choice is printed.
    """
    from opensloth.evaluate import trained_with

    if cfg.data.system_prompt is not None:
        return cfg
    trained = trained_with(cfg.model.model)
    if trained is None or trained.system_prompt is None:
        return cfg
    console.print(f"--system-prompt {trained.system_prompt!r}: the one --model was trained with "
                  f"({trained.source}); pass --system-prompt to change it.", markup=False, highlight=False)
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"system_prompt": trained.system_prompt})})


def launch_training(cfg: RunConfig, dry_run: bool = False) -> None:
    """Run `os-train sft|grpo`: plan, prepare data once, train on every requested device.

    Raises:
        UserError: bad devices, a busy --master-port, non-empty or locked output dir, a --resume that
            would train over a finished run or changes the saved shape, bad data; WorkerFailed (a
            UserError) when a worker fails, naming its rank and error.
    """
    devices = resolve_devices(cfg.distributed.devices)
    cfg = load_recipe(cfg.recipe).resolve_for_workers(cfg, len(devices))
    check_batch(cfg, len(devices))
    if len(devices) > 1:
        check_master_port(cfg.distributed.master_port)
    from opensloth.rundir import check_unlocked

    check_unlocked(cfg.training.output_dir)  # a live run there: say so, not "not empty"
    check_output_dir(cfg)
    cfg = with_trained_system_prompt(cfg)
    # Fail fast (before data prep and model loading): bad --resume-from, rewards, unwritable output dir.
    from opensloth.checkpoint import resolve_resume
    from opensloth.rundir import check_writable

    if cfg.training.resume_from is not None:
        resolve_resume(cfg.training.output_dir, False, cfg.training.resume_from)
    load_recipe(cfg.recipe).check_before_start(cfg)  # e.g. GRPO: an unknown reward, before anything is written
    if dry_run:
        console.print(config_to_yaml(cfg), markup=False, highlight=False)
        print_plan(cfg, devices)
        return
    check_writable(cfg.training.output_dir)

    from opensloth.distributed import setup_logging
    from opensloth.rundir import RunLock, check_resume

    # One live run per output dir, from here until every worker has exited. Taken before anything is
    # written; the checks that read the dir run again under the lock (another run may have just finished).
    with RunLock(cfg.training.output_dir) as lock:
        note = lock.stale_note()
        if note:
            console.print(note, markup=False, highlight=False)
        check_output_dir(cfg)
        for line in check_resume(cfg):
            console.print(line, style="yellow", markup=False, highlight=False)
        setup_logging(is_main=True)  # data prep runs here: its notes (drops, progress stages) must show
        tokenizer = load_tokenizer(cfg)
        prepared = prepare_data(cfg, tokenizer, num_shards=len(devices))
        print_plan(cfg, devices, prepared)
        # The workers read the config from here; output_dir/config.yaml is written by the recipe once
        # training starts, so a start that fails (bad model, bad --target-modules) leaves the dir as it was.
        with tempfile.TemporaryDirectory(prefix="opensloth-run-") as tmp:
            config_path = Path(tmp) / "config.yaml"
            dump_config(cfg, config_path)
            if devices == ["cpu"]:
                run_in_process(cfg, prepared.path)
            else:
                run_workers(cfg.recipe, config_path, prepared.path, devices,
                            launcher=cfg.distributed.launcher, master_port=cfg.distributed.master_port,
                            finish_timeout=cfg.distributed.collective_timeout + 60)
        if cfg.training.save_merged:
            from opensloth.evaluate import save_merged_after_training

            save_merged_after_training(cfg)


def prepare_only(cfg: RunConfig, output_path: Optional[Path] = None,
                 num_workers: Optional[int] = None) -> None:
    """Run `os-train data sft|grpo`: prepare (or reuse) the dataset, print its statistics, copy it.

    Args:
        cfg: the resolved config (model for the tokenizer, data section).
        output_path: also copy the prepared directory here (pass it to --dataset later).
        num_workers: shards to write (default: the worker count of --devices).
    """
    from opensloth.data import describe_drops

    if num_workers is not None and num_workers < 1:
        raise UserError(f"--num-workers {num_workers}: must be at least 1.")
    cfg = with_trained_system_prompt(cfg)
    shards = num_workers or len(resolve_devices(cfg.distributed.devices))
    if output_path is not None:
        output_path = Path(output_path)
        if output_path.exists() and (not output_path.is_dir() or any(output_path.iterdir())):
            raise UserError(f"--output-path {output_path} already exists and is not empty. "
                            "Choose a new directory (nothing was written).")
    from opensloth.distributed import setup_logging

    setup_logging(is_main=True)
    tokenizer = load_tokenizer(cfg)
    prepared = prepare_data(cfg, tokenizer, num_shards=shards)

    table = Table(title=f"os-train data {cfg.recipe}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("cache", f"{'hit' if prepared.cache_hit else 'miss (prepared now)'}: {prepared.path}")
    table.add_row("fingerprint", str(prepared.fingerprint))
    table.add_row("rows", str(prepared.num_rows))
    table.add_row("shards", f"{prepared.num_shards} (one per worker)")
    table.add_row("dropped", "; ".join(describe_drops(prepared.stats)) or "nothing (every row used whole)")
    for key, value in sorted(prepared.stats.to_dict().items()):
        table.add_row(str(key), str(value))
    if output_path is not None:
        # Copy beside the target, then rename: an interrupted copy never looks like a prepared dir.
        tmp = output_path.with_name(output_path.name + ".tmp-copy")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(prepared.path, tmp)
        if output_path.exists():
            output_path.rmdir()  # empty, checked above
        tmp.rename(output_path)
        table.add_row("saved to", f"{output_path} (pass it to --dataset)")
    console.print(table)
