"""prepare_dataset/prepare_grpo_dataset.py: the seed's command without --model writes the prompt set
(`prompt` messages + `answer`) that `os-train grpo --dataset` renders and tokenizes; its errors."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opensloth.config import resolve_config
from opensloth.data import prepare_grpo_dataset
from opensloth.data.synthetic import make_arithmetic_rows, write_rows
from opensloth.models import load_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "prepare_dataset" / "prepare_grpo_dataset.py"


def run_prepare(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("prepare_grpo_dataset", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_command_with_custom_file_writes_the_prompt_set_training_renders(tmp_path, tiny_model_dir):
    """`--task-type math --num-samples 1000 --output-path ./data/grpo_math` with --custom-file and no
    --model: messages + answer, which training renders to exactly the prompts the file itself gives."""
    rows = write_rows(make_arithmetic_rows(12, seed=3, schema="dapo"), tmp_path / "dapo.jsonl")
    result = run_prepare("--task-type", "math", "--custom-file", "dapo.jsonl", "--num-samples", "1000",
                         "--output-path", "./data/grpo_math", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--num-samples 1000 is more than the 12 rows" in " ".join(result.stdout.split())
    import datasets

    saved = datasets.load_from_disk(str(tmp_path / "data" / "grpo_math"))
    assert saved.column_names == ["prompt", "answer"]
    assert len(saved) == 12
    by_question = {r["prompt"]: r["solution"] for r in make_arithmetic_rows(12, seed=3, schema="dapo")}
    for row in saved:
        assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
        assert by_question[row["prompt"][0]["content"]] == row["answer"]

    # Training (--task math) renders it as it renders the DAPO file directly: same prompt texts.
    tokenizer = load_tokenizer(str(tiny_model_dir))

    def prompts(dataset: Path) -> dict[str, str]:
        cfg = resolve_config("grpo", None, {"model": str(tiny_model_dir), "dataset": str(dataset), "task": "math",
                                            "cache_dir": str(tmp_path / "cache")})
        prepared = prepare_grpo_dataset(cfg, tokenizer, 1)
        assert prepared.stats.format == ("prompt-answer" if dataset.is_dir() else "dapo-math")
        train = prepared.load_all()
        return dict(zip(train["prompt_text"], train["answer"]))

    from_set, from_file = prompts(tmp_path / "data" / "grpo_math"), prompts(rows)
    assert from_set == from_file
    assert all("<start_working_out>" in text for text in from_set)  # the reasoning template's system prompt


def test_default_math_dataset_offline_names_custom_file(tmp_path):
    result = run_prepare("--task-type", "math", "--num-samples", "1000", "--output-path", "./data/grpo_math",
                         cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "open-r1/DAPO-Math-17k-Processed" in result.stderr and "--custom-file" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--task-type", "code"], "--task-type code has no default dataset"),
    (["--task-type", "custom"], "--task-type custom has no default dataset"),
    (["--custom-file", "rows.csv"], "--custom-file must be a .json or .jsonl file"),
    (["--custom-file", "missing.jsonl"], "--custom-file missing.jsonl: no such file"),
    (["--custom-file", "rows.jsonl", "--chat-template", "r1-zero"], "--chat-template needs --model"),
    (["--custom-file", "rows.jsonl", "--num-workers", "2"], "--num-workers needs --model"),
])
def test_errors_name_the_option(script, tmp_path, capsys, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    write_rows(make_arithmetic_rows(2, schema="dapo"), tmp_path / "rows.jsonl")
    (tmp_path / "rows.csv").write_text("prompt,solution\n1+1,2\n")
    with pytest.raises(SystemExit) as exit_info:
        script.main([*argv, "--output-path", "out"])
    assert exit_info.value.code == 2
    message = " ".join(capsys.readouterr().err.split())
    assert expected in message
    if "code" in argv:
        assert "--custom-file" in message and "tests" in message
    assert not (tmp_path / "out").exists()


def test_code_custom_file_keeps_the_tests_column(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_rows([{"prompt": "Write add(a, b).", "tests": ["assert add(1, 2) == 3"]}], tmp_path / "code.jsonl")
    script.main(["--task-type", "code", "--custom-file", "code.jsonl", "--output-path", "code_set"])
    import datasets

    saved = datasets.load_from_disk(str(tmp_path / "code_set"))
    assert saved[0] == {"tests": ["assert add(1, 2) == 3"], "prompt": [{"role": "user", "content": "Write add(a, b)."}],
                        "answer": None}


def test_a_kept_column_that_would_change_the_format_is_refused(script, tmp_path, capsys, monkeypatch):
    """A dapo-math file with a `question` column: kept as is, the set would read as question-answer."""
    monkeypatch.chdir(tmp_path)
    write_rows([{"prompt": "1+1?", "solution": "2", "question": "other"}], tmp_path / "rows.jsonl")
    with pytest.raises(SystemExit):
        script.main(["--custom-file", "rows.jsonl", "--format", "dapo-math", "--output-path", "out"])
    assert "column(s) question would make" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists()
