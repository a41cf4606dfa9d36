"""Worker entry point: `python -m opensloth.launch.worker --recipe sft|grpo --config cfg.yaml --prepared DIR`.

One process per device. It reads its place in the job from the torchrun variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so the same command runs under our own
launcher and under `torchrun --nproc_per_node N -m opensloth.launch.worker ...` (several
machines: see docs/multi_gpu.md). It pins its device, joins the process group and calls
`opensloth.recipes.<recipe>.run(cfg, ctx)`. In a GRPO job with rollout workers (--rollout-devices, or
OPENSLOTH_ROLE=rollout on some torchrun ranks) a rollout process runs
`opensloth.recipes.grpo_rollout.run_rollout_worker` instead, and every process beats a heartbeat.

On failure it writes a small JSON error file (path in $OPENSLOTH_ERROR_FILE, set by our
launcher) so the parent can name the failing rank and its error, then exits at once without
tearing down the process group: a teardown that talks to a dead peer could hang.

Testing hook: OPENSLOTH_FAULT_INJECT="rank=1,step=1[,kind=raise|kill|hang]" makes that rank
fail just before its optimizer step number `step` (1-based, counted over every optimizer in the
process): `raise` raises RuntimeError, `kill` sends itself SIGKILL (like the OOM killer),
`hang` sleeps forever (its peers then hit the collective timeout). Used by
tests/test_launch_failures.py; never set it in a real run.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

from opensloth.config import RunConfig, resolve_config
from opensloth.distributed import WorkerContext, cleanup, init_distributed, pick_device, setup_logging
from opensloth.errors import TrainingStopped, UserError, plural
from opensloth.launch.procs import ERROR_FILE_ENV, LAUNCHED_ENV, PARENT_PID_ENV

FAULT_ENV = "OPENSLOTH_FAULT_INJECT"
_TORCHRUN_LOCK = None  # rank 0's output-dir lock under torchrun (see check_torchrun_job)
_HEARTBEAT = None  # this process's liveness beat in a job with rollout workers (see start_heartbeat)


def parse_fault_spec(spec: str) -> dict[str, str]:
    """"rank=1,step=2,kind=raise" -> {"rank": "1", "step": "2", "kind": "raise"} (kind defaults to raise)."""
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    fields.setdefault("kind", "raise")
    if not {"rank", "step"} <= set(fields) or fields["kind"] not in ("raise", "kill", "hang"):
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected rank=R,step=S[,kind=raise|kill|hang]")
    return fields


def install_fault_injection(rank: int) -> Optional[Callable[[], None]]:
    """Arm the testing hook described in the module docstring; returns a function that disarms it."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    fault = parse_fault_spec(spec)
    if int(fault["rank"]) != rank:
        return None
    target, seen = int(fault["step"]), [0]

    def pre_step(optimizer, args, kwargs):
        seen[0] += 1
        if seen[0] != target:
            return
        if fault["kind"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault["kind"] == "hang":
            while True:
                time.sleep(1)
        raise RuntimeError(f"injected fault on rank {rank} at optimizer step {target} ({FAULT_ENV})")

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(pre_step)
    return handle.remove


def run_recipe(cfg: RunConfig, ctx: WorkerContext) -> None:
    """Import `opensloth.recipes.<recipe>` and run it in this worker (both launch paths call this)."""
    recipe = importlib.import_module(f"opensloth.recipes.{cfg.recipe}")
    disarm = install_fault_injection(ctx.rank)
    try:
        recipe.run(cfg, ctx)
    except Exception as exc:
        from opensloth.errors import is_disk_full
        from opensloth.rundir import training_disk_full_error

        if isinstance(exc, UserError) or not is_disk_full(exc):
            raise
        # A write the recipes do not name themselves (metrics.jsonl, TensorBoard events, ...).
        raise training_disk_full_error(exc, cfg.training.output_dir) from exc
    finally:
        if disarm is not None:
            disarm()


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker if the launcher dies, so no worker outlives a killed job."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        os._exit(1)


def write_error_file(rank: int, exc: BaseException) -> None:
    """Record this worker's error for the launcher ($OPENSLOTH_ERROR_FILE), atomically."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    record = {
        "rank": rank,
        "type": type(exc).__name__,
        "message": str(exc),
        "user_error": isinstance(exc, UserError),
        "traceback": "".join(traceback.format_exception(exc)),
    }
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


def check_torchrun_job(cfg: RunConfig, prepared: Path) -> None:
    """Under torchrun no launcher of ours ran its checks: do them here, before joining the group.

    The prepared data must be sharded for WORLD_SIZE workers (GRPO reads shard RANK), and rank 0
    guards the output dir as `os-train` does: it takes the dir's lock for the life of its process
    (the other ranks of this node die with the job), refuses a non-empty dir and a --resume that
    would train over a finished run. The recipe writes config.yaml once training starts.
    """
    from opensloth.data import check_shards, load_prepared
    from opensloth.launch import check_output_dir
    from opensloth.rundir import RunLock, check_resume

    global _TORCHRUN_LOCK
    try:
        check_shards(load_prepared(prepared), int(os.environ.get("WORLD_SIZE", 1)))
    except UserError as exc:
        from opensloth.recipes.grpo_rollout import ROLE_ENV, ROLLOUT_WORLD_ENV

        if ROLLOUT_WORLD_ENV not in os.environ:
            raise
        rollouts = int(os.environ[ROLLOUT_WORLD_ENV])
        raise UserError(f"{exc} Count the training ranks only: the {plural(rollouts, 'rank')} with {ROLE_ENV}=rollout "
                        "read the trainers' shards.") from None
    if int(os.environ.get("RANK", 0)) == 0:
        _TORCHRUN_LOCK = RunLock(cfg.training.output_dir).acquire()  # released by _exit
        note = _TORCHRUN_LOCK.stale_note()
        if note:
            sys.stderr.write(note + "\n")
        check_output_dir(cfg)
        for line in check_resume(cfg):
            sys.stderr.write(line + "\n")


def start_heartbeat() -> None:
    """In a job with rollout workers: beat, and watch the peers this process depends on (a trainer's
    rollout worker; a rollout worker's trainers), so a peer that hangs or fails ends this process too
    (opensloth.recipes.grpo_rollout, "Liveness")."""
    from opensloth.recipes import grpo_rollout

    global _HEARTBEAT
    _HEARTBEAT = grpo_rollout.Heartbeat(grpo_rollout.link_rank(), grpo_rollout.link_peers(), _peer_lost).start()


def _peer_lost(message: str) -> None:
    """From the heartbeat thread: end this process as its own failure would (the launcher, or the peers
    watching it under torchrun, then name the peer that was lost)."""
    exc = RuntimeError(message)
    write_error_file(int(os.environ.get("RANK", 0)), exc)
    sys.stderr.write(f"Error: {message}. Ending this worker.\n")
    sys.stderr.flush()
    _exit(1, status=f"RuntimeError: {message}")


def _exit(code: int, status: Optional[str] = None) -> None:
    """os._exit(code), first releasing rank 0's output-dir lock under torchrun (os._exit runs no finally)
    and telling the heartbeat's watchers how this process ended (`status`: its error, by default from
    the code: 0 ok, 130 stopped)."""
    if _HEARTBEAT is not None:
        _HEARTBEAT.finish(status or {0: "ok", 130: "stopped"}.get(code, f"exited with code {code}"))
    if _TORCHRUN_LOCK is not None:
        _TORCHRUN_LOCK.release()
    os._exit(code)


def use_cuda_for(cfg: RunConfig) -> bool:
    return torch.cuda.is_available() and not cfg.distributed.devices.startswith("cpu")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m opensloth.launch.worker",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", required=True, choices=["sft", "grpo"])
    parser.add_argument("--config", required=True, type=Path,
                        help="YAML config (e.g. output_dir/config.yaml).")
    parser.add_argument("--prepared", type=Path, default=None,
                        help="Prepared dataset directory (os-train data ... --output-path). "
                        "Default: --dataset.")
    args = parser.parse_args(argv)
    _die_with_parent()

    rank = int(os.environ.get("RANK", 0))
    setup_logging(is_main=rank == 0)
    try:
        cfg = resolve_config(args.recipe, args.config)
        prepared = args.prepared or (Path(cfg.data.dataset) if cfg.data.dataset else None)
        if prepared is None or not prepared.is_dir():
            raise UserError(f"--prepared {prepared}: not a directory. Prepare the data first with "
                            f"`os-train data {args.recipe} ... --output-path DIR --num-workers N` and pass DIR.")
        from opensloth.recipes import grpo_rollout

        if LAUNCHED_ENV not in os.environ:  # torchrun: OPENSLOTH_ROLE picks the rollout ranks
            grpo_rollout.assign_torchrun_roles(cfg)
        if grpo_rollout.in_rollout_layout():
            start_heartbeat()
        setup_logging(is_main=grpo_rollout.rollout_rank() is None and int(os.environ.get("RANK", 0)) == 0)
        if grpo_rollout.rollout_rank() is not None:  # this process generates for the trainers
            devices = cfg.grpo.rollout_devices or cfg.distributed.devices
            on_gpu = torch.cuda.is_available() and not devices.startswith("cpu")
            grpo_rollout.run_rollout_worker(cfg, prepared, pick_device(on_gpu, int(os.environ.get("LOCAL_RANK", 0))))
        else:
            if LAUNCHED_ENV not in os.environ:
                check_torchrun_job(cfg, prepared)
            ctx = init_distributed(use_cuda_for(cfg), cfg.distributed.collective_timeout, prepared)
            run_recipe(cfg, ctx)
    except TrainingStopped as exc:  # every worker saved its share of the checkpoint
        write_error_file(rank, exc)  # the launcher prints the message once
        if rank == 0 and not os.environ.get(ERROR_FILE_ENV):  # torchrun: nobody reads that file
            sys.stderr.write(f"{exc}\n")
        cleanup()
        sys.stdout.flush()
        sys.stderr.flush()
        _exit(130)
    except KeyboardInterrupt:
        _exit(130)
    except SystemExit as exc:
        if exc.code in (0, None):
            raise
        write_error_file(rank, exc)
        if _HEARTBEAT is not None:
            _HEARTBEAT.finish(f"exited with code {exc.code}")
        raise
    except BaseException as exc:  # noqa: BLE001 - report every failure to the launcher, then leave
        write_error_file(rank, exc)
        if isinstance(exc, UserError):
            sys.stderr.write(f"Error: {exc}\n")
        else:
            traceback.print_exception(exc, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # os._exit: skip process-group teardown and atexit hooks that may block on a dead peer.
        _exit(2 if isinstance(exc, UserError) else 1, status=f"{type(exc).__name__}: {exc}")
    cleanup()
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit here too: even with the group destroyed, gloo's threads can abort an exiting
    # interpreter ("terminate called without an active exception", seen in CI on a rank that
    # finished while rank 0 was still saving). Everything the run writes is written by now.
    _exit(0)


if __name__ == "__main__":
    main()
