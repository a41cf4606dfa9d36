"""The launch layer without training: devices, output-dir guard, dry run, fault-spec parsing, failure text."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opensloth.config import resolve_config
from opensloth.errors import UserError
from opensloth.launch import check_batch, check_output_dir, resolve_devices
from opensloth.launch.procs import describe_failure, stop_all, worker_env
from opensloth.launch.worker import parse_fault_spec


def _cfg(recipe="sft", **overrides):
    return resolve_config(recipe, None, {"model": "m", "dataset": "d.jsonl", **overrides})


def test_resolve_devices():
    assert resolve_devices("cpu", gpu_count=4) == ["cpu"]
    assert resolve_devices("cpu:3", gpu_count=4) == ["cpu", "cpu", "cpu"]
    assert resolve_devices("auto", gpu_count=0) == ["cpu"]
    assert resolve_devices("auto", gpu_count=2) == [0, 1]
    assert resolve_devices("0,1,3", gpu_count=4) == [0, 1, 3]


def test_bad_gpu_ids_name_the_visible_gpus():
    with pytest.raises(UserError, match=r"--devices 0,5: no GPU with id 5\. Visible GPUs: 0, 1"):
        resolve_devices("0,5", gpu_count=2)
    with pytest.raises(UserError, match="no CUDA GPU is visible here. Use --devices cpu"):
        resolve_devices("0", gpu_count=0)


def test_grpo_prompts_must_split_evenly():
    check_batch(_cfg("grpo", rollout_batch_size=8), 4)
    with pytest.raises(UserError, match="--rollout-batch-size 6 .* 4 workers"):
        check_batch(_cfg("grpo", rollout_batch_size=6), 4)


def test_output_dir_guard(tmp_path):
    out = tmp_path / "run"
    check_output_dir(_cfg(output_dir=str(out)))  # missing: fine
    out.mkdir()
    check_output_dir(_cfg(output_dir=str(out)))  # empty: fine
    (out / "adapter_model.safetensors").write_text("precious")
    with pytest.raises(UserError, match="is not empty. Pass --overwrite"):
        check_output_dir(_cfg(output_dir=str(out)))
    check_output_dir(_cfg(output_dir=str(out), overwrite=True))
    check_output_dir(_cfg(output_dir=str(out), resume=True))
    assert (out / "adapter_model.safetensors").read_text() == "precious"


def _os_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cli = "from opensloth.cli.train import app; app()"
    return subprocess.run([sys.executable, "-c", cli, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_dry_run_prints_config_and_plan_and_writes_nothing(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"text": "hello"}\n')
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _os_train("sft", "--model", "some/model", "--dataset", "rows.jsonl", "--devices", "cpu:2",
                       "--output-dir", "out", "--learning-rate", "0.003", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "learning_rate: 0.003" in result.stdout  # the resolved config, as YAML
    assert "devices" in result.stdout and "2 workers" in result.stdout
    assert "4 sequences per step" in result.stdout  # 2 per micro-batch x 1 x 2 workers
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_refuses_non_empty_output_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _os_train("sft", "--model", "m", "--dataset", "rows.jsonl", "--devices", "cpu",
                       "--output-dir", str(out), "--dry-run", cwd=tmp_path)
    assert result.returncode == 2
    assert "is not empty. Pass --overwrite" in result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_fault_spec():
    assert parse_fault_spec("rank=1,step=2") == {"rank": "1", "step": "2", "kind": "raise"}
    assert parse_fault_spec("rank=0,step=1,kind=kill")["kind"] == "kill"
    with pytest.raises(ValueError, match="expected rank=R,step=S"):
        parse_fault_spec("rank=1")


def test_describe_failure(tmp_path):
    missing = tmp_path / "none.json"
    assert describe_failure(1, -signal.SIGKILL, missing)[0].startswith("worker rank 1 was killed by SIGKILL")
    assert describe_failure(2, 137, missing)[0].startswith("worker rank 2 was killed by SIGKILL")
    assert describe_failure(0, 3, missing) == ("worker rank 0 exited with status 3", False)
    record = tmp_path / "rank1.json"
    record.write_text('{"type": "RuntimeError", "message": "boom", "user_error": false}')
    assert describe_failure(1, 1, record) == ("worker rank 1 failed: RuntimeError: boom", False)
    record.write_text('{"type": "UserError", "message": "--rewards foo: unknown", "user_error": true}')
    assert describe_failure(1, 2, record) == ("--rewards foo: unknown", True)


def test_worker_env_pins_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    env = worker_env(1, 2, 2, 29555, tmp_path / "e.json")
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_PORT"]) == ("1", "2", "1", "29555")
    assert env["CUDA_VISIBLE_DEVICES"] == "6"  # id 2 among the GPUs the user made visible
    assert worker_env(0, 2, "cpu", 29555, tmp_path / "e.json")["CUDA_VISIBLE_DEVICES"] == ""


def test_cpu_workers_split_the_cores_among_the_processes_that_compute_together(tmp_path, monkeypatch):
    """Rollout workers overlapping the trainers (--max-staleness >= 1) share the cores with them: with a thread
    count sized by the trainers alone, 1 trainer + 1 rollout worker on 2 cores ran 12 steps in 109 s, not 13."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert worker_env(0, 2, "cpu", 29555, tmp_path / "e.json")["OMP_NUM_THREADS"] == "4"  # two trainers
    assert worker_env(3, 2, "cpu", 29555, tmp_path / "e.json", cpu_sharers=4)["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
    assert worker_env(0, 2, "cpu", 29555, tmp_path / "e.json", cpu_sharers=4)["OMP_NUM_THREADS"] == "3"


def test_stop_all_kills_the_whole_process_group():
    # A worker that ignores SIGTERM and has a child of its own: both must be gone.
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('ready', flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout.readline().strip() == b"ready"
    stop_all([proc], grace=0.5)
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 5  # SIGKILL is delivered asynchronously to the grandchild
    while _live_in_group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _live_in_group(proc.pid) == []


def _live_in_group(pgid: int) -> list[int]:
    """Processes of a process group that still run (zombies waiting for init to reap them are dead)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


def test_a_worker_user_error_reaches_the_launcher_as_one_message(tmp_path):
    # Real worker processes that fail in setup: the worker's UserError comes back as the launcher's.
    from opensloth.config import dump_config
    from opensloth.launch.procs import run_workers

    config = tmp_path / "config.yaml"
    dump_config(_cfg(output_dir=str(tmp_path / "out"), devices="cpu:2"), config)
    start = time.monotonic()
    with pytest.raises(UserError, match=r"--prepared .*missing: not a directory\. Prepare the data first"):
        run_workers("sft", config, tmp_path / "missing", ["cpu", "cpu"])
    assert time.monotonic() - start < 60


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_tmux_launcher_reports_a_failing_pane(tmp_path):
    from opensloth.config import dump_config
    from opensloth.launch.procs import run_workers

    config = tmp_path / "config.yaml"
    dump_config(_cfg(output_dir=str(tmp_path / "out"), devices="cpu:2"), config)
    with pytest.raises(UserError, match=r"--prepared .*missing: not a directory"):
        run_workers("sft", config, tmp_path / "missing", ["cpu", "cpu"], launcher="tmux")
    sessions = subprocess.run(["tmux", "list-sessions"], capture_output=True, text=True).stdout
    assert f"opensloth-{os.getpid()}:" not in sessions  # the launcher closed its session


def test_dry_run_reports_cache_miss_then_hit_without_writing(tiny_model_dir, tmp_path):
    from opensloth.data.synthetic import make_arithmetic_rows

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in make_arithmetic_rows(8, seed=0, schema="openmath")))
    common = ["--model", str(tiny_model_dir), "--dataset", str(rows), "--format", "openmath-reasoning",
              "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out")]
    miss = _os_train("sft", *common, "--dry-run", cwd=tmp_path)
    assert miss.returncode == 0, miss.stderr
    assert "cache miss" in miss.stdout
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
    prepared = _os_train("data", "sft", *common, cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    hit = _os_train("sft", *common, "--dry-run", cwd=tmp_path)
    assert "cache hit" in hit.stdout
    assert not (tmp_path / "out").exists()


def test_worker_under_torchrun_refuses_shards_for_another_world_size(tiny_model_dir, tmp_path):
    # The worker started directly (as torchrun would, WORLD_SIZE=1) on data sharded for 2 workers.
    from opensloth.config import dump_config
    from opensloth.data import prepare_sft_dataset
    from opensloth.data.synthetic import make_arithmetic_rows
    from opensloth.models import load_tokenizer

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in make_arithmetic_rows(8, seed=0, schema="openmath")))
    cfg = _cfg(model=str(tiny_model_dir), dataset=str(rows), format="openmath-reasoning",
               cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"))
    prepared = prepare_sft_dataset(cfg, load_tokenizer(str(tiny_model_dir)), num_shards=2)
    dump_config(cfg, tmp_path / "cfg.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENSLOTH_")}
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29599")
    result = subprocess.run([sys.executable, "-m", "opensloth.launch.worker", "--recipe", "sft", "--config",
                             str(tmp_path / "cfg.yaml"), "--prepared", str(prepared.path)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "was prepared for 2 workers but this run has 1" in result.stderr
    assert not (tmp_path / "out").exists()
