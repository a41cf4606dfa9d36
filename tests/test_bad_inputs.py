"""The bad-input sweep: every error a user can cause ends with one clear message, a non-zero exit,
no traceback (unless --debug), and nothing of theirs destroyed.

Each test runs the real CLI in a subprocess and backs one row of docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENTRY = {"os-train": "from opensloth.cli.train import app; app()", "os": "from opensloth.cli.main import app; app()"}


def cli(tool: str, *args: str, cwd: Path | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-c", ENTRY[tool], *map(str, args)], check=False, capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, and every needle in the one message (stderr)."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, f"{needle!r} not in:\n{out}"
    return out


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """An output dir holding a previous run's files, which no failure may touch."""
    out = tmp_path / "previous_run"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"precious weights")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return out


# -- config ------------------------------------------------------------------------------------


def test_bad_yaml(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: [unclosed\nlearning_rate: 1e-4\n")
    before = cfg.read_bytes()
    out = assert_clean_error(cli("os-train", "sft", "-c", cfg), "is not valid YAML", str(cfg))
    assert cfg.read_bytes() == before
    assert out.count("Error:") == 1


def test_missing_config_file(tmp_path):
    assert_clean_error(cli("os-train", "sft", "-c", tmp_path / "nope.yaml"), "Config file not found",
                       "--config")


def test_unknown_yaml_key_suggests_the_right_one(tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("model: tiny\ntraining:\n  learnin_rate: 1e-4\n")
    assert_clean_error(cli("os-train", "sft", "-c", cfg), "Unknown option", "learnin_rate",
                       "Did you mean: learning_rate")


def test_unknown_cli_option():
    proc = cli("os-train", "sft", "--model", "m", "--learnig-rate", "1e-4")
    assert proc.returncode == 2 and "No such option" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_option_value():
    assert_clean_error(cli("os-train", "sft", "--model", "m", "--lr-scheduler-type", "cosine_restarts"),
                       "--lr-scheduler-type", "cosine_restarts", "linear")


def test_missing_required_model():
    assert_clean_error(cli("os-train", "sft", "--dataset", "d.jsonl"), "Missing required option --model")


def test_group_size_too_small():
    assert_clean_error(cli("os-train", "grpo", "--model", "m", "--group-size", "1"), "--group-size",
                       "at least 2")


def test_reward_weights_count_mismatch():
    assert_clean_error(cli("os-train", "grpo", "--model", "m", "--rewards", "math_answer,math_format",
                           "--reward-weights", "1.0"), "--reward-weights has 1 value but", "names 2 rewards")


def test_report_to_wandb_without_wandb():
    pytest.importorskip("importlib")
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    assert_clean_error(cli("os-train", "sft", "--model", "m", "--report-to", "wandb"), "--report-to",
                       "wandb is not installed", "pip install")


def test_debug_shows_the_traceback(tmp_path):
    proc = cli("os-train", "sft", "-c", tmp_path / "nope.yaml", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "Config file not found" in proc.stderr


# -- devices and paths ---------------------------------------------------------------------------


def test_duplicate_device_ids():
    assert_clean_error(cli("os-train", "sft", "--model", "m", "--devices", "0,0"), "--devices",
                       "distinct GPU ids")


def test_gpu_ids_without_gpus(tmp_path):
    assert_clean_error(cli("os-train", "sft", "--model", "m", "--devices", "0,1",
                           "--output-dir", tmp_path / "out"), "--devices 0,1", "no CUDA GPU", "--devices cpu")
    assert not (tmp_path / "out").exists()


def test_missing_model_dir(tmp_path):
    assert_clean_error(cli("os-train", "sft", "--model", tmp_path / "no_model", "--dataset", "d.jsonl",
                           "--devices", "cpu", "--output-dir", tmp_path / "out" / "run"), "--model", "no_model",
                       "no such directory")
    assert not (tmp_path / "out").exists()  # the writability probe leaves nothing behind


def test_existing_output_dir_is_refused_and_kept(run_dir):
    before = snapshot(run_dir)
    assert_clean_error(cli("os-train", "sft", "--model", "m", "--devices", "cpu", "--output-dir", run_dir),
                       "is not empty", "--overwrite", "--resume")
    assert snapshot(run_dir) == before


def test_output_dir_is_a_file(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert_clean_error(cli("os-train", "sft", "--model", "m", "--devices", "cpu", "--output-dir", target),
                       "is a file")
    assert target.read_text() == "mine"


def test_read_only_output_dir(tmp_path):
    if os.geteuid() == 0:  # root ignores permission bits; /sys is read-only even for root
        target = Path("/sys/opensloth_test_run")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "run"
    assert_clean_error(cli("os-train", "sft", "--model", "m", "--devices", "cpu", "--output-dir", target),
                       "--output-dir", "is not writable")


def test_resume_from_missing_checkpoint(tmp_path):
    assert_clean_error(cli("os-train", "grpo", "--model", "m", "--devices", "cpu", "--output-dir", tmp_path / "o",
                           "--resume-from", tmp_path / "checkpoint-9"), "--resume-from", "no such directory")


def test_resume_from_partial_checkpoint(run_dir):
    partial = run_dir / "checkpoints" / "checkpoint-4"
    partial.mkdir(parents=True)
    (partial / "trainable.pt").write_bytes(b"half written")
    before = snapshot(run_dir)
    assert_clean_error(cli("os-train", "grpo", "--model", "m", "--devices", "cpu", "--output-dir", run_dir,
                           "--resume-from", partial), "not a complete checkpoint", "--resume")
    assert snapshot(run_dir) == before


# -- os eval / generate / export / plot ----------------------------------------------------------


def test_eval_unknown_reward(tmp_path, tiny_model_dir):
    assert_clean_error(cli("os", "eval", "--model", tiny_model_dir, "--dataset", tmp_path / "d.jsonl",
                           "--rewards", "math_answr"), "Unknown reward 'math_answr'", "Available:")


def test_eval_unknown_task(tmp_path, tiny_model_dir):
    assert_clean_error(cli("os", "eval", "--model", tiny_model_dir, "--dataset", tmp_path / "d.jsonl",
                           "--task", "maths"), "Unknown --task 'maths'")


def test_eval_pass_at_k_needs_sampling(tmp_path, tiny_model_dir):
    assert_clean_error(cli("os", "eval", "--model", tiny_model_dir, "--dataset", tmp_path / "d.jsonl",
                           "--num-samples", "4", "--temperature", "0"), "--num-samples 4", "--temperature")


def test_generate_without_prompt(tiny_model_dir):
    assert_clean_error(cli("os", "generate", "--model", tiny_model_dir), "Give a prompt", "--interactive")


def test_generate_missing_model(tmp_path):
    assert_clean_error(cli("os", "generate", "--model", tmp_path / "gone", "hi"), "--model", "no such directory")


def test_export_of_a_full_model(tiny_model_dir, tmp_path):
    assert_clean_error(cli("os", "export", "--model", tiny_model_dir, "--output", tmp_path / "m"),
                       "already a full model")


def test_export_into_non_empty_dir_keeps_files(tmp_path, run_dir):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x"}))
    before = snapshot(run_dir)
    assert_clean_error(cli("os", "export", "--model", adapter, "--output", run_dir), "not empty", "--overwrite")
    assert snapshot(run_dir) == before
    assert_clean_error(cli("os", "export", "--model", adapter, "--output", adapter), "--output must differ")


def test_export_bad_dtype(tmp_path):
    assert_clean_error(cli("os", "export", "--model", tmp_path, "--output", tmp_path / "o", "--dtype", "int8"),
                       "--dtype 'int8'", "bfloat16")


def test_plot_without_metrics(tmp_path):
    assert_clean_error(cli("os", "plot", tmp_path), "no metrics.jsonl")


# -- datasets, rewards, interrupts (need data prep, so they use the tiny model) -------------------


def _train(recipe: str, model: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    if recipe == "grpo" and "--rewards" not in extra:
        extra = ("--task", "math", *extra)
    return cli("os-train", recipe, "--model", model, "--dataset", data, "--devices", "cpu", "--output-dir", out,
               "--cache-dir", out.parent / "cache", "--report-to", "none", *extra)


def test_missing_dataset_file(tiny_model_dir, tmp_path):
    assert_clean_error(_train("grpo", tiny_model_dir, tmp_path / "missing.jsonl", tmp_path / "o"),
                       "--dataset", "missing.jsonl", "no such file")
    assert not (tmp_path / "o").exists()


def test_bad_columns(tiny_model_dir, tmp_path):
    data = tmp_path / "cols.jsonl"
    data.write_text('{"question": "1+1", "solution": "2"}\n')
    assert_clean_error(_train("grpo", tiny_model_dir, data, tmp_path / "o"), "cannot tell the row format",
                       "question, solution", "prompt-answer needs prompt + answer", "--format")
    assert_clean_error(_train("sft", tiny_model_dir, data, tmp_path / "o", "--format", "chat"),
                       "--format chat needs the columns messages", "question, solution")
    assert not (tmp_path / "o").exists()


def test_empty_and_unreadable_dataset(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_clean_error(_train("grpo", tiny_model_dir, empty, tmp_path / "o"), "--dataset", "empty.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text("not json\n")
    assert_clean_error(_train("grpo", tiny_model_dir, broken, tmp_path / "o"), "--dataset", "broken.jsonl",
                       "line 1: not valid JSON")
    assert broken.read_text() == "not json\n"


def test_prompts_longer_than_the_limit(tiny_model_dir, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "x" * 300, "answer": "1"}) + "\n")
    assert_clean_error(_train("grpo", tiny_model_dir, data, tmp_path / "o", "--max-prompt-length", "50"),
                       "longer than --max-prompt-length 50", "Raise --max-prompt-length")


def test_grpo_without_any_reward(tiny_model_dir, tmp_path):
    assert_clean_error(cli("os-train", "grpo", "--model", tiny_model_dir, "--dataset", tmp_path / "d.jsonl",
                           "--devices", "cpu", "--output-dir", tmp_path / "o"),
                       "GRPO needs at least one reward", "--task", "--rewards")
    assert not (tmp_path / "o").exists()


def test_unknown_reward_in_training_writes_nothing(tiny_model_dir, tmp_path):
    data = tmp_path / "ok.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    assert_clean_error(_train("grpo", tiny_model_dir, data, tmp_path / "o", "--rewards", "nope"),
                       "Unknown reward 'nope'", "os list-rewards")
    assert not (tmp_path / "o").exists()  # checked before any data prep or output


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tiny_model_dir, tmp_path):
    """SIGINT mid-run: the step finishes, checkpoint-<step> is sealed, --resume picks it up."""
    import signal
    import time

    from opensloth import checkpoint as ck

    data = tmp_path / "ok.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1)}) + "\n" for a in range(8)))
    out = tmp_path / "run"
    args = [sys.executable, "-c", ENTRY["os-train"], "grpo", "--model", str(tiny_model_dir), "--dataset",
            str(data), "--devices", "cpu", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--report-to", "none", "--rewards", "math_answer", "--group-size", "2", "--rollout-batch-size", "2",
            "--max-new-tokens", "8", "--print-sample-every", "0", "--max-steps", "400"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=300)
    assert "Traceback" not in output, output
    assert proc.returncode == 130, output[-3000:]  # a stopped run never passes for a finished one
    assert "continue with --resume" in output
    assert not (out / "adapter_config.json").exists()  # no "final" model from a stopped run
    latest = ck.find_latest_checkpoint(out)
    assert latest is not None and ck.verify_checkpoint(latest) is None
    stopped_at = ck.checkpoint_step(latest)
    assert 2 <= stopped_at < 400

    resumed = subprocess.run([*args[:-1], str(stopped_at + 2), "--resume"], check=False, capture_output=True, text=True,
                             timeout=400, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps[-2:] == [stopped_at + 1, stopped_at + 2]


def test_code_tests_that_cannot_be_graded_safely_are_reported_at_data_prep(tiny_model_dir, tmp_path):
    data = tmp_path / "code.jsonl"
    rows = [{"prompt": "Write add(a, b).", "answer": "-", "tests": ["assert add(1, 2) == 3"]},
            {"prompt": "Write mk(x).", "answer": "-", "tests": ["assert mk(1) == Node(1)"]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert_clean_error(_train("grpo", tiny_model_dir, data, tmp_path / "o", "--rewards", "code_correctness"),
                       "code.jsonl, row 2, column 'tests'", "assert mk(1) == Node(1)", "both sides",
                       "Rewrite or drop that test")
    assert not (tmp_path / "o").exists()
