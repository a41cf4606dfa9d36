"""Model backends (hf: transformers + PEFT; unsloth: FastLanguageModel on CUDA), LoRA, saving.

Public API:
    load_model_and_tokenizer(model_cfg, lora_cfg, device, *, for_training=True) -> (model, tokenizer)
    save_model(model, tokenizer, out_dir) -> Path
    merge_and_save(model_dir, out_dir) -> Path
    tiny.build_tiny_model(out_dir, ...) -> Path   (tests, demo)
"""

from opensloth.models.loading import (
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_backend,
    resolve_dtype,
    unsloth_usable,
)
from opensloth.models.saving import merge_and_save, save_model, unwrap_model

__all__ = [
    "load_model_and_tokenizer",
    "load_tokenizer",
    "merge_and_save",
    "resolve_backend",
    "resolve_dtype",
    "save_model",
    "unsloth_usable",
    "unwrap_model",
]
