"""TRL's GRPOConfig vocabulary (issue 20): every TRL 1.16 field has one meaning here, none is ignored.

The field list is tests/fixtures/trl_grpo_fields.json (TRL 1.16's GRPOConfig fields with their
defaults, and GRPOTrainer's arguments); where TRL 1.16 is installed (the bench venv) it is checked
against TRL itself.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opensloth import trl_names
from opensloth.config import GRPORunConfig, field_index, resolve_config
from opensloth.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "trl_grpo_fields.json"
TRL = json.loads(FIXTURE.read_text())
OURS = set(field_index(GRPORunConfig))


def test_every_trl_field_has_exactly_one_entry():
    names = [f["name"] for f in TRL["GRPOConfig"]]
    assert TRL["trl_version"] == "1.16.0" and len(names) == 189
    assert sorted(names) == sorted(trl_names.FIELDS), set(names) ^ set(trl_names.FIELDS)
    assert sorted(TRL["GRPOTrainer"]) == sorted(trl_names.TRAINER_ARGUMENTS)


def test_each_status_is_consistent_with_our_options():
    defaults = {f["name"]: f["default"] for f in TRL["GRPOConfig"]}
    for field in trl_names.FIELDS.values():
        if field.status == "same":
            assert field.name in OURS, field.name
        if field.status == "alias":
            assert field.ours in OURS and field.name not in OURS, field.name
        if field.status == "default_only":
            assert field.default == defaults[field.name], field.name  # the one accepted value is TRL's default
            assert field.name not in OURS, field.name
        if field.status == "refused":
            assert field.name not in OURS, f"{field.name} is an option now: give it status same"
        if field.status in ("default_only", "refused", "convert"):
            assert field.reason, field.name


def test_fixture_is_trl_1_16s_own_field_list(trl_python):
    code = ("import dataclasses, inspect, json, trl; from trl import GRPOConfig, GRPOTrainer; "
            "print(json.dumps([trl.__version__, [f.name for f in dataclasses.fields(GRPOConfig)], "
            "[p for p in inspect.signature(GRPOTrainer.__init__).parameters if p != 'self']]))")
    proc = subprocess.run([str(trl_python), "-c", code], capture_output=True, text=True, timeout=300, check=True)
    version, fields, trainer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert version == TRL["trl_version"]
    assert fields == [f["name"] for f in TRL["GRPOConfig"]]
    assert trainer == TRL["GRPOTrainer"]


def test_docs_page_lists_every_field_as_the_code_does():
    page = (ROOT / "docs" / "coming_from_trl.md").read_text()
    assert trl_names.markdown_table() in page, "run: python -m opensloth.trl_names"
    assert trl_names.trainer_table() in page, "run: python -m opensloth.trl_names"


def write_yaml(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_trl_names_map_onto_ours(tmp_path):
    cfg = resolve_config("grpo", write_yaml(tmp_path, {
        "num_generations": 4, "max_completion_length": 64, "generation_batch_size": 32, "num_iterations": 2,
        "gradient_checkpointing": False, "report_to": "none", "bf16": True, "use_vllm": False,
        "vllm_gpu_memory_utilization": 0.5, "vllm_importance_sampling_correction": False, "min_p": None,
        "adam_beta1": 0.9, "push_to_hub": False, "eval_strategy": "no", "warmup_steps": 0.1, "optim": "adamw_torch",
        "training": {"per_device_train_batch_size": 4}, "grpo": {"epsilon": 0.3},
        "loss_type": "bnpo", "scale_rewards": False, "importance_sampling_level": "sequence", "delta": 1.5,
        "mask_truncated_completions": True, "top_entropy_quantile": 0.2, "use_bias_correction_kl": True,
        "vllm_importance_sampling_mode": "sequence_mask", "vllm_importance_sampling_clip_min": 0.5,
        "vllm_importance_sampling_clip_max": 2.0,
    }), {"model": "m"})
    g = cfg.grpo
    assert (g.group_size, g.max_new_tokens, g.rollout_batch_size, g.epochs_per_rollout_batch) == (4, 64, 8, 2)
    assert (g.rollout_engine, g.vllm_memory_utilization, g.vllm_importance_sampling, g.min_p) == ("hf", 0.5, False, 0.0)
    assert (cfg.model.gradient_checkpointing, cfg.model.dtype, cfg.logging.report_to) == ("off", "bfloat16", ["none"])
    assert (cfg.training.warmup_ratio, cfg.training.eval_steps, g.epsilon) == (0.1, 0, 0.3)
    assert (g.loss_type, g.reward_scaling, g.importance_sampling_level, g.delta) == ("bnpo", "none", "sequence", 1.5)
    assert (g.mask_truncated_completions, g.top_entropy_quantile, g.use_bias_correction_kl) == (True, 0.2, True)
    assert (g.vllm_importance_sampling_mode, g.vllm_importance_sampling_clip_min, g.vllm_importance_sampling_cap) == \
        ("sequence_mask", 0.5, 2.0)
    for trl_value, ours in ((True, "group"), ("batch", "batch")):  # TRL's bool spellings of scale_rewards
        assert resolve_config("grpo", write_yaml(tmp_path, {"scale_rewards": trl_value}),
                              {"model": "m"}).grpo.reward_scaling == ours
    # Our own spellings of the shared names still mean what they meant.
    ours = resolve_config("grpo", write_yaml(tmp_path, {"gradient_checkpointing": "auto", "report_to": ["tensorboard"]}),
                          {"model": "m"})
    assert ours.model.gradient_checkpointing == "auto" and ours.logging.report_to == ["tensorboard"]


@pytest.mark.parametrize(("data", "message"), [
    ({"sync_ref_model": True}, "TRL option sync_ref_model: True is not supported; only TRL's default False"),
    ({"adam_beta2": 0.95}, "TRL option adam_beta2: 0.95 is not supported"),
    ({"optim": "adafactor"}, "TRL option optim: 'adafactor' is not supported here"),
    ({"steps_per_generation": 4, "rollout_batch_size": 4}, "give one of them"),
    ({"steps_per_generation": 4, "generation_batch_size": 16}, "give one (as TRL requires)"),
    ({"vllm_mode": "server"}, "no vLLM server mode"),
    ({"generation_batch_size": 30}, "must be a positive multiple of num_generations / --group-size (8)"),
    ({"generation_batch_size": 32, "rollout_batch_size": 4}, "keep one"),
    ({"num_generations": 4, "group_size": 8}, "gives group_size: 8 and num_generations: 4"),
    ({"eval_on_start": False, "eval_steps": 2, "eval_split_ratio": 0.1}, "a baseline eval always runs"),
    ({"report_to": "all"}, "name the integrations"),
])
def test_unsupported_trl_fields_are_refused_by_name(tmp_path, data, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_config("grpo", write_yaml(tmp_path, data), {"model": "m"})


def test_sft_does_not_read_grpo_names(tmp_path):
    with pytest.raises(UserError, match="Unknown option 'num_generations'"):
        resolve_config("sft", write_yaml(tmp_path, {"num_generations": 4}), {"model": "m"})


def test_a_grpo_config_in_trl_names_trains(tiny_model_dir, tmp_path):
    """Done-when of issue 20: a GRPOConfig-style YAML, in TRL's field names, trains (one real step)."""
    data = tmp_path / "add.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(4) for b in range(4)))
    config = write_yaml(tmp_path, {
        "output_dir": str(tmp_path / "out"), "learning_rate": 1e-3, "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1, "max_steps": 1, "logging_steps": 1, "report_to": "none",
        "bf16": False, "gradient_checkpointing": False, "seed": 0, "num_generations": 4,
        "max_completion_length": 8, "generation_batch_size": 8, "num_iterations": 1, "beta": 0.0,
        "epsilon": 0.2, "temperature": 1.0, "use_vllm": False, "push_to_hub": False, "save_strategy": "no",
        "loss_type": "dapo", "scale_rewards": "batch", "importance_sampling_level": "sequence",
        "mask_truncated_completions": True, "vllm_importance_sampling_mode": "sequence_mask",
    })
    proc = subprocess.run([sys.executable, "-c", "from opensloth.cli.train import app; app()", "grpo",
                           "--config", str(config), "--model", str(tiny_model_dir), "--dataset", str(data),
                           "--rewards", "math_answer", "--devices", "cpu", "--cache-dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plan = " ".join(proc.stdout.replace("│", " ").split())
    assert "2 prompts x 4 completions = 8 completions per step" in plan  # generation_batch_size 8 / 4
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["grpo"]["group_size"] == 4 and saved["grpo"]["max_new_tokens"] == 8
    assert (saved["grpo"]["loss_type"], saved["grpo"]["scale_rewards"]) == ("dapo", "batch")
    assert (tmp_path / "out" / "adapter_config.json").is_file()


def test_trl_flag_names_on_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "from opensloth.cli.train import app; app()", "grpo",
                           "--model", "m", "--task", "math", "--num-iterations", "3", "--num-generations", "4",
                           "--no-vllm-importance-sampling-correction", "--dry-run"],
                          capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout  # the resolved config, as --dry-run prints it
    assert "epochs_per_rollout_batch: 3" in text and "group_size: 4" in text
    assert "vllm_importance_sampling: false" in text


def test_steps_per_generation_sets_the_rollout_batch_from_the_worker_count(tmp_path):
    """TRL's steps_per_generation: per_device_train_batch_size x workers x steps completions per generation,
    each optimizer step taking per_device_train_batch_size x gradient_accumulation_steps of them per worker."""
    proc = subprocess.run([sys.executable, "-c", "from opensloth.cli.train import app; app()", "grpo",
                           "--model", "m", "--task", "math", "--devices", "cpu:2", "--per-device-train-batch-size", "4",
                           "--steps-per-generation", "2", "--group-size", "4", "--dry-run"],
                          capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
                          env={**__import__("os").environ, "COLUMNS": "300"})
    assert proc.returncode == 0, proc.stderr
    plan = " ".join(proc.stdout.replace("│", " ").split())
    assert "rollout_batch_size: 4" in proc.stdout  # 4 x 2 workers x 2 / 4
    assert "4 prompts x 4 completions = 16 completions per step (2 prompts per worker)" in plan
    assert "2 optimizer steps per rollout" in plan  # as TRL: steps_per_generation / gradient_accumulation_steps
    proc = subprocess.run([sys.executable, "-c", "from opensloth.cli.train import app; app()", "grpo",
                           "--model", "m", "--task", "math", "--devices", "cpu:2", "--per-device-train-batch-size", "3",
                           "--steps-per-generation", "1", "--group-size", "4", "--dry-run"],
                          capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path)
    assert proc.returncode == 2 and "not a multiple of --group-size 4" in proc.stderr
