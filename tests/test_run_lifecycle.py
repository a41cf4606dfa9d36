"""A run's lifecycle and its output dir, through the real CLI: resume, the lock, a full disk, a failed start,
a busy --master-port. Each test backs one row of docs/reliability.md ("Runs and their output dir").

Every run is a real `os-train` subprocess on the tiny model of tests/conftest.py, a few steps long.
The full-disk tests mount a small tmpfs (root; CI runs as root). Where mount is not permitted, the
final-save test limits the file size of the run instead (RLIMIT_FSIZE: EFBIG rather than ENOSPC, handled
the same way) and the checkpoint test, which needs a filesystem that fills up, skips with the reason.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from opensloth import checkpoint as ck

pytestmark = pytest.mark.slow

TRAIN = "from opensloth.cli.train import app; app()"
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def os_train(*args: object, timeout: int = 300, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TRAIN, *map(str, args)], check=False, capture_output=True,
                          text=True, env=ENV, timeout=timeout, preexec_fn=preexec_fn)


def assert_one_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """Exit `code`, no traceback, exactly one Error: line holding every needle."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert out.count("Error:") == 1, out[-4000:]
    flat = " ".join(out.split())  # rich wraps long lines
    for needle in needles:
        assert " ".join(needle.split()) in flat, f"{needle!r} not in:\n{out[-4000:]}"
    return flat


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    from opensloth.data.synthetic import make_arithmetic_rows, write_rows

    tmp = tmp_path_factory.mktemp("lifecycle_data")
    prompts = tmp / "add.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                               for a in range(5) for b in range(5)))
    sft = write_rows(make_arithmetic_rows(16, seed=0, schema="openmath"), tmp / "sft.jsonl")
    return {"grpo": prompts, "sft": sft, "cache": tmp / "cache"}


def grpo_args(model: Path, data: dict[str, Path], out: Path, *extra: object) -> list[object]:
    return ["grpo", "--model", model, "--dataset", data["grpo"], "--format", "prompt-answer", "--rewards",
            "math_answer", "--output-dir", out, "--cache-dir", data["cache"], "--devices", "cpu", "--report-to",
            "none", "--lora-r", "4", "--group-size", "2", "--rollout-batch-size", "2", "--max-new-tokens", "8",
            "--print-sample-every", "0", "--seed", "1", *extra]


def sft_args(model: Path, data: dict[str, Path], out: Path, *extra: object) -> list[object]:
    return ["sft", "--model", model, "--dataset", data["sft"], "--format", "openmath-reasoning", "--output-dir", out,
            "--cache-dir", data["cache"], "--devices", "cpu", "--report-to", "none", "--max-seq-length", "512",
            "--seed", "1", *extra]


# -- 1. resume ------------------------------------------------------------------------------------


def test_resume_refuses_a_finished_run_and_a_changed_shape_and_lists_other_changes(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    first = os_train(*grpo_args(tiny_model_dir, data, out, "--max-steps", "2", "--save-steps", "1"))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and ck.find_latest_checkpoint(out).name == "checkpoint-1"
    before = snapshot(out)

    # The same length again would only retrain over the finished model.
    again = os_train(*grpo_args(tiny_model_dir, data, out, "--max-steps", "2", "--save-steps", "1", "--resume"))
    assert_one_error(again, "holds a finished run", "raise --max-steps", f"--model {out}")
    assert snapshot(out) == before

    # A different shape cannot load the checkpoint: refused before anything is written, listing the changes.
    shape = os_train(*grpo_args(tiny_model_dir, data, out, "--max-steps", "3", "--save-steps", "1", "--resume",
                                "--lora-r", "8", "--target-modules", "q_proj,v_proj"))
    assert_one_error(shape, "change the shape", "--lora-r 4 -> 8",
                     "--target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj -> q_proj,v_proj")
    assert snapshot(out) == before  # config.yaml untouched

    # Longer, with a changed learning rate and group size: continues from checkpoint-1, says what changed,
    # and config.yaml records what the resumed run used (the previous one is kept).
    longer = os_train(*grpo_args(tiny_model_dir, data, out, "--max-steps", "3", "--save-steps", "1", "--resume",
                                 "--group-size", "4", "--learning-rate", "1e-3"))
    text = " ".join((longer.stdout + longer.stderr).split())
    assert longer.returncode == 0, text[-3000:]
    assert "Warning: --resume with changed options:" in text
    assert "--group-size 2 -> 4" in text and "--learning-rate 5e-06 -> 0.001" in text and "--max-steps 2 -> 3" in text
    now = yaml.safe_load((out / "config.yaml").read_text())
    kept = yaml.safe_load((out / "config.until-step-1.yaml").read_text())
    assert (now["grpo"]["group_size"], now["training"]["learning_rate"]) == (4, 1e-3)
    assert (kept["grpo"]["group_size"], kept["training"]["learning_rate"]) == (2, 5e-6)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # step 2 again from checkpoint-1, then 3: each step once
    replaced = [json.loads(line)["step"] for line in (out / "metrics.replaced-at-step-1.jsonl").read_text().splitlines()]
    assert replaced == [1, 2]  # the first run's rows, kept whole

    # The default --save-steps 0 leaves no checkpoint: nothing to resume, and the way to train further.
    shutil.rmtree(out / "checkpoints")
    before = snapshot(out)
    finished = os_train(*grpo_args(tiny_model_dir, data, out, "--max-steps", "9", "--resume"))
    assert_one_error(finished, "holds a finished run", "no checkpoint", f"--model {out} --output-dir NEW_DIR",
                     "--save-steps N")
    assert snapshot(out) == before


def test_a_fresh_run_into_an_overwritten_dir_starts_its_own_metrics(tiny_model_dir, data, tmp_path):
    """--overwrite used to append the new run's steps to the old run's metrics.jsonl (steps 1, 2, 1)."""
    out = tmp_path / "run"
    for steps in ("2", "1"):
        proc = os_train(*grpo_args(tiny_model_dir, data, out, "--max-steps", steps, "--overwrite"))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


# -- 2. one live run per output dir -----------------------------------------------------------------


def test_a_second_run_into_a_live_dir_is_refused_and_a_stale_lock_is_taken_over(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-c", TRAIN, *map(str, grpo_args(tiny_model_dir, data, out,
                                                                                   "--max-steps", "500"))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while first.poll() is None and time.monotonic() < deadline:
            if metrics.is_file() and metrics.read_text().strip():
                break
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before it was observed training"
        lock = json.loads((out / ".opensloth.lock").read_text())
        assert lock["pid"] == first.pid and lock["host"] == socket.gethostname()
        config = (out / "config.yaml").read_bytes()

        # With --overwrite, which would otherwise let it write into a non-empty dir.
        second = os_train(*grpo_args(tiny_model_dir, data, out, "--max-steps", "1", "--overwrite",
                                     "--learning-rate", "1e-3"))
        assert_one_error(second, f"is in use by another run (pid {first.pid} on host {socket.gethostname()}",
                         "nothing was written")
        assert (out / "config.yaml").read_bytes() == config
        assert json.loads((out / ".opensloth.lock").read_text())["pid"] == first.pid
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # like the OOM killer: the lock file stays behind
        first.wait()

    assert json.loads((out / ".opensloth.lock").read_text())["pid"] == first.pid
    third = os_train(*grpo_args(tiny_model_dir, data, out, "--max-steps", "1", "--overwrite"))
    text = " ".join((third.stdout + third.stderr).split())
    assert third.returncode == 0, text[-3000:]
    assert f"took over the lock of an earlier run in {out} (pid {first.pid}" in text and "that process is gone" in text
    assert (out / "adapter_model.safetensors").is_file()
    assert not (out / ".opensloth.lock").exists()  # released at exit


RACER = """
import sys, time
from opensloth.errors import UserError
from opensloth.rundir import RunLock
out, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:
    pass
try:
    lock = RunLock(out).acquire()
except UserError:
    print("refused")
else:
    print("got")
    time.sleep(2)  # hold it while the others try
    lock.release()
"""


def test_runs_that_start_together_get_the_lock_exactly_once(tmp_path):
    out = tmp_path / "fresh" / "run"  # not there yet: every racer also creates it
    start = time.time() + 3  # every racer imported and spinning by then
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(out), str(start)], stdout=subprocess.PIPE,
                               text=True, env=ENV) for _ in range(6)]
    results = sorted(p.communicate(timeout=60)[0].strip() for p in racers)
    assert results == ["got"] + ["refused"] * 5
    # No file is left (the winner released its lock; the losers wrote nothing). The directories go with the
    # winner's release unless a loser happened to create them first: then they stay, empty.
    assert [p for p in (tmp_path / "fresh").rglob("*") if p.is_file()] == []


# -- 3. a full disk ---------------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """mount(size) -> a directory on a tmpfs of that many bytes, or None where mount is not permitted."""
    mounts: list[Path] = []

    def mount(size: int) -> Path | None:
        where = tmp_path / f"fs{len(mounts)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            return None
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


def limit_file_size(limit: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes get EFBIG

    return preexec


def test_full_disk_at_the_final_save_keeps_the_previous_model(tiny_model_dir, data, tmp_path, small_fs):
    # A full fine-tune of the tiny model writes a 551 KB model.safetensors; 400 KB do not hold it.
    fs = small_fs(400 * 1024)
    preexec = None
    if fs is None:  # no mount here: a 400 KB file size limit fails the same write with EFBIG
        fs, preexec = tmp_path, limit_file_size(400 * 1024)
    out = fs / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the previous final model")
    (out / "config.json").write_text("{}")
    before = snapshot(out)
    proc = os_train(*sft_args(tiny_model_dir, data, out, "--max-steps", "1", "--full-finetune", "--overwrite"),
                    preexec_fn=preexec)
    text = assert_one_error(proc, f"while writing the final model to {out}: it needs about", "is free there",
                            "The files already there are unchanged", "No complete checkpoint exists yet")
    assert "No space left on device" in text or "File too large" in text
    after = snapshot(out)
    assert {k: after[k] for k in before} == before  # the previous model is kept as it was
    assert not [p for p in out.iterdir() if p.name.startswith(".saving-")]  # no half-written temp dir


@pytest.mark.parametrize("recipe", ["grpo", "sft"])
def test_full_disk_at_a_checkpoint_keeps_the_last_one(recipe, tiny_model_dir, data, small_fs):
    # One LoRA checkpoint of the tiny model takes about 250 KB (GRPO) or 210 KB (SFT, the HF Trainer's):
    # the filesystem holds the first and the run's small files, not a second.
    size = {"grpo": 420, "sft": 360}[recipe] * 1024
    fs = small_fs(size)
    if fs is None:
        pytest.skip("mount -t tmpfs is not permitted here, and a file size limit cannot let one checkpoint "
                    "through and stop the next (they are the same size)")
    out = fs / "run"
    args = grpo_args if recipe == "grpo" else sft_args
    proc = os_train(*args(tiny_model_dir, data, out, "--max-steps", "3", "--save-steps", "1", "--lora-r", "4"))
    assert_one_error(proc, "No space left on device while writing checkpoint-2 to", "it needs about",
                     f"The last checkpoint, {out / 'checkpoints' / 'checkpoint-1'}, is intact", "--resume")
    latest = ck.find_latest_checkpoint(out)
    assert latest is not None and latest.name == "checkpoint-1", "sizes changed: resize the tmpfs"
    assert ck.verify_checkpoint(latest) is None
    assert [p.name for p in (out / "checkpoints").iterdir() if p.is_dir()] == ["checkpoint-1"]  # no half one


# -- 4. a failed start does not block the retry -----------------------------------------------------------


def test_a_failed_start_leaves_nothing_and_the_corrected_command_succeeds(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    bad_modules = os_train(*sft_args(tiny_model_dir, data, out, "--max-steps", "1", "--target-modules", "foo_proj"))
    assert bad_modules.returncode != 0
    assert "foo_proj" in bad_modules.stdout + bad_modules.stderr
    assert not out.exists()

    corrupt = tmp_path / "corrupt_model"
    shutil.copytree(tiny_model_dir, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out.mkdir()  # an empty dir the user made: kept, and still empty
    bad_model = os_train(*sft_args(corrupt, data, out, "--max-steps", "1"))
    assert bad_model.returncode != 0
    assert out.is_dir() and not any(out.iterdir())

    fixed = os_train(*sft_args(tiny_model_dir, data, out, "--max-steps", "1"))
    assert fixed.returncode == 0, fixed.stdout[-3000:] + fixed.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / "config.yaml").is_file()


# -- 5. a busy --master-port ----------------------------------------------------------------------


def test_master_port_in_use_is_refused_before_workers_start(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = os_train(*sft_args(tiny_model_dir, data, out, "--max-steps", "1", "--devices", "cpu:2",
                                  "--master-port", port))
    assert_one_error(proc, f"--master-port {port} is already in use", "Pick another port",
                     "leave --master-port unset")
    assert not out.exists()
