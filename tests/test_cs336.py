"""Stanford CS336 (assignment 5) as OpenSloth runs it: `question` + plain `answer` rows, the r1_zero
prompt (`--chat-template r1-zero`), the math rewards on `<think> ... </think> <answer> ... </answer>`
completions, and a --rollout-batch-size that counts responses as CS336's does.

The reference prompt is CS336's cs336_alignment/prompts/r1_zero.prompt, as the assignment ships it
(copied here from a student repository of the assignment, shenrf/CS336-assignment5-alignment).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opensloth.config import resolve_config
from opensloth.data import prepare_grpo_dataset, prepare_sft_dataset
from opensloth.data.synthetic import make_arithmetic_rows, write_rows
from opensloth.data.templates import R1_ZERO_INSTRUCTION, render, resolve_template
from opensloth.errors import UserError
from opensloth.models import load_tokenizer

R1_ZERO_PROMPT = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The "
    "Assistant first thinks about the reasoning process in the mind and then provides the User with the answer. "
    "The reasoning process is enclosed within <think> </think> and answer is enclosed within <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>.\n"
    "User: {question}\nAssistant: <think>"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def cs336_file(tmp_path_factory) -> Path:
    """CS336-style rows: `question` and the plain answer (no '#### n' line), plus a column of its own."""
    rows = [{**row, "level": "Level 1"} for row in make_arithmetic_rows(6, seed=4, schema="question-answer")]
    return write_rows(rows, tmp_path_factory.mktemp("cs336") / "math.jsonl")


def grpo_cfg(model: Path, dataset: Path, tmp: Path, **extra):
    return resolve_config("grpo", None, {"model": str(model), "dataset": str(dataset), "task": "math",
                                         "cache_dir": str(tmp / "cache"), **extra})


def test_r1_zero_template_renders_cs336_prompt(tokenizer):
    template = resolve_template(tokenizer, "r1-zero")
    question = "What is 3 + 4?"
    assert render(tokenizer, [{"role": "user", "content": question}], True, template) == \
        R1_ZERO_PROMPT.format(question=question)
    # A system turn (or --system-prompt) replaces the instruction; an assistant turn continues the <think>.
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question},
                    {"role": "assistant", "content": " 3+4=7 </think> <answer> 7 </answer>"}]
    assert render(tokenizer, conversation, False, template) == \
        f"Be brief.\nUser: {question}\nAssistant: <think> 3+4=7 </think> <answer> 7 </answer>{tokenizer.eos_token}"
    assert render(tokenizer, conversation[1:2], True, resolve_template(tokenizer, "r1-zero", "Think.")) == \
        f"Think.\nUser: {question}\nAssistant: <think>"
    with pytest.raises(UserError, match="r1-zero template renders"):
        render(tokenizer, [{"role": "tool", "content": "x"}], True, template)


def test_question_and_plain_answer_rows_are_a_math_prompt_set(tiny_model_dir, tokenizer, cs336_file, tmp_path):
    """CS336's rows are not taken for gsm8k: no '####' line, so the answer is used as it is, and r1-zero
    renders them with CS336's prompt (not the reasoning system prompt the math formats default to)."""
    prepared = prepare_grpo_dataset(grpo_cfg(tiny_model_dir, cs336_file, tmp_path, chat_template="r1-zero"),
                                    tokenizer, 1)
    assert prepared.stats.format == "question-answer"
    assert prepared.stats.chat_template == "r1-zero"
    rows = prepared.load_all()
    source = {r["question"]: r["answer"] for r in make_arithmetic_rows(6, seed=4, schema="question-answer")}
    for row in rows:
        question = row["prompt"][-1]["content"]
        assert row["prompt"] == [{"role": "system", "content": R1_ZERO_INSTRUCTION}, {"role": "user", "content": question}]
        assert row["prompt_text"] == R1_ZERO_PROMPT.format(question=question)
        assert row["answer"] == source[question] and row["level"] == "Level 1"
    # gsm8k rows (an answer with '#### n') are still gsm8k; a gsm8k file with one plain answer is refused.
    gsm8k = write_rows(make_arithmetic_rows(3, seed=4, schema="gsm8k"), tmp_path / "gsm8k.jsonl")
    assert prepare_grpo_dataset(grpo_cfg(tiny_model_dir, gsm8k, tmp_path), tokenizer, 1).stats.format == "gsm8k"
    mixed = write_rows([*make_arithmetic_rows(2, seed=4, schema="gsm8k"), {"question": "1+1?", "answer": "2"}],
                       tmp_path / "mixed.jsonl")
    with pytest.raises(UserError, match="Row 3 of --dataset .* no final '#### n' line .* --format question-answer"):
        prepare_grpo_dataset(grpo_cfg(tiny_model_dir, mixed, tmp_path), tokenizer, 1)


def test_openmath_reasoning_with_r1_zero_is_refused(tiny_model_dir, tokenizer, tmp_path):
    data = write_rows(make_arithmetic_rows(2, schema="openmath"), tmp_path / "om.jsonl")
    cfg = resolve_config("sft", None, {"model": str(tiny_model_dir), "dataset": str(data), "chat_template": "r1-zero",
                                       "cache_dir": str(tmp_path / "cache")})
    with pytest.raises(UserError, match="openmath-reasoning writes the <start_working_out>"):
        prepare_sft_dataset(cfg, tokenizer, 1)


def test_math_rewards_grade_r1_zero_completions():
    """CS336's r1_zero reward: format 1 for `... </think> <answer> ... </answer>`, answer 1 only when the
    answer inside <answer> is right; math_format and math_answer read <think>/<answer> too."""
    from opensloth.rewards import resolve_rewards

    prompt = [{"role": "system", "content": R1_ZERO_INSTRUCTION}, {"role": "user", "content": "What is 3 + 4?"}]
    texts = [" 3 + 4 = 7 </think> <answer> 7 </answer>",          # right
             " 3 + 4 = 8 </think> <answer> 8 </answer>",          # wrong, formatted
             " 3 + 4 = 7 </think> <answer> \\boxed{7} </answer>",  # right, boxed inside the answer
             " 3 + 4 = 7, so 7."]                                 # no tags
    completions = [[{"role": "assistant", "content": text}] for text in texts]  # the prompt is a conversation
    rewards = resolve_rewards("math", ["math_format", "math_answer", "r1_zero"])
    result = rewards.score([prompt] * len(texts), completions, {"answer": ["7"] * len(texts)})
    assert result.per_reward["math_format"] == [1.0, 1.0, 1.0, 0.0]
    # math_answer grades the answer wherever it is (issue 26: math-verify reads the untagged 7);
    # r1_zero is CS336's own reward: the answer counts only in the format.
    assert result.per_reward["math_answer"] == [1.0, 0.0, 1.0, 1.0]
    assert result.per_reward["r1_zero"] == [1.0, 0.0, 1.0, 0.0]


def test_plan_counts_completions_and_notes_a_response_count(capsys):
    """CS336's rollout_batch_size 256 (responses) in groups of 8, passed as --rollout-batch-size 256."""
    from opensloth.launch import print_plan

    def plan(rollout: int, group: int) -> str:
        cfg = resolve_config("grpo", None, {"model": "Qwen/Qwen2.5-Math-1.5B", "rollout_batch_size": rollout,
                                            "group_size": group, "per_device_train_batch_size": 64})
        print_plan(cfg, ["cpu"])
        return " ".join(capsys.readouterr().out.replace("│", " ").split())

    cs336 = plan(256, 8)
    assert "256 prompts x 8 completions = 2048 completions per step" in cs336
    assert "--rollout-batch-size counts prompts" in cs336 and "pass --rollout-batch-size 32" in cs336
    assert "32 prompts x 8 completions = 256 completions per step" in plan(32, 8)
    assert "counts prompts" not in plan(32, 8)       # 256 completions: a plausible prompt count
    assert "counts prompts" not in plan(250, 8)      # not a multiple of the group size


@pytest.mark.slow
def test_cs336_rows_through_os_train_grpo_with_r1_zero(tiny_model_dir, cs336_file, tmp_path):
    """A CS336-style question/answer file through `os-train grpo --chat-template r1-zero --task math` (1 step
    on the tiny model): the prompts are CS336's, the math rewards score every completion, and the saved
    model keeps the template and the instruction `os eval` / `os generate` then use."""
    out = tmp_path / "grpo"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "400", "OPENSLOTH_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-c", "from opensloth.cli.train import app; app()", "grpo", "--model", str(tiny_model_dir), "--dataset", str(cs336_file),
         "--chat-template", "r1-zero", "--task", "math", "--devices", "cpu", "--output-dir", str(out),
         "--max-steps", "1", "--group-size", "2", "--rollout-batch-size", "2", "--max-new-tokens", "8",
         "--print-sample-every", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = " ".join(proc.stdout.replace("│", " ").split())
    assert "built by the question-answer format, chat template r1-zero" in printed
    assert "Assistant: <think>" in proc.stdout  # the printed sample's prompt
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"rewards/math_format/mean", "rewards/math_answer/mean"} <= set(metrics[-1])

    from opensloth.evaluate import render_chat, trained_with

    saved = load_tokenizer(str(out))
    trained = trained_with(str(out))
    assert trained.system_prompt == R1_ZERO_INSTRUCTION
    assert render_chat(saved, "What is 1 + 1?", trained.system_prompt) == R1_ZERO_PROMPT.format(question="What is 1 + 1?")
