"""--rollout-devices / --max-staleness (issue 22): rollout workers on their own (here: CPU) processes.

Real `os-train grpo` subprocesses with the tiny model, real gloo, a real SIGKILL. K = 0 must give the
colocated run's completions and losses (and so must a --resume with rollout workers); K = 1 trains two
workers from one rollout worker and logs the staleness and correction metrics; a killed rollout worker
ends the job at once, named, with no process left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from opensloth.config import resolve_config
from opensloth.errors import UserError
from opensloth.launch import resolve_rollout_devices
from opensloth.recipes.grpo_rollout import LOST_AFTER_SECONDS
from test_launch_multiworker import TAG_ENV, tagged_processes  # the process tagging both files use

pytestmark = pytest.mark.slow

CLI = "from opensloth.cli.train import app; app()"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    from opensloth.data.synthetic import make_arithmetic_rows

    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_arithmetic_rows(16, seed=0, schema="dapo")))
    return path


def grpo_args(model: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    # length_penalty separates the completions of a group, so the advantages and the updates are not 0.
    return ["grpo", "--model", str(model), "--dataset", str(prompts), "--rewards", "length_penalty",
            "--cache-dir", str(out.parent / "cache"), "--output-dir", str(out), "--rollout-batch-size", "2",
            "--group-size", "4", "--max-new-tokens", "12", "--report-to", "none", "--lora-r", "4",
            "--logging-steps", "1", "--seed", "5", "--learning-rate", "0.05", "--log-completions", *extra]


def os_train(args: list[str], tag: str, timeout: float = 120, **env_extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, **{TAG_ENV: tag, "CUDA_VISIBLE_DEVICES": ""}, **env_extra)
    return subprocess.run([sys.executable, "-c", CLI, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def start_past_step_1(args: list[str], tag: str, out: Path) -> subprocess.Popen:
    """`os-train` in a session of its own, returned once it has logged step 1 to out/metrics.jsonl (so its
    workers are all up); killed, with the test failed, if it exits or takes more than 90 s first."""
    env = dict(os.environ, **{TAG_ENV: tag, "CUDA_VISIBLE_DEVICES": ""})
    proc = subprocess.Popen([sys.executable, "-c", CLI, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 90
    try:
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, "the run never got to step 1"
            time.sleep(0.2)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_same_run(a: Path, b: Path, steps: list[int]) -> None:
    """Same completions and same losses/rewards (to 1e-6) on the given steps."""
    ma = {r["step"]: r for r in rows(a / "metrics.jsonl")}
    mb = {r["step"]: r for r in rows(b / "metrics.jsonl")}
    for step in steps:
        for key in ("loss", "reward", "reward_std", "kl", "completions/mean_length", "grad_norm"):
            assert mb[step][key] == pytest.approx(ma[step][key], abs=1e-6), (step, key)
    ca = [(r["step"], r["completion"]) for r in rows(a / "completions.jsonl") if r["step"] in steps]
    cb = [(r["step"], r["completion"]) for r in rows(b / "completions.jsonl") if r["step"] in steps]
    assert ca == cb and len(ca) == 8 * len(steps)


def test_bad_rollout_devices_are_refused_before_anything_starts(tiny_model_dir, tmp_path):
    def refused(devices: list, **options) -> str:
        cfg = resolve_config("grpo", None, {"model": str(tiny_model_dir), **options})
        with pytest.raises(UserError) as info:
            resolve_rollout_devices(cfg, devices, gpu_count=4)
        return str(info.value)

    assert "overlaps --devices" in refused([0, 1], rollout_devices="1,2", rollout_engine="hf")
    assert "no GPU with id 7" in refused([0, 1], rollout_devices="7", rollout_engine="hf")
    assert "scale-rewards batch" in refused(["cpu"], rollout_devices="cpu:1", scale_rewards="batch")
    assert "at most as many" in refused(["cpu"], rollout_devices="cpu:2")
    assert "needs --rollout-devices" in refused(["cpu"], max_staleness=1)
    assert "--launcher tmux does not start rollout workers" in refused(["cpu"], rollout_devices="cpu:1",
                                                                       launcher="tmux")
    for engine in ("hf", "vllm", "auto"):  # the rollout workers run the engine (tests/test_rollout_vllm.py)
        cfg = resolve_config("grpo", None, {"model": str(tiny_model_dir), "rollout_devices": "2,3",
                                            "rollout_engine": engine})
        assert resolve_rollout_devices(cfg, [0, 1], gpu_count=4) == [2, 3]
    # Through the CLI: one Error line, nothing written.
    out = tmp_path / "out"
    result = os_train(["grpo", "--model", str(tiny_model_dir), "--devices", "cpu", "--rollout-devices", "cpu:0",
                       "--output-dir", str(out)], uuid.uuid4().hex)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "Error:" in result.stderr and "N >= 1" in result.stderr and not out.exists()


def test_k0_reproduces_the_colocated_run_and_resumes(tiny_model_dir, prompts, tmp_path):
    tag = uuid.uuid4().hex
    colocated, remote, resumed = tmp_path / "colocated", tmp_path / "remote", tmp_path / "resumed"
    result = os_train(grpo_args(tiny_model_dir, prompts, colocated, "--devices", "cpu", "--max-steps", "3"), tag)
    assert result.returncode == 0, result.stderr[-3000:]
    result = os_train(grpo_args(tiny_model_dir, prompts, remote, "--devices", "cpu", "--max-steps", "3",
                                "--rollout-devices", "cpu:1", "--save-steps", "1"), tag)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_same_run(colocated, remote, [1, 2, 3])
    metrics = rows(remote / "metrics.jsonl")
    assert [m["rollout/staleness"] for m in metrics] == [0.0, 0.0, 0.0]
    assert metrics[0]["rollout/weight_sync_bytes"] > 0 and metrics[-1]["rollout/weight_sync_bytes"] == 0  # none after the last
    assert sum(m["loss"] != 0 for m in metrics) >= 2  # the comparison is about real updates
    # --resume with rollout workers from the step-1 checkpoint: the policy version, the sampler's position
    # and the random stream come back, so steps 2 and 3 are the uninterrupted run's.
    resumed.mkdir()
    shutil.copytree(remote / "checkpoints" / "checkpoint-1", resumed / "checkpoints" / "checkpoint-1")
    shutil.copy(remote / "config.yaml", resumed / "config.yaml")
    result = os_train(grpo_args(tiny_model_dir, prompts, resumed, "--devices", "cpu", "--max-steps", "3",
                                "--rollout-devices", "cpu:1", "--resume"), tag)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [m["step"] for m in rows(resumed / "metrics.jsonl")] == [2, 3]
    assert_same_run(colocated, resumed, [2, 3])
    assert tagged_processes(tag) == []


@pytest.mark.parametrize("k", [1, 2])
def test_k_ahead_trains_two_workers_from_one_rollout_worker(tiny_model_dir, prompts, tmp_path, k):
    tag, out = uuid.uuid4().hex, tmp_path / f"k{k}"
    result = os_train(grpo_args(tiny_model_dir, prompts, out, "--devices", "cpu:2", "--max-steps", "4",
                                "--rollout-devices", "cpu:1", "--max-staleness", str(k)), tag)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = rows(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # Batch m from version max(0, m - 1 - K): K = 1: 0, 1, 1, 1 behind; K = 2: 0, 1, 2, 2 (batches 2 and 3
    # both made from the start, so up to 2 x (K + 1) hand-overs to the two trainers are pending at once).
    expected = [float(min(m - 1, k)) for m in (1, 2, 3, 4)]
    assert [m["rollout/staleness"] for m in metrics] == expected
    assert metrics[-1]["rollout/staleness_mean"] == pytest.approx(sum(expected) / 4)
    assert all(m["rollout/samples_dropped"] == 0 for m in metrics)
    for key in ("rollout/trainer_idle_fraction", "rollout/rollout_idle_fraction"):
        assert all(0 <= m[key] <= 1 for m in metrics), key
    assert metrics[0]["rollout/weight_sync_seconds"] > 0 and metrics[0]["rollout/weight_sync_bytes"] > 0
    # The behaviour policy's log-probs reach the loss: equal to the trainer's while fresh, apart once stale.
    assert metrics[0]["rollout/logprob_diff_max"] == pytest.approx(0.0, abs=1e-5)
    assert metrics[1]["rollout/logprob_diff_max"] > 1e-3
    assert (out / "adapter_model.safetensors").is_file()
    assert tagged_processes(tag) == []


def test_a_killed_rollout_worker_ends_the_job(tiny_model_dir, prompts, tmp_path):
    tag, out = uuid.uuid4().hex, tmp_path / "killed"
    proc = start_past_step_1(grpo_args(tiny_model_dir, prompts, out, "--devices", "cpu", "--max-steps", "500",
                                       "--rollout-devices", "cpu:1"), tag, out)
    try:
        (victim,) = tagged_processes(tag, "OPENSLOTH_ROLLOUT_RANK=")
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - killed < 30
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2
    assert "Error: rollout worker rank 1 was killed by SIGKILL" in err, err[-3000:]
    time.sleep(0.5)
    assert tagged_processes(tag) == []


def test_sigterm_saves_a_checkpoint_and_resume_continues_with_rollout_workers(tiny_model_dir, prompts, tmp_path):
    tag, out = uuid.uuid4().hex, tmp_path / "stopped"
    args = grpo_args(tiny_model_dir, prompts, out, "--devices", "cpu", "--rollout-devices", "cpu:1",
                     "--max-staleness", "1")
    proc = start_past_step_1([*args, "--max-steps", "500"], tag, out)
    try:
        proc.send_signal(signal.SIGTERM)  # what the launcher does on Ctrl-C too
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "continue with --resume" in err, err[-3000:]
    (checkpoint,) = (out / "checkpoints").iterdir()
    saved = int(checkpoint.name.split("-")[1])
    time.sleep(0.5)
    assert tagged_processes(tag) == []
    result = os_train([*args, "--max-steps", str(saved + 2), "--resume"], tag)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resumed = [m for m in rows(out / "metrics.jsonl") if m["step"] > saved]
    # The restored version generates the first batch (fresh), the next is one version behind.
    assert [(m["step"], m["rollout/staleness"]) for m in resumed] == [(saved + 1, 0.0), (saved + 2, 1.0)]
    assert (out / "adapter_model.safetensors").is_file()
    assert tagged_processes(tag) == []


def test_a_dead_training_worker_stops_the_rollout_workers(tiny_model_dir, prompts, tmp_path):
    tag, out = uuid.uuid4().hex, tmp_path / "trainer_died"
    env = dict(os.environ, **{TAG_ENV: tag, "CUDA_VISIBLE_DEVICES": "",
                              "OPENSLOTH_FAULT_INJECT": "rank=0,step=2,kind=kill"})
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", CLI, *grpo_args(tiny_model_dir, prompts, out, "--devices", "cpu",
                                                                   "--max-steps", "4", "--rollout-devices", "cpu:1")],
                            env=env, capture_output=True, text=True, timeout=90)
    assert result.returncode == 2 and time.monotonic() - start < 60
    assert "Error: worker rank 0 was killed by SIGKILL" in result.stderr, result.stderr[-3000:]
    time.sleep(0.5)
    assert tagged_processes(tag) == []


@pytest.mark.parametrize("victim,watcher", [("rollout", "rollout worker rank 1"), ("trainer", "training worker rank 0")])
def test_a_hung_peer_ends_the_job_within_30_s(tiny_model_dir, prompts, tmp_path, victim, watcher):
    """SIGSTOP (a process that no longer runs, as a hang holding the interpreter or a lost machine looks):
    the peers watching its heartbeat end the job, naming it, long before --collective-timeout (600 s)."""
    tag, out = uuid.uuid4().hex, tmp_path / f"hung_{victim}"
    proc = start_past_step_1(grpo_args(tiny_model_dir, prompts, out, "--devices", "cpu", "--max-steps", "500",
                                       "--rollout-devices", "cpu:1"), tag, out)
    try:
        rollout = tagged_processes(tag, "OPENSLOTH_ROLLOUT_RANK=")
        workers = tagged_processes(tag, "OPENSLOTH_ERROR_FILE=")
        (target,) = rollout if victim == "rollout" else sorted(set(workers) - set(rollout))
        os.kill(target, signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = proc.communicate(timeout=40)
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2 and took < 30, (took, err[-3000:])
    assert f"{watcher} stopped answering: no heartbeat for {LOST_AFTER_SECONDS:.0f} s" in err, err[-3000:]
    time.sleep(0.5)
    assert tagged_processes(tag) == []


def torchrun_two_nodes(config: Path, env: dict, *extra: str) -> tuple[list[int], list[str]]:
    """Two torchrun "nodes" of one process each on localhost: node 0 rolls out, node 1 trains.
    Returns their exit codes and outputs."""
    from opensloth.launch.procs import free_port

    port, nodes = free_port(), []
    for node_rank, role in ((0, "rollout"), (1, "train")):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
                   "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                   "-m", "opensloth.launch.worker", "--recipe", "grpo", "--config", str(config), *extra]
        nodes.append(subprocess.Popen(command, env=dict(env, OPENSLOTH_ROLE=role, CUDA_VISIBLE_DEVICES=""),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    try:
        logs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    return [node.returncode for node in nodes], logs


def test_the_torchrun_two_node_layout_reproduces_the_colocated_run(tiny_model_dir, prompts, tmp_path):
    """Two torchrun "nodes" on localhost: node 0 rolls out (OPENSLOTH_ROLE=rollout, so torchrun rank 0 is the
    rollout worker), node 1 trains (torchrun rank 1 becomes training rank 0). At K = 0 it is the colocated run."""
    import yaml

    tag = uuid.uuid4().hex
    colocated, prepared, out = tmp_path / "colocated", tmp_path / "prepared", tmp_path / "torchrun"
    threads = {"OMP_NUM_THREADS": "1"}  # the same numerics in every process of both runs
    result = os_train(grpo_args(tiny_model_dir, prompts, colocated, "--devices", "cpu", "--max-steps", "3"), tag,
                      **threads)
    assert result.returncode == 0, result.stderr[-3000:]
    data_args = grpo_args(tiny_model_dir, prompts, tmp_path / "unused")
    data_args[0:1] = ["data", "grpo"]
    result = os_train([*data_args, "--output-path", str(prepared), "--num-workers", "1"], tag)
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((colocated / "config.yaml").read_text())
    config["data"]["dataset"], config["training"]["output_dir"] = str(prepared), str(out)
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(config))

    codes, logs = torchrun_two_nodes(tmp_path / "grpo.yaml", dict(os.environ, **{TAG_ENV: tag, **threads}))
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert_same_run(colocated, out, [1, 2, 3])
    assert [m["rollout/staleness"] for m in rows(out / "metrics.jsonl")] == [0.0, 0.0, 0.0]
    assert (out / "adapter_model.safetensors").is_file() and (out / "config.yaml").is_file()
    time.sleep(0.5)
    assert tagged_processes(tag) == []


def test_torchrun_roles_are_checked_before_anything_starts(tiny_model_dir, tmp_path):
    """OPENSLOTH_ROLE outside a GRPO torchrun job, and --rollout-devices under torchrun, are one Error each."""
    from opensloth.recipes.grpo_rollout import assign_torchrun_roles

    cfg = resolve_config("grpo", None, {"model": str(tiny_model_dir)})
    env = {"WORLD_SIZE": "2", "RANK": "0", "OPENSLOTH_ROLE": "rollout"}  # no torchrun agent
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        with pytest.raises(UserError, match="not started by torchrun"):
            assign_torchrun_roles(cfg)
        mp.setenv("OPENSLOTH_ROLE", "generator")
        with pytest.raises(UserError, match="expected train or rollout"):
            assign_torchrun_roles(cfg)
        mp.setenv("OPENSLOTH_ROLE", "rollout")
        mp.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
        sft = resolve_config("sft", None, {"model": str(tiny_model_dir)})
        with pytest.raises(UserError, match="recipe sft"):
            assign_torchrun_roles(sft)
        remote = resolve_config("grpo", None, {"model": str(tiny_model_dir), "rollout_devices": "cpu:1"})
        with pytest.raises(UserError, match="is for os-train"):
            assign_torchrun_roles(remote)


@pytest.mark.parametrize("roles,option,message", [
    ("rollout", [], "every torchrun rank has OPENSLOTH_ROLE=rollout: no rank is left to train"),
    ("train", ["--max-staleness", "1"], "--max-staleness 1 needs rollout workers: under torchrun set OPENSLOTH_ROLE"),
])
def test_torchrun_role_mistakes_are_one_error(tiny_model_dir, prompts, tmp_path, roles, option, message):
    """Found by trying: every rank told to roll out, and a staleness bound with nobody rolling out."""
    import yaml

    cfg = resolve_config("grpo", None, {"model": str(tiny_model_dir), "dataset": str(prompts),
                                        "output_dir": str(tmp_path / "out"), "devices": "cpu"})
    if option:
        cfg.grpo.max_staleness = int(option[1])
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    tag = uuid.uuid4().hex
    env = dict(os.environ, **{TAG_ENV: tag, "CUDA_VISIBLE_DEVICES": "", "OPENSLOTH_ROLE": roles})
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "opensloth.launch.worker", "--recipe", "grpo", "--config", str(tmp_path / "grpo.yaml"),
                             "--prepared", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"Error: {message}" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out").exists()
    assert tagged_processes(tag) == []


def test_the_heartbeat_passes_a_peers_failure_on_and_lets_a_finished_peer_go(monkeypatch):
    """Over a real TCPStore: a peer that records an error ends its watcher with that error within a beat
    or two; a peer that finished ("ok") is no longer watched, so its silence is not a hang."""
    import queue
    from datetime import timedelta

    import torch.distributed as dist

    from opensloth.recipes.grpo_rollout import BEAT_SECONDS, LINK_PORT_ENV, Heartbeat

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    monkeypatch.setenv(LINK_PORT_ENV, str(server.port))
    lost: queue.Queue = queue.Queue()
    peers = {1: "rollout worker rank 1", 2: "rollout worker rank 2"}
    watcher = Heartbeat(0, peers, lost.put).start()
    finished, failing = Heartbeat(1, {}, lost.put).start(), Heartbeat(2, {}, lost.put).start()
    time.sleep(3 * BEAT_SECONDS)  # every one has beaten: both peers are watched
    finished.finish("ok")
    time.sleep(3 * BEAT_SECONDS)
    assert lost.empty()  # rank 1 left cleanly
    failing.finish("RuntimeError: CUDA error: an illegal memory access was encountered")
    message = lost.get(timeout=5 * BEAT_SECONDS)
    assert message == "rollout worker rank 2 failed: RuntimeError: CUDA error: an illegal memory access was encountered"
    assert watcher.peers == {}
    for heartbeat in (watcher, finished, failing):
        heartbeat.stop()
    assert lost.empty()


def test_under_torchrun_a_trainer_error_reaches_the_rollout_node(tiny_model_dir, prompts, tmp_path):
    """Found by trying: data prepared for trainers + rollout workers (2 shards) with one trainer. The trainer
    stops with the count to use; the rollout worker on the other node, which torchrun alone would leave
    waiting, ends within seconds carrying that error (the heartbeat's exit record)."""
    import yaml

    tag, prepared = uuid.uuid4().hex, tmp_path / "prepared"
    data_args = grpo_args(tiny_model_dir, prompts, tmp_path / "unused")
    data_args[0:1] = ["data", "grpo"]
    assert os_train([*data_args, "--output-path", str(prepared), "--num-workers", "2"], tag).returncode == 0
    cfg = resolve_config("grpo", None, {"model": str(tiny_model_dir), "dataset": str(prepared), "devices": "cpu",
                                        "rewards": ["length_penalty"], "output_dir": str(tmp_path / "out")})
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    start = time.monotonic()
    codes, (rollout_log, train_log) = torchrun_two_nodes(tmp_path / "grpo.yaml", dict(os.environ, **{TAG_ENV: tag}))
    assert codes[0] != 0 and codes[1] != 0 and time.monotonic() - start < 120
    assert "was prepared for 2 workers but this run has 1" in train_log, train_log[-3000:]
    assert "Count the training ranks only: the 1 rank with OPENSLOTH_ROLE=rollout" in train_log
    assert "Error: training worker rank 0 failed: UserError: --dataset" in rollout_log, rollout_log[-3000:]
    assert not (tmp_path / "out").exists()
    time.sleep(0.5)
    assert tagged_processes(tag) == []
