"""Config: precedence (defaults < YAML < CLI), validation messages, unknown keys, generated CLI options."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from opensloth.cli.train import app
from opensloth.config import (
    GRPORunConfig,
    SFTRunConfig,
    config_to_yaml,
    dump_config,
    field_index,
    resolve_config,
)
from opensloth.errors import UserError


def test_recipe_defaults_then_yaml_then_cli(tmp_path: Path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"training": {"learning_rate": 1e-3, "max_steps": 7}, "lora_r": 4}))
    cfg = resolve_config("sft", cfg_file, {"model": "m", "max_steps": 9})
    assert isinstance(cfg, SFTRunConfig)
    assert cfg.training.learning_rate == 1e-3  # YAML beats the recipe default (2e-4)
    assert cfg.training.max_steps == 9  # CLI beats YAML
    assert cfg.lora.lora_r == 4  # flat YAML keys map to their section
    assert cfg.training.output_dir == Path("outputs/sft")  # recipe default


def test_grpo_defaults_differ_from_sft():
    cfg = resolve_config("grpo", None, {"model": "m"})
    assert isinstance(cfg, GRPORunConfig)
    assert cfg.training.learning_rate == 5e-6
    assert cfg.training.output_dir == Path("outputs/grpo")
    assert cfg.grpo.loss_agg == "token_mean"


@pytest.mark.parametrize("recipe", ["sft", "grpo"])
def test_python_api_gets_the_defaults_the_cli_gives(recipe):
    """Issue 27: the recipe defaults live in the pydantic models, not in a table only the CLI applied
    (GRPORunConfig(...) got learning rate 2e-4 where `os-train grpo` gives 5e-6)."""
    from opensloth.config import RUN_CONFIGS, ModelConfig

    built = RUN_CONFIGS[recipe](model=ModelConfig(model="m"))
    resolved = resolve_config(recipe, None, {"model": "m"})
    assert built.model_dump() == resolved.model_dump()
    assert GRPORunConfig(model=ModelConfig(model="m")).training.learning_rate == 5e-6
    assert SFTRunConfig(model=ModelConfig(model="m")).training.learning_rate == 2e-4


@pytest.mark.parametrize(
    ("recipe", "overrides", "message"),
    [
        ("grpo", {"eval_steps": 2}, "--eval-steps needs evaluation data"),  # GRPO did nothing, silently
        ("sft", {"eval_steps": 2}, "--eval-steps needs evaluation data"),
        ("grpo", {"loss_type": "no_baseline", "filter_zero_std": True}, "--filter-zero-std drops groups"),
    ],
)
def test_checks_without_a_worker_count_run_in_a_dry_run(recipe, overrides, message, tmp_path):
    """Checks that need no worker count are config validators: `--dry-run` reports them (exit 2), where
    before they ran only in the worker."""
    from opensloth.cli.train import app

    flags = [f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()]
    result = CliRunner().invoke(app, [recipe, "--model", "m", "--dataset", "d.jsonl", "--output-dir",
                                      str(tmp_path / "out"), "--dry-run", *flags])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_empty_target_modules_in_yaml_is_refused(tmp_path: Path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("target_modules: []\n")
    for recipe in ("sft", "grpo"):
        with pytest.raises(UserError, match="--target-modules is empty"):
            resolve_config(recipe, cfg_file, {"model": "m"})
    assert resolve_config("sft", cfg_file, {"model": "m", "full_finetune": True}).model.full_finetune


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"learning_rate": -1.0}, "--learning-rate (training.learning_rate): -1.0. Input should be greater than 0"),
        ({"devices": "0,0"}, "--devices (distributed.devices): '0,0'"),
        ({"lr_scheduler_type": "warp"}, "--lr-scheduler-type (training.lr_scheduler_type): 'warp'"),
        ({"lora_dropout": 1.5}, "--lora-dropout (lora.lora_dropout): 1.5"),
    ],
)
def test_validation_error_names_option_value_and_rule(overrides, expected):
    with pytest.raises(UserError) as info:
        resolve_config("sft", None, {"model": "m", **overrides})
    assert expected in str(info.value)


def test_group_size_one_rejected_with_reason():
    with pytest.raises(UserError, match="at least 2"):
        resolve_config("grpo", None, {"model": "m", "group_size": 1})


def test_sft_rejects_grpo_format_and_lists_choices():
    with pytest.raises(UserError, match="openmath-reasoning"):
        resolve_config("sft", None, {"model": "m", "format": "gsm8k"})


def test_reward_weights_must_match_rewards():
    with pytest.raises(UserError, match="--reward-weights has 1 value but --rewards names 2"):
        resolve_config("grpo", None, {"model": "m", "rewards": ["a", "b"], "reward_weights": [1.0]})


def test_unknown_yaml_key_suggests_close_match(tmp_path: Path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("learning_rat: 0.1\n")
    with pytest.raises(UserError, match="Did you mean: learning_rate"):
        resolve_config("sft", cfg_file, {"model": "m"})


def test_unknown_nested_key(tmp_path: Path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("training:\n  max_stepz: 3\n")
    with pytest.raises(UserError, match="training.max_stepz"):
        resolve_config("sft", cfg_file, {"model": "m"})


def test_key_in_the_wrong_section_names_the_right_one(tmp_path: Path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data:\n  prompt_length_percentile: 1.0\n")
    with pytest.raises(UserError, match=r"'data.prompt_length_percentile' .* belongs under 'grpo' "
                                        r"\(grpo.prompt_length_percentile"):
        resolve_config("grpo", cfg_file, {"model": "m"})


def test_bad_yaml_and_missing_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        resolve_config("sft", bad, {"model": "m"})
    with pytest.raises(UserError, match="Config file not found"):
        resolve_config("sft", tmp_path / "nope.yaml", {"model": "m"})
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(UserError, match="mapping"):
        resolve_config("sft", tmp_path / "list.yaml", {"model": "m"})


def test_missing_model_is_a_clear_error():
    with pytest.raises(UserError, match="Missing required option --model"):
        resolve_config("sft", None, {})


def test_resolved_config_round_trips_through_yaml(tmp_path: Path):
    cfg = resolve_config("grpo", None, {"model": "m", "rewards": ["math_answer"], "beta": 0.0})
    dump_config(cfg, tmp_path / "config.yaml")
    again = resolve_config("grpo", tmp_path / "config.yaml", {})
    assert again == cfg
    assert "beta: 0.0" in config_to_yaml(cfg)


def test_field_names_unique_and_every_field_has_help():
    for run_cls in (SFTRunConfig, GRPORunConfig):
        for name, (_, info) in field_index(run_cls).items():
            assert info.description, f"{name} has no description (it is the --help text)"


def test_cli_options_generated_and_overrides_parse():
    runner = CliRunner()
    result = runner.invoke(app, ["grpo", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in ("--learning-rate", "--num-generations", "--max-completion-length", "--no-std-normalization",
                 "--reward-module", "--loss-agg", "--per-device-train-batch-size"):
        assert flag in result.output


def test_cli_validation_error_exit_code_and_single_message():
    runner = CliRunner()
    result = runner.invoke(app, ["sft", "--model", "m", "--learning-rate", "-1"])
    assert result.exit_code == 2
    assert "Invalid value for --learning-rate" in result.output
    assert "Traceback" not in result.output


# -- sampling options and generation_kwargs (issue 20) --------------------------------------------


def test_sampling_options_from_the_cli_yaml_and_generation_kwargs(tmp_path: Path):
    from opensloth.config import GRPOConfig, overrides_from_cli

    values = overrides_from_cli("grpo", {"top_k": 20, "repetition_penalty": 1.05, "stop_strings": "</answer>, END"})
    g = resolve_config("grpo", None, {"model": "m", **values}).grpo
    assert (g.top_k, g.repetition_penalty, g.stop_strings) == (20, 1.05, ["</answer>", "END"])
    defaults = GRPOConfig()
    assert (defaults.top_k, defaults.repetition_penalty, defaults.stop_strings, defaults.generation_kwargs) == \
        (0, 1.0, [], None)  # all off
    assert GRPOConfig(top_k=None).top_k == 0  # TRL's / transformers' other "off"
    # TRL's generation_kwargs, a mapping in YAML: each key sets its option ("stop" is vLLM's name).
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text('grpo:\n  generation_kwargs: {top_k: 5, stop: "\\n\\n", repetition_penalty: 1.2}\n')
    g = resolve_config("grpo", cfg_file, {"model": "m"}).grpo
    assert (g.top_k, g.stop_strings, g.repetition_penalty) == (5, ["\n\n"], 1.2)
    # The dumped config reads back to the same options (both spellings agree there).
    dumped = tmp_path / "dump.yaml"
    dump_config(resolve_config("grpo", cfg_file, {"model": "m"}), dumped)
    assert resolve_config("grpo", dumped, {}).grpo == g
    # A JSON object on the command line.
    g = resolve_config("grpo", None, {"model": "m", "generation_kwargs": '{"stop_strings": ["a", "b"], "top_p": 0.9}'}).grpo
    assert (g.stop_strings, g.top_p) == (["a", "b"], 0.9)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"generation_kwargs": '{"num_beams": 4}'}, "--generation-kwargs key 'num_beams' is not supported"),
    ({"generation_kwargs": '{"seed": 1}'}, "sampling is seeded by --seed"),
    ({"generation_kwargs": '{"max_tokens": 9}'}, "use --max-new-tokens"),
    ({"generation_kwargs": '{"top_k": 5}', "top_k": 6}, "--top-k is set twice"),
    ({"generation_kwargs": '{"top_k": -1}'}, "Invalid value for --top-k"),
    ({"generation_kwargs": '{"top_k": 5'}, "--generation-kwargs is not JSON"),
    ({"generation_kwargs": "[1, 2]"}, "must be a mapping"),
    ({"repetition_penalty": 0}, "Invalid value for --repetition-penalty"),
    ({"stop_strings": ["ok", ""]}, "a stop string cannot be empty"),
])
def test_sampling_options_refused_with_the_reason(overrides, message):
    with pytest.raises(UserError, match=message):
        resolve_config("grpo", None, {"model": "m", **overrides})


def test_unsupported_generation_kwargs_refused_in_a_dry_run(tmp_path):
    result = CliRunner().invoke(app, ["grpo", "--model", "m", "--dataset", "d.jsonl", "--output-dir",
                                      str(tmp_path / "out"), "--dry-run", "--generation-kwargs",
                                      '{"suppress_tokens": [1]}'])
    assert result.exit_code == 2, result.output
    assert "--generation-kwargs key 'suppress_tokens' is not supported" in result.output
    assert "Traceback" not in result.output


def test_plan_says_what_the_loss_assumes_when_sampling_is_reshaped(tmp_path):
    def plan(*flags):
        result = CliRunner().invoke(app, ["grpo", "--model", "m", "--dataset", "d.jsonl", "--task", "math",
                                          "--output-dir", str(tmp_path / "out"), "--dry-run", *flags],
                                    env={"COLUMNS": "400"})
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    assert "reshape" not in plan("--stop-strings", "</answer>")  # a stop string leaves each token's distribution
    out = plan("--top-k", "20", "--repetition-penalty", "1.1", "--rollout-engine", "hf")
    assert "--top-k, --repetition-penalty reshape the sampling distribution" in out
    assert "softmax(logits / temperature) over the full vocabulary" in out and "importance weights" not in out
    assert "truncated importance weights correct this in part" in plan("--top-p", "0.9", "--rollout-engine", "vllm")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--loss-type", "dapo", "--loss-agg", "token_mean"], "--loss-type dapo aggregates as TRL's dapo does"),
        (["--loss-type", "grpo", "--loss-agg", "seq_mean"], "--loss-type grpo aggregates as TRL's grpo does"),
        (["--scale-rewards", "batch", "--no-std-normalization"], "--scale-rewards batch contradicts --no-std"),
        (["--scale-rewards", "none", "--std-normalization"], "--scale-rewards none contradicts --std-normalization"),
        (["--loss-type", "reinforce_with_baseline", "--importance-sampling-level", "sequence"], "takes no ratio"),
        (["--loss-type", "no_baseline", "--delta", "1.5"], "--delta uses the clipped loss's ratio"),
        (["--loss-type", "no_baseline", "--use-bias-correction-kl"], "--use-bias-correction-kl uses"),
        (["--top-entropy-quantile", "0"], "top_entropy_quantile"),
        (["--vllm-importance-sampling-mode", "token"], "vllm_importance_sampling_mode"),
    ],
)
def test_trl_loss_options_refuse_contradictions(flags, message, tmp_path):
    from opensloth.cli.train import app

    result = CliRunner().invoke(app, ["grpo", "--model", "m", "--dataset", "d.jsonl", "--output-dir",
                                      str(tmp_path / "out"), "--dry-run", *flags])
    assert result.exit_code == 2, result.output
    assert message in result.output.replace("\n", " ") and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("flags", "scaling"),
    [([], "group"), (["--no-std-normalization"], "none"), (["--scale-rewards", "batch"], "batch"),
     (["--scale-rewards", "none", "--no-std-normalization"], "none"), (["--scale-rewards", "group"], "group")],
)
def test_scale_rewards_and_std_normalization_agree(flags, scaling):
    """--std-normalization keeps working; it maps onto TRL's --scale-rewards (group / none)."""
    overrides = {"model": "m"}
    for flag, value in zip(flags, [*flags[1:], None]):
        if flag == "--no-std-normalization":
            overrides["std_normalization"] = False
        elif flag == "--scale-rewards":
            overrides["scale_rewards"] = value
    assert resolve_config("grpo", None, overrides).grpo.reward_scaling == scaling


def test_trl_loss_types_and_options_parse_from_the_cli(tmp_path):
    from opensloth.cli.train import app

    result = CliRunner().invoke(app, [
        "grpo", "--model", "m", "--dataset", "d.jsonl", "--output-dir", str(tmp_path / "out"), "--dry-run", "--task", "math",
        "--loss-type", "dapo", "--scale-rewards", "batch", "--importance-sampling-level", "sequence", "--delta", "1.5",
        "--mask-truncated-completions", "--top-entropy-quantile", "0.2", "--use-bias-correction-kl",
        "--vllm-importance-sampling-mode", "sequence_mask", "--vllm-importance-sampling-clip-max", "2.5",
        "--vllm-importance-sampling-clip-min", "0.5"])
    assert result.exit_code == 0, result.output
    for text in ("dapo", "sequence_mask", "2.5", "0.2"):
        assert text in result.output
