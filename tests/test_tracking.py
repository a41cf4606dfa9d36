"""tracking: metrics.jsonl, TensorBoard events, the curves PNG, the progress bar."""

from __future__ import annotations

import io
import json

import torch
from rich.console import Console

from opensloth.tracking import MetricsLogger, TrainingProgress, plot_metrics, read_metrics


def test_metrics_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path, report_to=["tensorboard"], run_name="r1", is_main=True) as logger:
        logger.log(1, {"loss": torch.tensor(2.5), "learning_rate": 1e-3, "rewards/math/mean": 0.25})
        logger.log(2, {"loss": float("nan"), "note": "text"})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [
        {"step": 1, "loss": 2.5, "learning_rate": 1e-3, "rewards/math/mean": 0.25},
        {"step": 2, "loss": None, "note": "text"},
    ]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs" / "r1"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "learning_rate", "rewards/math/mean"}
    assert [e.value for e in events.Scalars("loss")] == [2.5]  # NaN not sent


def test_tensorboard_shows_each_step_once_after_a_resume_or_an_overwrite(tmp_path):
    """A resumed run retrains the steps after its checkpoint and an --overwrite run starts again at step 1,
    into the same runs/<name> directory: TensorBoard must show only the newest value of each step."""
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def run(steps, value, start_step):
        with MetricsLogger(tmp_path, report_to=["tensorboard"], run_name="r", start_step=start_step) as logger:
            for step in steps:
                logger.log(step, {"loss": value + step})
        time.sleep(1.1)  # event files are named by the second they were opened

    def scalars():
        events = EventAccumulator(str(tmp_path / "runs" / "r"))
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars("loss")]

    run(range(1, 6), 0.0, start_step=1)  # killed after step 5, last checkpoint at step 3
    run(range(4, 7), 100.0, start_step=4)  # --resume: steps 4.. again
    assert scalars() == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 104.0), (5, 105.0), (6, 106.0)]
    run(range(1, 3), 1000.0, start_step=1)  # --overwrite: a new run from step 1
    assert scalars() == [(1, 1001.0), (2, 1002.0)]


def test_restart_keeps_the_steps_a_resume_continues_from(tmp_path):
    """restart=True: a resume from checkpoint-2 keeps steps 1..2 and sets the old file aside (it has steps
    3..4, trained again now); a fresh run (start_step 1) starts the file anew; without restart rows append."""
    with MetricsLogger(tmp_path, report_to=["none"]) as logger:
        for step in range(1, 5):
            logger.log(step, {"loss": float(step)})
    with MetricsLogger(tmp_path, report_to=["none"], start_step=3, restart=True) as logger:
        logger.log(3, {"loss": 30.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    replaced = tmp_path / "metrics.replaced-at-step-2.jsonl"
    assert [json.loads(line)["step"] for line in replaced.read_text().splitlines()] == [1, 2, 3, 4]
    with MetricsLogger(tmp_path, report_to=["none"], start_step=4, restart=True) as logger:
        logger.log(4, {"loss": 40.0})  # nothing superseded: no second replaced file, rows kept
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert not (tmp_path / "metrics.replaced-at-step-3.jsonl").exists()
    with MetricsLogger(tmp_path, report_to=["none"], restart=True) as logger:
        logger.log(1, {"loss": 7.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 7.0)]


def test_non_main_rank_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "out", report_to=["tensorboard"], is_main=False)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "out").exists()


def test_appends_across_runs_and_skips_torn_line(tmp_path):
    for step in (1, 2):
        with MetricsLogger(tmp_path, report_to=["none"]) as logger:
            logger.log(step, {"loss": 1.0 / step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a run killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert not (tmp_path / "runs").exists()


def test_plot_metrics_draws_logged_curves(tmp_path):
    assert plot_metrics(tmp_path) is None  # nothing logged yet
    with MetricsLogger(tmp_path, report_to=["none"]) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": 1.0 / step, "kl": 0.01 * step})
    path = plot_metrics(tmp_path)
    assert path == tmp_path / "training_curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_bar_shows_step_and_metrics():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=80)
    with TrainingProgress(total=10, console=console, description="grpo", show_keys=["loss", "train/kl"]) as bar:
        bar.update(3, {"loss": 0.123456, "train/kl": 0.5, "ignored": 1.0})
    text = buffer.getvalue()
    assert "3/10" in text and "loss=0.1235" in text and "kl=0.5" in text and "ignored" not in text
    assert "grpo" in text  # the name is never squeezed to "g…" by long metrics on a narrow terminal


def test_progress_without_a_terminal_prints_lines_as_it_goes():
    """Through a pipe (the launcher, a CI log) a bar would only show at the end: lines instead."""
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=80)
    bar = TrainingProgress(total=10, console=console, description="sft", show_keys=["loss"], line_interval=3600)
    with bar:
        bar.update(1, {"loss": 2.0})
        assert "sft 1/10" in buffer.getvalue() and "loss=2" in buffer.getvalue()  # printed at once
        bar.update(2, {"loss": 1.5})  # within the interval: quiet
        bar.update(10, {"loss": 0.5})  # the last step always prints
    lines = buffer.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["1/10", "10/10"]
    assert "loss=0.5" in lines[-1]
    silent = TrainingProgress(total=10, is_main=False)
    silent.update(1, {"loss": 1.0})
    silent.close()


def test_progress_line_marks_active_alarms_first():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=80)
    with TrainingProgress(total=3, console=console, description="grpo", show_keys=["loss"]) as bar:
        bar.update(3, {"loss": 0.5}, marks=["truncated", "zero_std"])
    assert "grpo 3/3" in buffer.getvalue() and "!truncated  !zero_std  loss=0.5" in buffer.getvalue()


def test_grpo_curves_show_each_reward_and_kl_only_when_logged(tmp_path):
    from opensloth.tracking import curve_panels

    with MetricsLogger(tmp_path / "beta0", report_to=["none"]) as logger:
        for step in range(1, 4):
            logger.log(step, {"loss": 0.1, "reward": 1.0, "rewards/total/mean": 1.0, "rewards/math_answer/mean": 0.5,
                              "rewards/my_reward/mean": 0.2, "rewards/my_reward/std": 0.1,
                              "completions/clipped_ratio": 0.3, "frac_reward_zero_std": 0.5,
                              "completions/mean_length": 9.0, "learning_rate": 1e-5})
        logger.log(3, {"eval/accuracy": 0.4})
    assert curve_panels(tmp_path / "beta0") == [
        "loss", "reward", "rewards/math_answer/mean", "rewards/my_reward/mean", "eval/accuracy",
        "completions/clipped_ratio", "frac_reward_zero_std", "completions/mean_length", "learning_rate"]
    with MetricsLogger(tmp_path / "beta", report_to=["none"]) as logger:
        logger.log(1, {"loss": 0.1, "kl": 0.01})
    assert curve_panels(tmp_path / "beta") == ["loss", "kl"]
    assert plot_metrics(tmp_path / "beta0").read_bytes()[:4] == b"\x89PNG"
