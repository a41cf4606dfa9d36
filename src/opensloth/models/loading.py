"""Load a model and tokenizer for training or inference: hf (transformers + PEFT) or unsloth.

Both backends return a PEFT model (or a plain model with --full-finetune), so everything
above models/ is backend-agnostic. `--model` is one of:

- a hub name or local directory of a base model: LoRA is added per the LoRA options;
- a local directory holding a saved PEFT adapter (`adapter_config.json`): its base model
  (`base_model_name_or_path`) is loaded and the adapter is trained further; the adapter's
  own rank, alpha and target modules apply, not the LoRA options.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from opensloth.config import LoraConfig, ModelConfig
from opensloth.errors import MissingExtraError, UserError

logger = logging.getLogger(__name__)

UNSLOTH_HINT = "pip install -e '.[unsloth]' (needs an NVIDIA GPU)"


# ------------------------------------------------------------------ choices


def resolve_backend(requested: str, device: torch.device) -> str:
    """`hf` or `unsloth` for `--backend auto|hf|unsloth` on this device.

    Raises:
        UserError: unsloth asked for without CUDA.
        MissingExtraError: unsloth asked for but not installed (a UserError and an ImportError).
    """
    if requested == "hf":
        return "hf"
    usable, why = unsloth_usable(device)
    if requested == "unsloth":
        if device.type != "cuda":
            raise UserError(f"--backend unsloth needs a CUDA GPU ({why}). Use --backend hf on this machine.")
        if not usable:
            raise MissingExtraError(f"--backend unsloth: {why}. Install it with {UNSLOTH_HINT}, or use --backend hf.")
        return "unsloth"
    return "unsloth" if usable else "hf"


def unsloth_usable(device: torch.device | None = None) -> tuple[bool, str]:
    """Whether the unsloth backend can run here, and why not. Imports unsloth only on CUDA."""
    if (device is not None and device.type != "cuda") or not torch.cuda.is_available():
        return False, "no CUDA device"
    if importlib.util.find_spec("unsloth") is None:
        return False, "unsloth is not installed"
    try:
        import unsloth  # noqa: F401  (importing patches transformers; needed before use)
    except Exception as err:  # noqa: BLE001  (unsloth raises many kinds on a bad environment)
        return False, f"unsloth failed to import: {err}"
    return True, "available"


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """Weights dtype for `--dtype`: auto is bfloat16 on CUDA (float16 where bf16 is missing), float32 on CPU."""
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if requested == "float16" and device.type == "cpu":
        raise UserError("--dtype float16 is not supported for training on the CPU. Use float32 or bfloat16.")
    return getattr(torch, requested)


def use_gradient_checkpointing(requested: str, device: torch.device) -> bool:
    """auto: on for CUDA (memory is the limit there), off on the CPU (time is)."""
    return requested == "on" or (requested == "auto" and device.type == "cuda")


def read_adapter_config(model: str) -> dict[str, Any] | None:
    """The saved adapter's config if `model` is a local adapter directory, else None."""
    path = Path(model).expanduser()
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"--model {model}: adapter_config.json is not valid JSON ({err}).") from None


def check_base_model(adapter_dir: str, base: str,
                     fix: str = "Point base_model_name_or_path in that file at its new place.") -> str:
    """The base model an adapter records (`base_model_name_or_path`), checked like --model.

    Raises:
        UserError: the recorded local base was moved or deleted (says where to point at its new
            place), or its weights are cut short.
    """
    try:
        base = check_model_path(base, option=f"The base model recorded in {adapter_dir}/adapter_config.json,")
    except UserError as err:
        if Path(base).expanduser().exists():
            raise
        raise UserError(f"The base model recorded in {adapter_dir}/adapter_config.json, {base}, does not exist "
                        f"(moved or deleted). {fix}") from err
    check_weights(base, f"The base model of {adapter_dir}")
    return base


def check_model_path(model: str, option: str = "--model") -> str:
    """Return a local path as an absolute string (so it is recorded that way in saved adapters),
    or a hub name unchanged. Raise a UserError for a local path that is not a model."""
    path = Path(model).expanduser()
    looks_local = path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{option} {model} is a file; pass a model directory or a hub model name.")
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise UserError(
                f"{option} {model} is not a model directory (no config.json or adapter_config.json). "
                "Pass a directory saved with save_pretrained, an OpenSloth output dir, or a hub model name."
            )
        return str(path.resolve())
    if looks_local:
        raise UserError(f"{option} {model}: no such directory. Check the path, or pass a hub model name.")
    return model


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a .safetensors file's framing, or None when it is whole.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's byte
    range, then the data: a download or save cut short ends before the last range does. Only the
    header is read, so this costs microseconds even for a 10 GB file.
    """
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes, shorter than the 8-byte header"
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        if 8 + header_len > size:
            return f"{size:,} bytes, but its header alone claims {header_len:,} (a cut-off file, or a Git LFS pointer)"
        try:
            header = json.loads(fh.read(header_len))
        except ValueError:
            return "its header is not valid JSON"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"{size:,} bytes, but its header describes {expected:,}"
    return None


def torch_zip_problem(path: Path) -> str | None:
    """What is wrong with a torch.save zip file (pytorch_model.bin, adapter_model.bin), or None.

    A zip ends with its central directory, which a cut-off file lacks (`zipfile.is_zipfile` reads only
    the end). Files in the pre-1.6 pickle format are not zips and are left to torch.
    """
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            return None  # not a zip: the legacy format, or not torch's at all
    return None if zipfile.is_zipfile(path) else "a torch.save zip without its end (a cut-off file)"


def missing_shards(directory: Path) -> list[tuple[str, str]]:
    """(index file, shard) for each shard a sharded checkpoint's *.index.json lists that is not there."""
    missing = []
    for index in sorted(directory.glob("*.index.json")):
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (ValueError, AttributeError):
            continue  # not a weights index; transformers reports it if it was meant to be one
        for shard in sorted(set(weight_map.values()) if isinstance(weight_map, dict) else ()):
            if isinstance(shard, str) and not (directory / shard).is_file():
                missing.append((index.name, shard))
    return missing


def check_weights(directory: str | Path, what: str) -> None:
    """Refuse a local model or adapter directory whose weights are cut short or missing a shard.

    Checks the framing of every .safetensors file, the end of every torch.save zip (.bin, .pt), and
    that every shard a *.index.json lists exists. Reads headers and file ends only.

    Raises:
        UserError: names the file, says it is corrupt or incomplete and how to get it whole.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return  # a hub name: the hub download checks its files
    fix = "Download it again, or save the model again with save_pretrained (an interrupted copy or download leaves this)."
    checks = [(file, safetensors_problem) for file in directory.glob("*.safetensors")]
    checks += [(file, torch_zip_problem) for pattern in ("*.bin", "*.pt") for file in directory.glob(pattern)]
    for file, problem_of in sorted(checks, key=lambda check: check[0]):
        problem = problem_of(file)
        if problem:
            raise UserError(f"{what}: {file} is corrupt or incomplete ({problem}). {fix}")
    missing = missing_shards(directory)
    if missing:
        index, shard = missing[0]
        raise UserError(f"{what}: {directory / index} lists the shard {shard}, which is not in {directory} "
                        f"(an incomplete download or copy). {fix}")


# ------------------------------------------------------------------ loading


def load_model_and_tokenizer(
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig,
    device: torch.device | str,
    *,
    for_training: bool = True,
    max_seq_length: int = 2048,
) -> tuple[Any, Any]:
    """Load `model_cfg.model` with its tokenizer, ready to train (or, with for_training=False, to generate).

    Args:
        model_cfg: the model section (model, backend, dtype, load_in_4bit, full_finetune, ...).
        lora_cfg: the LoRA section (ignored with full_finetune or when continuing an adapter).
        device: where the model lives (one worker, one device).
        for_training: add/unfreeze LoRA and set up gradient checkpointing; False gives an eval
            model (a saved adapter is still applied, a base model gets no LoRA).
        max_seq_length: longest sequence the model will see (unsloth sizes its RoPE cache with it).

    Returns:
        (model, tokenizer): a PeftModel, or a plain PreTrainedModel with --full-finetune or for
        inference on a base model; the tokenizer always has a pad token.

    Raises:
        UserError: bad path, bad option combination, unknown target modules.
    """
    device = torch.device(device)
    name = check_model_path(model_cfg.model)
    check_weights(name, f"--model {model_cfg.model}")
    adapter = read_adapter_config(name)
    if adapter is not None and model_cfg.full_finetune:
        raise UserError(
            f"--model {model_cfg.model} is a LoRA adapter; --full-finetune needs a full model. "
            "Merge the adapter into its base first, or drop --full-finetune to keep training the adapter."
        )
    if model_cfg.load_in_4bit and device.type != "cuda":
        raise UserError("--load-in-4bit needs a CUDA GPU (bitsandbytes). Drop it on this machine.")
    if model_cfg.load_in_4bit and model_cfg.full_finetune:
        raise UserError("--load-in-4bit cannot be combined with --full-finetune: 4-bit weights are frozen.")
    dtype = resolve_dtype(model_cfg.dtype, device)
    backend = resolve_backend(model_cfg.backend, device)
    logger.info("Loading %s with the %s backend (%s on %s)", name, backend, dtype, device)
    if backend == "unsloth":
        return _load_unsloth(model_cfg, lora_cfg, name, adapter, dtype, for_training, max_seq_length)
    return _load_hf(model_cfg, lora_cfg, name, adapter, dtype, device, for_training)


def _load_hf(model_cfg, lora_cfg, name, adapter, dtype, device, for_training):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_name = name
    if adapter is not None:
        base_name = adapter.get("base_model_name_or_path")
        if not base_name:
            raise UserError(f"--model {name}: adapter_config.json records no base_model_name_or_path.")
        base_name = check_base_model(name, base_name)
    tokenizer = load_tokenizer(name if _has_tokenizer(name) else base_name, model_cfg.trust_remote_code)

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.load_in_4bit:
        kwargs["quantization_config"] = _bnb_4bit_config(dtype)
        kwargs["device_map"] = {"": device.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(base_name, **kwargs)
    except OSError as err:
        raise UserError(f"--model {base_name}: could not load the model ({err}).") from None
    if not model_cfg.load_in_4bit:
        model.to(device)
    _match_pad_token(model, tokenizer)

    checkpointing = for_training and use_gradient_checkpointing(model_cfg.gradient_checkpointing, device)
    if model_cfg.load_in_4bit and for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        # Non-reentrant checkpointing needs no input grads, so frozen embeddings are fine under LoRA.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # model.config.use_cache stays on: GRPO generates with this model; training forwards pass use_cache=False.

    if adapter is not None:
        model = PeftModel.from_pretrained(model, name, is_trainable=for_training)
    elif for_training and not model_cfg.full_finetune:
        model = add_lora(model, lora_cfg)
    model.train(for_training)
    return model, tokenizer


REFERENCE_ADAPTER = "reference"


def add_reference_adapter(model: Any, adapter_dir: str) -> str:
    """Load the adapter saved in `adapter_dir` a second time, frozen, as `REFERENCE_ADAPTER`.

    GRPO that continues an adapter trains the copy PEFT loaded as "default"; this frozen copy keeps
    the starting policy for the KL term. LoRA weights only: the base weights are shared.

    Returns:
        The reference adapter's name.
    """
    model.load_adapter(adapter_dir, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    return REFERENCE_ADAPTER


@contextlib.contextmanager
def adapter_active(model: Any, name: str) -> Iterator[None]:
    """Run the block with adapter `name` active instead of the current one, then switch back.

    PEFT's set_adapter also sets requires_grad (True on the active adapter, False on the others):
    `name` is activated frozen, and switching back makes the trained adapter trainable again.
    """
    trained = model.active_adapter
    model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(trained)


def add_lora(model, lora_cfg: LoraConfig):
    """Wrap `model` in a fresh LoRA adapter (B zero-initialised, so the output is unchanged)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    missing = [m for m in lora_cfg.target_modules if not _has_module(model, m)]
    if missing:
        raise UserError(
            f"--target-modules {','.join(missing)} not found in {type(model).__name__}. "
            f"Linear modules it has: {', '.join(linear_module_names(model))}."
        )
    peft_config = PeftLoraConfig(
        r=lora_cfg.lora_r,
        lora_alpha=lora_cfg.lora_alpha,
        lora_dropout=lora_cfg.lora_dropout,
        target_modules=list(lora_cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def _load_unsloth(model_cfg, lora_cfg, name, adapter, dtype, for_training, max_seq_length):
    from unsloth import FastLanguageModel

    checkpointing = for_training and use_gradient_checkpointing(model_cfg.gradient_checkpointing, torch.device("cuda"))
    # Given an adapter directory, unsloth loads its base and applies the adapter itself.
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=name,
        max_seq_length=max_seq_length,
        dtype=dtype,
        load_in_4bit=model_cfg.load_in_4bit,
        full_finetuning=model_cfg.full_finetune,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    if adapter is not None:
        if for_training:
            for param_name, param in model.named_parameters():
                param.requires_grad = "lora_" in param_name
    elif for_training and not model_cfg.full_finetune:
        model = FastLanguageModel.get_peft_model(
            model,
            r=lora_cfg.lora_r,
            lora_alpha=lora_cfg.lora_alpha,
            lora_dropout=lora_cfg.lora_dropout,
            target_modules=list(lora_cfg.target_modules),
            bias="none",
            use_gradient_checkpointing="unsloth" if checkpointing else False,
        )
    if not for_training:
        FastLanguageModel.for_inference(model)
    # unsloth may hand back a processor for multimodal models; we train text only.
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """AutoTokenizer for `name`, with a pad token (eos when the tokenizer has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise UserError(f"--model {name}: could not load its tokenizer ({err}).") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ------------------------------------------------------------------ helpers


def linear_module_names(model) -> list[str]:
    """Distinct leaf names of the Linear layers (what --target-modules may name), lm_head excluded."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names - {"lm_head"})


def _has_module(model, leaf: str) -> bool:
    return any(n == leaf or n.endswith("." + leaf) for n, _ in model.named_modules())


def _has_tokenizer(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def _match_pad_token(model, tokenizer) -> None:
    """Generation warns and may misbehave when the model's pad id disagrees with the tokenizer's."""
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def _bnb_4bit_config(dtype: torch.dtype):
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingExtraError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
