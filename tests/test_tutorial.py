"""The tutorial's scripts run exactly as written, offline, with a tiny model and local files in the
schemas of the two hub datasets, steered only through their environment variables."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from opensloth.data.synthetic import make_arithmetic_rows, write_rows

TUTORIAL = Path(__file__).resolve().parents[1] / "grpo_tutorial"
SFT_ARGS = "--max-seq-length 512 --per-device-train-batch-size 4 --learning-rate 1e-3"
GRPO_ARGS = ("--max-new-tokens 12 --group-size 2 --rollout-batch-size 2 --per-device-train-batch-size 4 "
             "--learning-rate 1e-4 --print-sample-every 0")


def run_script(name: str, env: dict[str, str], cwd: Path = TUTORIAL) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.run(["bash", f"scripts/{name}"] if cwd == TUTORIAL else ["bash", str(TUTORIAL / "scripts" / name)],
                          cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tutorial_env(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tutorial")
    sft_file = write_rows(make_arithmetic_rows(48, seed=0, schema="openmath"), root / "openmath_mini.jsonl")
    grpo_file = write_rows(make_arithmetic_rows(24, seed=1, schema="dapo"), root / "dapo_math.jsonl")
    return {
        "MODEL": str(tiny_model_dir),
        "SFT_DATASET": str(sft_file),
        "GRPO_DATASET": str(grpo_file),
        "SFT_SAMPLES": "32",
        "GRPO_SAMPLES": "16",
        "MAX_STEPS": "2",
        "OUTPUT_ROOT": str(root / "outputs"),
        "OPENSLOTH_CACHE": str(root / "cache"),
    }


def assert_adapter(path: Path) -> None:
    assert (path / "adapter_config.json").is_file(), sorted(p.name for p in path.iterdir())
    assert (path / "adapter_model.safetensors").is_file()
    assert (path / "config.yaml").is_file()
    lines = (path / "metrics.jsonl").read_text().splitlines()
    assert lines and all("step" in json.loads(line) for line in lines)


@pytest.mark.slow
def test_end_to_end_scripts(tutorial_env):
    out = Path(tutorial_env["OUTPUT_ROOT"])
    sft = run_script("01_sft_end_to_end.sh", {**tutorial_env, "EXTRA_ARGS": SFT_ARGS})
    assert sft.returncode == 0, sft.stdout[-3000:] + sft.stderr[-3000:]
    assert_adapter(out / "sft_qwen_reasoning_model")
    grpo = run_script("02_grpo_end_to_end.sh", {**tutorial_env, "EXTRA_ARGS": GRPO_ARGS})
    assert grpo.returncode == 0, grpo.stdout[-3000:] + grpo.stderr[-3000:]
    assert_adapter(out / "grpo_final_model")
    rewards = [json.loads(line) for line in (out / "grpo_final_model" / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/math_answer/mean" in r for r in rewards)


@pytest.mark.slow
def test_step_by_step_scripts(tutorial_env, tmp_path):
    env = {**tutorial_env, "OUTPUT_ROOT": str(tmp_path / "outputs")}
    out = tmp_path / "outputs"
    for script, extra in (("00_prepare_sft_dataset.sh", ""), ("01_train_sft.sh", SFT_ARGS),
                          ("02_prepare_grpo_dataset.sh", ""), ("03_train_grpo.sh", GRPO_ARGS)):
        result = run_script(script, {**env, "EXTRA_ARGS": extra})
        assert result.returncode == 0, f"{script}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert (out / "data" / "sft_prepared").is_dir()
    assert (out / "data" / "grpo_prepared").is_dir()
    assert_adapter(out / "sft_qwen_reasoning_model")
    assert_adapter(out / "grpo_final_model")


def test_wrong_directory_is_refused(tutorial_env, tmp_path):
    result = run_script("01_sft_end_to_end.sh", tutorial_env, cwd=tmp_path)
    assert result.returncode == 2
    assert "run this script from the grpo_tutorial/ directory" in result.stderr


def test_grpo_without_sft_output_is_refused(tutorial_env, tmp_path):
    result = run_script("02_grpo_end_to_end.sh", {**tutorial_env, "OUTPUT_ROOT": str(tmp_path / "empty")})
    assert result.returncode == 2
    assert "Run stage 1 first" in result.stderr
    result = run_script("03_train_grpo.sh", {**tutorial_env, "OUTPUT_ROOT": str(tmp_path / "empty")})
    assert result.returncode == 2
    assert "Run step 1 first" in result.stderr


def test_gpu_count_larger_than_present_is_refused(tutorial_env):
    result = run_script("01_sft_end_to_end.sh", {**tutorial_env, "GPU_COUNT": "8"})
    assert result.returncode == 2
    assert "GPU_COUNT=8 but this machine has 0 GPU(s)" in result.stderr


def _documented_example(variable: str) -> str:
    """The example value the tutorial README gives for VARIABLE in its settings table."""
    text = (TUTORIAL / "README.md").read_text()
    match = re.search(rf'^\| `{variable}` \|.*`{variable}="([^"]*)"`', text, flags=re.MULTILINE)
    assert match, f"no {variable} example in grpo_tutorial/README.md"
    return match.group(1)


def test_documented_extra_args_reach_only_the_stage_that_takes_them(tutorial_env, tmp_path):
    """The README's EXTRA_ARGS / SFT_EXTRA_ARGS / GRPO_EXTRA_ARGS examples, as given, run both stages
    (--dry-run keeps it fast): the GRPO-only options reach os-train grpo, never os-train sft."""
    examples = {name: _documented_example(name) for name in ("EXTRA_ARGS", "SFT_EXTRA_ARGS", "GRPO_EXTRA_ARGS")}
    assert "--group-size" in examples["GRPO_EXTRA_ARGS"]
    env = {**tutorial_env, **examples, "OUTPUT_ROOT": str(tmp_path / "outputs")}
    env["EXTRA_ARGS"] += " --dry-run"
    sft = run_script("01_sft_end_to_end.sh", env)
    assert sft.returncode == 0, sft.stdout[-3000:] + sft.stderr[-3000:]
    shutil.copytree(tutorial_env["MODEL"], tmp_path / "outputs" / "sft_qwen_reasoning_model")  # stands in for SFT
    grpo = run_script("02_grpo_end_to_end.sh", env)
    assert grpo.returncode == 0, grpo.stdout[-3000:] + grpo.stderr[-3000:]
    assert "group_size: 16" in grpo.stdout and "learning_rate: 1.0e-05" in grpo.stdout
