"""`os generate`, `os export`, `os eval`, `os plot` on a trained tiny adapter, through the real CLI.

The adapter is trained here in a few seconds (LoRA on the tiny random Qwen2, 120 AdamW steps)
until its greedy answers to four sums are right, so the tests can check real text.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opensloth.evaluate import pass_at_k

PROBLEMS = [("2+3", "5"), ("4+4", "8"), ("1+6", "7"), ("9+0", "9")]


def os_cli(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from opensloth.cli.main import app; app()", *args],
                          check=False, capture_output=True, text=True, input=stdin, timeout=timeout)


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter saved with models.save_model that answers PROBLEMS as <SOLUTION>a</SOLUTION>."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opensloth.config import ALL_LINEAR
    from opensloth.models import save_model

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR))
    seqs = []
    for question, answer in PROBLEMS:
        prompt = tok.apply_chat_template([{"role": "user", "content": f"What is {question}?"}], tokenize=False,
                                         add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tok(f"<SOLUTION>{answer}</SOLUTION><|im_end|>", add_special_tokens=False)["input_ids"]
        seqs.append((torch.tensor([p_ids + c_ids]), torch.tensor([[-100] * len(p_ids) + c_ids])))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for _ in range(120):
        for ids, labels in seqs:
            model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("adapter_run") / "sft"
    save_model(model.eval(), tok, out)
    return out


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert pass_at_k(4, 3, 2) == 1.0  # fewer than k wrong samples: any k contain a correct one
    with pytest.raises(ValueError):
        pass_at_k(2, 3, 1)


def test_generate_uses_saved_template(trained_adapter):
    proc = os_cli("generate", "--model", str(trained_adapter), "What is 2+3?", "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "<SOLUTION>5</SOLUTION>"


def test_generate_interactive(trained_adapter):
    proc = os_cli("generate", "--model", str(trained_adapter), "--interactive", "--max-new-tokens", "12",
                  stdin="What is 4+4?\nWhat is 1+6?\n\n")
    assert proc.returncode == 0, proc.stderr
    assert "<SOLUTION>8</SOLUTION>" in proc.stdout and "<SOLUTION>7</SOLUTION>" in proc.stdout


def _greedy(model, tok, question: str) -> str:
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_export_reloads_without_peft_and_matches_adapter(trained_adapter, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    proc = os_cli("export", "--model", str(trained_adapter), "--output", str(out), "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    assert (out / "chat_template.jinja").is_file() or "chat_template" in (out / "tokenizer_config.json").read_text()

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapter = AutoPeftModelForCausalLM.from_pretrained(trained_adapter)
    tok = AutoTokenizer.from_pretrained(out)
    for question, answer in PROBLEMS:
        text = _greedy(merged, tok, f"What is {question}?")
        assert text == _greedy(adapter, tok, f"What is {question}?")
        assert text == f"<SOLUTION>{answer}</SOLUTION>"

    # The default is bf16 16-bit weights, still loadable with plain transformers.
    out16 = tmp_path / "merged16"
    assert os_cli("export", "--model", str(trained_adapter), "--output", str(out16)).returncode == 0
    assert AutoModelForCausalLM.from_pretrained(out16).dtype == torch.bfloat16


def test_the_training_runs_settings_are_found_beside_a_model_or_above_its_checkpoint(tmp_path):
    from opensloth.evaluate import find_run_config, trained_with

    out = tmp_path / "run"
    (out / "checkpoints" / "checkpoint-4" / "adapter").mkdir(parents=True)
    (out / "config.yaml").write_text("recipe: grpo\ndata:\n  format: dapo-math\n  system_prompt: Be brief.\n"
                                     "grpo:\n  max_new_tokens: 24\n")
    for model in (out, out / "checkpoints" / "checkpoint-4", out / "checkpoints" / "checkpoint-4" / "adapter"):
        assert find_run_config(str(model)) == out / "config.yaml"
    trained = trained_with(str(out))
    assert (trained.system_prompt, trained.data_format, trained.max_new_tokens) == ("Be brief.", "dapo-math", 24)
    assert find_run_config(str(tmp_path)) is None and find_run_config("Qwen/Qwen2.5-0.5B-Instruct") is None
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "config.yaml").write_text("recipe: sft\ndata:\n  format: openmath-reasoning\n")
    assert trained_with(str(sft)).data_format is None  # an SFT format says nothing about eval prompts


def test_generate_and_export_carry_the_training_system_prompt(trained_adapter, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_adapter, run)
    (run / "config.yaml").write_text("recipe: sft\ndata:\n  system_prompt: Answer in tags.\n")
    proc = os_cli("generate", "--model", str(run), "What is 2+3?", "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert "system prompt 'Answer in tags.' (training run)" in proc.stderr.replace("\n", " ")
    proc = os_cli("generate", "--model", str(run), "What is 2+3?", "--max-new-tokens", "12", "--system-prompt", "X")
    assert proc.returncode == 0 and "system prompt 'X' (flag)" in proc.stderr.replace("\n", " ")
    merged = tmp_path / "merged"
    assert os_cli("export", "--model", str(run), "--output", str(merged), "--dtype", "float32").returncode == 0
    assert (merged / "config.yaml").read_text() == (run / "config.yaml").read_text()


def test_plot_redraws_curves(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-4} for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = os_cli("plot", str(run))
    assert proc.returncode == 0, proc.stderr
    png = run / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _eval_ready() -> bool:
    try:
        from opensloth.data import prepare_grpo_dataset  # noqa: F401
        from opensloth.rewards import resolve_rewards  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _eval_ready(), reason="needs opensloth.data.prepare_grpo_dataset and opensloth.rewards")
def test_eval_reports_accuracy_and_writes_every_completion(trained_adapter, tmp_path):
    data = tmp_path / "eval.jsonl"
    rows = [{"prompt": f"What is {q}?", "answer": a} for q, a in PROBLEMS]
    rows[3]["answer"] = "10"  # one wrong reference: accuracy must be 3/4, not 1
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "results.jsonl"
    proc = os_cli("eval", "--model", str(trained_adapter), "--dataset", str(data), "--format", "prompt-answer",
                  "--task", "math", "--chat-template", "model", "--max-new-tokens", "12", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4
    for record in records:  # data prep may reorder rows: match each record to its problem
        (question, answer), = [(q, a) for q, a in PROBLEMS if f"What is {q}?" in record["prompt"]]
        assert record["completion"] == f"<SOLUTION>{answer}</SOLUTION>"
        assert record["correct"] == (question != "9+0")
    assert "pass@1" in proc.stdout and "0.7500" in proc.stdout

    # k samples per prompt: pass@k from the same JSONL.
    out_k = tmp_path / "results_k.jsonl"
    proc = os_cli("eval", "--model", str(trained_adapter), "--dataset", str(data), "--format", "prompt-answer",
                  "--task", "math", "--chat-template", "model", "--max-new-tokens", "12", "--num-samples", "3",
                  "--temperature", "1.0", "--output", str(out_k))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out_k.read_text().splitlines()]
    assert len(records) == 12 and {r["sample"] for r in records} == {0, 1, 2}
    assert "pass@3" in proc.stdout


def test_in_training_eval_reports_what_os_eval_reports(trained_adapter, tmp_path):
    """Issue 27: GRPO's --eval-steps scores with the run's rewards and reports os eval's summary, on the
    same data, with the same numbers (the end-of-run eval vs `os eval` of the saved adapter)."""
    data = tmp_path / "eval.jsonl"
    rows = [{"prompt": f"What is {q}?", "answer": a} for q, a in PROBLEMS]
    rows[3]["answer"] = "10"  # one wrong reference: pass@1 3/4
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "grpo"
    proc = subprocess.run(
        [sys.executable, "-c", "from opensloth.cli.train import app; app()", "grpo", "--model", str(trained_adapter),
         "--dataset", str(data), "--eval-dataset", str(data), "--format", "prompt-answer", "--task", "math",
         "--chat-template", "model", "--max-new-tokens", "12", "--group-size", "2", "--rollout-batch-size", "2",
         "--max-steps", "1", "--eval-steps", "1", "--learning-rate", "1e-3", "--devices", "cpu",
         "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--report-to", "none"],
        check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    in_training = {k.removeprefix("eval/"): v for k, v in final.items() if k.startswith("eval/")}

    proc = os_cli("eval", "--model", str(out), "--dataset", str(data), "--output", str(tmp_path / "r.jsonl"))
    assert proc.returncode == 0, proc.stderr
    table = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 2 and cells[1].replace(".", "").replace("-", "").isdigit():
            table[cells[0]] = float(cells[1])
    assert set(in_training) == set(table) >= {"pass@1", "reward/mean", "rewards/math_answer/mean"}
    assert in_training["pass@1"] == 0.75
    for key, value in table.items():
        assert round(in_training[key], 4) == value, key


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_eval_with_an_engine_that_cannot_run_here(trained_adapter, tmp_path):
    """`--rollout-engine vllm` without vllm: one line saying why and what to do, nothing written."""
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1+1?", "answer": "2"}) + "\n")
    out = tmp_path / "results.jsonl"
    proc = os_cli("eval", "--model", str(trained_adapter), "--dataset", str(data), "--format", "prompt-answer",
                  "--rollout-engine", "vllm", "--output", str(out))
    assert proc.returncode == 2, proc.stderr
    assert "--rollout-engine vllm cannot run here: vllm is not installed" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.slow
def test_save_merged_on_training(tiny_model_dir, tmp_path):
    """`os-train sft --save-merged`: OUTPUT_DIR/merged is a plain bf16 transformers model beside the adapter."""
    import os

    from transformers import AutoModelForCausalLM

    from opensloth.data.synthetic import make_arithmetic_rows, write_rows

    data = write_rows(make_arithmetic_rows(16, seed=0, schema="openmath"), tmp_path / "rows.jsonl")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", "from opensloth.cli.train import app; app()", "sft", "--model", str(tiny_model_dir),
         "--dataset", str(data), "--devices", "cpu", "--output-dir", str(out), "--cache-dir", str(tmp_path / "c"),
         "--report-to", "none", "--max-steps", "2", "--max-seq-length", "512", "--system-prompt", "Think.",
         "--save-merged"],
        check=False, capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (out / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.dtype == torch.bfloat16 and not any("lora" in n for n, _ in merged.named_parameters())
