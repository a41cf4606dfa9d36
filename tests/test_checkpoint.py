"""Checkpoints: exact resume after SIGKILL, atomic saves, rotation, corrupt ones skipped.

The training loop below is a small real one (tiny Qwen2 + PEFT LoRA with dropout, AdamW, a
linear schedule, a shuffled data order): everything whose state a checkpoint must carry.
It runs in a subprocess so it can be killed with SIGKILL like an OOM-killed job.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from opensloth import checkpoint as ck
from opensloth.errors import UserError

LOOP = textwrap.dedent(
    """
    import json, os, random, signal, sys
    from pathlib import Path
    import numpy as np, torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM, get_linear_schedule_with_warmup
    from opensloth import checkpoint as ck

    out, total, save_steps, kill_at, resume, limit = (
        Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1",
        int(sys.argv[6]))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo")
    torch.manual_seed(0); random.seed(0); np.random.seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = get_peft_model(Qwen2ForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2,
                                                               target_modules=["q_proj", "v_proj"]))
    data = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(1))[rank::world]
    # Same initial weights everywhere, then a different random stream per worker.
    torch.manual_seed(1 + rank); random.seed(1 + rank); np.random.seed(1 + rank)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = get_linear_schedule_with_warmup(opt, 2, total)
    step, epoch, pos, order = 0, 0, 0, None
    path = ck.resolve_resume(out, resume, None)
    if path is not None:
        got = ck.load_checkpoint(path, model=model, optimizer=opt, scheduler=sched, rank=rank, world_size=world)
        step = got["step"]; epoch, pos, order = got["state"]["epoch"], got["state"]["pos"], got["state"]["order"]
    log = open(out / f"losses{rank}.jsonl", "a")
    while step < total:
        if order is None or pos >= len(order):
            order, pos, epoch = np.random.permutation(len(data)).tolist(), 0, epoch + 1
        batch = data[order[pos:pos + 3]]; pos += 3
        # python's RNG picks a crop: its state must survive the resume too.
        batch = batch[:, : random.randint(8, 16)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if world > 1:  # average gradients across workers
            for p in model.parameters():
                if p.requires_grad:
                    dist.all_reduce(p.grad); p.grad /= world
        opt.step(); sched.step(); opt.zero_grad(); step += 1
        log.write(json.dumps({"step": step, "loss": loss.item()}) + "\\n"); log.flush()
        if save_steps and step % save_steps == 0:
            ck.save_checkpoint(out, step, model=model, optimizer=opt, scheduler=sched,
                               state={"epoch": epoch, "pos": pos, "order": order}, save_total_limit=limit)
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    torch.save(ck.trainable_state_dict(model), out / f"final{rank}.pt")
    if world > 1:
        # Leave together: a rank that exits while its peer's gloo threads still run aborts it.
        dist.barrier(); dist.destroy_process_group()
    """
)


def run_loop(tmp_path: Path, out: Path, total: int, save_steps: int, kill_at: int = -1,
             resume: bool = False, limit: int = 2, world: int = 1) -> subprocess.CompletedProcess:
    """Run LOOP in `world` processes (gloo when > 1); returns rank 0's process (all were waited for)."""
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    out.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, str(script), str(out), str(total), str(save_steps), str(kill_at),
            "1" if resume else "0", str(limit)]
    if world == 1:
        return subprocess.run(args, check=False, capture_output=True, text=True, timeout=300)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(world)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr))
    for result in results[1:]:
        assert result.returncode == results[0].returncode, result.stderr
    return results[0]


def losses(out: Path, rank: int = 0) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / f"losses{rank}.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}  # a resumed step overwrites the killed run's value


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("full")
    out = tmp / "run"
    proc = run_loop(tmp, out, total=7, save_steps=2)
    assert proc.returncode == 0, proc.stderr
    return out


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    out = tmp_path / "run"
    # Killed right after step 5: the newest checkpoint is checkpoint-4, so step 5 is redone.
    killed = run_loop(tmp_path, out, total=7, save_steps=2, kill_at=5)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "final0.pt").exists()
    assert ck.find_latest_checkpoint(out).name == "checkpoint-4"

    resumed = run_loop(tmp_path, out, total=7, save_steps=2, resume=True)
    assert resumed.returncode == 0, resumed.stderr

    assert_same_run(uninterrupted, out, ranks=1)


def assert_same_run(want_dir: Path, got_dir: Path, ranks: int) -> None:
    """Bit-identical final weights on every rank and identical losses after the resume point."""
    for rank in range(ranks):
        want, got = torch.load(want_dir / f"final{rank}.pt"), torch.load(got_dir / f"final{rank}.pt")
        assert want.keys() == got.keys()
        for name in want:
            assert torch.equal(want[name], got[name]), (rank, name)
        want_losses, got_losses = losses(want_dir, rank), losses(got_dir, rank)
        assert [got_losses[s] for s in (5, 6, 7)] == [want_losses[s] for s in (5, 6, 7)]


@pytest.mark.slow
def test_two_workers_sigkill_then_resume_equals_uninterrupted(tmp_path):
    """2 gloo workers with different data and RNG streams: each worker's state comes back."""
    full = run_loop(tmp_path, tmp_path / "full", total=7, save_steps=2, world=2)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "run"
    killed = run_loop(tmp_path, out, total=7, save_steps=2, kill_at=5, world=2)
    assert killed.returncode == -signal.SIGKILL
    resumed = run_loop(tmp_path, out, total=7, save_steps=2, resume=True, world=2)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path / "full", out, ranks=2)
    # Both workers' weights agree (gradients were averaged) and both RNG states were saved.
    w0, w1 = torch.load(out / "final0.pt"), torch.load(out / "final1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    saved = torch.load(out / "checkpoints" / "checkpoint-6" / "trainer_state.pt", weights_only=False)
    assert len(saved["rng"]) == 2 and not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])


def test_rotation_keeps_newest_complete(uninterrupted):
    names = [p.name for p in ck.list_checkpoints(uninterrupted)]
    assert names == ["checkpoint-4", "checkpoint-6"]  # save_total_limit=2 of 2, 4, 6
    for ckpt in ck.list_checkpoints(uninterrupted):
        assert ck.verify_checkpoint(ckpt) is None
        assert (ckpt / "adapter" / "adapter_config.json").is_file()  # usable as --model too


def test_save_killed_midway_never_corrupts_newest_good(tmp_path):
    """SIGKILL inside torch.save of checkpoint-4: checkpoint-2 stays the newest complete one."""
    out = tmp_path / "run"
    killer = tmp_path / "killer.py"
    # Wrap torch.save so that the 3rd file written in the second checkpoint kills the process.
    killer.write_text(textwrap.dedent(
        """
        import os, signal, runpy, sys, torch
        real_save, calls = torch.save, {"n": 0}
        def save(obj, f, *a, **k):
            calls["n"] += 1
            real_save(obj, f, *a, **k)
            if calls["n"] == 7:  # 4 files per checkpoint: mid-way through the second one
                os.kill(os.getpid(), signal.SIGKILL)
        torch.save = save
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
        """))
    (tmp_path / "loop.py").write_text(LOOP)
    out.mkdir()
    proc = subprocess.run([sys.executable, str(killer), str(tmp_path / "loop.py"), str(out), "6", "2", "-1",
                           "0", "5"], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p.name for p in ck.list_checkpoints(out)] == ["checkpoint-2"]
    assert list(ck.checkpoints_root(out).glob(".tmp-*")), "the killed save left its temp dir"
    assert ck.find_latest_checkpoint(out).name == "checkpoint-2"

    # Resuming from it works and the stale temp dir is cleaned at the next save.
    resumed = run_loop(tmp_path, out, total=4, save_steps=2, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    assert [p.name for p in ck.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert not list(ck.checkpoints_root(out).glob(".tmp-*"))


def test_corrupt_or_partial_checkpoints_are_skipped(tmp_path, uninterrupted, caplog):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    newest = out / "checkpoints" / "checkpoint-6"
    with open(newest / "optimizer.pt", "r+b") as fh:  # flip one byte
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    partial = out / "checkpoints" / "checkpoint-8"
    partial.mkdir()
    (partial / "trainable.pt").write_bytes(b"half")
    with caplog.at_level("WARNING", logger="opensloth"):
        assert ck.find_latest_checkpoint(out).name == "checkpoint-4"
    assert "checkpoint-8" in caplog.text and "interrupted" in caplog.text
    assert "checkpoint-6" in caplog.text and "checksum" in caplog.text
    with pytest.raises(UserError, match="--resume-from"):
        ck.resolve_resume(out, False, newest)
    with pytest.raises(UserError, match="no such directory"):
        ck.resolve_resume(out, False, out / "nope")
    assert ck.resolve_resume(tmp_path / "empty", True, None) is None  # --resume with nothing: fresh start


def test_rng_roundtrip():
    import random

    import numpy as np

    state = ck.capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ck.restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_stop_signal_sets_flag_then_second_sigint_raises():
    from opensloth import rundir

    with rundir.StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and rundir.stop_requested(stop)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ------------------------------------------------------------------------------------------------
# The real recipes through the real CLI: SIGKILL mid-run, then --resume
# ------------------------------------------------------------------------------------------------

TRAIN = "from opensloth.cli.train import app; app()"
# Keys that depend on wall-clock time, not on the computation; and the end-of-run `train_loss`,
# which after a resume is the mean over the resumed run's steps (checked on its own below).
TIMING = ("time", "per_second", "runtime", "flos", "train_loss")


def _recipe_args(recipe: str, model: Path, data: Path, out: Path) -> list[str]:
    common = ["--model", str(model), "--dataset", str(data), "--output-dir", str(out), "--devices", "cpu",
              "--cache-dir", str(out.parent / "cache"), "--report-to", "none", "--max-steps", "6",
              "--save-steps", "2", "--seed", "5", "--lora-r", "4"]
    if recipe == "grpo":
        return ["grpo", *common, "--format", "prompt-answer", "--rewards", "math_answer,math_format",
                "--group-size", "4", "--rollout-batch-size", "4", "--max-new-tokens", "10",
                "--per-device-train-batch-size", "8", "--learning-rate", "1e-2", "--print-sample-every", "0",
                "--temperature", "1.0"]
    return ["sft", *common, "--format", "openmath-reasoning", "--system-prompt", "Think.",
            "--per-device-train-batch-size", "4", "--learning-rate", "3e-3", "--max-seq-length", "128",
            "--lora-dropout", "0.1"]  # dropout: the torch RNG must come back too


def _metrics(out: Path) -> dict[int, dict]:
    """step -> the last record logged for it (a resumed step overwrites the killed run's)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_step: dict[int, dict] = {}
    for row in rows:
        by_step.setdefault(row["step"], {}).update(
            {k: v for k, v in row.items() if not any(t in k for t in TIMING)})
    return by_step


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


def _kill_after_first_checkpoint(args: list[str], out: Path) -> int:
    """Start `os-train`, SIGKILL its whole process group once checkpoint-2 is sealed; its exit code."""
    import time

    proc = subprocess.Popen([sys.executable, "-c", TRAIN, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    manifest = out / "checkpoints" / "checkpoint-2" / ck.MANIFEST
    deadline = time.monotonic() + 500
    while proc.poll() is None and not manifest.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory) -> dict[str, Path]:
    from opensloth.data.synthetic import make_arithmetic_rows, write_rows

    tmp = tmp_path_factory.mktemp("resume_data")
    prompts = tmp / "add.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                               for a in range(10) for b in range(10)))
    return {"grpo": prompts, "sft": write_rows(make_arithmetic_rows(48, seed=0, schema="openmath"),
                                               tmp / "sft.jsonl")}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["sft", "grpo"])
def test_cli_sigkill_then_resume_equals_uninterrupted(recipe, recipe_data, tiny_model_dir, tmp_path):
    full = tmp_path / "full"
    proc = subprocess.run([sys.executable, "-c", TRAIN, *_recipe_args(recipe, tiny_model_dir, recipe_data[recipe],
                                                                        full)],
                          check=False, capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    out = tmp_path / "killed"
    args = _recipe_args(recipe, tiny_model_dir, recipe_data[recipe], out)
    assert _kill_after_first_checkpoint(args, out) == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists()
    resume_step = ck.checkpoint_step(ck.find_latest_checkpoint(out))
    assert resume_step in (2, 4)

    proc = subprocess.run([sys.executable, "-c", TRAIN, *args, "--resume"], check=False, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    want, got = _adapter(full), _adapter(out)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    want_m, got_m = _metrics(full), _metrics(out)
    after = [s for s in want_m if s > resume_step]
    assert after and [got_m[s] for s in after] == [want_m[s] for s in after]
    if recipe == "sft":  # the end-of-run train_loss is the mean over the steps the resumed run trained
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        train_loss = [r["train_loss"] for r in rows if "train_loss" in r][-1]
        assert train_loss == pytest.approx(sum(got_m[s]["loss"] for s in after) / len(after), abs=1e-3)
