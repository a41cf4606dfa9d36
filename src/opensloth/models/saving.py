"""Save what training produced: a PEFT adapter (or a full model) with the tokenizer and its template.

Writes are atomic per file: everything is written into a temporary directory next to the
target, then moved into place with `os.replace`, config files last, so a reader never sees a
config whose weights are missing or half written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Moved last: a loader looks for these first, so they appear only once the weights are in place.
CONFIG_FILES = ("adapter_config.json", "config.json")


def unwrap_model(model: Any) -> Any:
    """The model inside DDP / accelerate / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def save_pretrained_trained(model: Any, out_dir: str | Path, **kwargs: Any) -> None:
    """`model.save_pretrained(out_dir)`, restricted to the active adapter of a PEFT model that holds
    several (GRPO keeps a frozen copy of a continued adapter as its KL reference, which must not be
    written as a second adapter beside the trained one)."""
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and len(peft_config) > 1:
        kwargs["selected_adapters"] = [model.active_adapter]
    model.save_pretrained(out_dir, **kwargs)


def save_model(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Save `model` (PEFT adapter or full model) and `tokenizer` (with its chat template) into `out_dir`.

    A PEFT model writes `adapter_config.json` (its base model recorded as
    `base_model_name_or_path`) and `adapter_model.safetensors`; a plain model writes
    `config.json` and `model.safetensors`. Other files in `out_dir` (metrics, logs) are kept.

    Args:
        model: the trained model (wrappers such as DDP are removed).
        tokenizer: its tokenizer; `chat_template.jinja` is written with it.
        out_dir: the directory to fill (created if missing).

    Returns:
        `out_dir` as a Path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = unwrap_model(model)
    with tempfile.TemporaryDirectory(prefix=".saving-", dir=out) as tmp:
        save_pretrained_trained(model, tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: (n in CONFIG_FILES, n))
        for name in names:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(Path(tmp) / name, target)
    return out


def merge_and_save(model_dir: str | Path, out_dir: str | Path, dtype: str = "bfloat16",
                   base_model: str | None = None) -> Path:
    """Merge a saved LoRA adapter into its base weights and save a standalone model.

    Args:
        model_dir: a directory written by `save_model` with a PEFT adapter.
        out_dir: where the merged model and tokenizer go.
        dtype: dtype of the merged weights (16-bit for serving).
        base_model: the base model to merge into (default: the one the adapter records).

    Returns:
        `out_dir` as a Path, loadable with `AutoModelForCausalLM.from_pretrained`.
    """
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if base_model is None:
        model = AutoPeftModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    else:
        base = AutoModelForCausalLM.from_pretrained(base_model, dtype=getattr(torch, dtype))
        model = PeftModel.from_pretrained(base, str(model_dir))
    merged = model.merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return save_model(merged, tokenizer, out_dir)
