"""GRPO math: advantages, policy-gradient losses, KL, masked reductions, chunked log-probs.

Pure torch functions. They take tensors and plain scalars, return tensors, never log, never
call `.item()` (so nothing forces a device sync) and never see a config object; the recipe
(`opensloth.recipes.grpo`) wires them together. Policy losses sit in a registry
(`register_policy_loss` / `get_policy_loss`) so `--loss-type` is a lookup, not a branch chain: each
entry says what the loss needs (advantages or raw rewards; old log-probs or not), and the recipe
asks it instead of comparing names.

Formulas (per prompt q with G sampled completions o_1..o_G, rewards r_1..r_G):

    advantage      A_i = (r_i - mean(r)) / (std(r) + eps)      std unbiased (n - 1); GRPO
                   A_i =  r_i - mean(r)                         --no-std-normalization; Dr. GRPO
    zero std       a group whose rewards are all equal (max == min, not std == 0: see below)
    reinforce      l_t = -s log pi(o_t)    s = A (reinforce_with_baseline) or s = r (no_baseline)
    ratio          rho_t = exp(log pi(o_t) - log pi_old(o_t))                 --importance-sampling-level token
                   rho_i = exp(mean_t (log pi(o_t) - log pi_old(o_t)))       sequence (GSPO), one per sequence
    grpo_clip      l_t = -min(min(rho_t, delta) A, clip(rho_t, 1 - eps_low, 1 + eps_high) A)   (delta: --delta)
                   (TRL's grpo, bnpo, dr_grpo and dapo are this loss with a fixed aggregation, see aggregate_loss)
    KL (k3)        kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1     (>= 0, unbiased for KL)

Gradient accumulation contract (`aggregate_loss`): each micro-batch's loss is divided by counts
of the WHOLE optimizer step (all micro-batches on all workers), so summing micro-batch gradients
and SUM-all-reducing them across workers gives exactly the full-batch gradient. Callers must
not divide again by the number of accumulation steps or workers.

Glossary:
    B: sequences in a batch (prompts x G), contiguous groups of G completions per prompt.
    G: group size (completions per prompt).
    T: completion (response) tokens, right-padded.
    L: sequence positions passed to `compute_token_log_probs` (often T).
    H: hidden size.  V: vocabulary size.
    mask: 1/True on real completion tokens, 0/False on padding (after EOS).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "AGGREGATION_MODES",
    "PolicyLoss",
    "aggregate_loss",
    "compute_group_advantages",
    "compute_kl_k3",
    "compute_policy_loss",
    "compute_token_log_probs",
    "compute_high_entropy_mask",
    "compute_truncated_is_weights",
    "compute_vllm_is_weights",
    "compute_zero_std_groups",
    "VLLM_IS_MODES",
    "mask_truncated_completions",
    "get_policy_loss",
    "get_policy_loss_fn",
    "masked_mean",
    "masked_normalize",
    "register_policy_loss",
]


# -- masked reductions -------------------------------------------------------------------------


def masked_normalize(
    x: torch.Tensor, mask: torch.Tensor, normalize_constant: float, dim: int | None = None
) -> torch.Tensor:
    """Sum of `x` where `mask` is set, divided by a given constant.

    Masked-out entries are dropped with `where`, not multiplied by 0, so a NaN/inf there
    (e.g. a log-prob at a padding position) cannot leak into the result.

    Args:
        x: values, any shape.
        mask: same shape as `x`, bool or 0/1 (a float mask acts as weights).
        normalize_constant: the divisor.
        dim: reduce over this dim; None reduces over everything.

    Returns:
        `x` summed over `dim` (or all) where `mask`, divided by `normalize_constant`.
    """
    masked = torch.where(mask.bool(), x * mask.to(x.dtype), torch.zeros_like(x))
    total = masked.sum() if dim is None else masked.sum(dim=dim)
    return total / normalize_constant


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the entries where `mask` is set (0 where the mask is empty).

    Args:
        x: values, any shape.
        mask: same shape as `x`, bool or 0/1 (a float mask acts as weights).
        dim: reduce over this dim; None reduces over everything.

    Returns:
        sum(x * mask) / sum(mask) over `dim` (or all); 0 where sum(mask) == 0.
    """
    m = mask.to(x.dtype)
    count = m.sum() if dim is None else m.sum(dim=dim)
    return masked_normalize(x, mask, 1.0, dim) / count.clamp_min(torch.finfo(x.dtype).tiny)


# -- advantages --------------------------------------------------------------------------------


def compute_group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    normalize_by_std: bool = True,
    eps: float = 1e-4,
    scale_std: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Group-relative advantages: each reward compared with the other completions of its prompt.

    A_i = (r_i - mean_g) / (std_g + eps) with the unbiased (n - 1) group std (GRPO; TRL's
    scale_rewards="group"), A_i = (r_i - mean_g) / (scale_std + eps) with a given std (TRL's
    scale_rewards="batch": the unbiased std of every reward of the step, on every worker), or
    A_i = r_i - mean_g when `normalize_by_std` is False (Dr. GRPO, scale_rewards="none").
    A group whose rewards are all equal gets A = 0 in every case.

    Args:
        rewards: (B,) float, B = prompts x G, the G completions of a prompt contiguous.
        group_size: G, at least 2 (a group of one has no baseline and no std).
        normalize_by_std: divide by a std + eps.
        eps: added to the std before dividing, so zero-std groups stay finite.
        scale_std: the std to divide by instead of each group's (0-dim tensor or float), e.g. the
            batch std from `compute_batch_std`; None divides by the group std.

    Returns:
        advantages: (B,) float32.
        raw_rewards: (B,) float32, the input rewards.
        metadata: 0-dim tensors `mean` (mean reward), `std` (mean over groups of the group
            std, TRL's `reward_std`), `max`, `min` (over the batch) and `frac_zero_std`
            (fraction of groups whose rewards are all equal, per `compute_zero_std_groups`).

    Raises:
        ValueError: group_size < 2, or B not a multiple of group_size.
    """
    if group_size < 2:
        raise ValueError(
            f"group_size must be at least 2 for group-relative advantages (got {group_size}): "
            "a group of one completion has no baseline to compare against."
        )
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be a 1-D tensor whose length is a multiple of group_size={group_size} "
            f"(got shape {tuple(rewards.shape)})."
        )
    raw = rewards.float()
    grouped = raw.view(-1, group_size)  # (B / G, G)
    mean = grouped.mean(dim=1, keepdim=True)  # (B / G, 1)
    std = grouped.std(dim=1, keepdim=True, unbiased=True)  # (B / G, 1)
    centered = grouped - mean
    divisor = std if scale_std is None else torch.as_tensor(scale_std, dtype=raw.dtype, device=raw.device)
    advantages = centered / (divisor + eps) if normalize_by_std else centered
    zero_std = compute_zero_std_groups(raw, group_size)  # (B / G,)
    advantages = torch.where(zero_std.unsqueeze(1), torch.zeros_like(advantages), advantages)
    metadata = {
        "mean": raw.mean(),
        "std": std.mean(),
        "max": raw.max(),
        "min": raw.min(),
        "frac_zero_std": zero_std.float().mean(),
    }
    return advantages.reshape(-1), raw, metadata  # (B,), (B,)


def compute_zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which groups have all-equal rewards: the one test behind `frac_zero_std` and `--filter-zero-std`.

    The test is max == min, exact. `std == 0` is not: the float std of equal values may come out as
    1e-9 (three rewards of 0.1 give 0.1 + 0.1 + 0.1 != 3 * 0.1 in the mean), so a std test would keep
    groups whose advantages are all 0 and count them as signal.

    Args:
        rewards: (B,) float, B = prompts x G, the G completions of a prompt contiguous.
        group_size: G.

    Returns:
        (B / G,) bool, True where every reward of the group is the same.

    Example:
        >>> compute_zero_std_groups(torch.tensor([0.1, 0.1, 0.1, 0.0, 1.0, 0.0]), 3).tolist()
        [True, False]
    """
    grouped = rewards.view(-1, group_size)  # (B / G, G)
    return grouped.amax(dim=1) == grouped.amin(dim=1)


# -- policy-gradient losses --------------------------------------------------------------------

PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
# `aggregate_loss` modes; the first three are --loss-agg's, the last two TRL's bnpo and dapo.
AGGREGATION_MODES = ("seq_mean", "token_mean", "constant", "local_token_mean", "rollout_token_mean")
Signal = Literal["advantages", "rewards"]


@dataclass(frozen=True)
class PolicyLoss:
    """A registered `--loss-type` and what the recipe must give it.

    Attributes:
        name: the `--loss-type` value.
        fn: `(log_probs (B,T), old_log_probs (B,T), signal (B,), *, epsilon_low, epsilon_high, mask,
            importance_sampling_level, delta) -> (per_token_loss (B,T), metadata)`, metadata holding the
            per-token float masks `clip_low`, `clip_high`, `clip` (B,T).
        signal: what the recipe passes as the per-sequence signal: "advantages" (group-relative A)
            or "rewards" (the raw total reward r, no baseline; --filter-zero-std then means nothing).
        uses_old_log_probs: the loss compares pi with pi_old (a ratio). When False, `old_log_probs`
            is ignored and the recipe never computes it; when True and the batch is updated more
            than once (off-policy), the recipe computes pi_old once per rollout batch.
        aggregation: the `aggregate_loss` mode the loss always uses (TRL's loss types fix theirs), or
            None: the user's `--loss-agg`.
    """

    name: str
    fn: PolicyLossFn
    signal: Signal
    uses_old_log_probs: bool
    aggregation: str | None = None


POLICY_LOSS_REGISTRY: dict[str, PolicyLoss] = {}


def register_policy_loss(
    name: str, *, signal: Signal = "advantages", uses_old_log_probs: bool = True, aggregation: str | None = None
) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: make a per-token policy loss available as `--loss-type <name>` (see `PolicyLoss`).

    `uses_old_log_probs` defaults to True: computing pi_old for a loss that ignores it costs a
    forward pass, while leaving it out for a ratio loss would make every update on-policy in
    disguise. Add the name to `GRPOConfig.loss_type` in opensloth/config.py too (a test checks that
    the two agree).

    Raises:
        ValueError: the name is taken, `signal` is neither "advantages" nor "rewards", or
            `aggregation` is not one of `AGGREGATION_MODES`.
    """
    if signal not in ("advantages", "rewards"):
        raise ValueError(f"policy loss {name!r}: signal must be 'advantages' or 'rewards', not {signal!r}")
    if aggregation is not None and aggregation not in AGGREGATION_MODES:
        raise ValueError(f"policy loss {name!r}: aggregation must be one of {', '.join(AGGREGATION_MODES)}")

    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSS_REGISTRY:
            raise ValueError(f"policy loss {name!r} is already registered")
        POLICY_LOSS_REGISTRY[name] = PolicyLoss(name, fn, signal, uses_old_log_probs, aggregation)
        return fn

    return decorator


def get_policy_loss(name: str) -> PolicyLoss:
    """The registered loss called `name`, with what it needs; a miss lists the valid names.

    Raises:
        ValueError: no loss of that name.
    """
    try:
        return POLICY_LOSS_REGISTRY[name]
    except KeyError:
        valid = ", ".join(sorted(POLICY_LOSS_REGISTRY))
        raise ValueError(f"unknown policy loss {name!r}; valid choices: {valid}") from None


def get_policy_loss_fn(name: str) -> PolicyLossFn:
    """The per-token loss function registered as `name`; a miss lists the valid names."""
    return get_policy_loss(name).fn


def _no_clip_metadata(log_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    zeros = torch.zeros_like(log_probs, dtype=torch.float32)
    return {"clip_low": zeros, "clip_high": zeros, "clip": zeros}


def compute_reinforce_loss(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, signal: torch.Tensor, **_: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """REINFORCE: l_t = -s * log pi(o_t), s the sequence's signal. Never clips, ignores pi_old.

    One body for two `--loss-type`s, which differ only in the signal the recipe passes
    (their `PolicyLoss.signal`):
        no_baseline              s = r, the raw reward (no baseline: unbiased, high variance)
        reinforce_with_baseline  s = A, the group-relative advantage (the group mean is the baseline)

    Args:
        log_probs: (B, T) log pi of the sampled tokens, with gradient.
        old_log_probs: (B, T) unused (same signature as the other losses).
        signal: (B,) raw rewards or advantages.

    Returns:
        per-token loss (B, T) and all-zero clip masks (B, T).
    """
    return -signal.unsqueeze(1) * log_probs, _no_clip_metadata(log_probs)


register_policy_loss("no_baseline", signal="rewards", uses_old_log_probs=False)(compute_reinforce_loss)
register_policy_loss("reinforce_with_baseline", signal="advantages", uses_old_log_probs=False)(
    compute_reinforce_loss)


@register_policy_loss("grpo_clip", signal="advantages", uses_old_log_probs=True)
def compute_grpo_clip_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    mask: torch.Tensor | None = None,
    importance_sampling_level: str = "token",
    delta: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-style clipped surrogate: l = -min(min(rho, delta) A, clip(rho, 1 - eps_low, 1 + eps_high) A).

    With A > 0 the clip binds when rho > 1 + eps_high (`clip_high`); with A < 0 it binds when
    rho < 1 - eps_low (`clip_low`). A clipped token has zero gradient. As TRL 1.16's `_compute_loss`:
    rho is per token (`importance_sampling_level="token"`) or, for "sequence" (GSPO), one per sequence,
    exp of the mean over its completion tokens of log pi - log pi_old, broadcast over its tokens;
    `delta` (two-sided clipping) caps the unclipped term's ratio, and the clip masks are taken from
    the capped ratio.

    Args:
        log_probs: (B, T) log pi of the sampled tokens, with gradient.
        old_log_probs: (B, T) log pi_old, the policy that sampled (no gradient).
        advantages: (B,) group-relative advantages.
        epsilon_low: lower clip range.
        epsilon_high: upper clip range (DAPO's clip-higher); None means `epsilon_low`.
        mask: (B, T) 1 on completion tokens; needed by the sequence level (the mean's tokens).
        importance_sampling_level: "token" or "sequence".
        delta: upper bound on rho in the unclipped term, or None (off).

    Returns:
        per_token_loss: (B, T).
        metadata: float masks (B, T) `clip_low`, `clip_high` and `clip` (either), 1 where the
            clipped term was the one taken (reduce them with `masked_mean`), and `ratio` (B, T), rho
            before the delta cap, with gradient (TRL's KL bias correction multiplies the KL by it).

    Raises:
        ValueError: an unknown level, or the sequence level without a mask.
    """
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(1)  # (B, 1)
    log_ratio = log_probs - old_log_probs.detach()  # (B, T)
    if importance_sampling_level == "token":
        log_weights = log_ratio
    elif importance_sampling_level == "sequence":
        if mask is None:
            raise ValueError("importance_sampling_level='sequence' needs the completion mask")
        m = mask.to(log_ratio.dtype)
        log_weights = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (B, 1)
    else:
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}; "
                         "valid choices: token, sequence")
    ratio = torch.exp(log_weights)  # (B, T) or (B, 1)
    uncapped_ratio = ratio
    clipped_ratio = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + eps_high)
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    loss = -torch.minimum(ratio * adv, clipped_ratio * adv).expand_as(log_probs)  # (B, T)
    clip_low = ((ratio < 1.0 - epsilon_low) & (adv < 0)).expand_as(log_probs)
    clip_high = ((ratio > 1.0 + eps_high) & (adv > 0)).expand_as(log_probs)
    metadata = {
        "clip_low": clip_low.float(),
        "clip_high": clip_high.float(),
        "clip": (clip_low | clip_high).float(),
        "ratio": uncapped_ratio.expand_as(log_probs),
    }
    return loss, metadata


# TRL 1.16's loss types: the same clipped objective, each with its own aggregation (see aggregate_loss).
for _name, _aggregation in (("grpo", "seq_mean"), ("bnpo", "local_token_mean"), ("dr_grpo", "constant"),
                            ("dapo", "rollout_token_mean")):
    register_policy_loss(_name, signal="advantages", uses_old_log_probs=True, aggregation=_aggregation)(
        compute_grpo_clip_loss)


def compute_policy_loss(
    loss_type: str,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    importance_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    importance_sampling_level: str = "token",
    delta: float | None = None,
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token policy loss of the registered `loss_type`, optionally masked and re-weighted per token.

    Args:
        loss_type: a name in the registry (`no_baseline`, `reinforce_with_baseline`, `grpo_clip`, and
            TRL's `grpo`, `bnpo`, `dr_grpo`, `dapo`).
        log_probs: (B, T) current log-probs, with gradient.
        old_log_probs: (B, T) sampling-policy log-probs (pass `log_probs.detach()` when on-policy).
        advantages: (B,) the loss's signal: advantages, or raw rewards where the loss's
            `PolicyLoss.signal` is "rewards" (`no_baseline`).
        epsilon_low: lower clip range (clipped losses).
        epsilon_high: upper clip range (clipped losses); None means `epsilon_low`.
        importance_weights: optional (B, T) or (B, 1) weights multiplying the loss, e.g.
            `compute_vllm_is_weights` when the sampler's log-probs differ from ours.
        mask: (B, T) completion mask (the sequence-level ratio's tokens).
        importance_sampling_level: "token" or "sequence" (clipped losses).
        delta: two-sided clipping bound (clipped losses), or None.
        token_mask: optional (B, T) bool, the tokens whose policy loss counts (e.g.
            `compute_high_entropy_mask`); the others get 0 (the KL term, added later, is not masked).

    Returns:
        per_token_loss (B, T) and the loss's metadata (per-token clip masks, (B, T) each).
    """
    fn = get_policy_loss_fn(loss_type)
    options = {"epsilon_low": epsilon_low, "epsilon_high": epsilon_high}
    if importance_sampling_level != "token" or delta is not None:  # only the clipped losses take these
        options |= {"mask": mask, "importance_sampling_level": importance_sampling_level, "delta": delta}
    loss, metadata = fn(log_probs, old_log_probs, advantages, **options)
    if token_mask is not None:
        loss = loss * token_mask.to(loss.dtype)
    if importance_weights is not None:
        loss = loss * importance_weights.detach()
    return loss, metadata


def compute_high_entropy_mask(
    entropies: torch.Tensor, mask: torch.Tensor, quantile: float, pool: torch.Tensor | None = None
) -> torch.Tensor:
    """The completion tokens whose entropy is at least the `quantile` of the pool's (TRL's get_high_entropy_mask).

    `--top-entropy-quantile q` keeps the top q of the tokens ("Beyond the 80/20 rule"): the
    threshold is torch.quantile(pool, 1 - q) (linear interpolation), over the entropies of every
    worker's completion tokens of the micro-batch, as TRL gathers them.

    Args:
        entropies: (B, T) per-token entropies.
        mask: (B, T) 1 on completion tokens.
        quantile: the threshold's quantile in [0, 1] (1 - q).
        pool: (N,) the entropies the threshold is taken over; None uses `entropies[mask]`.

    Returns:
        (B, T) bool, True on completion tokens whose entropy >= the threshold (all False when the pool is empty).
    """
    values = entropies.detach()[mask.bool()].float() if pool is None else pool.float()
    if values.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    threshold = torch.quantile(values, quantile)
    return ((entropies.detach() * mask.to(entropies.dtype)) >= threshold) & mask.bool()


def mask_truncated_completions(completion_mask: torch.Tensor, is_eos_terminated: torch.Tensor) -> torch.Tensor:
    """The completion mask with every truncated completion (no EOS within the limit) zeroed, as TRL's
    `mask_truncated_completions`: such completions add nothing to the loss and no tokens to its counts.

    Args:
        completion_mask: (B, T) 1 on completion tokens.
        is_eos_terminated: (B,) bool, True where the completion ended with EOS.

    Returns:
        (B, T) mask of the same dtype.
    """
    return completion_mask * is_eos_terminated.to(completion_mask.device).unsqueeze(1).to(completion_mask.dtype)


VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def compute_vllm_is_weights(
    old_log_probs: torch.Tensor,
    sampler_log_probs: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    clip_max: float | None,
    clip_min: float | None = None,
) -> torch.Tensor:
    """Importance weights pi_old / pi_sampler for a sampler (vLLM) that is not exactly our policy, as TRL 1.16.

    d_t = (log pi_old - log pi_sampler) * mask (NaN -> 0, so padding and unscored tokens weigh 1). The
    token modes use w_t = exp(d_t), (B, T); the sequence modes one weight per sequence,
    w = exp(sum_t d_t), (B, 1). `*_truncate` clamps w into [clip_min, clip_max]; `*_mask` sets w = 0
    where it lies outside (the token or sequence is dropped). A bound of None is no bound.

    Args:
        old_log_probs: (B, T) log pi_old from the trainer's forward.
        sampler_log_probs: (B, T) the engine's log-probs of the same tokens.
        mask: (B, T) 1 on completion tokens.
        mode: one of `VLLM_IS_MODES`.
        clip_max: upper bound C_max, or None.
        clip_min: lower bound C_min, or None.

    Returns:
        (B, T) or (B, 1) weights, without gradient.

    Raises:
        ValueError: unknown mode.
    """
    if mode not in VLLM_IS_MODES:
        raise ValueError(f"unknown vLLM importance-sampling mode {mode!r}; valid choices: {', '.join(VLLM_IS_MODES)}")
    diff = torch.nan_to_num((old_log_probs.detach() - sampler_log_probs.detach()) * mask, nan=0.0)  # (B, T)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)  # (B, 1)
    weights = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(weights, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return weights.masked_fill((weights < low) | (weights > high), 0.0)


def compute_truncated_is_weights(
    old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance-sampling weights for a sampler that is not exactly our policy.

    A fast engine (vLLM) samples from pi_sampler, slightly different from the trainer's
    pi_old at the same weights; w_t = min(pi_old / pi_sampler, cap) corrects the gradient
    for that mismatch while the cap bounds its variance.

    Args:
        old_log_probs: (B, T) log pi_old from the trainer's forward.
        rollout_log_probs: (B, T) log pi_sampler reported by the rollout engine.
        cap: upper bound on the weight (e.g. 2.0).

    Returns:
        (B, T) weights in (0, cap], without gradient.

    The recipe uses `compute_vllm_is_weights`, whose token_truncate mode is this on completion tokens.
    """
    return torch.exp(old_log_probs.detach() - rollout_log_probs.detach()).clamp(max=cap)


def compute_sampler_logprob_diff(
    trainer_log_probs: torch.Tensor, sampler_log_probs: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """|log pi_trainer - log pi_sampler| on every completion token: the train-inference mismatch.

    Its mean and max are logged as `rollout/logprob_diff_mean`/`_max`. Large values mean the
    engine samples from a different policy than the one being trained (stale weights, another
    dtype or kernel) and the importance weights are doing real work.

    Args:
        trainer_log_probs: (B, T) log pi_old of the completion tokens from the trainer's forward.
        sampler_log_probs: (B, T) the engine's log-probs of the same tokens.
        completion_mask: (B, T) 1 on completion tokens.

    Returns:
        (num_completion_tokens,) float32 absolute differences, without gradient.
    """
    diff = (trainer_log_probs.detach().float() - sampler_log_probs.detach().float()).abs()
    return diff[completion_mask.bool()]


# -- KL ----------------------------------------------------------------------------------------


def compute_kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) on tokens sampled from pi.

    kl_t = exp(d) - d - 1 with d = ref_t - logp_t: non-negative, 0 when the policies agree,
    and unbiased because E_pi[exp(d)] = 1 (Schulman, "Approximating KL divergence").

    Args:
        log_probs: (B, T) log pi, with gradient.
        ref_log_probs: (B, T) log pi_ref, without gradient.

    Returns:
        (B, T) per-token KL estimates.
    """
    d = ref_log_probs - log_probs
    return torch.exp(d) - d - 1.0


# -- aggregation -------------------------------------------------------------------------------

def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    num_sequences: float,
    num_tokens: float,
    max_new_tokens: int,
    num_micro_batches: float = 1.0,
    rollout_tokens_per_update: float | None = None,
) -> torch.Tensor:
    """Reduce a micro-batch's per-token loss to its share of the optimizer step's loss.

    The counts are GLOBAL: over every micro-batch of the optimizer step on every worker. Each
    micro-batch's result is then a term of the full-batch loss, so its gradients summed over
    micro-batches (and SUM-all-reduced over workers) equal the full-batch gradient exactly.
    Do NOT divide further by gradient-accumulation steps or world size.

        seq_mean            sum_i (sum_t l_it m_it / n_i) / num_sequences   (GRPO, TRL's grpo; n_i = tokens of seq i)
        token_mean          sum_it l_it m_it / num_tokens                    (the optimizer step's token mean)
        constant            sum_it l_it m_it / (num_sequences * max_new_tokens)   (Dr. GRPO, TRL's dr_grpo)
        local_token_mean    (sum_it l_it m_it / sum_it m_it) / num_micro_batches   (TRL's bnpo: each
                            micro-batch's own token mean, averaged over the step's micro-batches)
        rollout_token_mean  sum_it l_it m_it / rollout_tokens_per_update     (TRL's dapo: the rollout batch's
                            tokens on every worker, divided by the optimizer steps one pass over it makes)

    The last two are TRL 1.16's definitions, which depend on how the batch is cut: bnpo normalises by
    the tokens of one worker's micro-batch (TRL divides by gradient-accumulation steps and DDP averages
    over workers, so num_micro_batches = GA x workers), dapo by num_items_in_batch, the tokens of the
    whole generation batch, scaled to one optimizer step. seq_mean and constant divide by the step's
    global sequence count, which equals TRL's per-micro-batch mean / GA / workers when every
    micro-batch holds the same number of sequences (TRL's always do).

    Args:
        per_token_loss: (b, T) loss of this micro-batch's b sequences.
        mask: (b, T) 1 on completion tokens.
        mode: one of `AGGREGATION_MODES`.
        num_sequences: sequences in the whole optimizer step (all micro-batches, all workers).
        num_tokens: masked tokens in the whole optimizer step (all micro-batches, all workers).
        max_new_tokens: the generation budget (the constant of `constant`).
        num_micro_batches: micro-batches in the whole optimizer step, all workers (local_token_mean).
        rollout_tokens_per_update: the rollout batch's masked tokens on all workers divided by the
            optimizer steps per pass over it (rollout_token_mean).

    Returns:
        0-dim loss tensor.

    Raises:
        ValueError: unknown mode, or rollout_token_mean without `rollout_tokens_per_update`.
    """
    if mode == "seq_mean":
        per_seq = masked_mean(per_token_loss, mask, dim=1)  # (b,)
        return per_seq.sum() / num_sequences
    if mode == "token_mean":
        return masked_normalize(per_token_loss, mask, num_tokens)
    if mode == "constant":
        return masked_normalize(per_token_loss, mask, num_sequences * max_new_tokens)
    if mode == "local_token_mean":
        local_tokens = mask.to(per_token_loss.dtype).sum().clamp(min=1.0)
        return masked_normalize(per_token_loss, mask, 1.0) / local_tokens / num_micro_batches
    if mode == "rollout_token_mean":
        if rollout_tokens_per_update is None:
            raise ValueError("rollout_token_mean needs rollout_tokens_per_update")
        return masked_normalize(per_token_loss, mask, max(rollout_tokens_per_update, 1.0))
    raise ValueError(f"unknown loss aggregation {mode!r}; valid choices: {', '.join(AGGREGATION_MODES)}")


# -- chunked log-probs -------------------------------------------------------------------------


def _softmax_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs (bf16/fp16 softmax loses the log-probs), else the input's."""
    return torch.promote_types(x.dtype, torch.float32)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, V), (n, V) -> (n,) sum_v a[i, v] * b[i, v], as one batched matmul (one pass, no (n, V) temporary)."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """log pi(target) and entropy from hidden @ W^T / temperature, (chunk x V) at a time.

    Forward keeps only the per-token log-normaliser (N,); backward recomputes each chunk's
    logits once and writes the gradient in closed form (z = logits / temperature, p = softmax z):
        d logp / dz    = onehot(target) - p
        d entropy / dz = -p * (z - sum_v p_v z_v)
    so neither pass ever holds more than two (chunk x V) tensors. Every (chunk x V) pass counts at
    Qwen's 151,936-token vocabulary (~0.1-0.25 s each for 384 tokens on a 2-core CPU): the division by
    a temperature of 1 is skipped, sums of products run as one batched matmul, the logits' buffer is
    reused in place, and the entropy's gradient is computed only when the loss uses the entropy (it is
    usually a logged metric: autograd then hands backward None for it, not a tensor of zeros).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, with_entropy):
        # hidden (N, H), weight (V, H), targets (N,) -> logp (N,), entropy (N,), float32
        ctx.set_materialize_grads(False)  # an output the loss does not use gets a None gradient
        N = hidden.shape[0]
        dtype = _softmax_dtype(hidden)
        logp = torch.empty(N, dtype=dtype, device=hidden.device)
        entropy = torch.zeros(N, dtype=dtype, device=hidden.device)
        log_z = torch.empty(N, dtype=dtype, device=hidden.device)
        for start in range(0, N, chunk_size):
            rows = slice(start, start + chunk_size)
            z = _chunk_logits(hidden[rows], weight, dtype, temperature)  # (n, V)
            log_z[rows] = torch.logsumexp(z, dim=-1)
            logp[rows] = z.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1) - log_z[rows]
            if with_entropy:
                log_p = z.sub_(log_z[rows].unsqueeze(-1))  # (n, V), reuses z
                entropy[rows] = -_row_dot(log_p.exp(), log_p)
        ctx.save_for_backward(hidden, weight, targets, log_z)
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, log_z = ctx.saved_tensors
        use_entropy = ctx.with_entropy and grad_entropy is not None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_logp is None and not use_entropy:
            return None, None, None, None, None, None
        if grad_logp is None:
            grad_logp = torch.zeros_like(log_z)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=log_z.dtype, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            z = _chunk_logits(hidden[rows], weight, log_z.dtype, ctx.temperature)  # (n, V)
            g_logp = grad_logp[rows].unsqueeze(-1)  # (n, 1)
            if use_entropy:
                p = (z - log_z[rows].unsqueeze(-1)).exp_()  # (n, V)
                mean_z = _row_dot(p, z).unsqueeze(-1)  # (n, 1)
                grad_z = z.sub_(mean_z).mul_(p).mul_(-grad_entropy[rows].unsqueeze(-1))  # reuses z
                grad_z.sub_(p.mul_(g_logp))
            else:
                grad_z = z.sub_(log_z[rows].unsqueeze(-1)).exp_().mul_(-g_logp)  # -g p, in z's buffer
            grad_z.scatter_add_(-1, targets[rows].unsqueeze(-1), g_logp)
            # Through "/ temperature" and back to the matmul's dtype, as autograd would.
            if ctx.temperature != 1.0:
                grad_z = grad_z.div_(ctx.temperature)
            grad_z = grad_z.to(hidden.dtype)
            if need_h:
                grad_h[rows] = grad_z @ weight
            if need_w:
                grad_w += (grad_z.T @ hidden[rows]).to(grad_w.dtype)
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, temperature: float) -> torch.Tensor:
    """(n, H) @ (V, H)^T in `dtype`, divided by the temperature (in place: the matmul's output is fresh)."""
    z = (hidden @ weight.T).to(dtype)  # (n, V)
    return z.div_(temperature) if temperature != 1.0 else z


def compute_token_log_probs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropy) of `target_ids` under softmax(hidden @ W^T / temperature).

    Works through the B*L tokens `chunk_size` at a time, so at most (chunk_size x V) logits
    exist at once, in the backward pass too: a custom autograd function keeps only each
    token's log-normaliser and recomputes a chunk's logits in backward, where the gradient
    is written in closed form. Logits are divided by the sampling temperature so that log pi
    is the distribution the completions were drawn from (as TRL does), and upcast to float32
    (from bf16/fp16) before the softmax.

    Args:
        hidden: (B, L, H) final hidden states (after the model's last norm), position t
            predicting target_ids[:, t].
        lm_head_weight: (V, H) output projection (no bias, no logit scaling).
        target_ids: (B, L) int64 tokens whose log-probs are wanted.
        temperature: sampling temperature (> 0).
        chunk_size: tokens per chunk.
        with_entropy: also return the entropy of each position's distribution.

    Returns:
        logp: (B, L) float32 (float64 for float64 inputs).
        entropy: (B, L) like logp, or None when `with_entropy` is False.
    """
    B, L, H = hidden.shape
    logp, entropy = _ChunkedTokenLogProbs.apply(
        hidden.reshape(B * L, H), lm_head_weight, target_ids.reshape(B * L), temperature, chunk_size, with_entropy
    )  # (N,), (N,) with N = B * L
    return logp.view(B, L), (entropy.view(B, L) if with_entropy else None)
