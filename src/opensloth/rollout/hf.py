"""The `hf` rollout engine: transformers models, a KV cache, left padding, any device.

Generates through whatever module it is given, so a PEFT model samples with its LoRA
adapter active and no weight sync is ever needed. Two decoders produce the same completions:

    lean      (default on the CPU) our own loop: each prompt is prefilled ONCE, its KV cache is
              repeated for the G completions of its group into buffers allocated once for the
              whole completion (`PreallocatedLayer`), then one batched forward per new token with
              our own sampling (`apply_repetition_penalty` then `filter_logits`: the same operations, in
              the same order, as transformers' repetition-penalty processor and temperature / top-k /
              top-p / min-p warpers; stop strings by transformers' StopStringCriteria), with each LoRA
              layer merged into one matmul for the rollout (`lora_merged_for_sampling`).
              generate() prefills every prompt G times and runs a chain of Python logits
              processors and stopping criteria per token; on the Qwen2.5-0.5B-shaped CPU workload
              the prefill alone is G x cheaper here (docs/performance.md).
    generate  transformers' `model.generate` (default on CUDA, where `cache_implementation="static"`
              makes transformers compile the decode step: 64 x 256 sampled tokens from a 0.5B
              Qwen2 on an H100 in 2.3 s against 13.5 s with the dynamic cache; prompts are then
              left-padded to a multiple of 64 so the cache length, hence the compiled graph,
              changes rarely). Also the fallback for a model the lean loop does not support
              (encoder-decoder, a custom cache, no `logits_to_keep`), with a log line.

Every sampling parameter is set explicitly on both paths: a hub model's generation_config
(Qwen2.5-Instruct ships top_k=20, repetition_penalty=1.05) would otherwise reshape the
distribution the completions are drawn from, and the policy-gradient log-probs would no longer
describe it. Only what the caller asks for (--top-k, --repetition-penalty, --stop-strings) is applied.

Two choices differ from stock transformers, on both decoders, so that a row's completion never
depends on how the other prompts of its batch are padded: the repetition penalty counts a row's real
tokens (prompt and completion so far), not its left padding (stock `generate` also penalises the pad
id, which is Qwen's <|endoftext|>, a stop token); and stop strings are looked for in the completion
only (stock `generate` also matches one that starts in the prompt). vLLM does both the same way. On
an unpadded prompt that does not end inside a stop string, both decoders give stock generate's tokens.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig
from transformers.cache_utils import DynamicLayer
from transformers.generation import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.stopping_criteria import StopStringCriteria

from opensloth.rollout.base import Prompt, RolloutBatch, RolloutEngine, completion_mask_from_eos

logger = logging.getLogger(__name__)

CHATML_END = "<|im_end|>"
# End-of-turn / end-of-document markers that end a completion whenever the vocabulary has them:
# a Qwen-Instruct fine-tune saved without its generation_config still stops at <|endoftext|>.
END_MARKERS = (CHATML_END, "<|endoftext|>")


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Token ids that end a completion: the tokenizer's EOS, `<|im_end|>` and `<|endoftext|>` when
    the vocabulary has them, and the model's generation_config EOS ids."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids += [int(vocab[marker]) for marker in END_MARKERS if marker in vocab]
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None)
    ids += [int(i) for i in (extra if isinstance(extra, (list, tuple)) else [extra]) if i is not None]
    return list(dict.fromkeys(ids))  # unique, order kept


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, multiple_of: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into one tensor.

    Args:
        sequences: N lists of token ids.
        pad_id: the padding id.
        multiple_of: round the padded length up to a multiple of this.

    Returns:
        ids (N, P) int64 and mask (N, P) int64 (1 on real tokens).
    """
    longest = max(len(s) for s in sequences)
    P = -(-longest // multiple_of) * multiple_of
    ids = torch.full((len(sequences), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), P), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, P - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, P - len(seq):] = 1
    return ids, mask


def filter_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0,
                  min_p: float = 0.0, top_k: int | None = 0) -> torch.Tensor:
    """The sampling distribution's logits: removed tokens at -inf, the rest divided by the temperature.

    The same operations, in the same order, as transformers' TemperatureLogitsWarper, TopKLogitsWarper,
    TopPLogitsWarper and MinPLogitsWarper (what `generate` applies with do_sample and
    min_tokens_to_keep=1), so both decoders sample from one distribution.

    Args:
        logits: (B, V) float32 next-token logits (after any repetition penalty).
        temperature: divides the logits (1.0 leaves them as they are).
        top_k: keep the k likeliest tokens, and every token tied with the k-th (0 or None = off).
        top_p: keep the smallest set of likeliest tokens whose probability reaches top_p (1.0 = off);
            the likeliest token is always kept.
        min_p: drop tokens whose probability is below min_p x the top token's (0.0 = off).

    Returns:
        (B, V) float32 filtered logits; softmax of them is the distribution sampled from.
    """
    scores = logits / temperature if temperature != 1.0 else logits
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, sorted_index = torch.sort(scores, descending=False)  # (B, V) ascending
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False  # keep the likeliest token
        remove = remove_sorted.scatter(1, sorted_index, remove_sorted)  # back to vocabulary order
        scores = scores.masked_fill(remove, float("-inf"))
    if min_p > 0.0:
        probs = scores.softmax(dim=-1)
        remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
        remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)  # keep the likeliest token
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def sample_tokens(logits: torch.Tensor, *, greedy: bool, temperature: float = 1.0, top_p: float = 1.0,
                  min_p: float = 0.0, top_k: int | None = 0) -> torch.Tensor:
    """Next tokens (B,) int64: argmax when greedy, else one draw from softmax(filter_logits(logits)).

    The draw inverts the cumulative distribution with one uniform number per row, where
    torch.multinomial draws an exponential number for every token of the vocabulary: at Qwen's
    151,936 tokens that was 21 ms of a ~240 ms CPU decode step, against 9.5 ms here. Token i is picked
    when u falls in (cdf[i-1], cdf[i]], an interval as wide as its probability (empty for a filtered
    token); the sum runs in float64 so that rounding does not move the interval edges measurably.

    Args:
        logits: (B, V) float32 next-token logits.
    """
    if greedy:
        return logits.argmax(dim=-1)
    scores = filter_logits(logits, temperature=temperature, top_p=top_p, min_p=min_p, top_k=top_k)  # (B, V)
    weights = (scores - scores.amax(dim=-1, keepdim=True)).exp()  # (B, V) unnormalised probabilities, 0 if filtered
    cdf = weights.cumsum(dim=-1, dtype=torch.float64)  # (B, V)
    total = cdf[:, -1:]  # (B, 1) >= 1: the likeliest token has weight 1
    u = (1.0 - torch.rand(total.shape, dtype=torch.float64, device=cdf.device)) * total  # (B, 1) in (0, total]
    return torch.searchsorted(cdf, u).squeeze(1)  # first i with cdf[i] >= u


def seen_tokens(ids: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: which tokens occur among each row's real (mask 1) tokens.

    Args:
        ids: (B, L) token ids; mask: (B, L) 1 on real tokens, 0 on padding.
    """
    counts = torch.zeros(ids.shape[0], vocab_size, dtype=torch.long, device=ids.device)
    return counts.scatter_add_(1, ids, mask.long()) > 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: each seen token's logit is divided by the penalty
    when positive and multiplied by it when negative (so penalty > 1 makes it less likely).

    Args:
        logits: (B, V) float32 next-token logits.
        seen: (B, V) bool, the tokens of each row's prompt and completion so far (`seen_tokens`).
        penalty: > 0; 1.0 leaves the logits as they are.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


class RepetitionPenaltyOverRealTokens(LogitsProcessor):
    """`apply_repetition_penalty` as a logits processor for `generate`, counting the prompts' real tokens
    only (stock RepetitionPenaltyLogitsProcessor also counts the left padding).

    `generate` runs custom processors after its own ones and before the temperature / top-k / top-p /
    min-p warpers: the place its own repetition penalty takes.

    Args:
        penalty: the repetition penalty.
        prompt_mask: (B, P) 1 on real prompt tokens; every generated position counts.
    """

    def __init__(self, penalty: float, prompt_mask: torch.Tensor):
        self.penalty, self.prompt_mask = penalty, prompt_mask

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        P = self.prompt_mask.shape[1]
        mask = torch.cat([self.prompt_mask.to(input_ids.device), torch.ones_like(input_ids[:, P:])], dim=1)
        return apply_repetition_penalty(scores, seen_tokens(input_ids, mask, scores.shape[-1]), self.penalty)


class CompletionStopStrings(StoppingCriteria):
    """transformers' StopStringCriteria over the completion only: True for the rows whose last token
    completes a stop string that lies wholly in the completion.

    Args:
        criteria: a StopStringCriteria for the stop strings (built once per tokenizer and strings: it
            indexes the whole vocabulary).
        prompt_length: P, the columns of `input_ids` before the completion (0: input_ids is the completion).
    """

    def __init__(self, criteria: StopStringCriteria, prompt_length: int = 0):
        self.criteria, self.prompt_length = criteria, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs) -> torch.BoolTensor:
        return self.criteria(input_ids[:, self.prompt_length:], scores)


def stop_string_ends(completion_ids: torch.Tensor, stop: CompletionStopStrings) -> torch.Tensor:
    """(B,) int64: each row's first position whose token completes a stop string, T where none does.

    Args:
        completion_ids: (B, T) generated tokens; stop: the criteria with prompt_length 0.
    """
    B, T = completion_ids.shape
    ends = torch.full((B,), T, dtype=torch.long)
    for t in range(T):
        hit = stop(completion_ids[:, : t + 1]).cpu() & (ends == T)  # (B,)
        ends[hit] = t
        if bool((ends < T).all()):
            break
    return ends


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in buffers allocated once, for the whole rollout.

    DynamicLayer appends each new position with torch.cat, which copies the whole cache every token
    (O(T^2) bytes over a completion): on the CPU bench model it was 60% of the decode time. Here each
    update writes the new positions in place and `keys` / `values` are views of the filled part, so
    attention still sees exactly the positions written so far (a static cache would attend over its
    full length, masked).

    Args:
        keys: (B, H, L, Dk) and values: (B, H, L, Dv), the prefilled cache.
        capacity: positions the buffers hold, >= L (L + the new tokens to decode).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        B, H, L, _ = keys.shape
        self.key_buffer = keys.new_empty(B, H, capacity, keys.shape[-1])
        self.value_buffer = values.new_empty(B, H, capacity, values.shape[-1])
        self.key_buffer[:, :, :L] = keys
        self.value_buffer[:, :, :L] = values
        self.keys, self.values = self.key_buffer[:, :, :L], self.value_buffer[:, :, :L]
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:
            raise RuntimeError(f"PreallocatedLayer holds {self.key_buffer.shape[-2]} positions, asked for {end}")
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values


def expand_prefilled_cache(cache: DynamicCache, repeats: int, capacity: int) -> None:
    """Repeat a prefilled cache's rows for the G completions of each prompt, into preallocated layers.

    Row i of the (N, ...) cache becomes rows i*repeats .. i*repeats+repeats-1. Plain DynamicLayers
    become PreallocatedLayers of `capacity` positions; any other layer kind (sliding window) keeps
    its own update and is only repeated.
    """
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized:
            cache.layers[index] = PreallocatedLayer(layer.keys.repeat_interleave(repeats, dim=0),
                                                    layer.values.repeat_interleave(repeats, dim=0), capacity)
        else:
            layer.batch_repeat_interleave(repeats)


@contextlib.contextmanager
def lora_merged_for_sampling(model: Any) -> Iterator[int]:
    """Inside the block, each active LoRA linear of `model` runs as ONE matmul with W + scale * B @ A.

    A LoRA linear costs the base matmul plus five small ops (dropout, A, B, scale, add) per call; in a
    decode step of a small model those ops, not the FLOPs, are the time (docs/performance.md). The
    merged weight is a new tensor swapped in for the block and the original is put back after, so the
    base weights are restored bit for bit (PEFT's merge_adapter/unmerge_adapter would add and subtract
    the delta in place, and the rounding would drift the frozen weights, hence the reference policy,
    a little every step). Costs memory for a copy of every merged weight while the block runs.

    The merged layer computes the same function, rounded differently: token log-probs differ from the
    unmerged forward's by ~1e-6 in float32 (tests/test_rollout_hf.py bounds it).

    Left as they are (their own forward runs): layers with the adapter disabled or already merged,
    DoRA and other LoRA variants, LoRA biases, non-Linear or quantized base layers, and a weight
    another module shares (an lm_head tied to the input embeddings: merging it would add the LoRA
    delta to the embedding lookup too).

    Yields:
        The number of layers merged (0 for a model without LoRA).
    """
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:  # no peft: nothing to merge
        yield 0
        return
    swapped: list[tuple[Any, torch.nn.Parameter, torch.Tensor]] = []
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))  # >1: a tied weight
    try:
        with torch.no_grad():
            for module in model.modules():
                if not isinstance(module, LoraLinear) or module.disable_adapters or module.merged:
                    continue
                adapters = [name for name in module.active_adapters if name in module.lora_A]
                if not adapters or any(name in module.lora_variant or module.lora_bias[name] for name in adapters):
                    continue
                weight = module.get_base_layer().weight
                if uses[id(weight)] > 1:
                    continue
                merged = weight.detach()
                for name in adapters:  # a new tensor: the first addmm never writes into the base weight
                    if module.fan_in_fan_out:  # weight stored (in, out): PEFT's own delta, transposed to match
                        merged = merged + module.get_delta_weight(name).to(merged.dtype)
                    else:  # W + scale * B @ A in one op (one pass over W, no delta tensor)
                        merged = torch.addmm(merged, module.lora_B[name].weight.to(merged.dtype),
                                             module.lora_A[name].weight.to(merged.dtype), alpha=module.scaling[name])
                swapped.append((module, weight, weight.data))
                weight.data = merged
                module._disable_adapters = True  # the LoRA branch is in the weight now
        yield len(swapped)
    finally:
        for module, weight, original in swapped:
            weight.data = original
            module._disable_adapters = False


def lean_decode_unsupported(model: Any) -> str | None:
    """Why the lean loop cannot drive `model` (then the engine falls back to `generate`), or None.

    It needs a decoder-only model whose forward takes `logits_to_keep` and whose cache is a
    standard DynamicCache (transformers' own test, `_supports_default_dynamic_cache`).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # through PEFT
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return "not a decoder-only transformers model"
    supports_cache = getattr(type(base), "_supports_default_dynamic_cache", None)
    if supports_cache is None or not supports_cache():
        return f"{type(base).__name__} does not use a standard DynamicCache"
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward has no logits_to_keep"
    return None


class HFRolloutEngine(RolloutEngine):
    """Rollouts with a transformers model (see the module docstring for the two decoders), on any device.

    Args:
        model: a causal LM, possibly PEFT-wrapped (generation goes through the adapter).
        tokenizer: its tokenizer (used to tokenise string prompts and decode completions).
        device: where generation runs; defaults to the model's device.
        static_cache: with the generate decoder, use transformers' static cache and its compiled
            decode step; None means on CUDA only.
        decoder: "lean", "generate", or "auto" (lean on the CPU, generate on CUDA where its compiled
            static-cache step is measured; lean falls back to generate for a model it does not support).
    """

    name = "hf"
    DECODERS = ("auto", "lean", "generate")

    def __init__(self, model: Any, tokenizer: Any, device: str | torch.device | None = None,
                 static_cache: bool | None = None, decoder: str = "auto"):
        if decoder not in self.DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(self.DECODERS)}, not {decoder!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.static_cache = self.device.type == "cuda" if static_cache is None else static_cache
        self.eos_ids = stop_token_ids(tokenizer, model)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])
        self.decoder = self._choose_decoder(decoder)
        # Stop tokens are suppressed until this many new tokens (0: never). For benchmarks that need
        # every completion at full length (bench/gpu_grpo.py); both decoders honour it.
        self.min_new_tokens = 0
        # Seconds of the last lean generate() call: {"prefill_time": ..., "decode_time": ...} ({} with generate).
        self.last_timings: dict[str, float] = {}
        self._stop_criteria: dict[tuple[str, ...], StopStringCriteria] = {}

    def _choose_decoder(self, asked: str) -> str:
        if asked == "generate" or (asked == "auto" and self.device.type == "cuda"):
            return "generate"
        reason = lean_decode_unsupported(self.model)
        if reason is None:
            return "lean"
        logger.info("hf engine: decoding with transformers' generate (the lean loop cannot: %s)", reason)
        return "generate"

    def tokenize(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Token ids of each prompt; strings are rendered prompts, so no special tokens are added."""
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        if all(isinstance(p, str) for p in prompts):
            return self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        if any(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be all strings or all token-id lists, not a mix")
        return [[int(t) for t in p] for p in prompts]

    def stop_criteria(self, stop_strings: Sequence[str], prompt_length: int = 0) -> CompletionStopStrings | None:
        """The stop-string criteria for these strings (None for none); the vocabulary is indexed once."""
        key = tuple(stop_strings)
        if not key:
            return None
        if key not in self._stop_criteria:
            self._stop_criteria[key] = StopStringCriteria(tokenizer=self.tokenizer, stop_strings=list(key))
        return CompletionStopStrings(self._stop_criteria[key], prompt_length)

    def generation_config(self, *, max_new_tokens: int, temperature: float, top_p: float, min_p: float,
                          greedy: bool, top_k: int | None = 0, repetition_penalty: float = 1.0) -> GenerationConfig:
        """Every knob that shapes the sampling distribution, set so that nothing is inherited.

        The repetition penalty (`repetition_penalty`) and stop strings are not in it: `_decode_generate`
        passes them as our own processor and criteria (see the module docstring).
        """
        del repetition_penalty  # applied by RepetitionPenaltyOverRealTokens, in the same place
        sampling = {} if greedy else {
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k or 0,  # 0 = off: the full vocabulary unless --top-k asks otherwise
            "min_p": min_p if min_p and min_p > 0 else None,
        }
        return GenerationConfig(
            do_sample=not greedy,
            **sampling,
            max_new_tokens=max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            num_beams=1,
            repetition_penalty=1.0,  # ours, if asked for, comes as a logits processor
            stop_strings=None,
            no_repeat_ngram_size=0,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
            cache_implementation="static" if self.static_cache else None,
            return_dict_in_generate=False,
        )

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        group_size: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        stop_strings: Sequence[str] = (),
        seed: int | None = None,
        greedy: bool = False,
    ) -> RolloutBatch:
        """See `RolloutEngine.generate`. Returns tensors on the CPU."""
        if group_size < 1 or max_new_tokens < 1:
            raise ValueError(f"group_size and max_new_tokens must be >= 1 (got {group_size}, {max_new_tokens})")
        prompt_lists = self.tokenize(prompts)
        lean = self.decoder == "lean"
        multiple_of = 64 if self.static_cache and not lean else 1
        prompt_ids, prompt_mask = left_pad(prompt_lists, self.pad_id, multiple_of=multiple_of)  # (N, P)
        self.last_timings = {}
        sampling = {"greedy": greedy, "temperature": temperature, "top_p": top_p, "min_p": min_p, "top_k": top_k}
        ends = {"repetition_penalty": repetition_penalty, "stop_strings": tuple(stop_strings)}

        was_training = self.model.training
        self.model.eval()  # no dropout; gradient checkpointing is inactive, so the KV cache is used
        rng = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        try:
            merged = lora_merged_for_sampling(self.model) if lean else contextlib.nullcontext()
            with rng if seed is not None else contextlib.nullcontext(), merged:
                if seed is not None:
                    torch.manual_seed(seed)
                if lean:
                    completion_ids = self._decode_lean(prompt_ids, prompt_mask, group_size, max_new_tokens, sampling,
                                                       **ends)
                else:
                    completion_ids = self._decode_generate(prompt_ids, prompt_mask, group_size, max_new_tokens,
                                                           sampling, **ends)
        finally:
            self.model.train(was_training)

        stop = self.stop_criteria(stop_strings)
        stop_ends = stop_string_ends(completion_ids, stop) if stop is not None else None  # (B,)
        completion_mask, is_truncated = completion_mask_from_eos(completion_ids, self.eos_ids, stop_ends)
        completion_ids = completion_ids.masked_fill(completion_mask == 0, self.pad_id)
        lengths = completion_mask.sum(dim=1)  # (B,)
        # T = the longest completion: columns past it are padding in every row, and the update
        # would pay for them in every forward.
        T = int(lengths.max())
        completion_ids, completion_mask = completion_ids[:, :T], completion_mask[:, :T]
        texts = self.tokenizer.batch_decode(
            [row[:n] for row, n in zip(completion_ids.tolist(), lengths.tolist())], skip_special_tokens=True
        )
        return RolloutBatch(
            # Rows i*G .. i*G+G-1 are prompt i's group.
            prompt_ids=prompt_ids.repeat_interleave(group_size, dim=0),  # (B, P)
            prompt_mask=prompt_mask.repeat_interleave(group_size, dim=0),  # (B, P)
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            completions_text=texts,
            is_truncated=is_truncated,
            prompt_index=torch.arange(len(prompt_lists)).repeat_interleave(group_size),  # (B,)
            sampler_log_probs=None,  # the trainer's forward is the sampler here
        )

    def _decode_generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int,
                         max_new_tokens: int, sampling: dict, repetition_penalty: float = 1.0,
                         stop_strings: Sequence[str] = ()) -> torch.Tensor:
        """transformers' generate over the N x G repeated prompts: (N, P) prompts -> (B, T') tokens on the CPU."""
        gen_cfg = self.generation_config(max_new_tokens=max_new_tokens, **sampling)
        ids = prompt_ids.repeat_interleave(group_size, dim=0).to(self.device)  # (B, P)
        mask = prompt_mask.repeat_interleave(group_size, dim=0).to(self.device)  # (B, P)
        processors = LogitsProcessorList()
        if repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyOverRealTokens(repetition_penalty, mask))
        criteria = StoppingCriteriaList()
        stop = self.stop_criteria(stop_strings, prompt_length=ids.shape[1])
        if stop is not None:
            criteria.append(stop)
        sequences = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                                        logits_processor=processors, stopping_criteria=criteria)  # (B, P + T')
        return sequences[:, ids.shape[1]:].cpu()

    def _decode_lean(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int,
                     max_new_tokens: int, sampling: dict, repetition_penalty: float = 1.0,
                     stop_strings: Sequence[str] = ()) -> torch.Tensor:
        """Prefill each prompt once, repeat its cache G times, decode with our own sampling.

        Args:
            prompt_ids: (N, P) left-padded prompts; prompt_mask: (N, P) 1 on real tokens.

        Returns:
            (B, T') int64 tokens on the CPU, B = N x G, T' <= max_new_tokens; a row that has emitted
            an EOS, or completed a stop string, emits the pad id afterwards (as generate does).
        """
        model, device, G = self.model, self.device, group_size
        N, P = prompt_ids.shape
        B = N * G
        ids, mask = prompt_ids.to(device), prompt_mask.to(device)
        # Position ids as generate numbers them: 0 at each row's first real token.
        positions = (mask.cumsum(dim=-1) - 1).clamp_min(0)  # (N, P)

        # Prefill: N rows, the logits of the last position only (not P x V of them).
        start = time.perf_counter()
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        # (N, ...) -> (B, ...): prompt i's rows are i*G .. i*G+G-1, with room for the new tokens.
        expand_prefilled_cache(cache, G, capacity=P + max_new_tokens)
        logits = out.logits[:, -1].float().repeat_interleave(G, dim=0)  # (B, V)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # so the phase times below are the device's
        self.last_timings["prefill_time"] = time.perf_counter() - start
        start = time.perf_counter()

        # Decode: one forward per token over all B rows (static shapes; finished rows emit pad).
        full_mask = torch.cat([mask.repeat_interleave(G, dim=0), mask.new_ones(B, max_new_tokens)], dim=1)
        next_position = positions[:, -1:].repeat_interleave(G, dim=0) + 1  # (B, 1): rows end at column P-1
        eos = torch.tensor(self.eos_ids, device=device)
        pad = torch.tensor(self.pad_id, device=device)
        tokens = torch.full((B, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        stop = self.stop_criteria(stop_strings)  # over tokens[:, :t + 1], the completion so far
        # Repetition penalty: which tokens each row holds (real prompt tokens, then each sampled one).
        seen = (seen_tokens(ids, mask, logits.shape[-1]).repeat_interleave(G, dim=0)
                if repetition_penalty != 1.0 else None)  # (B, V)
        rows = torch.arange(B, device=device)
        # "All done?" costs a host sync: every step on the CPU (free), every 8 steps on an accelerator.
        check_every = 1 if device.type == "cpu" else 8
        steps = max_new_tokens
        for t in range(max_new_tokens):
            if t < self.min_new_tokens:
                logits[:, eos] = float("-inf")  # as transformers' MinNewTokensLengthLogitsProcessor
            if seen is not None:  # a processor: before the warpers, and when greedy too, as in transformers
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            token = torch.where(finished, pad, sample_tokens(logits, **sampling))  # (B,)
            tokens[:, t] = token
            if seen is not None:
                seen[rows, token] = True
            finished |= torch.isin(token, eos)
            if stop is not None:
                finished |= stop(tokens[:, : t + 1])
            if t + 1 == max_new_tokens or ((t + 1) % check_every == 0 and bool(finished.all())):
                steps = t + 1
                break
            out = model(input_ids=token[:, None], attention_mask=full_mask[:, : P + t + 1],
                        position_ids=next_position + t, past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1].float()  # (B, V)
        tokens = tokens[:, :steps].cpu()
        self.last_timings["decode_time"] = time.perf_counter() - start
        return tokens
