"""The hf rollout engine on a real tiny Qwen2 (tests/conftest.py `tiny_model_dir`)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from opensloth.errors import UserError
from opensloth.rollout import get_rollout_engine
from opensloth.rollout.base import RolloutBatch, completion_mask_from_eos
from opensloth.rollout.hf import (
    HFRolloutEngine,
    filter_logits,
    lean_decode_unsupported,
    left_pad,
    stop_token_ids,
)

PROMPTS = [
    "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "x",
]


@pytest.fixture
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def _valid_prefix(batch: RolloutBatch, row: int) -> list[int]:
    return batch.completion_ids[row][batch.completion_mask[row].bool()].tolist()


# -- pure helpers ------------------------------------------------------------------------------


def test_completion_mask_includes_first_eos_and_flags_truncation():
    ids = torch.tensor([[5, 9, 7, 9], [1, 2, 3, 4], [9, 8, 9, 9], [3, 4, 8, 6]])
    mask, truncated = completion_mask_from_eos(ids, eos_ids=[9, 8])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]
    assert truncated.tolist() == [False, True, False, False]


def test_left_pad_and_multiple_of():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0, multiple_of=4)
    assert ids.tolist() == [[0, 1, 2, 3], [0, 0, 0, 4]]
    assert mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]


def test_stop_tokens_of_the_real_qwen_tokenizer(qwen_tokenizer):
    ids = stop_token_ids(qwen_tokenizer)  # no model, so no generation_config to list them
    assert qwen_tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    assert qwen_tokenizer.convert_tokens_to_ids("<|endoftext|>") in ids
    assert qwen_tokenizer.eos_token_id in ids


# -- generation --------------------------------------------------------------------------------


def test_group_layout_shapes_and_string_or_id_prompts(model_and_tokenizer):
    model, tok = model_and_tokenizer
    engine = HFRolloutEngine(model, tok)
    batch = engine.generate(PROMPTS, group_size=4, max_new_tokens=6, seed=0)
    B = len(PROMPTS) * 4
    assert len(batch) == B and len(batch.completions_text) == B
    assert batch.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    assert batch.prompt_mask.sum(1).tolist() == [n for n in lengths for _ in range(4)]
    assert batch.prompt_ids.shape == (B, max(lengths))
    for i in range(B):  # every row of a group carries its prompt, left-padded
        n = lengths[i // 4]
        want = tok(PROMPTS[i // 4], add_special_tokens=False)["input_ids"]
        assert batch.prompt_ids[i, -n:].tolist() == want
        assert (batch.prompt_mask[i, : max(lengths) - n] == 0).all()
    assert batch.input_ids.shape == (B, max(lengths) + batch.num_completion_tokens)
    torch.testing.assert_close(batch.attention_mask, torch.cat([batch.prompt_mask, batch.completion_mask], 1))
    assert batch.sampler_log_probs is None
    # Token-id prompts (the prepared dataset's prompt_ids) are the same thing.
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    same = engine.generate(ids, group_size=4, max_new_tokens=6, seed=0)
    assert torch.equal(same.completion_ids, batch.completion_ids)
    with pytest.raises(ValueError, match="not a mix"):
        engine.generate([PROMPTS[0], ids[1]], group_size=2, max_new_tokens=2)


def test_greedy_alone_equals_greedy_in_a_left_padded_batch(model_and_tokenizer):
    model, tok = model_and_tokenizer
    engine = HFRolloutEngine(model, tok)
    together = engine.generate(PROMPTS, group_size=1, max_new_tokens=10, greedy=True)
    assert together.prompt_mask[2].sum() == 1  # "x" is heavily left-padded
    for i, prompt in enumerate(PROMPTS):
        alone = engine.generate([prompt], group_size=1, max_new_tokens=10, greedy=True)
        assert alone.prompt_mask.all()  # no padding on its own
        assert _valid_prefix(alone, 0) == _valid_prefix(together, i)


def test_seed_makes_sampling_reproducible_without_touching_global_rng(model_and_tokenizer):
    model, tok = model_and_tokenizer
    engine = HFRolloutEngine(model, tok)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = engine.generate(PROMPTS[:2], group_size=3, max_new_tokens=8, temperature=1.0, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is untouched
    b = engine.generate(PROMPTS[:2], group_size=3, max_new_tokens=8, temperature=1.0, seed=7)
    c = engine.generate(PROMPTS[:2], group_size=3, max_new_tokens=8, temperature=1.0, seed=8)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.completions_text == b.completions_text
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # Completions within a group differ (sampling, not G copies of one sample).
    assert len({tuple(r) for r in a.completion_ids[:3].tolist()}) > 1


def test_model_generation_config_does_not_leak_into_sampling(model_and_tokenizer):
    """A hub model's top_k / repetition_penalty must not reshape the sampling distribution."""
    model, tok = model_and_tokenizer
    model.generation_config.top_k = 1  # if inherited, every sample would be the argmax
    model.generation_config.repetition_penalty = 10.0
    engine = HFRolloutEngine(model, tok)
    sampled = engine.generate([PROMPTS[0]], group_size=6, max_new_tokens=6, seed=0)
    assert len({tuple(r) for r in sampled.completion_ids.tolist()}) > 1
    # Greedy equals a plain argmax loop (no repetition penalty applied).
    greedy = engine.generate([PROMPTS[1]], group_size=1, max_new_tokens=6, greedy=True)
    ids = tok(PROMPTS[1], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert _valid_prefix(greedy, 0) == ids[0, -6:].tolist()[: len(_valid_prefix(greedy, 0))]


def test_stops_at_im_end_masks_after_it_and_decodes_without_it(model_and_tokenizer):
    model, tok = model_and_tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    # Make <|im_end|> the likeliest token wherever the token the model first emits greedily
    # would have been: its output row becomes a scaled copy of that token's row.
    first = HFRolloutEngine(model, tok).generate([PROMPTS[0]], group_size=1, max_new_tokens=1, greedy=True)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[eos] = 1.5 * head[int(first.completion_ids[0, 0])]
    engine = HFRolloutEngine(model, tok)
    # ~10% of completions end at <|im_end|>: 96 of them make "none did" a 1e-4 chance for any seed.
    batch = engine.generate(PROMPTS, group_size=32, max_new_tokens=12, temperature=1.5, seed=0)
    ended = (~batch.is_truncated).nonzero().flatten().tolist()
    assert ended, "no completion produced <|im_end|>"
    assert torch.equal(batch.is_eos_terminated, ~batch.is_truncated)
    for row in range(len(batch)):
        ids, mask = batch.completion_ids[row].tolist(), batch.completion_mask[row].tolist()
        if row in ended:
            k = ids.index(eos)
            assert mask == [1] * (k + 1) + [0] * (len(ids) - k - 1)  # up to and including EOS
            assert ids[k + 1 :] == [engine.pad_id] * (len(ids) - k - 1)
            assert batch.completions_text[row] == tok.decode(ids[:k], skip_special_tokens=True)
        else:
            assert eos not in ids and all(mask) and len(ids) == 12


def test_lora_is_active_during_generation_and_train_mode_is_restored(model_and_tokenizer):
    from peft import LoraConfig, get_peft_model

    model, tok = model_and_tokenizer
    base_out = HFRolloutEngine(model, tok).generate(PROMPTS, group_size=1, max_new_tokens=8, greedy=True)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))
    peft_model.gradient_checkpointing_enable()  # as in training; generation must still use the cache
    engine = HFRolloutEngine(peft_model, tok)
    peft_model.train()
    fresh = engine.generate(PROMPTS, group_size=1, max_new_tokens=8, greedy=True)
    assert torch.equal(fresh.completion_ids, base_out.completion_ids)  # B = 0: the adapter is a no-op
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    adapted = engine.generate(PROMPTS, group_size=1, max_new_tokens=8, greedy=True)
    assert peft_model.training  # restored after generation
    assert not torch.equal(adapted.completion_ids, base_out.completion_ids)
    with peft_model.disable_adapter():
        again = engine.generate(PROMPTS, group_size=1, max_new_tokens=8, greedy=True)
    assert torch.equal(again.completion_ids, base_out.completion_ids)


def test_rollout_batch_to_device_and_errors(model_and_tokenizer):
    model, tok = model_and_tokenizer
    engine = HFRolloutEngine(model, tok)
    batch = engine.generate(PROMPTS[:1], group_size=2, max_new_tokens=3, seed=0).to("cpu")
    assert batch.completion_ids.device.type == "cpu" and len(batch) == 2
    with pytest.raises(ValueError, match="group_size and max_new_tokens must be >= 1"):
        engine.generate(PROMPTS, group_size=0, max_new_tokens=3)
    with pytest.raises(ValueError, match="at least one prompt"):
        engine.generate([], group_size=2, max_new_tokens=3)


# -- the lean decoder against transformers' generate ---------------------------------------------


def _make_eos_likely(model, tok, prompt):
    """Make <|im_end|> likely wherever the greedy first token of `prompt` would be (its output row
    becomes a scaled copy of that token's), so some rows stop mid-way and others run on."""
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    first = HFRolloutEngine(model, tok, decoder="generate").generate([prompt], group_size=1, max_new_tokens=1,
                                                                     greedy=True)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[eos] = 1.05 * head[int(first.completion_ids[0, 0])]
    return eos


def test_lean_greedy_gives_exactly_generates_tokens(model_and_tokenizer):
    model, tok = model_and_tokenizer
    eos = _make_eos_likely(model, tok, PROMPTS[1])
    lean = HFRolloutEngine(model, tok, decoder="lean")
    ref = HFRolloutEngine(model, tok, decoder="generate")
    assert lean.decoder == "lean" and ref.decoder == "generate"
    prompts = PROMPTS + ["<|im_start|>user\nA longer question, to pad the others a lot more?<|im_end|>\n"]
    a = lean.generate(prompts, group_size=3, max_new_tokens=16, greedy=True)
    b = ref.generate(prompts, group_size=3, max_new_tokens=16, greedy=True)
    ended = (~b.is_truncated).nonzero().flatten().tolist()
    assert 0 < len(ended) < len(b), "the test needs rows that stop at EOS mid-way and rows that do not"
    assert any(b.completion_mask[r].sum() < 16 for r in ended)
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.prompt_mask, b.prompt_mask)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert torch.equal(a.is_truncated, b.is_truncated) and a.completions_text == b.completions_text
    assert eos in a.completion_ids
    # min_new_tokens (bench/gpu_grpo.py forces full-length completions with it): the same on both decoders.
    lean.min_new_tokens = ref.min_new_tokens = 16
    a = lean.generate(prompts, group_size=1, max_new_tokens=16, greedy=True)
    b = ref.generate(prompts, group_size=1, max_new_tokens=16, greedy=True)
    assert a.completion_mask.all() and torch.equal(a.completion_ids, b.completion_ids)


def test_lean_prefills_each_prompt_once(model_and_tokenizer):
    """generate() runs the prompt batch G times over; the lean loop runs each prompt once."""
    model, tok = model_and_tokenizer
    shapes: list[tuple[int, int]] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        HFRolloutEngine(model, tok, decoder="lean").generate(PROMPTS, group_size=4, max_new_tokens=5, seed=0)
        lean_prefills = [s for s in shapes if s[1] > 1]
        shapes.clear()
        HFRolloutEngine(model, tok, decoder="generate").generate(PROMPTS, group_size=4, max_new_tokens=5, seed=0)
        generate_prefills = [s for s in shapes if s[1] > 1]
    finally:
        hook.remove()
    P = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS)
    assert lean_prefills == [(3, P)]  # N rows, once
    assert generate_prefills == [(12, P)]  # N x G rows


@pytest.mark.parametrize("temperature,top_p,min_p", [(1.0, 1.0, 0.0), (0.7, 0.9, 0.0), (1.3, 1.0, 0.1),
                                                     (0.5, 0.8, 0.05), (1.0, 0.3, 0.0)])
def test_filter_logits_equals_transformers_warpers(model_and_tokenizer, temperature, top_p, min_p):
    """Our sampling distribution is exactly the one generate builds from the same GenerationConfig."""
    model, tok = model_and_tokenizer
    engine = HFRolloutEngine(model, tok)
    cfg = engine.generation_config(max_new_tokens=4, temperature=temperature, top_p=top_p, min_p=min_p, greedy=False)
    processors = model._get_logits_processor(generation_config=cfg, input_ids_seq_length=3,
                                             encoder_input_ids=None, prefix_allowed_tokens_fn=None,
                                             logits_processor=None, device="cpu")
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(0)) * 3
    logits[0, :5] = 10.0  # ties at the top
    theirs = processors(torch.zeros(16, 3, dtype=torch.long), logits.clone())
    ours = filter_logits(logits, temperature=temperature, top_p=top_p, min_p=min_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))  # the same tokens removed
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1), rtol=0, atol=1e-7)
    if top_p < 1.0 or min_p > 0.0:
        assert torch.isinf(ours).any()  # the filters did something


def test_lean_samples_the_filtered_distribution(model_and_tokenizer):
    """Empirical first and second tokens of many completions against softmax(filter(logits / T)) of a
    teacher-forced forward, with a total-variation bound that the distribution without top-p fails."""
    model, tok = model_and_tokenizer
    with torch.no_grad():  # sharpen the random model, so top-p keeps ~100 of its 263 tokens
        model.get_output_embeddings().weight.mul_(3.0)
    temperature, top_p, n = 0.7, 0.8, 3000
    engine = HFRolloutEngine(model, tok, decoder="lean")
    batch = engine.generate([PROMPTS[0]], group_size=n, max_new_tokens=2, temperature=temperature, top_p=top_p,
                            seed=0)
    prompt = batch.prompt_ids[:1]
    with torch.no_grad():
        first_logits = model(prompt).logits[0, -1].float()
    first = batch.completion_ids[:, 0]

    def tv(samples, logits, **kw):
        """TV(empirical, expected) and a bound ~2.5x its expected value under the right distribution."""
        expected = filter_logits(logits[None], **kw)[0].softmax(-1)
        empirical = torch.bincount(samples, minlength=expected.numel()).float() / samples.numel()
        bound = 2 * (expected * (1 - expected) / samples.numel()).sqrt().sum() / 2
        return float((empirical - expected).abs().sum() / 2), float(bound)

    distance, bound = tv(first, first_logits, temperature=temperature, top_p=top_p)
    assert distance < bound
    for wrong in ({}, {"temperature": temperature}, {"top_p": top_p}):  # each must be told apart
        assert tv(first, first_logits, **wrong)[0] > bound, wrong
    # Second step, conditioned on the most frequent first token (the decode path, cache repeated G times).
    common = int(first.mode().values)
    rows = (first == common).nonzero().flatten()
    assert len(rows) > 500
    with torch.no_grad():
        second_logits = model(torch.cat([prompt, torch.tensor([[common]])], 1)).logits[0, -1].float()
    distance, bound = tv(batch.completion_ids[rows, 1], second_logits, temperature=temperature, top_p=top_p)
    assert distance < bound


def test_lean_falls_back_to_generate_for_an_unsupported_model(model_and_tokenizer, caplog):
    from transformers import T5Config, T5ForConditionalGeneration

    _, tok = model_and_tokenizer
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=300, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                             d_kv=8, decoder_start_token_id=0))
    assert lean_decode_unsupported(t5) == "not a decoder-only transformers model"
    with caplog.at_level("INFO", logger="opensloth.rollout.hf"):
        assert HFRolloutEngine(t5, tok).decoder == "generate"
    assert "lean loop cannot: not a decoder-only" in caplog.text
    with pytest.raises(ValueError, match="decoder must be one of auto, lean, generate"):
        HFRolloutEngine(t5, tok, decoder="fast")


# -- engine selection --------------------------------------------------------------------------


def test_get_rollout_engine(model_and_tokenizer):
    model, tok = model_and_tokenizer
    assert isinstance(get_rollout_engine("hf", model, tok, "cpu"), HFRolloutEngine)
    with pytest.raises(UserError, match="choose one of: auto, hf, vllm"):
        get_rollout_engine("sglang", model, tok, "cpu")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_auto_falls_back_to_hf_and_explicit_vllm_explains(model_and_tokenizer):
    model, tok = model_and_tokenizer
    assert isinstance(get_rollout_engine("auto", model, tok, "cpu"), HFRolloutEngine)
    with pytest.raises(UserError, match="--rollout-engine vllm cannot run here: vllm is not installed"):
        get_rollout_engine("vllm", model, tok, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="static-cache generation needs CUDA")
def test_static_cache_on_cuda_matches_dynamic_greedy(model_and_tokenizer):
    model, tok = model_and_tokenizer
    model = model.to("cuda")
    static = HFRolloutEngine(model, tok, device="cuda")
    dynamic = HFRolloutEngine(model, tok, device="cuda", static_cache=False)
    assert static.static_cache and static.generation_config(
        max_new_tokens=4, temperature=1.0, top_p=1.0, min_p=0.0, greedy=True).cache_implementation == "static"
    a = static.generate(PROMPTS, group_size=1, max_new_tokens=8, greedy=True)
    b = dynamic.generate(PROMPTS, group_size=1, max_new_tokens=8, greedy=True)
    assert a.prompt_ids.shape[1] % 64 == 0  # padded to a cache-friendly length
    for row in range(len(PROMPTS)):
        assert _valid_prefix(a, row) == _valid_prefix(b, row)


def _peft_with_random_lora(model, target_modules="all-linear"):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
    return peft_model


def test_lora_merged_for_sampling_is_the_same_function_and_restores_the_weights_bit_for_bit(model_and_tokenizer):
    from opensloth.rollout.hf import lora_merged_for_sampling

    model, tok = model_and_tokenizer
    peft_model = _peft_with_random_lora(model).eval()
    ids = torch.tensor([tok(PROMPTS[0], add_special_tokens=False)["input_ids"]])
    base_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "base_layer" in n}
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for n, m in peft_model.named_modules()
             if n.endswith("lora_A.default")]
    with torch.no_grad():
        unmerged = peft_model(ids).logits.log_softmax(-1)
        n_calls = len(calls)
        with lora_merged_for_sampling(peft_model) as merged_layers:
            merged = peft_model(ids).logits.log_softmax(-1)
            assert len(calls) == n_calls  # the LoRA branch does not run: it is in the weights
        after = peft_model(ids).logits.log_softmax(-1)
    for h in hooks:
        h.remove()
    assert merged_layers == len(hooks) == 7 * model.config.num_hidden_layers
    assert len(calls) == 2 * n_calls  # back to the two-branch forward
    assert not torch.equal(merged, unmerged)  # rounded differently ...
    assert (merged - unmerged).abs().max() < 1e-5  # ... but the same function
    assert torch.equal(after, unmerged)
    for n, p in peft_model.named_parameters():
        if "base_layer" in n:
            assert torch.equal(p, base_before[n]), n  # restored bit for bit, no merge/unmerge drift
    # Nothing to merge: the adapter disabled, or no PEFT at all.
    with peft_model.disable_adapter(), lora_merged_for_sampling(peft_model) as merged_layers:
        assert merged_layers == 0
    with lora_merged_for_sampling(torch.nn.Sequential(torch.nn.Linear(4, 4))) as merged_layers:
        assert merged_layers == 0


def test_lean_on_a_lora_model_greedy_equals_generate_and_samples_only_the_active_adapter(model_and_tokenizer):
    model, tok = model_and_tokenizer
    peft_model = _peft_with_random_lora(model)
    lean = HFRolloutEngine(peft_model, tok, decoder="lean")
    ref = HFRolloutEngine(peft_model, tok, decoder="generate")
    a = lean.generate(PROMPTS, group_size=2, max_new_tokens=12, greedy=True)
    b = ref.generate(PROMPTS, group_size=2, max_new_tokens=12, greedy=True)
    assert torch.equal(a.completion_ids, b.completion_ids)
    with peft_model.disable_adapter():  # the reference policy's rollouts stay the base model's
        base = lean.generate(PROMPTS, group_size=2, max_new_tokens=12, greedy=True)
        base_ref = ref.generate(PROMPTS, group_size=2, max_new_tokens=12, greedy=True)
    assert torch.equal(base.completion_ids, base_ref.completion_ids)
    assert not torch.equal(base.completion_ids, a.completion_ids)


def test_sample_tokens_never_draws_a_filtered_token_and_matches_the_probabilities():
    from opensloth.rollout.hf import sample_tokens

    torch.manual_seed(0)
    # Likeliest tokens at both ends of the vocabulary, filtered ones in between and at the very end.
    logits = torch.full((20000, 6), -1.0)
    logits[:, 0], logits[:, 4], logits[:, 5] = 2.0, 2.0, -30.0
    tokens = sample_tokens(logits, greedy=False, min_p=0.1)  # keeps tokens 0 and 4 only
    assert set(tokens.tolist()) == {0, 4}
    assert abs(float((tokens == 0).float().mean()) - 0.5) < 0.02
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    tokens = sample_tokens(probs.log().expand(40000, 4), greedy=False)
    empirical = torch.bincount(tokens, minlength=4).float() / 40000
    assert (empirical - probs).abs().max() < 0.01  # 4 sigma at n = 40000
    one_hot = torch.tensor([[0.0, float("-inf"), float("-inf")]]).expand(1000, 3)
    assert sample_tokens(one_hot, greedy=False).eq(0).all()


def test_lora_merged_for_sampling_leaves_a_tied_lm_head_alone(model_and_tokenizer):
    """The tiny model ties lm_head to the input embeddings: merging a LoRA on lm_head into that shared
    weight would add the delta to the embedding lookup too, a different model."""
    from opensloth.rollout.hf import lora_merged_for_sampling

    model, tok = model_and_tokenizer
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    peft_model = _peft_with_random_lora(model, target_modules=["lm_head", "q_proj"]).eval()
    ids = torch.tensor([tok(PROMPTS[0], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        unmerged = peft_model(ids).logits.log_softmax(-1)
        with lora_merged_for_sampling(peft_model) as merged_layers:
            merged = peft_model(ids).logits.log_softmax(-1)
    assert merged_layers == model.config.num_hidden_layers  # the q_proj layers; not lm_head
    assert (merged - unmerged).abs().max() < 1e-5


# -- top_k, repetition_penalty and stop strings against transformers (issue 20) ------------------


def _untie_random_head(model):
    """A random lm_head of its own: the tied tiny model repeats its last input token under greedy
    decoding (x . x wins), so a repetition penalty or a stop string would have nothing to change."""
    weight = model.get_output_embeddings().weight
    model.lm_head.weight = torch.nn.Parameter(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) / 2)
    model.config.tie_word_embeddings = False
    return model


def _stock_generate(model, tok, prompt, max_new_tokens, **kw):
    """transformers' own generate, stock processors and criteria, on one unpadded prompt: its new tokens."""
    from transformers import GenerationConfig

    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tok, model),
                           pad_token_id=tok.pad_token_id, top_k=None, top_p=None, temperature=None, **kw)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg, tokenizer=tok)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("top_k,penalty", [(5, 1.0), (1, 1.0), (40, 1.3), (0, 0.7), (300, 2.0)])
def test_repetition_penalty_and_top_k_equal_transformers_processors(model_and_tokenizer, top_k, penalty):
    """apply_repetition_penalty then filter_logits is exactly generate's processor chain for the same
    options (repetition penalty first, then temperature, top-k, top-p, min-p)."""
    from transformers import GenerationConfig

    from opensloth.rollout.hf import apply_repetition_penalty, seen_tokens

    model, _ = model_and_tokenizer
    cfg = GenerationConfig(do_sample=True, temperature=0.8, top_k=top_k, top_p=0.95, min_p=0.02,
                           repetition_penalty=penalty)
    processors = model._get_logits_processor(generation_config=cfg, input_ids_seq_length=6, encoder_input_ids=None,
                                             prefix_allowed_tokens_fn=None, logits_processor=None, device="cpu")
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 300, generator=gen) * 3
    logits[0, :5] = 10.0  # ties at the top
    input_ids = torch.randint(0, 300, (16, 6), generator=gen)
    input_ids[1] = 7  # one row repeats a single token
    theirs = processors(input_ids, logits.clone())
    seen = seen_tokens(input_ids, torch.ones_like(input_ids), 300)
    ours = filter_logits(apply_repetition_penalty(logits, seen, penalty), temperature=0.8, top_p=0.95, min_p=0.02,
                         top_k=top_k)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1), rtol=0, atol=1e-7)
    if 0 < top_k < 300:
        assert (~torch.isinf(ours)).sum(-1).max() <= max(top_k, 5)  # top-k cut (row 0's 5-way tie survives)


def test_seen_tokens_ignores_padding():
    from opensloth.rollout.hf import seen_tokens

    ids = torch.tensor([[0, 0, 3, 4], [5, 6, 0, 7]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    seen = seen_tokens(ids, mask, 8)
    assert seen[0].nonzero().flatten().tolist() == [3, 4]  # the pad id 0 is not counted
    assert seen[1].nonzero().flatten().tolist() == [0, 5, 6, 7]  # a real 0 is


def test_repetition_penalty_greedy_equals_stock_generate_and_ignores_padding(model_and_tokenizer):
    model, tok = model_and_tokenizer
    _untie_random_head(model)
    lean = HFRolloutEngine(model, tok, decoder="lean")
    ref = HFRolloutEngine(model, tok, decoder="generate")
    penalised = {}
    for i, prompt in enumerate(PROMPTS):
        want = _stock_generate(model, tok, prompt, 24, repetition_penalty=1.3)
        for engine in (lean, ref):
            alone = engine.generate([prompt], group_size=2, max_new_tokens=24, greedy=True, repetition_penalty=1.3)
            assert _valid_prefix(alone, 0) == _valid_prefix(alone, 1) == want, (i, engine.decoder)
        penalised[i] = want
    plain = lean.generate([PROMPTS[0]], group_size=1, max_new_tokens=24, greedy=True)
    assert _valid_prefix(plain, 0) != penalised[0]  # the penalty changed the greedy completion
    # In a left-padded batch each row gives its unpadded completion (stock generate would also penalise
    # the pad id there), on both decoders.
    for engine in (lean, ref):
        together = engine.generate(PROMPTS, group_size=1, max_new_tokens=24, greedy=True, repetition_penalty=1.3)
        assert together.prompt_mask[2].sum() == 1  # "x" is heavily left-padded
        assert [_valid_prefix(together, i) for i in range(len(PROMPTS))] == [penalised[i] for i in range(3)]


def test_top_k_sampling_draws_from_the_k_likeliest(model_and_tokenizer):
    """Lean top-k sampling: only the k likeliest first tokens occur, with the filtered probabilities."""
    model, tok = model_and_tokenizer
    _untie_random_head(model)
    n, k = 3000, 4
    lean = HFRolloutEngine(model, tok, decoder="lean")
    batch = lean.generate([PROMPTS[0]], group_size=n, max_new_tokens=1, temperature=0.9, top_k=k, seed=0)
    with torch.no_grad():
        logits = model(batch.prompt_ids[:1]).logits[0, -1].float()
    expected = filter_logits(logits[None], temperature=0.9, top_k=k)[0].softmax(-1)
    assert set(batch.completion_ids[:, 0].tolist()) <= set(logits.topk(k).indices.tolist())
    empirical = torch.bincount(batch.completion_ids[:, 0], minlength=expected.numel()).float() / n
    assert (empirical - expected).abs().max() < 4 * (0.25 / n) ** 0.5  # 4 sigma
    # The generate path takes top_k too (GenerationConfig), so both decoders sample from it.
    cfg = HFRolloutEngine(model, tok, decoder="generate").generation_config(
        max_new_tokens=1, temperature=0.9, top_p=1.0, min_p=0.0, top_k=k, greedy=False)
    assert cfg.top_k == k


def _a_stop_string(tok, tokens: list[int]) -> tuple[str, int]:
    """Two consecutive single-character ASCII tokens of a completion, as text, that occur nowhere before them:
    (the string, the position of the token that completes it)."""
    text = [tok.decode([t]) for t in tokens]
    for j in range(3, len(tokens)):
        pair = text[j - 1] + text[j]
        if len(pair) == 2 and pair.isascii() and pair not in "".join(text[: j]):
            return pair, j
    raise AssertionError(f"no usable stop string in {text}")


def test_stop_strings_end_completions_as_stock_generate_does(model_and_tokenizer):
    model, tok = model_and_tokenizer
    _untie_random_head(model)
    prompt = PROMPTS[0]
    free = _stock_generate(model, tok, prompt, 24)
    stop, end = _a_stop_string(tok, free)
    want = _stock_generate(model, tok, prompt, 24, stop_strings=[stop])
    assert want[: end + 1] == free[: end + 1]  # stock generate stopped at the token completing it ...
    assert all(t == tok.pad_token_id for t in want[end + 1:])  # ... and padded after it
    for decoder in ("lean", "generate"):
        engine = HFRolloutEngine(model, tok, decoder=decoder)
        batch = engine.generate([prompt, PROMPTS[2]], group_size=2, max_new_tokens=24, greedy=True,
                                stop_strings=["never-generated", stop])
        for row in (0, 1):
            assert _valid_prefix(batch, row) == free[: end + 1], decoder  # mask: up to and including that token
            assert batch.completion_mask[row].tolist() == [1] * (end + 1) + [0] * (batch.num_completion_tokens - end - 1)
            assert batch.completions_text[row].endswith(stop)  # kept in the text, as generate's decode keeps it
        assert not batch.is_truncated[:2].any() and batch.is_eos_terminated[:2].all()  # ended, not truncated
        # The padded second prompt runs on (or ends) independently of the first.
        other = engine.generate([PROMPTS[2]], group_size=1, max_new_tokens=24, greedy=True,
                                stop_strings=["never-generated", stop])
        assert _valid_prefix(batch, 2) == _valid_prefix(other, 0)
        assert bool(batch.is_truncated[2]) == bool(other.is_truncated[0])
