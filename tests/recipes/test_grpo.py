"""The GRPO recipe end to end, through the real `os-train grpo` CLI on tiny models.

- the CLI runs, logs every metric under its TRL name, and saves a loadable adapter;
- micro-batching is exact: 4 micro-batches of 4 give the same update as one micro-batch of 16;
- the same seed gives the same run (pinned per-step numbers);
- flag combinations the recipe refuses fail before any model loads, with a clear message;
Reward going up is tested end to end by tests/test_demo.py (`os demo`: SFT, then GRPO raises held-out
accuracy) and, for a dense reward with the vLLM engine, by tests/test_rollout_vllm.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opensloth.config import resolve_config
from opensloth.distributed import WorkerContext
from opensloth.errors import UserError

TRL_KEYS = [
    "reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio", "clip_ratio/low_mean",
    "clip_ratio/high_mean", "completions/mean_length", "completions/clipped_ratio", "loss", "grad_norm",
    "learning_rate", "step_time", "tokens_per_second",
]


def os_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `os-train` as a user would (a fresh process), returning its output."""
    return subprocess.run([sys.executable, "-c", "from opensloth.cli.train import app; app()", *args],
                          check=False, cwd=cwd, capture_output=True, text=True, timeout=600)


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    """Single-digit additions as prompt/answer JSONL."""
    path = tmp_path_factory.mktemp("grpo_data") / "add.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def grpo_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "grpo", "--model", str(model), "--dataset", str(data), "--format", "prompt-answer",
        "--output-dir", str(out), "--devices", "cpu", "--cache-dir", str(out.parent / "cache"),
        "--rewards", "math_answer,math_format", "--group-size", "4", "--rollout-batch-size", "4",
        "--max-new-tokens", "12", "--per-device-train-batch-size", "16", "--learning-rate", "1e-2",
        "--lora-r", "4", "--seed", "3", "--report-to", "none", *extra,
    ]


@pytest.fixture(scope="module")
def cli_run(tiny_model_dir, prompts_file, tmp_path_factory) -> Path:
    """Three steps of `os-train grpo` on the random tiny model; returns its output dir."""
    out = tmp_path_factory.mktemp("grpo_cli") / "run"
    proc = os_train(*grpo_args(tiny_model_dir, prompts_file, out, "--max-steps", "3", "--print-sample-every", "2",
                               "--eval-split-ratio", "0.1", "--eval-steps", "2"), cwd=out.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_cli_logs_trl_metrics_and_saves_adapter(cli_run):
    rows = read_metrics(cli_run)
    train_rows = [r for r in rows if "reward" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for key in TRL_KEYS + ["rewards/math_answer/mean", "rewards/math_format/mean"]:
        assert all(key in r and r[key] == r[key] for r in train_rows), key  # present and not NaN
    for r in train_rows:
        assert 0 <= r["completions/mean_length"] <= 12
        assert 0 <= r["frac_reward_zero_std"] <= 1
        assert r["kl"] >= 0  # k3 is non-negative per token
        assert r["step_time"] > 0 and r["tokens_per_second"] > 0
    # Step 1 is on-policy with a zero-initialised LoRA B: the policy equals the reference, so KL is 0.
    assert train_rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    # The linear schedule decays from the peak.
    assert train_rows[0]["learning_rate"] > train_rows[-1]["learning_rate"]
    # os eval's summary (issue 27), pass@1 from the run's answer-checking reward (math_answer).
    eval_rows = [r for r in rows if "eval/pass@1" in r]
    assert [r["step"] for r in eval_rows] == [0, 2, 3]  # a baseline before training, every 2 steps, the end
    assert all(0 <= r["eval/pass@1"] <= 1 and "eval/rewards/math_format/mean" in r for r in eval_rows)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (cli_run / "adapter_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(cli_run)
    assert tokenizer.chat_template
    base_path = json.loads((cli_run / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), cli_run)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # training moved the adapter


def adapter_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out_dir / "adapter_model.safetensors")


def test_micro_batches_give_the_full_batch_update(tiny_model_dir, prompts_file, tmp_path):
    """One rollout batch of 16 sequences: 1 micro-batch of 16 vs 4 accumulated micro-batches of 4."""
    outs = {}
    for name, extra in {"one": ("--per-device-train-batch-size", "16"),
                        "four": ("--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "4")}.items():
        out = tmp_path / name
        # The prompts this test was pinned with (ChatML-wrapped; text prompts now go in raw by default): with
        # raw ones, AdamW turns fp32 summation-order noise in one near-zero gradient entry into 2.3e-7 (FACTS).
        args = grpo_args(tiny_model_dir, prompts_file, out, "--max-steps", "1", "--print-sample-every", "0",
                         "--max-grad-norm", "0", "--chat-template", "model", *extra)
        proc = os_train(*args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outs[name] = out
    one, four = adapter_weights(outs["one"]), adapter_weights(outs["four"])
    assert one.keys() == four.keys()
    moved = False
    for key in one:
        torch.testing.assert_close(one[key], four[key], rtol=1e-5, atol=1e-7)
        moved |= bool(one[key].abs().sum() > 0) and "lora_B" in key
    assert moved
    m_one, m_four = read_metrics(outs["one"])[0], read_metrics(outs["four"])[0]
    assert m_one["reward"] == m_four["reward"]  # same rollouts
    assert m_one["loss"] == pytest.approx(m_four["loss"], rel=1e-5, abs=1e-7)
    assert m_one["grad_norm"] == pytest.approx(m_four["grad_norm"], rel=1e-5)


def test_trl_loss_options_train_end_to_end(tiny_model_dir, prompts_file, tmp_path):
    """TRL 1.16's loss-side options through the real CLI (their math against TRL: tests/test_grpo_loss_parity.py):
    the batch-std advantages, the truncation mask (12 new tokens: the random model rarely stops), the
    per-micro-batch entropy gather with accumulation, GSPO ratios, two-sided clipping and the rollout-token
    normaliser over two optimizer steps per rollout."""
    out = tmp_path / "trl_options"
    proc = os_train(*grpo_args(tiny_model_dir, prompts_file, out, "--max-steps", "2", "--print-sample-every", "0",
                               "--loss-type", "dapo", "--scale-rewards", "batch", "--mask-truncated-completions",
                               "--top-entropy-quantile", "0.5", "--importance-sampling-level", "sequence",
                               "--delta", "1.5", "--use-bias-correction-kl", "--per-device-train-batch-size", "4",
                               "--gradient-accumulation-steps", "2"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [r for r in read_metrics(out) if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)


def test_same_seed_same_run(cli_run, tiny_model_dir, prompts_file, tmp_path):
    """A second identical run reproduces the first one's per-step numbers."""
    out = tmp_path / "again"
    proc = os_train(*grpo_args(tiny_model_dir, prompts_file, out, "--max-steps", "3", "--print-sample-every", "2",
                               "--eval-split-ratio", "0.1", "--eval-steps", "2"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = [r for r in read_metrics(cli_run) if "reward" in r]
    again = [r for r in read_metrics(out) if "reward" in r]
    for a, b in zip(first, again, strict=True):
        for key in ("reward", "loss", "grad_norm", "kl", "completions/mean_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


def make_recipe(tmp_path: Path, **overrides):
    from opensloth.recipes.grpo import GRPORecipe

    cfg = resolve_config("grpo", None, {"model": "unused", "output_dir": tmp_path, **overrides})
    ctx = WorkerContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    return GRPORecipe(cfg, ctx)


@pytest.fixture(scope="module")
def sft_adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter that changes the model's outputs, saved as `os-train sft` saves one (the
    tutorial's stage 1 output, without spending a training run on it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opensloth.models import save_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
    return save_model(model, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path_factory.mktemp("sft") / "adapter")


@pytest.mark.parametrize("path", ["fresh_lora", "continued_adapter", "full_finetune"])
def test_kl_is_zero_before_the_first_update_on_every_path(path, tiny_model_dir, sft_adapter_dir, prompts_file,
                                                          tmp_path):
    """The KL reference is the policy GRPO starts from: a fresh LoRA's base, the SFT adapter being
    continued (it used to be the base without that adapter: kl 0.041 at step 1 on a 0.5B model),
    or a full fine-tune's starting weights. Step 1's only update sees the untouched policy."""
    out = tmp_path / "run"
    model = sft_adapter_dir if path == "continued_adapter" else tiny_model_dir
    extra = ["--full-finetune"] if path == "full_finetune" else []
    proc = os_train(*grpo_args(model, prompts_file, out, "--max-steps", "3", "--beta", "0.04", "--save-steps", "2",
                               "--print-sample-every", "0", *extra), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [r for r in read_metrics(out) if "kl" in r]
    assert rows[0]["step"] == 1 and abs(rows[0]["kl"]) < 1e-7, rows[0]["kl"]
    assert rows[1]["kl"] > 0  # after an update (lr 1e-2) the policy has moved away from the reference
    if path == "continued_adapter":
        # Only the trained adapter is written, never the frozen reference copy beside it.
        for adapter_dir in (out, out / "checkpoints" / "checkpoint-2" / "adapter"):
            assert (adapter_dir / "adapter_model.safetensors").is_file()
            assert not (adapter_dir / "reference").exists(), sorted(p.name for p in adapter_dir.iterdir())


def test_grpo_on_an_opensloth_model_keeps_the_system_prompt_it_was_trained_with(tiny_model_dir, prompts_file,
                                                                               tmp_path):
    """The tutorial's stage 2 without --system-prompt renders prompts with stage 1's, not the template's
    default; the flag still overrides it."""
    import shutil

    sft_run = tmp_path / "sft"
    shutil.copytree(tiny_model_dir, sft_run)
    (sft_run / "config.yaml").write_text("recipe: sft\ndata:\n  system_prompt: Think in tags.\n")
    proc = os_train(*grpo_args(sft_run, prompts_file, tmp_path / "grpo", "--dry-run"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "system_prompt: Think in tags." in proc.stdout
    assert "the one --model was trained with" in proc.stdout
    proc = os_train(*grpo_args(sft_run, prompts_file, tmp_path / "grpo", "--dry-run", "--system-prompt", "Other."),
                    cwd=tmp_path)
    assert proc.returncode == 0 and "system_prompt: Other." in proc.stdout
    assert "the one --model was trained with" not in proc.stdout


def set_up_recipe(tmp_path: Path, model_dir: Path, data: Path, **overrides):
    """A GRPORecipe on one CPU worker with its data prepared as the launcher prepares it (not set up)."""
    from opensloth.data import prepare_grpo_dataset
    from opensloth.models.loading import load_tokenizer
    from opensloth.recipes.grpo import GRPORecipe

    cfg = resolve_config("grpo", None, {
        "model": str(model_dir), "dataset": str(data), "format": "prompt-answer",
        "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), "devices": "cpu",
        "rewards": ["math_answer"], "group_size": 2, "rollout_batch_size": 2, "max_new_tokens": 4,
        "per_device_train_batch_size": 4, "report_to": ["none"], "max_steps": 1, "print_sample_every": 0,
        **overrides,
    })
    prepared = prepare_grpo_dataset(cfg, load_tokenizer(str(model_dir)), 1)
    ctx = WorkerContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                        prepared_data_path=Path(prepared.path))
    return GRPORecipe(cfg, ctx)


def test_an_update_with_nan_gradients_is_skipped_and_three_in_a_row_stop_the_run(tiny_model_dir, prompts_file,
                                                                                 tmp_path):
    """A NaN gradient (here from NaN advantages) must not reach the weights or the optimizer state;
    the run stops with one clear error after three such updates in a row."""
    from opensloth.recipes.grpo import MAX_NONFINITE_UPDATES_IN_A_ROW, Batch

    recipe = set_up_recipe(tmp_path, tiny_model_dir, prompts_file, beta=0.0, max_steps=5)
    recipe.setup()
    try:
        rollout = recipe.engine.generate([[5, 6, 7], [8, 9]], group_size=2, max_new_tokens=4)

        def batch(advantage: float) -> Batch:
            return Batch(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                         completion_mask=rollout.completion_mask, advantages=torch.full((4,), advantage))

        before = [p.detach().clone() for p in recipe.params]
        for attempt in range(1, MAX_NONFINITE_UPDATES_IN_A_ROW):
            metrics = recipe.update(batch(float("nan")))
            assert metrics["nonfinite_grad_updates"] == 1.0 and math.isnan(metrics["grad_norm"])
            assert all(torch.equal(a, b) for a, b in zip(before, recipe.params)), attempt
            assert not recipe.optimizer.state  # AdamW's moments were never touched
        metrics = recipe.update(batch(1.0))  # a good update resets the count
        assert metrics["nonfinite_grad_updates"] == 0.0 and math.isfinite(metrics["grad_norm"])
        assert any(not torch.equal(a, b) for a, b in zip(before, recipe.params))
        for _ in range(1, MAX_NONFINITE_UPDATES_IN_A_ROW):
            recipe.update(batch(float("nan")))
        with pytest.raises(UserError, match="gradient norm was nan in 3 optimizer updates in a row"):
            recipe.update(batch(float("nan")))
    finally:
        recipe.cleanup()


def test_filter_zero_std_drops_equal_rewards_whose_float_std_is_not_zero(tiny_model_dir, prompts_file, tmp_path,
                                                                          clean_registry):
    """Eight rewards of 0.01 are equal, but their float32 std is 9e-10, not 0: --filter-zero-std tested std > 0
    and kept the group (num_filtered_sequences 0 while frac_reward_zero_std said 1). One test decides both."""
    module = tmp_path / "constant.py"
    module.write_text("def hundredth_reward(completions, **kwargs):\n    return [0.01] * len(completions)\n")
    assert float(torch.full((1, 8), 0.01).std(dim=1)) > 0  # the premise: equal values, a float std above 0
    recipe = set_up_recipe(tmp_path, tiny_model_dir, prompts_file, rewards=["hundredth_reward"],
                           reward_modules=[str(module)], group_size=8, rollout_batch_size=1, filter_zero_std=True)
    recipe.setup()
    try:
        metrics = recipe.train_step(1)
    finally:
        recipe.cleanup()
    assert metrics["frac_reward_zero_std"] == 1.0
    assert metrics["num_filtered_sequences"] == 8.0 and metrics["skipped_update"] == 1.0


def test_a_failing_setup_still_closes_the_rollout_engine(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    """setup() ran outside run()'s try: a failure after the engine was built (here a --resume-from that does
    not exist, checked once the model is loaded) left a vLLM engine running. The hf engine is the one here;
    its close() is recorded, then runs as it is."""
    from opensloth.recipes.grpo import run
    from opensloth.rollout.hf import HFRolloutEngine

    closed = []
    real_close = HFRolloutEngine.close
    monkeypatch.setattr(HFRolloutEngine, "close", lambda self: (closed.append(self), real_close(self)))
    recipe = set_up_recipe(tmp_path, tiny_model_dir, prompts_file, resume_from=str(tmp_path / "missing"))
    with pytest.raises(UserError, match="--resume-from .*missing: no such directory"):
        run(recipe.cfg, recipe.ctx)
    assert len(closed) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rollout_batch_size": 3}, "--rollout-batch-size 3 must be a multiple of the number of workers"),
        ({"loss_type": "no_baseline", "filter_zero_std": True}, "--filter-zero-std"),
    ],
)
def test_bad_flag_combinations_fail_before_loading(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message.replace("-", r"\-")):
        make_recipe(tmp_path, **overrides)


def test_cli_reports_bad_combination_and_exits_2(tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "bad"
    proc = os_train(*grpo_args(tiny_model_dir, prompts_file, out, "--max-steps", "1", "--loss-type", "no_baseline",
                               "--filter-zero-std"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "--filter-zero-std" in proc.stderr and "Traceback" not in proc.stderr


def test_prompt_sampler_covers_every_row_once_per_pass():
    from opensloth.recipes.grpo import prompt_sampler

    sampler = prompt_sampler(10, 4, seed=0)
    seen = [i for _ in range(5) for i in next(sampler)]  # 20 indices = two passes
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))


def test_split_evenly():
    from opensloth.recipes.grpo import split_evenly

    assert [s.stop - s.start for s in split_evenly(10, 3)] == [4, 3, 3]
    assert [s.stop - s.start for s in split_evenly(2, 3)] == [1, 1, 0]


def test_a_reward_calling_sys_exit_stops_the_first_step_with_a_message(tiny_model_dir, prompts_file, tmp_path):
    """sys.exit(3) inside a user's reward ended `os-train grpo` with exit 3 and no message: it escaped
    the containment (SystemExit is not an Exception). It was then contained and counted; a reward that
    fails on the first step now stops the run before any update, with one message naming it."""
    module = tmp_path / "exiting.py"
    module.write_text("import sys\n\ndef exiting_reward(completions, **kwargs):\n    sys.exit(3)\n")
    out = tmp_path / "run"
    args = grpo_args(tiny_model_dir, prompts_file, out, "--max-steps", "1", "--reward-module", str(module),
                     "--reward-timeout", "30")
    for flag, value in (("--rewards", "math_answer,exiting_reward"), ("--group-size", "2"),
                        ("--rollout-batch-size", "2"), ("--max-new-tokens", "4"), ("--per-device-train-batch-size", "4")):
        args[args.index(flag) + 1] = value  # the smallest step: this is about the reward call only
    proc = os_train(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"Reward 'exiting_reward' ({module.resolve()}) raised SystemExit: 3 on the first step" in proc.stderr
    assert 'exiting.py", line 4, in exiting_reward' in proc.stderr  # the reward's own traceback
    assert "reward_timeout: 30.0" in (out / "config.yaml").read_text()
    assert not (out / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Rewards written as Unsloth notebooks and TRL docs write them, through --reward-module
# ---------------------------------------------------------------------------------------------

USER_REWARDS = Path(__file__).parents[1] / "fixtures" / "user_rewards.py"
TRL_REFERENCE_RUN = USER_REWARDS.with_name("trl_reference_run.py")
# Either completion form: the rewards that read completion_ids, trainer_state, log_metric, log_extra, or are async.
ANY_FORM_REWARDS = ["token_budget_reward", "progress_reward", "first_word_reward", "async_judge_reward",
                    "record_arguments_reward"]
CHAT_REWARDS = ["match_format_exactly", "match_format_approximately", "check_answer", "check_numbers",
                "format_reward_func", "accuracy_reward", "think_format_reward", *ANY_FORM_REWARDS]
TEXT_REWARDS = ["reward_len", "reward_ground_truth", *ANY_FORM_REWARDS]
NOTEBOOK_SYSTEM = "You are given a problem. Think about it, then give your solution between <SOLUTION></SOLUTION>."


def user_reward_run(tmp_path_factory, tiny_model_dir, name: str, rows: list[dict], rewards: list[str],
                    *extra: str) -> tuple[Path, subprocess.CompletedProcess]:
    """`os-train grpo --reward-module tests/fixtures/user_rewards.py` on `rows`; returns (output dir, process)."""
    pytest.importorskip("trl.rewards")
    root = tmp_path_factory.mktemp(name)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "run"
    args = grpo_args(tiny_model_dir, data, out, "--reward-module", str(USER_REWARDS), "--print-sample-every", "1",
                     *extra)
    for flag, value in (("--rewards", ",".join(rewards)), ("--group-size", "2"), ("--rollout-batch-size", "2"),
                        ("--per-device-train-batch-size", "4")):
        args[args.index(flag) + 1] = value
    proc = subprocess.run([sys.executable, "-c", "from opensloth.cli.train import app; app()", *args], cwd=root,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "REWARD_RECORD_FILE": str(root / "arguments.jsonl")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="module")
def chat_run(tiny_model_dir, tmp_path_factory):
    """Two steps on a conversational dataset (the notebook's system + user prompt), beta 0."""
    rows = [{"prompt": [{"role": "system", "content": NOTEBOOK_SYSTEM}, {"role": "user", "content": f"{a}+{b}"}],
             "answer": str(a + b), "level": a} for a in range(5) for b in range(4)]
    return user_reward_run(tmp_path_factory, tiny_model_dir, "chat_rewards", rows, CHAT_REWARDS, "--max-steps", "2",
                           "--max-new-tokens", "8", "--beta", "0")


@pytest.fixture(scope="module")
def text_run(tiny_model_dir, tmp_path_factory):
    """Three steps on plain-text prompts with a --max-new-tokens far too small (the truncation alarm),
    beta 0.04 and an eval split (eval accuracy in the curves)."""
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "ground_truth": str(a + b)} for a in range(5)
            for b in range(4)]
    return user_reward_run(tmp_path_factory, tiny_model_dir, "text_rewards", rows, TEXT_REWARDS, "--max-steps", "3",
                           "--max-new-tokens", "3", "--beta", "0.04", "--eval-split-ratio", "0.2", "--eval-steps", "3")


def assert_every_reward_scored_every_step(out: Path, rewards: list[str], steps: int) -> list[dict]:
    train_rows = [r for r in read_metrics(out) if "reward" in r]
    assert [r["step"] for r in train_rows] == list(range(1, steps + 1))
    for row in train_rows:
        for name in rewards:
            assert row[f"rewards/{name}/failures"] == 0.0, (name, row["step"])
            assert row[f"rewards/{name}/none_fraction"] == 0.0, (name, row["step"])  # a value for every completion
            assert row[f"rewards/{name}/mean"] is not None, (name, row["step"])
        # trainer_state is current (global_step = steps done) and completion_ids are the completions' tokens.
        assert row["rewards/state/global_step"] == row["step"] - 1 and row["rewards/state/max_steps"] == steps
        assert row["rewards/completion_tokens"] == pytest.approx(row["completions/mean_length"])
    # log_extra columns are saved with the logged completions (every step: --print-sample-every 1).
    logged = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in logged}) == list(range(1, steps + 1)) and len(logged) == 4 * steps
    assert all(isinstance(r["extra"]["first_word"], str) and set(r["rewards"]) == set(rewards) for r in logged)
    return train_rows


def recorded_arguments(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out.parent / "arguments.jsonl").read_text().splitlines()]


def test_notebook_and_trl_rewards_run_unchanged_on_a_conversational_dataset(chat_run):
    out, proc = chat_run
    train_rows = assert_every_reward_scored_every_step(out, CHAT_REWARDS, 2)
    assert all("kl" not in r for r in train_rows)  # beta 0: no KL measured, none logged
    first = recorded_arguments(out)[0]
    assert first["arguments"]["completions"] == "list[list[dict(content:str,role:str)]]"
    assert first["prompts"][0][0] == {"role": "system", "content": NOTEBOOK_SYSTEM}  # as the dataset holds it
    plan = " ".join(proc.stdout.replace("│", " ").split())  # the plan says how the prompts were rendered
    assert "prompts conversations, chat template model" in plan

    from opensloth.tracking import curve_panels

    panels = curve_panels(out)
    assert {f"rewards/{name}/mean" for name in CHAT_REWARDS} <= set(panels)
    assert {"completions/clipped_ratio", "frac_reward_zero_std"} <= set(panels) and "kl" not in panels


def test_trl_text_rewards_run_unchanged_on_plain_text_prompts_and_truncation_raises_an_alarm(text_run):
    out, proc = text_run
    train_rows = assert_every_reward_scored_every_step(out, TEXT_REWARDS, 3)
    assert all("kl" in r for r in train_rows)
    first = recorded_arguments(out)[0]
    assert first["arguments"]["completions"] == "list[str]" and first["arguments"]["prompts"] == "list[str]"
    assert first["prompts"][0].endswith("=")  # the text as the dataset holds it
    assert "prompts text prompts as they are, no chat template" in " ".join(proc.stdout.replace("│", " ").split())
    # More than half of the completions hit --max-new-tokens 3: the alarm fires on the third such step, once.
    assert all(r["completions/clipped_ratio"] > 0.5 for r in train_rows)
    assert [r["alarms/truncated"] for r in train_rows] == [0.0, 0.0, 1.0]
    output = proc.stdout + proc.stderr
    assert output.count("Alarm truncated") == 1 and "Raise --max-new-tokens" in output
    assert "!truncated" in output  # the mark in the progress line

    from opensloth.tracking import curve_panels

    panels = curve_panels(out)
    # The eval curve is the run's own reward (its rewards check no answer, so there is no pass@1).
    assert {f"rewards/{name}/mean" for name in TEXT_REWARDS} | {"eval/reward/mean", "kl"} <= set(panels)
    assert (out / "training_curves.png").is_file()


@pytest.mark.parametrize("run", ["chat_run", "text_run"])
def test_rewards_receive_what_trl_grpo_trainer_passes_them(run, request, tiny_model_dir, trl_python, tmp_path):
    """The same rows through TRL 1.16's GRPOTrainer (one real step, in the TRL venv): every argument
    has the same name, type and form. Ours adds only `solution`, the documented alias of `answer`."""
    out, _ = request.getfixturevalue(run)
    ours = recorded_arguments(out)[0]
    record = tmp_path / "trl.jsonl"
    proc = subprocess.run([str(trl_python), str(TRL_REFERENCE_RUN), str(tiny_model_dir),
                           str(out.parent / "data.jsonl"), str(tmp_path / "trl_out")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "REWARD_RECORD_FILE": str(record), "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trl = json.loads(record.read_text().splitlines()[0])
    expected = {**trl["arguments"], "solution": trl["arguments"]["answer"]}
    assert ours["arguments"] == expected
    dataset_prompts = [json.loads(line)["prompt"] for line in (out.parent / "data.jsonl").read_text().splitlines()]
    assert all(p in dataset_prompts for p in ours["prompts"] + trl["prompts"])  # both: as the dataset holds them
    assert ours["state"]["global_step"] == trl["state"]["global_step"] == 0
    assert isinstance(ours["state"]["epoch"], float) and isinstance(trl["state"]["max_steps"], int)


def test_the_progress_line_shows_the_runs_own_rewards(text_run):
    """It showed rewards/math_answer/mean, which a run without math_answer never has."""
    out, proc = text_run
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if re.search(r"grpo \d+/\d+ \[", line)]
    assert lines, proc.stdout[-2000:]
    assert all(f"rewards/{name}/mean=" in lines[-1] for name in TEXT_REWARDS), lines[-1]


def test_a_reward_failing_three_steps_in_a_row_stops_after_a_checkpoint_and_none_everywhere_warns(
        tiny_model_dir, prompts_file, tmp_path):
    """Scores on the first step, then raises: steps 2 and 3 are contained and counted, step 4 saves
    checkpoint-4 and stops. A reward that returns None everywhere is named in a warning, every step counted."""
    module = tmp_path / "later.py"
    module.write_text(
        "def flaky_reward(completions, trainer_state, **kwargs):\n"
        "    if trainer_state.global_step >= 1:\n"
        "        raise RuntimeError('judge went away')\n"
        "    return [0.0] * len(completions)\n\n"
        "def absent_reward(completions, **kwargs):\n"
        "    return [None] * len(completions)\n")
    out = tmp_path / "run"
    args = grpo_args(tiny_model_dir, prompts_file, out, "--max-steps", "6", "--reward-module", str(module),
                     "--print-sample-every", "0")
    for flag, value in (("--rewards", "math_answer,flaky_reward,absent_reward"), ("--group-size", "2"),
                        ("--rollout-batch-size", "2"), ("--max-new-tokens", "4"), ("--per-device-train-batch-size", "4")):
        args[args.index(flag) + 1] = value
    proc = os_train(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Training stopped at step 4: reward 'flaky_reward'" in proc.stderr and "failed on 3 steps in a row" in proc.stderr
    assert "raised RuntimeError: judge went away" in proc.stdout + proc.stderr  # the contained failure, reported once
    assert (out / "checkpoints" / "checkpoint-4").is_dir()
    rows = [r for r in read_metrics(out) if "reward" in r]
    assert [r["rewards/flaky_reward/failures"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    assert [r["alarms/reward_none"] for r in rows] == [1.0] * 4  # absent_reward (flaky's failures are not this alarm)
    output = proc.stdout + proc.stderr
    assert output.count("Reward 'absent_reward'") == 1 and "returned None for every completion of step 1" in output


def test_alarms_warn_once_mark_the_progress_line_and_are_counted(tmp_path, caplog):
    """check_alarms on the global metrics of successive steps: truncation and zero std need 3 steps in a
    row (a good step resets them); each warns once and names the option to change."""
    import logging

    from opensloth.recipes.grpo import ALARM_STEPS
    from opensloth.rewards import resolve_rewards
    from opensloth.tracking import Alarm

    recipe = make_recipe(tmp_path, max_new_tokens=16)
    recipe.rewards = resolve_rewards(None, ["math_answer"])
    recipe.alarms = {"truncated": Alarm("truncated", ALARM_STEPS), "zero_std": Alarm("zero_std", ALARM_STEPS)}
    recipe.none_warned = set()
    steps = [(0.9, 1.0), (0.9, 1.0), (0.2, 1.0), (0.9, 1.0), (0.9, 0.5), (0.9, 1.0)]  # (clipped, zero-std fraction)
    counted, marks = [], []
    with caplog.at_level(logging.WARNING, logger="opensloth"):
        for step, (clipped, zero_std) in enumerate(steps, 1):
            metrics = {"completions/clipped_ratio": clipped, "frac_reward_zero_std": zero_std,
                       "rewards/math_answer/none_fraction": 0.0, "rewards/math_answer/failures": 0.0}
            out = recipe.check_alarms(step, metrics)
            counted.append((out["alarms/truncated"], out["alarms/zero_std"], out["alarms/reward_none"]))
            marks.append(list(recipe.marks))
    assert counted == [(0, 0, 0), (0, 0, 0), (0, 1, 0), (0, 1, 0), (0, 0, 0), (1, 0, 0)]
    assert marks[2] == ["zero_std"] and marks[5] == ["truncated"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "zero reward std for 3 steps in a row" in warnings[0] and "--group-size" in warnings[0]
    assert "hit --max-new-tokens 16" in warnings[1] and "Raise --max-new-tokens" in warnings[1]
