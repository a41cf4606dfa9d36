"""Multi-worker runs through the real CLI on the CPU (gloo): equivalence, torchrun, failures, shards.

Every run is a real `os-train` subprocess with a tiny model. Processes are tagged with an
environment variable so the tests can find (and prove the absence of) every worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

TAG_ENV = "OPENSLOTH_TEST_TAG"
CLI = "from opensloth.cli.train import app; app()"


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> Path:
    from opensloth.data.synthetic import make_arithmetic_rows

    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in make_arithmetic_rows(32, seed=0, schema="openmath")))
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def sft_args(model: Path, rows: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", "--model", str(model), "--dataset", str(rows), "--format", "openmath-reasoning",
            "--cache-dir", str(cache), "--output-dir", str(out), "--max-steps", "2", "--seed", "3",
            "--learning-rate", "0.01", "--max-seq-length", "256", "--logging-steps", "1",
            "--report-to", "none", "--lora-r", "4", "--lora-alpha", "8", *extra]


def tagged_env(tag: str, **extra: str) -> dict[str, str]:
    return dict(os.environ, **{TAG_ENV: tag}, **extra)


def run_group(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run in a new session; on timeout the whole group is killed (no orphaned workers)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in tagged_processes(env[TAG_ENV]):
            os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[:4]} timed out after {timeout} s:\n{out[-2000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def os_train(args: list[str], tag: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return run_group([sys.executable, "-c", CLI, *args], tagged_env(tag, **env), timeout)


def tagged_processes(tag: str, variable: str = "") -> list[int]:
    """Live processes (not zombies) whose environment carries `tag` (and sets `variable`, when given,
    e.g. "OPENSLOTH_ROLLOUT_RANK=")."""
    found = []
    needle = f"{TAG_ENV}={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            if needle not in env or (variable and not any(v.startswith(variable.encode()) for v in env)):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


def worker_pid(tag: str, rank: int) -> int | None:
    for pid in tagged_processes(tag):
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
            cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        if b"opensloth.launch.worker" in cmd and f"RANK={rank}".encode() in env:
            return pid
    return None


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def logged(out: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row[key] for row in rows if key in row]


@pytest.fixture(scope="module")
def two_worker_run(tiny_model_dir, rows_file, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft2") / "out"
    result = os_train(sft_args(tiny_model_dir, rows_file, cache_dir, out, "--devices", "cpu:2",
                               "--per-device-train-batch-size", "2"), uuid.uuid4().hex)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[rank0]" in result.stdout and "[rank1]" not in result.stdout  # only rank 0 speaks
    return out


def test_sft_two_workers_match_one_worker_with_twice_the_batch(tiny_model_dir, rows_file, cache_dir, tmp_path,
                                                              two_worker_run):
    one = tmp_path / "one"
    result = os_train(sft_args(tiny_model_dir, rows_file, cache_dir, one, "--devices", "cpu",
                               "--per-device-train-batch-size", "4"), uuid.uuid4().hex)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    w1, w2 = adapter(one), adapter(two_worker_run)
    initial_b = [name for name in w1 if "lora_B" in name]
    assert initial_b and all(w1[name].abs().sum() > 0 for name in initial_b), "training did not move LoRA B"
    assert set(w1) == set(w2)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)
    # Adam hides a constant gradient scale; the logged loss and grad norm do not.
    for key in ("loss", "grad_norm"):
        assert logged(two_worker_run, key) == pytest.approx(logged(one, key), rel=1e-4), key


def test_torchrun_matches_the_builtin_launcher(tiny_model_dir, rows_file, cache_dir, tmp_path, two_worker_run):
    prepared = tmp_path / "prepared"
    args = sft_args(tiny_model_dir, rows_file, cache_dir, tmp_path / "unused", "--devices", "cpu:2",
                    "--per-device-train-batch-size", "2")
    args[0:1] = ["data", "sft"]  # data prep takes the same options (and ignores the training ones)
    result = os_train([*args, "--output-path", str(prepared), "--num-workers", "2"], uuid.uuid4().hex)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    out = tmp_path / "torchrun_out"
    config = yaml.safe_load((two_worker_run / "config.yaml").read_text())
    config["data"]["dataset"] = str(prepared)
    config["training"]["output_dir"] = str(out)
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config))
    tag = uuid.uuid4().hex
    run = run_group(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "opensloth.launch.worker", "--recipe", "sft", "--config", str(tmp_path / "sft.yaml")],
        tagged_env(tag), timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (out / "config.yaml").is_file()
    w_launcher, w_torchrun = adapter(two_worker_run), adapter(out)
    for name in w_launcher:
        torch.testing.assert_close(w_torchrun[name], w_launcher[name], rtol=1e-5, atol=1e-6, msg=name)
    assert tagged_processes(tag) == []


def test_worker_raising_in_its_first_step_ends_the_job(tiny_model_dir, rows_file, cache_dir, tmp_path):
    tag = uuid.uuid4().hex
    start = time.monotonic()
    result = os_train(sft_args(tiny_model_dir, rows_file, cache_dir, tmp_path / "out", "--devices", "cpu:2"),
                      tag, timeout=180, OPENSLOTH_FAULT_INJECT="rank=1,step=1")
    assert result.returncode != 0
    assert "worker rank 1 failed: RuntimeError: injected fault on rank 1" in result.stderr
    assert "[rank1] Traceback" in result.stderr  # the failing rank's own last lines are shown
    assert time.monotonic() - start < 150
    assert tagged_processes(tag) == []


def test_killing_a_worker_mid_training_ends_the_job_within_30s(tiny_model_dir, rows_file, cache_dir, tmp_path):
    tag, out = uuid.uuid4().hex, tmp_path / "out"
    args = sft_args(tiny_model_dir, rows_file, cache_dir, out, "--devices", "cpu:2", "--max-steps", "500")
    proc = _start_and_wait_for_a_step(args, tag, out, tmp_path / "log.txt")
    try:
        victim = worker_pid(tag, rank=1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        code = proc.wait(timeout=60)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    output = (tmp_path / "log.txt").read_text()
    assert code != 0
    assert elapsed < 30
    assert "worker rank 1 was killed by SIGKILL" in output
    assert tagged_processes(tag) == []


def test_prepared_dir_for_two_workers_refused_with_one(tiny_model_dir, rows_file, cache_dir, tmp_path):
    prepared = tmp_path / "prepared2"
    args = sft_args(tiny_model_dir, rows_file, cache_dir, tmp_path / "unused")
    args[0:1] = ["data", "sft"]
    result = os_train([*args, "--output-path", str(prepared), "--num-workers", "2"], uuid.uuid4().hex)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    args = sft_args(tiny_model_dir, prepared, cache_dir, out, "--devices", "cpu")
    result = os_train(args, uuid.uuid4().hex)
    assert result.returncode == 2
    assert "2" in result.stderr and "1" in result.stderr and "Traceback" not in result.stderr
    assert not (out / "adapter_model.safetensors").exists()


def _start_and_wait_for_a_step(args: list[str], tag: str, out: Path, log_path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CLI, *args], env=tagged_env(tag), stdout=log_path.open("w"),
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("training never logged a step:\n" + log_path.read_text()[-3000:])
        time.sleep(0.5)
    return proc


def test_ctrl_c_stops_every_worker(tiny_model_dir, rows_file, cache_dir, tmp_path):
    tag, out = uuid.uuid4().hex, tmp_path / "out"
    args = sft_args(tiny_model_dir, rows_file, cache_dir, out, "--devices", "cpu:2", "--max-steps", "500")
    proc = _start_and_wait_for_a_step(args, tag, out, tmp_path / "log.txt")
    try:
        proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends to the launcher
        code = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = (tmp_path / "log.txt").read_text()
    assert code == 130, output[-3000:]
    assert "Stopping the workers" in output
    assert "Stopped at step" in output and "continue with --resume" in output  # where, and how to go on
    assert not (out / "adapter_config.json").exists()
    assert tagged_processes(tag) == []


@pytest.mark.skipif(subprocess.run(["which", "tmux"], capture_output=True).returncode != 0,
                    reason="tmux is not installed")
def test_ctrl_c_in_a_tmux_pane_stops_the_job_with_a_checkpoint(tiny_model_dir, rows_file, cache_dir, tmp_path):
    """--launcher tmux: Ctrl-C typed in rank 0's pane reaches that worker; every worker saves and
    stops, and the launcher says so and exits 130 (not a 'worker failed')."""
    tag, out = uuid.uuid4().hex, tmp_path / "out"
    args = sft_args(tiny_model_dir, rows_file, cache_dir, out, "--devices", "cpu:2", "--max-steps", "500",
                    "--launcher", "tmux")
    proc = _start_and_wait_for_a_step(args, tag, out, tmp_path / "log.txt")
    try:
        session = f"opensloth-{proc.pid}"
        subprocess.run(["tmux", "send-keys", "-t", f"{session}.0", "C-c"], check=True)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = (tmp_path / "log.txt").read_text()
    assert code == 130, output[-3000:]
    assert "Stopped at step" in output and "continue with --resume" in output, output[-3000:]
    assert (out / "checkpoints").is_dir() and not (out / "adapter_config.json").exists()
    assert tagged_processes(tag) == []


def test_grpo_two_workers_train_and_rank0_saves(tiny_model_dir, cache_dir, tmp_path):
    from opensloth.data.synthetic import make_arithmetic_rows

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in make_arithmetic_rows(16, seed=0, schema="dapo")))
    out, tag = tmp_path / "out", uuid.uuid4().hex
    result = os_train(["grpo", "--model", str(tiny_model_dir), "--dataset", str(prompts), "--task", "math",
                       "--cache-dir", str(cache_dir), "--output-dir", str(out), "--devices", "cpu:2",
                       "--max-steps", "2", "--rollout-batch-size", "4", "--group-size", "2",
                       "--max-new-tokens", "8", "--report-to", "none", "--lora-r", "4", "--log-completions"], tag)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # --log-completions (TRL's): every completion of each logged step, both workers' (4 prompts x 2), by rank 0.
    logged = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1] * 8 + [2] * 8
    assert all(len({json.dumps(r["prompt"]) for r in logged if r["step"] == s}) == 4 for s in (1, 2))
    assert "2 prompts per worker" in " ".join(result.stdout.replace("│", " ").split())  # the plan may wrap it
    assert "[rank1]" not in result.stdout + result.stderr
    assert [row["step"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    assert (out / "adapter_model.safetensors").is_file() and (out / "config.yaml").is_file()
    assert tagged_processes(tag) == []
