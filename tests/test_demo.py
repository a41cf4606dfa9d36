"""`os demo` end to end through the real CLI: offline, CPU, SFT then GRPO, before/after table.

This is also the project's "GRPO raises held-out accuracy" test on a model our own code taught
the format: the SFT data carries a systematic mistake (most subtraction answers off by one),
SFT imitates it, and GRPO with the verified answer reward must unlearn it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_os_demo_grpo_beats_sft(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-c", "from opensloth.cli.main import app; app()", "demo",
                           "--output-dir", str(out)], capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "100"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "after SFT + GRPO" in proc.stdout

    def scores(name: str) -> tuple[float, float]:
        rows = [json.loads(line) for line in (out / "eval" / f"{name}.jsonl").read_text().splitlines()]
        exact = sum(r["rewards"]["math_format"] == 1.0 for r in rows) / len(rows)
        return exact, sum(r["correct"] for r in rows) / len(rows)

    base_format, base_acc = scores("base_model")
    sft_format, sft_acc = scores("sft_model")
    grpo_format, grpo_acc = scores("grpo_model")
    assert base_format == 0.0 and base_acc == 0.0  # a random model knows nothing
    assert sft_format >= 0.9  # SFT taught the format
    assert grpo_format >= 0.9  # GRPO kept it
    assert grpo_acc >= sft_acc + 0.15, (sft_acc, grpo_acc)  # and GRPO fixed answers SFT got wrong
    for model in ("sft_model", "grpo_model"):
        assert (out / model / "training_curves.png").is_file()
        assert (out / model / "metrics.jsonl").is_file()
    assert (out / "grpo_model" / "adapter_config.json").is_file()

    # A plain `os eval`, as the README shows it, evaluates the model as it was trained (the run's
    # system prompt, template and completion length): exactly the demo's own numbers.
    proc = subprocess.run([sys.executable, "-c", "from opensloth.cli.main import app; app()", "eval", "--model",
                           str(out / "grpo_model"), "--dataset", str(out / "data" / "held_out.jsonl"), "--task",
                           "math", "--output", str(tmp_path / "plain_eval.jsonl")],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "system prompt" in proc.stdout and "(training run)" in proc.stdout  # says where settings came from
    rows = [json.loads(line) for line in (tmp_path / "plain_eval.jsonl").read_text().splitlines()]
    plain_format = sum(r["rewards"]["math_format"] == 1.0 for r in rows) / len(rows)
    plain_acc = sum(r["correct"] for r in rows) / len(rows)
    assert (plain_format, plain_acc) == (grpo_format, grpo_acc)


def test_os_demo_refuses_non_empty_output_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "-c", "from opensloth.cli.main import app; app()", "demo",
                           "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--overwrite" in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_demo_max_staleness_moves_only_the_grpo_rollouts_to_a_cpu_worker(tmp_path):
    from opensloth.config import resolve_config
    from opensloth.demo import DemoSettings, grpo_overrides
    from opensloth.launch import resolve_rollout_devices

    common = {"devices": "cpu", "seed": 0, "cache_dir": str(tmp_path / "cache"), "overwrite": True}
    paths = (tmp_path / "sft_model", tmp_path / "dapo.jsonl", tmp_path / "grpo_model")
    colocated = grpo_overrides(DemoSettings(), common, *paths)
    staleness_1 = grpo_overrides(DemoSettings(max_staleness=1), common, *paths)
    assert "rollout_devices" not in colocated and "max_staleness" not in colocated
    rest = {k: v for k, v in staleness_1.items() if k not in ("rollout_devices", "max_staleness")}
    assert rest == colocated  # everything else identical
    cfg = resolve_config("grpo", None, staleness_1)
    assert (cfg.grpo.rollout_devices, cfg.grpo.max_staleness) == ("cpu:1", 1)
    assert resolve_rollout_devices(cfg, ["cpu"]) == ["cpu"]  # the launcher accepts the layout
    assert resolve_rollout_devices(resolve_config("grpo", None, colocated), ["cpu"]) == []
    k0 = resolve_config("grpo", None, grpo_overrides(DemoSettings(max_staleness=0), common, *paths))
    assert (k0.grpo.rollout_devices, k0.grpo.max_staleness) == ("cpu:1", 0)  # 0 is a layout, not "off"


def test_os_demo_refuses_a_negative_max_staleness(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "from opensloth.cli.main import app; app()", "demo",
                           "--output-dir", str(tmp_path / "demo"), "--max-staleness", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--max-staleness" in proc.stderr
    assert not (tmp_path / "demo").exists()
