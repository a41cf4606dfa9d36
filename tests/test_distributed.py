"""opensloth.distributed with two real gloo processes: gradient all-reduce, metrics, broadcast."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from opensloth import distributed as D
from opensloth.launch.procs import free_port

IN_DIM, OUT_DIM, BATCH = 4, 3, 8


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(IN_DIM, OUT_DIM), torch.nn.Linear(OUT_DIM, 1))
    model[0].bias.requires_grad_(False)  # frozen: must be skipped by the all-reduce
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, IN_DIM, generator=g), torch.randn(BATCH, 1, generator=g)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = D.init_distributed(use_cuda=False, collective_timeout=60)
    x, y = _batch()
    shard = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    results = {"ctx": (ctx.rank, ctx.world_size, ctx.is_main, str(ctx.device))}

    # Loss normalised by the GLOBAL batch size: the sum of the workers' gradients is the full gradient.
    model = _model()
    ((model(x[shard]) - y[shard]) ** 2).sum().div(BATCH).backward()
    D.all_reduce_gradients(model.parameters())
    results["sum"] = _grads(model)

    # Loss normalised per worker: op="mean" gives the full gradient.
    model = _model()
    ((model(x[shard]) - y[shard]) ** 2).mean().backward()
    D.all_reduce_gradients(model.parameters(), op="mean")
    results["mean"] = _grads(model)

    # A trainable parameter unused on rank 1 (grad None there) still lines the buffers up.
    model = _model()
    out = model[0](x[shard])
    if rank == 0:
        out = model[1](out)
    out.sum().backward()
    D.all_reduce_gradients(model.parameters())
    results["unused"] = _grads(model)

    results["metrics_mean"] = D.reduce_metrics({"loss": float(rank + 1), "n": torch.tensor(rank)})
    results["metrics_max"] = D.reduce_metrics({"loss": float(rank + 1)}, op="max")
    results["broadcast"] = D.broadcast_object({"seed": 123} if rank == 0 else None)
    D.barrier()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    D.cleanup()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_context(two_workers):
    assert two_workers[0]["ctx"] == (0, 2, True, "cpu")
    assert two_workers[1]["ctx"] == (1, 2, False, "cpu")


def test_sum_of_globally_normalised_grads_equals_one_worker(two_workers):
    x, y = _batch()
    model = _model()
    ((model(x) - y) ** 2).sum().div(BATCH).backward()
    expected = _grads(model)
    assert set(expected) == {"0.weight", "1.weight", "1.bias"}
    for result in two_workers:
        for name, grad in expected.items():
            torch.testing.assert_close(result["sum"][name], grad, rtol=1e-6, atol=1e-7)


def test_mean_of_locally_normalised_grads_equals_one_worker(two_workers):
    x, y = _batch()
    model = _model()
    ((model(x) - y) ** 2).mean().backward()
    for result in two_workers:
        for name, grad in _grads(model).items():
            torch.testing.assert_close(result["mean"][name], grad, rtol=1e-6, atol=1e-7)


def test_unused_parameter_counts_as_zero(two_workers):
    x, _ = _batch()
    model = _model()
    model[1](model[0](x[: BATCH // 2])).sum().backward()  # rank 0's half through both layers
    model[0](x[BATCH // 2:]).sum().backward()  # rank 1's half through the first layer only
    for result in two_workers:
        for name, grad in _grads(model).items():
            torch.testing.assert_close(result["unused"][name], grad, rtol=1e-6, atol=1e-6)


def test_metrics_and_broadcast(two_workers):
    for result in two_workers:
        assert result["metrics_mean"] == {"loss": 1.5, "n": 0.5}
        assert result["metrics_max"] == {"loss": 2.0}
        assert result["broadcast"] == {"seed": 123}


def test_helpers_are_identity_without_a_process_group():
    model = _model()
    x, y = _batch()
    ((model(x) - y) ** 2).mean().backward()
    before = _grads(model)
    D.all_reduce_gradients(model.parameters())
    for name, grad in _grads(model).items():
        assert torch.equal(grad, before[name])
    assert D.reduce_metrics({"a": torch.tensor(2.0)}) == {"a": 2.0}
    assert D.broadcast_object([1]) == [1]
    D.barrier()


def _stuck_worker(rank: int, port: int, out_dir: str) -> None:
    import time

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    D.init_distributed(use_cuda=False, collective_timeout=3)
    if rank == 1:
        time.sleep(20)  # never joins the all-reduce below, and stays alive
        return
    start = time.monotonic()
    try:
        D.all_reduce_scalars([1.0])
        outcome = "returned"
    except Exception as exc:  # noqa: BLE001 - gloo raises RuntimeError (DistBackendError) on timeout
        outcome = type(exc).__name__
    with open(os.path.join(out_dir, "stuck.txt"), "w") as f:
        f.write(f"{outcome} {time.monotonic() - start:.1f}")
    os._exit(0)  # do not wait for rank 1


def test_a_stuck_collective_times_out(tmp_path):
    ctx = mp.spawn(_stuck_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False)
    try:
        ctx.processes[0].join(timeout=60)
        outcome, seconds = (tmp_path / "stuck.txt").read_text().split()
    finally:
        for proc in ctx.processes:
            proc.kill()
    assert outcome != "returned"
    assert 2.5 <= float(seconds) < 15
