"""GRPO math pinned against hand-derived values (opensloth.grpo.core and .forward)."""

from __future__ import annotations

import math

import pytest
import torch

from opensloth.grpo import core
from opensloth.grpo.core import (
    aggregate_loss,
    compute_group_advantages,
    compute_kl_k3,
    compute_policy_loss,
    compute_token_log_probs,
    compute_truncated_is_weights,
    get_policy_loss_fn,
    masked_mean,
    masked_normalize,
    register_policy_loss,
)

TOL = {"rtol": 1e-6, "atol": 1e-6}


# -- advantages --------------------------------------------------------------------------------


def test_advantages_normalised_by_unbiased_std_and_all_equal_group_is_zero():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv, raw, meta = compute_group_advantages(rewards, group_size=4, eps=0.0)
    # group 1: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 1/sqrt(3); group 2 all equal -> 0
    a = 0.5 * math.sqrt(3.0)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]), **TOL)
    torch.testing.assert_close(raw, rewards, **TOL)
    torch.testing.assert_close(meta["mean"], torch.tensor(1.25), **TOL)
    torch.testing.assert_close(meta["std"], torch.tensor((1 / math.sqrt(3.0) + 0.0) / 2), **TOL)
    torch.testing.assert_close(meta["max"], torch.tensor(2.0), **TOL)
    torch.testing.assert_close(meta["min"], torch.tensor(0.0), **TOL)
    torch.testing.assert_close(meta["frac_zero_std"], torch.tensor(0.5), **TOL)


def test_advantages_eps_is_added_to_the_std():
    adv, _, _ = compute_group_advantages(torch.tensor([0.0, 2.0]), group_size=2, eps=0.5)
    # mean 1, unbiased std sqrt(2): A = +-1 / (sqrt(2) + 0.5)
    a = 1.0 / (math.sqrt(2.0) + 0.5)
    torch.testing.assert_close(adv, torch.tensor([-a, a]), **TOL)


def test_advantages_without_std_normalisation_are_centred_rewards():
    adv, _, meta = compute_group_advantages(torch.tensor([3.0, 1.0, 2.0, 0.1, 0.1, 0.4]), 3, normalize_by_std=False)
    # group means 2 and 0.2
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0, -0.1, -0.1, 0.2]), **TOL)
    torch.testing.assert_close(meta["frac_zero_std"], torch.tensor(0.0), **TOL)


def test_all_equal_group_is_zero_even_when_float_std_is_not():
    # 0.1 + 0.1 + 0.1 is not exactly 3 * 0.1; the group still counts as zero-std.
    adv, _, meta = compute_group_advantages(torch.full((3,), 0.1), group_size=3)
    assert torch.equal(adv, torch.zeros(3))
    assert float(meta["frac_zero_std"]) == 1.0


def test_group_size_one_and_ragged_batch_are_rejected():
    with pytest.raises(ValueError, match="group_size must be at least 2"):
        compute_group_advantages(torch.tensor([1.0, 0.0]), group_size=1)
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        compute_group_advantages(torch.ones(6), group_size=4)


# -- policy losses -----------------------------------------------------------------------------


def _clip_case(advantage: float):
    old = torch.zeros(1, 3)
    log_probs = torch.log(torch.tensor([[0.5, 1.0, 1.5]])).requires_grad_()  # rho = 0.5, 1, 1.5
    loss, meta = compute_policy_loss(
        "grpo_clip", log_probs, old, torch.tensor([advantage]), epsilon_low=0.2, epsilon_high=0.28
    )
    loss.sum().backward()
    return loss.detach(), meta, log_probs.grad


def test_grpo_clip_positive_advantage_clips_above_1_plus_eps_high():
    loss, meta, grad = _clip_case(+1.0)
    # -min(rho, clip(rho, 0.8, 1.28)) = [-0.5, -1, -1.28]; the clipped token has no gradient,
    # the others d/dlogp (-rho A) = -rho.
    torch.testing.assert_close(loss, torch.tensor([[-0.5, -1.0, -1.28]]), **TOL)
    torch.testing.assert_close(grad, torch.tensor([[-0.5, -1.0, 0.0]]), **TOL)
    assert meta["clip_high"].tolist() == [[0.0, 0.0, 1.0]]
    assert meta["clip_low"].tolist() == [[0.0, 0.0, 0.0]]
    assert meta["clip"].tolist() == [[0.0, 0.0, 1.0]]


def test_grpo_clip_negative_advantage_clips_below_1_minus_eps_low():
    loss, meta, grad = _clip_case(-1.0)
    # -min(-rho, -clip(rho)) = max(rho, clip(rho)) = [0.8, 1, 1.5]
    torch.testing.assert_close(loss, torch.tensor([[0.8, 1.0, 1.5]]), **TOL)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 1.0, 1.5]]), **TOL)
    assert meta["clip_low"].tolist() == [[1.0, 0.0, 0.0]]
    assert meta["clip_high"].tolist() == [[0.0, 0.0, 0.0]]
    assert meta["clip"].tolist() == [[1.0, 0.0, 0.0]]


def test_grpo_clip_epsilon_high_defaults_to_epsilon_low():
    old = torch.zeros(1, 1)
    loss, meta = compute_policy_loss("grpo_clip", torch.log(torch.tensor([[1.5]])), old, torch.tensor([2.0]),
                                     epsilon_low=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-2.4]]), **TOL)  # -1.2 * 2
    assert meta["clip_high"].item() == 1.0


def test_on_policy_grpo_clip_gradient_is_the_reinforce_gradient():
    """With pi_old = pi.detach() (one update per rollout batch) rho = 1, nothing clips, and the
    gradient of the clipped objective is -A per token, as for REINFORCE with a baseline."""
    g = torch.Generator().manual_seed(4)
    log_probs = (-torch.rand(3, 5, generator=g) * 4).requires_grad_()
    adv = torch.tensor([1.5, -0.5, 0.0])
    clip_loss, meta = compute_policy_loss("grpo_clip", log_probs, log_probs.detach(), adv, epsilon_low=0.2)
    (clip_grad,) = torch.autograd.grad(clip_loss.sum(), log_probs)
    reinforce_loss, _ = compute_policy_loss("reinforce_with_baseline", log_probs, log_probs.detach(), adv)
    (reinforce_grad,) = torch.autograd.grad(reinforce_loss.sum(), log_probs)
    torch.testing.assert_close(clip_grad, -adv[:, None].expand(3, 5), **TOL)
    torch.testing.assert_close(clip_grad, reinforce_grad, **TOL)
    assert float(meta["clip"].sum()) == 0.0


def test_reinforce_losses_and_importance_weights():
    log_probs = torch.tensor([[-1.0, -2.0], [-0.5, -0.25]])
    scores = torch.tensor([2.0, -1.0])
    for name in ("no_baseline", "reinforce_with_baseline"):
        loss, meta = compute_policy_loss(name, log_probs, log_probs, scores)
        torch.testing.assert_close(loss, torch.tensor([[2.0, 4.0], [-0.5, -0.25]]), **TOL)
        assert float(meta["clip"].sum()) == 0.0
    weights = torch.tensor([[0.5, 1.0], [2.0, 0.0]])
    loss, _ = compute_policy_loss("reinforce_with_baseline", log_probs, log_probs, scores, importance_weights=weights)
    torch.testing.assert_close(loss, torch.tensor([[1.0, 4.0], [-1.0, 0.0]]), **TOL)


def test_truncated_is_weights_are_capped_ratios():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.2]]))
    rollout = torch.log(torch.tensor([[0.25, 0.5, 0.4]]))
    torch.testing.assert_close(compute_truncated_is_weights(old, rollout, cap=1.5),
                               torch.tensor([[1.5, 1.0, 0.5]]), **TOL)


def test_policy_loss_registry_lists_choices_and_restores():
    with pytest.raises(ValueError, match="grpo_clip, no_baseline, reinforce_with_baseline"):
        get_policy_loss_fn("ppo")
    saved = dict(core.POLICY_LOSS_REGISTRY)
    try:
        @register_policy_loss("zero")
        def zero_loss(log_probs, old_log_probs, advantages, **_):
            return log_probs * 0, {}

        assert get_policy_loss_fn("zero") is zero_loss
        with pytest.raises(ValueError, match="already registered"):
            register_policy_loss("zero")(zero_loss)
    finally:
        core.POLICY_LOSS_REGISTRY.clear()
        core.POLICY_LOSS_REGISTRY.update(saved)


def test_each_loss_says_what_it_needs():
    """The recipe asks these specs instead of comparing --loss-type names."""
    specs = {name: (loss.signal, loss.uses_old_log_probs) for name, loss in core.POLICY_LOSS_REGISTRY.items()}
    assert specs == {"no_baseline": ("rewards", False), "reinforce_with_baseline": ("advantages", False),
                     "grpo_clip": ("advantages", True), "grpo": ("advantages", True), "bnpo": ("advantages", True),
                     "dr_grpo": ("advantages", True), "dapo": ("advantages", True)}
    # The two REINFORCE losses are one function: they differ only in the signal the recipe passes.
    assert get_policy_loss_fn("no_baseline") is get_policy_loss_fn("reinforce_with_baseline")
    with pytest.raises(ValueError, match="signal must be 'advantages' or 'rewards'"):
        register_policy_loss("typo", signal="reward")


def test_the_config_accepts_exactly_the_registered_losses():
    """A loss is added in grpo/core.py and named in GRPOConfig.loss_type: the two lists must agree, and the
    option's help must name every choice."""
    from typing import get_args

    from opensloth.config import GRPOConfig

    field = GRPOConfig.model_fields["loss_type"]
    assert set(get_args(field.annotation)) == set(core.POLICY_LOSS_REGISTRY)
    assert field.default in core.POLICY_LOSS_REGISTRY
    assert all(name in field.description for name in core.POLICY_LOSS_REGISTRY)


def test_zero_std_groups_are_the_groups_of_equal_rewards():
    # Eight rewards of 0.01: equal, yet their float32 std is about 9e-10 (the filter's old test, std > 0).
    rewards = torch.cat([torch.full((8,), 0.01), torch.tensor([0.0] * 7 + [1.0])])
    assert float(rewards[:8].std()) > 0
    assert core.compute_zero_std_groups(rewards, 8).tolist() == [True, False]
    _, _, meta = compute_group_advantages(rewards, 8)
    assert float(meta["frac_zero_std"]) == 0.5


# -- KL ----------------------------------------------------------------------------------------


def test_kl_k3_values():
    logp = torch.log(torch.tensor([[0.5, 0.3]]))
    ref = torch.log(torch.tensor([[0.25, 0.3]]))
    # d = log(0.25 / 0.5) = -log 2: exp(d) - d - 1 = 0.5 + log 2 - 1; equal policies -> 0
    torch.testing.assert_close(compute_kl_k3(logp, ref), torch.tensor([[math.log(2.0) - 0.5, 0.0]]), **TOL)


# -- masked reductions and aggregation ---------------------------------------------------------


def test_masked_mean_and_normalize_ignore_padding_even_nan():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 0.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor(7.0 / 3.0), **TOL)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 4.0, 0.0]), **TOL)
    torch.testing.assert_close(masked_normalize(x, mask.bool(), 2.0), torch.tensor(3.5), **TOL)
    torch.testing.assert_close(masked_normalize(x, mask, 2.0, dim=0), torch.tensor([2.5, 1.0, 0.0]), **TOL)


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


@pytest.mark.parametrize("mode, expected", [
    ("seq_mean", (1.5 + 5.0) / 2),  # mean of the per-sequence means
    ("token_mean", 18.0 / 5),  # one mean over the 5 real tokens
    ("constant", 18.0 / (2 * 4)),  # sum / (sequences x max_new_tokens=4)
])
def test_aggregate_loss_modes(mode, expected):
    out = aggregate_loss(PER_TOKEN, MASK, mode, num_sequences=2, num_tokens=5, max_new_tokens=4)
    torch.testing.assert_close(out, torch.tensor(expected), **TOL)


def test_aggregate_loss_unknown_mode():
    with pytest.raises(ValueError, match="seq_mean, token_mean, constant"):
        aggregate_loss(PER_TOKEN, MASK, "sum", num_sequences=2, num_tokens=5, max_new_tokens=4)


def _reference_full_batch_loss(per_token, mask, mode, max_new_tokens):
    """The full-batch objective written as loops, independent of aggregate_loss."""
    rows = [[float(per_token[i, t]) if mask[i, t] else None for t in range(mask.shape[1])] for i in range(len(mask))]
    rows = [[v for v in r if v is not None] for r in rows]
    if mode == "seq_mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    if mode == "token_mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    return sum(sum(r) for r in rows) / (len(rows) * max_new_tokens)


@pytest.mark.parametrize("mode", ["seq_mean", "token_mean", "constant"])
def test_gradient_accumulation_equals_full_batch_gradient(mode):
    """k unequal micro-batches, each divided by the global counts, sum to the full-batch gradient."""
    g = torch.Generator().manual_seed(0)
    B, T, max_new = 7, 6, 8
    lengths = torch.tensor([6, 1, 3, 5, 2, 6, 4])  # unequal completion lengths
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (B, T) right padding
    old = -torch.rand(B, T, generator=g) * 3
    theta = (old + 0.3 * torch.randn(B, T, generator=g)).requires_grad_()  # log-probs as parameters
    ref = old + 0.1 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)

    def per_token_loss(rows):
        loss, _ = compute_policy_loss("grpo_clip", theta[rows], old[rows], adv[rows],
                                      epsilon_low=0.2, epsilon_high=0.28)
        return loss + 0.04 * compute_kl_k3(theta[rows], ref[rows])

    # Full-batch gradient from the loop-written reference objective.
    full = per_token_loss(slice(None))
    expected_value = _reference_full_batch_loss(full.detach(), mask, mode, max_new)
    ref_loss = {
        "seq_mean": ((full * mask).sum(1) / mask.sum(1)).mean(),
        "token_mean": (full * mask).sum() / mask.sum(),
        "constant": (full * mask).sum() / (B * max_new),
    }[mode]
    assert abs(float(ref_loss.detach()) - expected_value) < 1e-5
    (expected_grad,) = torch.autograd.grad(ref_loss, theta)

    # Micro-batches of 3, 1 and 3 sequences (as 2 workers x accumulation would split them).
    n_seq, n_tok = float(B), float(mask.sum())
    total = 0.0
    for rows in (slice(0, 3), slice(3, 4), slice(4, 7)):
        loss = aggregate_loss(per_token_loss(rows), mask[rows], mode, num_sequences=n_seq, num_tokens=n_tok,
                              max_new_tokens=max_new)
        loss.backward()
        total += float(loss.detach())
    assert abs(total - expected_value) < 1e-5
    torch.testing.assert_close(theta.grad, expected_grad, rtol=1e-5, atol=1e-7)


# -- chunked log-probs -------------------------------------------------------------------------


def _unchunked(hidden, weight, targets, temperature):
    logits = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32)) / temperature
    log_softmax = torch.log_softmax(logits, dim=-1)
    logp = log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    return logp, entropy


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("loss_uses", ["both", "logp", "entropy"])  # "logp": entropy only logged, as in the recipe
def test_chunked_log_probs_match_unchunked_values_and_gradients(chunk_size, temperature, loss_uses):
    g = torch.Generator().manual_seed(1)
    B, L, H, V = 3, 5, 8, 11
    hidden = torch.randn(B, L, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, L), generator=g)
    c1, c2 = torch.randn(B, L, generator=g, dtype=torch.float64), torch.randn(B, L, generator=g, dtype=torch.float64)
    c1 = c1 * (loss_uses != "entropy")
    c2 = c2 * (loss_uses != "logp")

    def loss(logp, entropy):
        return ((logp * c1).sum() if loss_uses != "entropy" else 0) + ((entropy * c2).sum() if loss_uses != "logp" else 0)

    logp, entropy = compute_token_log_probs(hidden, weight, targets, temperature=temperature, chunk_size=chunk_size,
                                            with_entropy=True)
    grads = torch.autograd.grad(loss(logp, entropy), (hidden, weight))
    ref_logp, ref_entropy = _unchunked(hidden, weight, targets, temperature)
    ref_grads = torch.autograd.grad(loss(ref_logp, ref_entropy), (hidden, weight))

    # float64 end to end: the closed-form backward must agree with autograd to rounding.
    torch.testing.assert_close(logp, ref_logp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_chunked_log_probs_in_bfloat16_match_autograd_with_float32_softmax():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 6, 16, generator=g).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(50, 16, generator=g).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 50, (2, 6), generator=g)
    logp, entropy = compute_token_log_probs(hidden, weight, targets, chunk_size=5, with_entropy=True)
    assert logp.dtype == torch.float32  # softmax upcast from bf16
    grads = torch.autograd.grad((logp + entropy).sum(), (hidden, weight))
    ref_logp, ref_entropy = _unchunked(hidden, weight, targets, 1.0)
    ref_grads = torch.autograd.grad((ref_logp + ref_entropy).sum(), (hidden, weight))
    torch.testing.assert_close(logp, ref_logp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_log_probs_of_uniform_distribution_and_temperature():
    V = 7
    hidden = torch.zeros(1, 2, 4)  # zero hidden -> all logits 0 -> uniform
    logp, entropy = compute_token_log_probs(hidden, torch.randn(V, 4), torch.tensor([[0, 6]]), with_entropy=True)
    torch.testing.assert_close(logp, torch.full((1, 2), -math.log(V)), **TOL)
    torch.testing.assert_close(entropy, torch.full((1, 2), math.log(V)), **TOL)
    # Two tokens with logits 0 and log 3: p = (1/4, 3/4); at temperature 2 logits halve -> (1, sqrt 3) / (1 + sqrt 3)
    weight = torch.tensor([[0.0], [math.log(3.0)]])
    logp, entropy = compute_token_log_probs(torch.ones(1, 1, 1), weight, torch.tensor([[1]]), temperature=2.0,
                                            with_entropy=True)
    p = math.sqrt(3.0) / (1 + math.sqrt(3.0))
    torch.testing.assert_close(logp, torch.tensor([[math.log(p)]]), **TOL)
    torch.testing.assert_close(entropy, torch.tensor([[-(p * math.log(p) + (1 - p) * math.log(1 - p))]]), **TOL)
    _, none = compute_token_log_probs(torch.ones(1, 1, 1), weight, torch.tensor([[1]]))
    assert none is None


def test_chunked_log_probs_never_save_a_full_logits_tensor_for_backward():
    """Autograd keeps at most (chunk x V) of anything per chunk, never (tokens x V)."""
    B, L, H, V, chunk = 4, 16, 8, 500, 8
    hidden = torch.randn(B, L, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    targets = torch.randint(0, V, (B, L))
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, entropy = compute_token_log_probs(hidden, weight, targets, chunk_size=chunk, with_entropy=True)
    assert max(saved) < B * L * V / 4, f"a saved tensor has {max(saved)} elements"
    (logp.sum() + entropy.sum()).backward()
    assert hidden.grad is not None and weight.grad is not None

    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _unchunked(hidden, weight, targets, 1.0)
    assert max(saved) >= B * L * V  # the unchunked version does hold full logits


# -- log-probs from a (PEFT) causal LM ---------------------------------------------------------


def test_model_log_probs_match_full_logits_with_adapter_on_and_off(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from opensloth.grpo.forward import compute_model_log_probs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # non-zero B so the adapter changes the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 256, (3, 10), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0  # left padding in the prompt
    attention_mask[1, -2:] = 0  # right padding after the completion
    T, temp = 4, 0.8

    def full(m):
        pos = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        logits = m(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).logits.float() / temp
        return torch.log_softmax(logits[:, -T - 1 : -1], -1).gather(-1, input_ids[:, -T:, None]).squeeze(-1)

    logp, entropy = compute_model_log_probs(model, input_ids, attention_mask, num_completion_tokens=T,
                                            temperature=temp, chunk_size=5)
    real = attention_mask[:, -T:].bool()  # padded completion positions are documented as meaningless
    torch.testing.assert_close(logp[real], full(model)[real], rtol=1e-5, atol=1e-5)
    assert entropy.shape == (3, T)
    with model.disable_adapter():
        ref_logp, _ = compute_model_log_probs(model, input_ids, attention_mask, num_completion_tokens=T,
                                              temperature=temp, chunk_size=5)
        torch.testing.assert_close(ref_logp[real], full(model)[real], rtol=1e-5, atol=1e-5)
    assert (ref_logp - logp).abs().max() > 1e-3  # the adapter mattered

    # Gradients reach the LoRA weights through the chunked path.
    logp.sum().backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert lora_grads and all(gr is not None and gr.abs().sum() > 0 for gr in lora_grads)


def test_left_align_moves_leading_padding_to_the_end():
    from opensloth.grpo.forward import left_align

    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 0], [0, 0, 0, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
    aligned_ids, aligned_mask, shift = left_align(ids, mask)
    assert aligned_ids.tolist() == [[5, 6, 7, 0, 0], [1, 2, 3, 4, 0], [0, 0, 0, 0, 0]]
    assert aligned_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]]
    assert shift.tolist() == [2, 0, 5]


def test_model_log_probs_never_give_the_decoder_a_fully_masked_query_row(tiny_model_dir):
    """Left-padded prompts, padded to a common multiple as the hf engine does on CUDA: the decoder
    must see each row's real tokens first (a padded query row with every key masked made the bf16
    backward NaN on an H100), columns of padding in every row cut off, and each row's log-probs
    equal to that row's own unpadded forward."""
    from transformers import AutoModelForCausalLM

    from opensloth.grpo.forward import compute_model_log_probs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=g) for n in (3, 7, 5)]
    completions = [torch.randint(3, 256, (n,), generator=g) for n in (4, 2, 3)]
    P, T, pad = 16, 5, 0  # prompts left-padded to 16 (9 columns of padding in every row)
    input_ids = torch.full((3, P + T), pad)
    attention_mask = torch.zeros((3, P + T), dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        input_ids[row, P - len(prompt):P] = prompt
        input_ids[row, P:P + len(completion)] = completion
        attention_mask[row, P - len(prompt):P + len(completion)] = 1

    seen = []
    hook = model.get_decoder().register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        logp, _ = compute_model_log_probs(model, input_ids, attention_mask, num_completion_tokens=T)
    finally:
        hook.remove()
    (kwargs,) = seen
    assert kwargs["attention_mask"][:, 0].tolist() == [1, 1, 1]  # every query row has a real key
    assert kwargs["input_ids"].shape == (3, 7 + 2)  # the longest real row: 9 of 21 columns

    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        alone = torch.cat([prompt, completion])[None]
        with torch.no_grad():
            logits = model(input_ids=alone).logits[0, len(prompt) - 1 : -1].float()
        expected = torch.log_softmax(logits, -1).gather(-1, completion[:, None]).squeeze(-1)
        torch.testing.assert_close(logp[row, : len(completion)], expected, rtol=1e-5, atol=1e-5)


def test_sampler_logprob_diff_is_the_abs_difference_on_completion_tokens():
    trainer = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    sampler = torch.tensor([[-1.5, -2.0, -1.0], [-0.25, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])  # the -3 vs -1 and -9 vs 0 pairs are padding
    diff = core.compute_sampler_logprob_diff(trainer, sampler, mask)
    assert diff.tolist() == pytest.approx([0.5, 0.0, 0.25, 0.0])
    assert core.compute_sampler_logprob_diff(trainer, sampler, torch.zeros_like(mask)).numel() == 0


def test_shared_prompts_give_the_row_log_probs_and_gradients_with_one_prompt_forward_per_group(tiny_model_dir):
    """Groups sharing a prompt (left-padded prompts of different lengths, right-padded completions of
    different lengths, a group split across the batch): the prompt runs once per distinct prompt,
    and log-probs, entropies and LoRA gradients equal those of the whole-row forward."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from opensloth.grpo.forward import compute_model_log_probs

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 256, (n,), generator=g) for n in (6, 3)]
    P, T, G = 6, 5, 3
    rows, masks = [], []
    for i in (0, 1, 0, 0, 1, 1):  # prompt 0's group is not contiguous
        n = int(torch.randint(1, T + 1, (1,), generator=g))
        ids, mask = torch.zeros(P + T, dtype=torch.long), torch.zeros(P + T, dtype=torch.long)
        ids[P - len(prompts[i]):P], mask[P - len(prompts[i]):P + n] = prompts[i], 1
        ids[P:P + n] = torch.randint(3, 256, (n,), generator=g)
        rows.append(ids)
        masks.append(mask)
    input_ids, attention_mask = torch.stack(rows), torch.stack(masks)
    real = attention_mask[:, -T:].bool()
    model.train()

    def run(share):
        model.zero_grad()
        seen = []
        hook = model.get_decoder().register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
        try:
            logp, entropy = compute_model_log_probs(model, input_ids, attention_mask, num_completion_tokens=T,
                                                    temperature=0.9, share_prompts=share)
        finally:
            hook.remove()
        (logp * real).sum().backward()
        grads = [p.grad.clone() for n, p in model.named_parameters() if "lora_" in n]
        return logp, entropy, grads, seen

    logp, entropy, grads, seen = run(share=True)
    ref_logp, ref_entropy, ref_grads, ref_seen = run(share=False)
    assert seen == [(2, 6), (2 * G, T)]  # the two prompts once, then the six completions
    longest = int(attention_mask.sum(1).max())  # the row path cuts columns of padding in every row
    assert ref_seen == [(2 * G, longest)] and longest > T
    torch.testing.assert_close(logp[real], ref_logp[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[real], ref_entropy[real], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0

    # Gradient checkpointing drops a KV cache in training: the whole-row forward is used instead.
    model.gradient_checkpointing_enable()
    _, _, _, seen = run(share=True)
    assert seen == [(2 * G, longest)]


# -- TRL 1.16's loss-side options (their parity with TRL itself: tests/test_grpo_loss_parity.py) --------------


def test_trl_loss_types_are_the_clipped_loss_with_their_own_aggregation():
    aggregations = {name: loss.aggregation for name, loss in core.POLICY_LOSS_REGISTRY.items()}
    assert aggregations == {"no_baseline": None, "reinforce_with_baseline": None, "grpo_clip": None,
                            "grpo": "seq_mean", "bnpo": "local_token_mean", "dr_grpo": "constant",
                            "dapo": "rollout_token_mean"}
    assert all(get_policy_loss_fn(name) is get_policy_loss_fn("grpo_clip") for name in ("grpo", "bnpo", "dr_grpo", "dapo"))
    with pytest.raises(ValueError, match="aggregation must be one of"):
        register_policy_loss("typo", aggregation="mean")


def test_bnpo_and_dapo_aggregations_by_hand():
    """bnpo: a micro-batch's own token mean / micro-batches; dapo: tokens / the rollout's tokens per update."""
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    counts = {"num_sequences": 8.0, "num_tokens": 20.0, "max_new_tokens": 3}
    local = core.aggregate_loss(loss, mask, "local_token_mean", num_micro_batches=2.0, **counts)
    torch.testing.assert_close(local, torch.tensor(10.0 / 4 / 2), **TOL)
    rollout = core.aggregate_loss(loss, mask, "rollout_token_mean", rollout_tokens_per_update=25.0, **counts)
    torch.testing.assert_close(rollout, torch.tensor(10.0 / 25), **TOL)
    with pytest.raises(ValueError, match="rollout_tokens_per_update"):
        core.aggregate_loss(loss, mask, "rollout_token_mean", **counts)


def test_sequence_level_ratio_is_exp_of_the_mean_log_ratio():
    """GSPO: rho_i = exp(mean_t log-ratio over the sequence's tokens), clipped, the same on each of its tokens."""
    old = torch.zeros(2, 3)
    new = torch.tensor([[0.3, 0.0, 0.6], [-0.9, 0.3, 5.0]])  # row 1: the last token is padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, -1.0])
    loss, meta = core.compute_grpo_clip_loss(new, old, adv, epsilon_low=0.2, epsilon_high=0.28, mask=mask,
                                             importance_sampling_level="sequence")
    rho0, rho1 = math.exp(0.3), math.exp(-0.3)  # 1.35 > 1.28 (clipped high), 0.74 < 0.8 (clipped low)
    expected = torch.tensor([[-min(rho0, 1.28)] * 3, [max(rho1, 0.8)] * 3])
    torch.testing.assert_close(loss, expected, **TOL)
    torch.testing.assert_close(meta["clip"], torch.ones(2, 3), **TOL)
    with pytest.raises(ValueError, match="needs the completion mask"):
        core.compute_grpo_clip_loss(new, old, adv, importance_sampling_level="sequence")


def test_delta_caps_the_unclipped_ratio_for_negative_advantages():
    """Two-sided clipping: with A < 0 and rho = e (far above 1 + eps), the loss is -delta * A, not -e * A."""
    new = torch.tensor([[1.0, 1.0]], requires_grad=True)
    loss, meta = core.compute_grpo_clip_loss(new, torch.zeros(1, 2), torch.tensor([-2.0]), epsilon_low=0.2,
                                             delta=1.5)
    torch.testing.assert_close(loss, torch.tensor([[3.0, 3.0]]), **TOL)
    loss.sum().backward()
    torch.testing.assert_close(new.grad, torch.zeros(1, 2), **TOL)  # capped: no gradient, as TRL's clamp
    torch.testing.assert_close(meta["ratio"], torch.full((1, 2), math.e), **TOL)  # before the cap (KL correction)
    uncapped, _ = core.compute_grpo_clip_loss(new.detach(), torch.zeros(1, 2), torch.tensor([-2.0]))
    torch.testing.assert_close(uncapped, torch.full((1, 2), 2 * math.e), **TOL)


def test_high_entropy_mask_keeps_the_top_quantile_of_completion_tokens():
    entropies = torch.tensor([[0.1, 0.9, 0.5, 7.0], [0.3, 0.7, 0.2, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # 7.0 is padding: never kept, never in the pool
    # top 50% of the 7 tokens: threshold = quantile([0, .1, .2, .3, .5, .7, .9], 0.5) = 0.3
    keep = core.compute_high_entropy_mask(entropies, mask, 0.5)
    assert keep.tolist() == [[False, True, True, False], [True, True, False, False]]
    pooled = core.compute_high_entropy_mask(entropies, mask, 0.5, pool=torch.tensor([0.7, 0.7]))  # threshold 0.7
    assert pooled.tolist() == [[False, True, False, False], [False, True, False, False]]
    assert not core.compute_high_entropy_mask(entropies, torch.zeros_like(mask), 0.5).any()


def test_mask_truncated_completions_zeroes_the_rows_without_eos():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = core.mask_truncated_completions(mask, torch.tensor([False, True]))
    assert out.tolist() == [[0, 0, 0], [1, 1, 0]] and out.dtype == mask.dtype


def test_vllm_importance_sampling_modes_by_hand():
    """TRL's four modes: per token or per sequence (sum of log-ratios), truncate (clamp) or mask (drop to 0)."""
    log2 = math.log(2.0)
    old = torch.tensor([[log2, 0.0, -log2], [0.0, 0.5 * log2, 9.0]])
    sampler = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 1's last token is padding: weight 1 (token), ignored (sequence)
    w = {mode: core.compute_vllm_is_weights(old, sampler, mask, mode, clip_max=1.5, clip_min=0.6)
         for mode in core.VLLM_IS_MODES}
    r2 = math.sqrt(2.0)
    torch.testing.assert_close(w["token_truncate"], torch.tensor([[1.5, 1.0, 0.6], [1.0, r2, 1.0]]), **TOL)
    torch.testing.assert_close(w["token_mask"], torch.tensor([[0.0, 1.0, 0.0], [1.0, r2, 1.0]]), **TOL)
    torch.testing.assert_close(w["sequence_truncate"], torch.tensor([[1.0], [r2]]), **TOL)  # exp(0), exp(log2 / 2)
    torch.testing.assert_close(w["sequence_mask"], torch.tensor([[1.0], [r2]]), **TOL)
    high = core.compute_vllm_is_weights(old, sampler, mask, "sequence_mask", clip_max=1.2)
    torch.testing.assert_close(high, torch.tensor([[1.0], [0.0]]), **TOL)
    # token_truncate without a lower bound is the truncated IS the recipe used before the modes existed
    torch.testing.assert_close(core.compute_vllm_is_weights(old, sampler, mask, "token_truncate", 3.0)[mask.bool()],
                               compute_truncated_is_weights(old, sampler, 3.0)[mask.bool()], **TOL)
    with pytest.raises(ValueError, match="token_truncate, token_mask"):
        core.compute_vllm_is_weights(old, sampler, mask, "token", 3.0)


def test_batch_scaled_advantages_divide_by_the_given_std():
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0])
    adv, _, _ = compute_group_advantages(rewards, 2, scale_std=2.0, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([0.25, -0.25, 0.0, 0.0]), **TOL)


def test_policy_loss_token_mask_drops_only_the_policy_term():
    loss, _ = compute_policy_loss("grpo_clip", torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1.0]),
                                  token_mask=torch.tensor([[True, False]]))
    torch.testing.assert_close(loss, torch.tensor([[-1.0, 0.0]]), **TOL)
