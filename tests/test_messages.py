"""Nothing silent, nothing cryptic: what the CLI says about bad files, dropped rows, counts and progress.

Each test runs the real CLI, in a subprocess where it loads a model or prepares data (as
tests/test_bad_inputs.py does), else in this process with Typer's CliRunner (seconds faster: no
fresh import of torch), and backs one row of docs/reliability.md ("Messages, drops and progress").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from test_bad_inputs import ENTRY, assert_clean_error, snapshot


def cli(tool: str, *args, cwd: Path | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """The real CLI, off a terminal (as in CI or `| tee`), wide enough that table rows stay on one line."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-c", ENTRY[tool], *map(str, args)], check=False, capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)


def cli_here(tool: str, *args) -> subprocess.CompletedProcess:
    """The same CLI in this process (for errors raised before any model or data work), as a
    CompletedProcess whose stdout holds everything printed."""
    from opensloth.cli.main import app as os_app
    from opensloth.cli.train import app as train_app

    result = CliRunner().invoke(train_app if tool == "os-train" else os_app, list(map(str, args)),
                                env={"COLUMNS": "250"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback the user would see
    return subprocess.CompletedProcess([tool, *args], result.exit_code, stdout=result.output, stderr="")


def prompts(path: Path, n: int = 20) -> Path:
    """n prompt-answer rows whose prompts all differ in length."""
    path.write_text("".join(json.dumps({"prompt": f"{a}+1=" + "x" * a, "answer": str(a + 1)}) + "\n"
                            for a in range(n)))
    return path


def prepare_grpo(model: Path, data: Path, tmp: Path, *extra) -> subprocess.CompletedProcess:
    return cli("os-train", "data", "grpo", "--model", model, "--dataset", data, "--task", "math", "--devices", "cpu",
               "--cache-dir", tmp / "cache", *extra)


# -- 5. one Error: line instead of a traceback ---------------------------------------------------


def test_non_utf8_jsonl_names_the_file_and_line(tiny_model_dir, tmp_path):
    data = tmp_path / "latin.jsonl"
    rows = [json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1)}) for a in range(4)]
    data.write_bytes(("\n".join(rows) + "\n").encode() + '{"prompt": "caf\xe9", "answer": "1"}\n'.encode("latin-1"))
    before = data.read_bytes()
    assert_clean_error(prepare_grpo(tiny_model_dir, data, tmp_path), "--dataset", "latin.jsonl, line 5",
                       "not UTF-8", "iconv")
    assert data.read_bytes() == before


def test_non_utf8_yaml_names_the_file_and_line(tmp_path):
    cfg = tmp_path / "latin.yaml"
    cfg.write_bytes("model: m\nsystem_prompt: caf\xe9\n".encode("latin-1"))
    assert_clean_error(cli_here("os-train", "sft", "-c", cfg, "--dry-run"), "latin.yaml, line 2", "not UTF-8")


def test_truncated_safetensors_names_the_file(tiny_model_dir, tmp_path):
    model = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for proc in (cli("os", "generate", "--model", model, "hi"),
                 cli("os-train", "sft", "--model", model, "--dataset", prompts(tmp_path / "d.jsonl"), "--devices",
                     "cpu", "--output-dir", tmp_path / "out", "--format", "prompt-completion")):
        assert_clean_error(proc, str(weights), "corrupt or incomplete", "Download it again")
    assert not (tmp_path / "out").exists()  # refused before any data prep or output


def _adapter_on_a_moved_base(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(adapter, where its base was when it was saved, where the base is now)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    old, new, adapter = tmp_path / "base_old", tmp_path / "base_new", tmp_path / "adapter"
    shutil.copytree(tiny_model_dir, old)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(old),
                           LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(old).save_pretrained(adapter)
    old.rename(new)
    return adapter, old, new


def test_export_of_an_adapter_whose_base_moved(tiny_model_dir, tmp_path):
    adapter, old, new = _adapter_on_a_moved_base(tiny_model_dir, tmp_path)
    before = snapshot(adapter)
    assert_clean_error(cli("os", "export", "--model", adapter, "--output", tmp_path / "merged"),
                       "adapter_config.json", str(old), "does not exist", "--base-model")
    assert not (tmp_path / "merged").exists() and snapshot(adapter) == before
    done = cli("os", "export", "--model", adapter, "--output", tmp_path / "merged", "--base-model", new)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "merged" / "config.json").is_file() and snapshot(adapter) == before


def test_generate_on_cuda_without_a_gpu(tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_clean_error(cli_here("os", "generate", "--model", tiny_model_dir, "--device", "cuda", "hi"),
                       "--device cuda", "no CUDA GPU", "--device cpu")
    assert_clean_error(cli_here("os", "generate", "--model", tiny_model_dir, "--device", "gpu", "hi"),
                       "--device 'gpu'", "cpu, cuda or cuda:N")


@pytest.mark.parametrize("value", ["0", "-5"])
def test_generate_max_new_tokens_must_be_positive(tiny_model_dir, value):
    out = assert_clean_error(cli_here("os", "generate", "--model", tiny_model_dir, "--max-new-tokens", value, "hi"),
                             f"--max-new-tokens {value}", "at least 1")
    assert out.count("Error:") == 1


def test_export_overwrite_onto_a_file_keeps_it(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x"}))
    target = tmp_path / "merged.bin"
    target.write_text("mine")
    assert_clean_error(cli_here("os", "export", "--model", adapter, "--output", target, "--overwrite"),
                       "--output", "is a file", "the file is kept")
    assert target.read_text() == "mine"


# -- 6. nothing dropped or ignored without a word --------------------------------------------------


def test_grpo_keeps_every_prompt_by_default_and_counts_every_drop(tiny_model_dir, tmp_path):
    data = prompts(tmp_path / "d.jsonl")
    kept = prepare_grpo(tiny_model_dir, data, tmp_path)
    assert kept.returncode == 0, kept.stderr
    assert "│ rows " in kept.stdout and "│ 20 " in kept.stdout  # not 18: no hidden 90th-percentile cut
    assert "nothing (every row used whole)" in kept.stdout
    cut = prepare_grpo(tiny_model_dir, data, tmp_path, "--prompt-length-percentile", "0.5")
    assert cut.returncode == 0, cut.stderr
    assert "10 prompts longer than --prompt-length-percentile 0.5" in cut.stdout  # the plan
    assert "Data prep: 10 prompts longer than --prompt-length-percentile 0.5" in cut.stdout + cut.stderr  # the log


def test_grpo_run_plan_counts_drops_clamps_and_speaks_singular(tiny_model_dir, tmp_path):
    """One real GRPO step: the plan and the log count the --max-prompt-length drops and the short
    --num-samples; counts of one are singular ("1 worker", "1 optimizer update")."""
    data = prompts(tmp_path / "d.jsonl")
    proc = cli("os-train", "grpo", "--model", tiny_model_dir, "--dataset", data, "--task", "math", "--devices", "cpu",
               "--output-dir", tmp_path / "run", "--cache-dir", tmp_path / "cache", "--report-to", "none",
               "--max-steps", "1", "--group-size", "2", "--rollout-batch-size", "2", "--max-new-tokens", "4",
               "--print-sample-every", "0", "--max-prompt-length", "15", "--num-samples", "50")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "--num-samples 50 is more than the 20 rows of --dataset: all 20 used" in proc.stdout  # the plan
    assert "--num-samples 50 is more than the 20 rows of --dataset" in out.replace("\n", " ")  # the log
    assert "prompts longer than --max-prompt-length 15 dropped" in proc.stdout
    assert "of 20 read, 1 shard," in proc.stdout
    assert "(1 worker," in proc.stdout and "1 optimizer step per rollout" in proc.stdout
    assert "GRPO: 1 step, 2 prompts x 2 completions per step, 1 optimizer update per step" in " ".join(out.split())
    for wrong in ("1 workers", "1 shards", "1 steps", "1 optimizer updates"):
        assert wrong not in out


@pytest.mark.parametrize("recipe", ["sft", "grpo"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_max_steps_zero_or_negative_is_refused(recipe, value):
    assert_clean_error(cli_here("os-train", recipe, "--model", "m", "--max-steps", value, "--dry-run"),
                       f"--max-steps (training.max_steps): {value}", "-1 to train for --num-train-epochs")


def test_max_steps_help_says_what_a_step_is():
    sft = " ".join(cli_here("os-train", "sft", "--help").stdout.split())
    grpo = " ".join(cli_here("os-train", "grpo", "--help").stdout.split())
    assert "0 and other negative values are refused" in sft and "Optimizer steps to train" in sft
    assert "GRPO steps to train, each one rollout batch" in grpo and "Optimizer steps" not in grpo


def test_eval_without_reference_answers_is_refused(tiny_model_dir, tmp_path):
    data = tmp_path / "no_answers.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+1="}) + "\n" for a in range(3)))
    assert_clean_error(cli("os", "eval", "--model", tiny_model_dir, "--dataset", data, "--max-new-tokens", "2",
                           "--output", tmp_path / "res.jsonl"),
                       "no_answers.jsonl has no reference answers", "--accuracy-reward math_answer",
                       "`answer` column", "`solution`")
    assert not (tmp_path / "res.jsonl").exists()


def test_reward_module_whose_rewards_are_not_used_is_refused(tmp_path):
    module = tmp_path / "mine.py"
    module.write_text("def shout(completions, **kwargs):\n    return [1.0] * len(completions)\n")
    assert_clean_error(cli("os-train", "grpo", "--model", "m", "--task", "math", "--reward-module", module,
                           "--dry-run"), "mine.py defines shout", "uses none of them", "--rewards shout")
    used = cli("os-train", "grpo", "--model", "m", "--task", "math", "--reward-module", module, "--rewards", "shout",
               "--dry-run")
    assert used.returncode == 0, used.stderr
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    assert_clean_error(cli("os-train", "grpo", "--model", "m", "--rewards", "math_answer", "--reward-module", empty,
                           "--dry-run"), "empty.py defines no reward")


# -- 7. messages ---------------------------------------------------------------------------------


def test_malformed_jsonl_line_is_named(tiny_model_dir, tmp_path):
    data = tmp_path / "broken.jsonl"
    rows = [json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1)}) for a in range(5)]
    data.write_text("\n".join(rows[:3] + ['{"prompt": "x", "answer": '] + rows[3:]) + "\n")
    out = assert_clean_error(prepare_grpo(tiny_model_dir, data, tmp_path), "broken.jsonl, line 4", "not valid JSON")
    assert "An error occurred while generating the dataset" not in out


def test_row_numbers_count_from_one(tiny_model_dir, tmp_path):
    data = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(4)]
    rows[2]["prompt"] = ""  # line 3 of the file
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert_clean_error(prepare_grpo(tiny_model_dir, data, tmp_path), "Row 3 of --dataset", "column 'prompt' is empty")
    skipped = prepare_grpo(tiny_model_dir, data, tmp_path, "--skip-bad-rows")
    assert skipped.returncode == 0 and "row 3: column 'prompt' is empty" in skipped.stdout + skipped.stderr
    assert "1 malformed row dropped (--skip-bad-rows)" in skipped.stdout
    # Blank lines (the JSON reader skips them) part rows from lines: the message names both.
    lines = [json.dumps(r) for r in rows]
    data.write_text("\n".join([lines[0], "", lines[1], "   ", lines[2], lines[3]]) + "\n")
    assert_clean_error(prepare_grpo(tiny_model_dir, data, tmp_path), "Row 3 (line 5) of --dataset",
                       "column 'prompt' is empty")  # --skip-bad-rows names it the same way (row_name)


def test_row_name_gives_the_line_of_a_jsonl_row(tmp_path):
    from opensloth.data.sources import row_name

    data = tmp_path / "d.jsonl"
    data.write_text('{"a": 1}\n\n{"a": 2}\n \t\n{"a": 3}\n')
    assert [row_name(str(data), i) for i in range(3)] == ["row 1", "row 2 (line 3)", "row 3 (line 5)"]
    assert row_name("some/hub-dataset", 4) == "row 5"
    (tmp_path / "d.json").write_text('[{"a": 1},\n\n{"a": 2}]')
    assert row_name(str(tmp_path / "d.json"), 1) == "row 2"  # a JSON array: rows are not lines


def test_yaml_type_errors_show_list_and_quoting_syntax(tmp_path):
    cfg = tmp_path / "types.yaml"
    cfg.write_text("model: m\ntarget_modules: q_proj v_proj\nrun_name: yes\ndataset_config: 2023\n")
    assert_clean_error(cli_here("os-train", "sft", "-c", cfg, "--dry-run"), "target_modules: [q_proj, v_proj]",
                       "YAML read it as a boolean", 'put the text in quotes (run_name: "...")',
                       'YAML read it as a number: put the text in quotes (dataset_config: "...")')


def test_missing_reward_module_says_it_does_not_exist(tmp_path):
    assert_clean_error(cli_here("os-train", "grpo", "--model", "m", "--rewards", "math_answer", "--reward-module",
                           tmp_path / "nothere.py", "--dry-run"), "nothere.py: the file does not exist")


def test_data_prep_prints_progress_lines_off_a_terminal(tiny_model_dir, tmp_path):
    """Off a terminal (CI, `| tee`) each stage prints plain lines with its name and rows done/total."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+1=", "completion": str(a + 1)}) + "\n" for a in range(30)))
    proc = cli("os-train", "data", "sft", "--model", tiny_model_dir, "--dataset", data, "--devices", "cpu",
               "--cache-dir", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert "prepare: format rows (prompt-completion) 30/30 [" in proc.stderr
    assert "prepare: tokenize 30/30 [" in proc.stderr
    assert "Reading --dataset" in proc.stdout + proc.stderr


def test_cut_off_bin_weights_and_a_missing_shard_are_named(tiny_model_dir, tmp_path):
    """Beyond .safetensors: a torch.save zip cut short (pytorch_model.bin) and a sharded model missing a
    shard are refused with the file named, before anything loads."""
    import torch
    from transformers import AutoModelForCausalLM

    from opensloth.errors import UserError
    from opensloth.models.loading import check_weights

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    as_bin = tmp_path / "bin"
    shutil.copytree(tiny_model_dir, as_bin)
    (as_bin / "model.safetensors").unlink()
    weights = as_bin / "pytorch_model.bin"
    torch.save(model.state_dict(), weights)  # the older format transformers still loads
    check_weights(as_bin, "--model bin")  # whole: fine
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 100])
    with pytest.raises(UserError, match=r"pytorch_model.bin is corrupt or incomplete \(a torch.save zip without its end"):
        check_weights(as_bin, "--model bin")

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, sharded)
    (sharded / "model.safetensors").unlink()
    model.save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    check_weights(sharded, "--model sharded")
    shards[-1].unlink()
    assert_clean_error(cli("os", "generate", "--model", sharded, "hi"), "model.safetensors.index.json lists the shard",
                       shards[-1].name, "incomplete download or copy")
