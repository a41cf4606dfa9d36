"""GRPO math as pure torch functions (see `opensloth.grpo.core`), plus a model-agnostic helper
that gets completion log-probs from a causal LM in chunks (`opensloth.grpo.forward`)."""

from opensloth.grpo.core import (
    AGGREGATION_MODES,
    POLICY_LOSS_REGISTRY,
    VLLM_IS_MODES,
    PolicyLoss,
    aggregate_loss,
    compute_group_advantages,
    compute_high_entropy_mask,
    compute_kl_k3,
    compute_policy_loss,
    compute_token_log_probs,
    compute_truncated_is_weights,
    compute_vllm_is_weights,
    compute_zero_std_groups,
    get_policy_loss,
    get_policy_loss_fn,
    mask_truncated_completions,
    masked_mean,
    masked_normalize,
    register_policy_loss,
)
from opensloth.grpo.forward import compute_model_log_probs, get_decoder_and_head

__all__ = [
    "AGGREGATION_MODES",
    "POLICY_LOSS_REGISTRY",
    "PolicyLoss",
    "VLLM_IS_MODES",
    "aggregate_loss",
    "compute_group_advantages",
    "compute_high_entropy_mask",
    "compute_kl_k3",
    "compute_model_log_probs",
    "compute_policy_loss",
    "compute_token_log_probs",
    "compute_truncated_is_weights",
    "compute_vllm_is_weights",
    "compute_zero_std_groups",
    "get_decoder_and_head",
    "get_policy_loss",
    "get_policy_loss_fn",
    "mask_truncated_completions",
    "masked_mean",
    "masked_normalize",
    "register_policy_loss",
]
