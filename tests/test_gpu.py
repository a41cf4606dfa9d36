"""The CUDA paths: the Unsloth backend and NCCL through the real `os-train` CLI, and bench/gpu_grpo.py.

Everything that needs CUDA skips cleanly without it (the Unsloth tests also skip when unsloth
does not import). The benchmark's --tiny mode runs on the CPU too, so the GPU benchmark's code
(workload build, forced completion length, phase timings, FLOPs count) is tested here.
The rollout-worker sides (ours-rollout-k0/k1) run as cpu + cpu:1 here; their 2-GPU layout is not tested.
The static-cache vs dynamic-cache greedy equality of the hf engine lives in test_rollout_hf.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _unsloth_reason() -> str:
    """Why the Unsloth tests cannot run here ("" when they can), asked in a child process: importing
    unsloth patches transformers for the whole process, and the other tests in this session (the
    hf engine's, on the CPU too) must run on plain transformers."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    code = ("import torch; from opensloth.models.loading import unsloth_usable; "
            "usable, reason = unsloth_usable(torch.device('cuda')); print('REASON=' + ('' if usable else reason))")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    answers = [line[len("REASON="):] for line in proc.stdout.splitlines() if line.startswith("REASON=")]
    if proc.returncode != 0 or not answers:  # unsloth prints banners: read only our line
        return "checking unsloth failed: " + (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return answers[-1]


def needs_unsloth(test):
    """Skip unless CUDA is present and unsloth imports (checked at collection, without importing it on CPU)."""
    reason = _unsloth_reason()
    return pytest.mark.skipif(bool(reason), reason=reason or "unsloth usable")(test)


def os_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`os-train` in a fresh process, as a user runs it."""
    env = {**os.environ, "OPENSLOTH_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-c", "from opensloth.cli.train import app; app()", *args], cwd=cwd,
                          env=env, check=False, capture_output=True, text=True, timeout=900)


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 with 64-wide heads (the head size fused kernels are tuned for)."""
    from opensloth.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("gpu_model"), hidden_size=128, num_layers=2, num_heads=2,
                            num_kv_heads=2, seed=0)


@pytest.fixture(scope="module")
def sft_rows(tmp_path_factory) -> Path:
    from opensloth.data.synthetic import make_arithmetic_rows, write_rows

    return write_rows(make_arithmetic_rows(64, seed=0, schema="openmath"),
                      tmp_path_factory.mktemp("gpu_sft") / "rows.jsonl")


@pytest.fixture(scope="module")
def grpo_prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gpu_grpo") / "add.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", "--model", str(model), "--dataset", str(data), "--format", "openmath-reasoning",
            "--system-prompt", "Think, then answer.", "--devices", "0", "--output-dir", str(out),
            "--max-steps", "24", "--per-device-train-batch-size", "8", "--learning-rate", "1e-2",
            "--lr-scheduler-type", "constant", "--max-seq-length", "256", "--lora-r", "8", "--seed", "0",
            "--report-to", "none", *extra]


def grpo_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["grpo", "--model", str(model), "--dataset", str(data), "--format", "prompt-answer",
            "--output-dir", str(out), "--devices", "0", "--rewards", "math_answer,math_format",
            "--group-size", "4", "--rollout-batch-size", "4", "--max-new-tokens", "16",
            "--per-device-train-batch-size", "16", "--learning-rate", "1e-2", "--lora-r", "4", "--seed", "3",
            "--max-steps", "3", "--print-sample-every", "0", "--report-to", "none", *extra]


def assert_sft_learned(out: Path, proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    losses = [row["loss"] for row in read_metrics(out) if "loss" in row]
    assert len(losses) == 24 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) < sum(losses[:4]), losses  # LoRA on a random model still fits the format


def assert_grpo_ran(out: Path, proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    rows = [row for row in read_metrics(out) if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0
        assert 1 <= row["completions/mean_length"] <= 16


# -- NCCL: one CUDA worker through the launcher ---------------------------------------------------


@needs_cuda
@pytest.mark.slow
def test_sft_on_one_gpu_through_the_launcher(gpu_model_dir, sft_rows, tmp_path):
    out = tmp_path / "sft"
    assert_sft_learned(out, os_train(*sft_args(gpu_model_dir, sft_rows, out, "--backend", "hf"), cwd=tmp_path))


@needs_cuda
@pytest.mark.slow
def test_grpo_on_one_gpu_through_the_launcher(gpu_model_dir, grpo_prompts, tmp_path):
    out = tmp_path / "grpo"
    assert_grpo_ran(out, os_train(*grpo_args(gpu_model_dir, grpo_prompts, out, "--backend", "hf",
                                             "--rollout-engine", "hf"), cwd=tmp_path))


# -- the Unsloth backend --------------------------------------------------------------------------


@needs_unsloth
@pytest.mark.slow
def test_unsloth_sft(gpu_model_dir, sft_rows, tmp_path):
    out = tmp_path / "sft"
    assert_sft_learned(out, os_train(*sft_args(gpu_model_dir, sft_rows, out, "--backend", "unsloth"), cwd=tmp_path))


@needs_unsloth
@pytest.mark.slow
def test_unsloth_grpo_continues_an_unsloth_sft_adapter(gpu_model_dir, sft_rows, grpo_prompts, tmp_path):
    """SFT then GRPO, both on the Unsloth backend: the tutorial's two stages."""
    sft_out = tmp_path / "sft"
    assert_sft_learned(sft_out, os_train(*sft_args(gpu_model_dir, sft_rows, sft_out, "--backend", "unsloth"),
                                         cwd=tmp_path))
    out = tmp_path / "grpo"
    assert_grpo_ran(out, os_train(*grpo_args(sft_out, grpo_prompts, out, "--backend", "unsloth",
                                             "--rollout-engine", "hf"), cwd=tmp_path))


# -- bench/gpu_grpo.py ----------------------------------------------------------------------------


def test_base_parameter_count_counts_tied_weights_once_and_skips_lora(tiny_model_dir):
    from gpu_grpo import base_parameter_count
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = sum(p.numel() for p in model.parameters())  # parameters() yields the tied tensor once
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert base_parameter_count(peft_model) == expected


def run_tiny_bench(tmp_path: Path, device: str) -> dict:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_grpo.py"), "--tiny", "--steps", "1",
                           "--warmup", "1", "--sides", "ours-hf", "--device", device, "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def check_tiny_result(report: dict) -> dict:
    from gpu_grpo import TINY

    r = report["results"]["ours-hf"]
    assert "failed" not in r and "skipped" not in r, r
    # Stop tokens suppressed: every completion is exactly --max-new-tokens long.
    assert r["completion_tokens_per_step"] == TINY.prompts * TINY.group * TINY.new_tokens
    assert len(r["all_step_s"]) == 2
    assert 0 < r["generation_s"] < r["step_s"] and 0 < r["update_s"] < r["step_s"]
    assert r["completion_tokens_per_s"] == pytest.approx(r["completion_tokens_per_step"] / r["step_s"])
    assert r["update_tflops"] > 0 and r["engine"] == "hf"
    return r


@pytest.mark.slow
def test_tiny_bench_runs_our_side_on_the_cpu(tmp_path):
    report = run_tiny_bench(tmp_path, "cpu")
    assert report["device"] == "cpu"
    r = check_tiny_result(report)
    assert "peak_memory_gib" not in r and "update_mfu" not in r  # no GPU counters, no peak to compare with


@needs_cuda
@pytest.mark.slow
def test_tiny_bench_on_the_gpu_reports_memory_and_mfu(tmp_path):
    r = check_tiny_result(run_tiny_bench(tmp_path, "cuda:0"))
    assert r["peak_memory_gib"] > 0 and 0 < r["update_mfu"] < 1


def test_rollout_sides_need_two_gpus_and_say_so():
    from gpu_grpo import ROLLOUT_SIDES, skip_reason

    count = torch.cuda.device_count()
    for side in ROLLOUT_SIDES:
        reason = skip_reason(side, torch.device("cuda"))
        if count >= 2:
            assert reason is None or ROLLOUT_SIDES[side][1] == "vllm"  # (vllm may not run there)
        else:
            assert reason == f"needs 2 GPUs (training on GPU 0, rollout worker on GPU 1), {count} visible"
        on_cpu = skip_reason(side, torch.device("cpu"))
        if ROLLOUT_SIDES[side][1] == "vllm":
            assert on_cpu.startswith("a GPU side")
        else:
            assert on_cpu is None  # on the CPU: cpu + cpu:1


@pytest.mark.slow
def test_tiny_bench_rollout_side_on_the_cpu_reports_idle_fractions_and_the_ratio(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_grpo.py"), "--tiny", "--steps", "2",
                           "--warmup", "1", "--sides", "ours-hf,ours-rollout-k1", "--device", "cpu", "--out",
                           str(out)], check=False, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    r = results["ours-rollout-k1"]
    assert "failed" not in r and "skipped" not in r, r
    assert len(r["all_step_s"]) == 3 and r["layout"] == "cpu + cpu:1" and r["max_staleness"] == 1
    assert r["step_ratio_vs_colocated"] == pytest.approx(r["step_s"] / results["ours-hf"]["step_s"])
    assert 0 <= r["trainer_idle_fraction"] < 1 and 0 <= r["rollout_idle_fraction"] < 1
    assert r["staleness_mean"] == pytest.approx(2 / 3)  # batch 1 from the start (0 old), then 1 behind
    assert r["samples_dropped"] == 0
    assert "peak_memory_gib" not in r
    assert "ours-rollout-k1" in proc.stdout and "step/hf" in proc.stdout  # the table has the side and its ratio
