"""Process-group helpers: one worker per device, joined in a torch.distributed group.

Every helper here also works without a process group (a single worker run in-process): it
then acts as the identity, so recipes call them unconditionally.

Workers find their place from the torchrun environment variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT); `opensloth.launch` sets the same variables for the
workers it starts, so one code path serves both launchers.

Gradient synchronisation: `all_reduce_gradients` SUMs by default. The GRPO recipe divides its
loss by *global* counts (tokens or sequences over all workers), so each worker's gradient is
already its share of the global mean and the sum over workers is the gradient of one big
batch. A loss normalised per worker would need op="mean" instead.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger("opensloth")

ReduceOp = Literal["sum", "mean", "max", "min"]


@dataclass(frozen=True)
class WorkerContext:
    """Where this worker sits in the job; passed to `recipes.<name>.run(cfg, ctx)`.

    Attributes:
        rank: global rank, 0..world_size-1.
        world_size: number of workers in the job.
        local_rank: rank on this machine (torchrun's LOCAL_RANK).
        device: the device this worker computes on (cuda:i or cpu).
        prepared_data_path: directory of the PreparedDataset the parent wrote.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    prepared_data_path: Optional[Path] = None

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, writes metrics and saves outputs."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def env_rank() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) when unset."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world_size, local_rank


def pick_device(use_cuda: bool, local_rank: int) -> torch.device:
    """The device of this worker, pinned as the current CUDA device.

    Our launcher gives each GPU worker exactly one visible GPU (CUDA_VISIBLE_DEVICES), so it
    is cuda:0; under torchrun every GPU of the node is visible and LOCAL_RANK picks one.
    """
    if not use_cuda:
        return torch.device("cpu")
    count = torch.cuda.device_count()
    index = local_rank if count > 1 else 0
    if index >= count:
        raise RuntimeError(f"LOCAL_RANK {local_rank} has no GPU: only {count} visible on this machine")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(
    use_cuda: bool, collective_timeout: int, prepared_data_path: Optional[Path] = None
) -> WorkerContext:
    """Pin this worker's device and join the process group (NCCL on GPU, gloo on CPU).

    A single worker (WORLD_SIZE unset or 1) joins no group: every helper below is then the
    identity. `collective_timeout` bounds every collective, so a dead peer fails the job
    instead of hanging it.

    Args:
        use_cuda: compute on a GPU (else the CPU).
        collective_timeout: seconds before a stuck all-reduce/barrier raises.
        prepared_data_path: directory of the prepared dataset, recorded in the context.
    """
    rank, world_size, local_rank = env_rank()
    device = pick_device(use_cuda, local_rank)
    if not use_cuda:
        # The HF Trainer (SFT) only enters CPU DDP when told it runs on the CPU.
        os.environ["ACCELERATE_USE_CPU"] = "true"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=collective_timeout),
            device_id=device if use_cuda else None,
        )
    return WorkerContext(rank, world_size, local_rank, device, prepared_data_path)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else env_rank()[0]


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every worker (bounded by the collective timeout)."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (safe to call twice or without one).

    A worker must not exit with its group still up: gloo's threads then abort the process at
    exit ("terminate called without an active exception"). No barrier first: rank 0 may still be
    saving, and a barrier longer than the collective timeout would fail a finished run.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _reduce_(tensor: torch.Tensor, op: ReduceOp) -> torch.Tensor:
    """All-reduce in place; "mean" is a sum divided by the world size (gloo has no AVG)."""
    torch_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM,
                "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    dist.all_reduce(tensor, op=torch_op)
    if op == "mean":
        tensor.div_(dist.get_world_size())
    return tensor


def all_reduce_gradients(params: Iterable[torch.nn.Parameter], op: ReduceOp = "sum") -> None:
    """Reduce the gradients of trainable parameters across workers, in place.

    The gradients are flattened into one buffer per dtype (usually one) so the whole model
    costs one collective instead of one per LoRA matrix. A trainable parameter with no
    gradient on this worker takes part as zeros: every worker must send buffers of the same
    layout or the collective would mismatch.

    Args:
        params: the model's parameters; those with requires_grad=False are skipped.
        op: "sum" (default: losses normalised by global counts, as in the GRPO recipe),
            "mean" (losses normalised per worker), "max" or "min".
    """
    if not is_distributed():
        return
    trainable = [p for p in params if p.requires_grad]
    for p in trainable:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in trainable:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])  # (sum of numels,)
        _reduce_(flat, op)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def all_reduce_scalars(values: list[float], op: ReduceOp = "sum", device: Optional[torch.device] = None
                       ) -> list[float]:
    """Reduce a few floats across workers in one collective (e.g. global token counts)."""
    if not is_distributed():
        return list(values)
    if device is None:
        on_gpu = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    return _reduce_(tensor, op).tolist()


def reduce_metrics(metrics: dict[str, float], op: ReduceOp = "mean") -> dict[str, float]:
    """Reduce a dict of scalar metrics across workers for logging (one collective).

    Every worker must pass the same keys. Values may be floats, ints or 0-d tensors; the
    result holds floats. Without a process group the dict comes back as floats unchanged.
    """
    keys = sorted(metrics)
    values = [float(metrics[k]) for k in keys]
    return dict(zip(keys, all_reduce_scalars(values, op)))


def all_gather_objects(obj: Any) -> list[Any]:
    """Every worker's picklable `obj`, in rank order (one element without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from rank `src` to every worker; returns it on all ranks."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def print0(message: str, **kwargs: Any) -> None:
    """Print on rank 0 only, through rich (markup allowed)."""
    if is_main_process():
        from rich.console import Console

        Console().print(message, **kwargs)


def setup_logging(is_main: bool) -> None:
    """Route the "opensloth" logger through rich: INFO on rank 0, warnings and errors elsewhere.

    Idempotent; a handler the application already installed is kept.
    """
    log = logging.getLogger("opensloth")
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    if not log.handlers:
        from rich.logging import RichHandler

        log.addHandler(RichHandler(show_path=False, show_time=False, markup=False))
        log.propagate = False
