"""The tutorial's scripts run exactly as written, offline, with a tiny model and local files in the
schemas of the two hub datasets, steered only through their environment variables, from the repository
root, from grpo_tutorial/ and from any other directory.

The runs use a copy of the repository's layout (grpo_tutorial/ beside prepare_dataset/) in a temporary
directory, so a run from its root writes its outputs/ there, not into the checkout. Every script starts
from all three directories in `test_every_script_starts_from_any_directory` (PRINT_COMMANDS=1: the
script's checks run, the command it would run is printed and parsed by the real CLI); the slow tests
then run every script for real, each stage from a different one of the three directories.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import typer

from opensloth.data.synthetic import make_arithmetic_rows, write_rows

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "grpo_tutorial"
SCRIPTS = sorted(p.name for p in (TUTORIAL / "scripts").glob("0*.sh"))
STARTS = ("root", "tutorial", "elsewhere")
SFT_ARGS = "--max-seq-length 512 --per-device-train-batch-size 4 --learning-rate 1e-3"
GRPO_ARGS = ("--max-new-tokens 8 --group-size 2 --rollout-batch-size 2 --per-device-train-batch-size 4 "
             "--learning-rate 1e-4 --print-sample-every 0")


def make_layout(base: Path) -> dict[str, Path]:
    """A copy of the repository's tutorial layout under `base`; the three start directories."""
    repo = base / "repo"
    shutil.copytree(TUTORIAL, repo / "grpo_tutorial", ignore=shutil.ignore_patterns("outputs"))
    shutil.copytree(ROOT / "prepare_dataset", repo / "prepare_dataset", ignore=shutil.ignore_patterns("__pycache__"))
    (base / "elsewhere").mkdir()
    return {"root": repo, "tutorial": repo / "grpo_tutorial", "elsewhere": base / "elsewhere"}


def script_path(dirs: dict[str, Path], start: str, name: str) -> str:
    """The script as a user types it from that directory (the README's commands)."""
    return {"root": f"grpo_tutorial/scripts/{name}", "tutorial": f"scripts/{name}",
            "elsewhere": str(dirs["tutorial"] / "scripts" / name)}[start]


def run_script(name: str, env: dict[str, str], cwd: Path = TUTORIAL, path: str | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(["bash", path or str(TUTORIAL / "scripts" / name)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tutorial_env(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tutorial")
    sft_file = write_rows(make_arithmetic_rows(16, seed=0, schema="openmath"), root / "openmath_mini.jsonl")
    grpo_file = write_rows(make_arithmetic_rows(8, seed=1, schema="dapo"), root / "dapo_math.jsonl")
    return {
        "MODEL": str(tiny_model_dir),
        "SFT_DATASET": str(sft_file),
        "GRPO_DATASET": str(grpo_file),
        "SFT_SAMPLES": "8",
        "GRPO_SAMPLES": "4",
        "MAX_STEPS": "1",
        "GPU_COUNT": "0",
        "OPENSLOTH_CACHE": str(root / "cache"),
    }


def assert_adapter(path: Path) -> None:
    assert (path / "adapter_config.json").is_file(), sorted(p.name for p in path.iterdir())
    assert (path / "adapter_model.safetensors").is_file()
    assert (path / "config.yaml").is_file()
    lines = (path / "metrics.jsonl").read_text().splitlines()
    assert lines and all("step" in json.loads(line) for line in lines)


def parse_with_real_cli(argv: list[str]) -> None:
    """Parse a printed command with the program it names: os-train's Typer app, or a prepare script's
    own argument parser. Raises (SystemExit, click errors) on an unknown option or a bad value."""
    if argv[0] == "os-train":
        from opensloth.cli.train import app

        command = typer.main.get_command(app)
        ctx = command.make_context("os-train", [], resilient_parsing=True)
        sub = command.get_command(ctx, argv[1])
        sub.make_context(argv[1], argv[2:], parent=ctx)
        return
    spec = importlib.util.spec_from_file_location("prepare_script", argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.parse_args(argv[2:])


def test_every_script_starts_from_any_directory(tutorial_env, tmp_path):
    """Each of the six scripts, started from the repository root, from grpo_tutorial/ and from another
    directory, passes its checks and runs the same command, with outputs under outputs/ of the
    directory it was started from and the repository's prepare_dataset/ scripts."""
    dirs = make_layout(tmp_path)
    for start in STARTS:  # what the GRPO and training steps check for first, where each would look
        out = dirs[start] / "outputs"
        (out / "data" / "sft_prepared").mkdir(parents=True)
        (out / "data" / "grpo_prepared").mkdir(parents=True)
        (out / "sft_qwen_reasoning_model").mkdir()
        (out / "sft_qwen_reasoning_model" / "adapter_config.json").write_text("{}")
    env = {**tutorial_env, "PRINT_COMMANDS": "1"}
    for name in SCRIPTS:
        printed = {}
        for start in STARTS:
            result = run_script(name, env, cwd=dirs[start], path=script_path(dirs, start, name))
            assert result.returncode == 0, f"{name} from {start}: {result.stdout}{result.stderr}"
            assert f"(in {dirs[start]})" in result.stdout  # the outputs' directory, as the script says
            printed[start] = result.stdout.strip().splitlines()[-1]
        assert len(set(printed.values())) == 1, printed  # the same command from every directory
        argv = shlex.split(printed["root"])
        if argv[0] != "os-train":
            assert Path(argv[1]) == dirs["root"] / "prepare_dataset" / argv[1].rsplit("/", 1)[-1]
            assert Path(argv[1]).is_file()
        outputs = [argv[i + 1] for i, a in enumerate(argv) if a in ("--output-dir", "--output-path")]
        assert outputs and all(o.startswith("outputs/") for o in outputs), argv  # relative to the start
        parse_with_real_cli(argv)


@pytest.mark.slow
def test_end_to_end_scripts_from_the_repository_root(tutorial_env, tmp_path):
    """QUICKSTART's commands from the repository root: the outputs land in its outputs/."""
    dirs = make_layout(tmp_path)
    out = dirs["root"] / "outputs"
    sft = run_script("01_sft_end_to_end.sh", {**tutorial_env, "EXTRA_ARGS": SFT_ARGS}, cwd=dirs["root"],
                     path="grpo_tutorial/scripts/01_sft_end_to_end.sh")
    assert sft.returncode == 0, sft.stdout[-3000:] + sft.stderr[-3000:]
    assert_adapter(out / "sft_qwen_reasoning_model")
    grpo = run_script("02_grpo_end_to_end.sh", {**tutorial_env, "EXTRA_ARGS": GRPO_ARGS}, cwd=dirs["root"],
                      path="grpo_tutorial/scripts/02_grpo_end_to_end.sh")
    assert grpo.returncode == 0, grpo.stdout[-3000:] + grpo.stderr[-3000:]
    assert_adapter(out / "grpo_final_model")
    rewards = [json.loads(line) for line in (out / "grpo_final_model" / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/math_answer/mean" in r for r in rewards)


@pytest.mark.slow
def test_step_by_step_scripts_from_another_directory(tutorial_env, tmp_path):
    """The four step-by-step scripts, run by path from a directory outside the repository."""
    dirs = make_layout(tmp_path)
    out = dirs["elsewhere"] / "outputs"
    for script, extra in (("00_prepare_sft_dataset.sh", ""), ("01_train_sft.sh", SFT_ARGS),
                          ("02_prepare_grpo_dataset.sh", ""), ("03_train_grpo.sh", GRPO_ARGS)):
        result = run_script(script, {**tutorial_env, "EXTRA_ARGS": extra}, cwd=dirs["elsewhere"],
                            path=script_path(dirs, "elsewhere", script))
        assert result.returncode == 0, f"{script}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert (out / "data" / "sft_prepared").is_dir()
    assert (out / "data" / "grpo_prepared").is_dir()
    assert_adapter(out / "sft_qwen_reasoning_model")
    assert_adapter(out / "grpo_final_model")


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
    (--dry-run keeps it fast) from grpo_tutorial/: the GRPO-only options reach os-train grpo, never
    os-train sft."""
    dirs = make_layout(tmp_path)
    examples = {name: _documented_example(name) for name in ("EXTRA_ARGS", "SFT_EXTRA_ARGS", "GRPO_EXTRA_ARGS")}
    assert "--group-size" in examples["GRPO_EXTRA_ARGS"]
    env = {**tutorial_env, **examples}
    env["EXTRA_ARGS"] += " --dry-run"
    cwd = dirs["tutorial"]
    sft = run_script("01_sft_end_to_end.sh", env, cwd=cwd, path="scripts/01_sft_end_to_end.sh")
    assert sft.returncode == 0, sft.stdout[-3000:] + sft.stderr[-3000:]
    shutil.copytree(tutorial_env["MODEL"], cwd / "outputs" / "sft_qwen_reasoning_model")  # stands in for SFT
    grpo = run_script("02_grpo_end_to_end.sh", env, cwd=cwd, path="scripts/02_grpo_end_to_end.sh")
    assert grpo.returncode == 0, grpo.stdout[-3000:] + grpo.stderr[-3000:]
    assert "group_size: 16" in grpo.stdout and "learning_rate: 1.0e-05" in grpo.stdout


def test_tutorial_names_the_math_preset_and_how_to_add_demo_reward():
    """The tutorial's list of `--task math` rewards is the preset; demo_reward is added, not preset."""
    from opensloth.rewards.base import PRESETS

    text = (TUTORIAL / "README.md").read_text()
    listed = re.search(r"`--task math` rewards: ([^)]*)\)", text)
    assert listed, "the tutorial's stage table should list the --task math rewards"
    assert re.findall(r"`(\w+)`", listed.group(1)) == PRESETS["math"]
    assert "demo_reward" not in PRESETS["math"]
    assert 'GRPO_EXTRA_ARGS="--rewards demo_reward"' in text
