"""Metrics: metrics.jsonl + TensorBoard (+ wandb), a training-curves PNG, alarms, and the progress bar.

Every recipe logs the same way: one `MetricsLogger.log(step, metrics)` per logging step, on
rank 0 only (other ranks get a logger that does nothing, so recipes need no rank checks).
Keys are namespaced like TensorBoard tags (`train/loss`, `rewards/math/mean`); the plain
names `loss` and `learning_rate` are kept for the SFT recipe, as TRL logs them.

Example:
    >>> logger = MetricsLogger("out", report_to=["tensorboard"], run_name=None, is_main=True)
    >>> logger.log(1, {"loss": 2.3, "learning_rate": 1e-4})   # appends {"step": 1, ...}
    >>> logger.close(); plot_metrics("out")                    # -> out/training_curves.png
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"
BAR_WIDTH = 20


class MetricsLogger:
    """Writes each logged step to metrics.jsonl, TensorBoard and (if asked) wandb.

    Args:
        output_dir: run directory; metrics.jsonl and TensorBoard events go here (events under `runs/`).
        report_to: any of "tensorboard", "wandb", "none". metrics.jsonl is always written.
        run_name: TensorBoard subdirectory and wandb run name (default: the output dir's name).
        is_main: only the main process writes; others ignore every call.
        start_step: the first step this run logs (N + 1 when resumed from checkpoint-N, else 1).
            TensorBoard drops the events the same directory holds from that step on, which an
            earlier run (killed after its last checkpoint, or overwritten) wrote and this run
            writes again.
        restart: this run (re)starts the directory's metrics.jsonl: a fresh run (`start_step` 1, into an
            --overwrite dir) starts the file anew; a run resumed from checkpoint-N keeps the rows of steps
            1..N and, when the file also has later steps (which it now trains again; the curves would show
            two step N+1), moves the whole previous file to metrics.replaced-at-step-<N>.jsonl. Without it
            rows are appended to what the file holds.
    """

    def __init__(self, output_dir: str | Path, report_to: Iterable[str] = ("tensorboard",),
                 run_name: str | None = None, is_main: bool = True, start_step: int = 1, restart: bool = False):
        self.output_dir = Path(output_dir)
        self.is_main = is_main
        self.run_name = run_name or self.output_dir.name
        self._tb = None
        self._wandb = None
        self._file = None
        if not is_main:
            return
        report_to = set(report_to) - {"none"}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if restart:
            _restart_metrics_file(self.output_dir / METRICS_FILE, start_step)
        # Line-buffered so the file is readable while training; closed in close().
        self._file = open(self.output_dir / METRICS_FILE, "a", buffering=1)  # noqa: SIM115
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.output_dir / "runs" / self.run_name), purge_step=start_step)
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError as err:
                raise ImportError("--report-to wandb needs wandb: pip install -e '.[wandb]'") from err
            # WANDB_MODE=offline works without an account; the run is synced later with `wandb sync`.
            self._wandb = wandb.init(name=self.run_name, dir=str(self.output_dir), reinit=True)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record `metrics` (name -> number) for optimizer step `step`; non-finite and non-numeric values pass
        through to metrics.jsonl as given (JSON null for NaN) but are not sent to TensorBoard."""
        if not self.is_main:
            return
        values = {k: _to_python(v) for k, v in metrics.items()}
        record = {"step": int(step), **values}
        self._file.write(json.dumps(record, allow_nan=False, default=str) + "\n")
        numeric = {k: v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, global_step=step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def log_table(self, step: int, name: str, records: list[dict[str, Any]]) -> None:
        """Send `records` (one dict per row, same keys) to wandb as a table called `name`; a no-op without
        wandb (metrics.jsonl and TensorBoard keep scalars; the caller writes the rows to its own file)."""
        if not self.is_main or self._wandb is None or not records:
            return
        import wandb

        columns = list(records[0])
        rows = [[json.dumps(r.get(c), default=str) if isinstance(r.get(c), (dict, list)) else r.get(c)
                 for c in columns] for r in records]
        self._wandb.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _restart_metrics_file(path: Path, start_step: int) -> None:
    """Keep the rows of steps before `start_step` in metrics.jsonl (none for a fresh run); see MetricsLogger."""
    if not path.is_file():
        return
    if start_step <= 1:
        path.unlink()
        return
    resumed_step = start_step - 1
    kept, superseded = [], False
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            continue  # a torn last line of a killed run
        if step <= resumed_step:
            kept.append(line + "\n")
        else:
            superseded = True
    if superseded:
        os.replace(path, path.with_name(f"metrics.replaced-at-step-{resumed_step}.jsonl"))
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def _to_python(value: Any) -> Any:
    """Tensors and numpy scalars -> Python numbers; NaN/inf -> None (JSON has no NaN)."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl, in order; a torn last line (run killed mid-write) is skipped."""
    path = Path(output_dir) / METRICS_FILE
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# Curves worth drawing, in panel order, each matched by the first key that exists in the log.
# "rewards/*/mean" stands for one panel per reward (rewards/<name>/mean, the total left out).
CURVE_KEYS = [
    ("loss", ["loss", "train/loss"]),
    ("reward", ["reward", "rewards/total/mean", "train/reward"]),
    ("reward", ["rewards/*/mean"]),
    ("eval pass@1", ["eval/pass@1", "eval/accuracy", "eval_accuracy"]),
    ("eval reward", ["eval/reward/mean"]),
    ("clipped ratio", ["completions/clipped_ratio"]),
    ("zero-std fraction", ["frac_reward_zero_std"]),
    ("KL", ["kl", "train/kl"]),
    ("completion length", ["completions/mean_length", "completion_length", "train/completion_length"]),
    ("eval loss", ["eval_loss", "eval/loss"]),
    ("learning rate", ["learning_rate", "train/learning_rate"]),
]


def _expand(candidates: list[str], records: list[dict]) -> list[list[str]]:
    """One candidate list per panel: a "prefix/*/suffix" pattern becomes one panel per matching key."""
    if not any("*" in c for c in candidates):
        return [candidates]
    (pattern,) = candidates
    head, tail = pattern.split("*")
    keys = dict.fromkeys(k for r in records for k in r
                         if k.startswith(head) and k.endswith(tail) and "/" not in k[len(head):-len(tail)]
                         and k != head + "total" + tail)
    return [[k] for k in keys]


def plot_metrics(output_dir: str | Path, keys: list[tuple[str, list[str]]] | None = None) -> Path | None:
    """Draw training_curves.png from metrics.jsonl: one panel per curve that was logged.

    GRPO runs get: loss, total reward, each reward's mean, eval pass@1 and reward (with eval data), the
    clipped ratio, the zero-std fraction, KL (only when it was measured: beta > 0), completion
    length and learning rate.

    Returns:
        The PNG path, or None when nothing plottable was logged.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display in a training job
    import matplotlib.pyplot as plt

    panels = _panels(read_metrics(output_dir), keys or CURVE_KEYS)
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, key, points) in zip(axes.flat, panels):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 50 else None)
        ax.set_title(f"{title} ({key})", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(output_dir) / CURVES_FILE
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _panels(records: list[dict], keys: list[tuple[str, list[str]]]) -> list[tuple[str, str, list]]:
    """(title, key, [(step, value), ...]) of each panel to draw: the first candidate key that was logged."""
    panels = []
    for title, pattern in keys:
        for candidates in _expand(pattern, records):
            for key in candidates:
                points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
                if points:
                    panels.append((title, key, points))
                    break
    return panels


def curve_panels(output_dir: str | Path) -> list[str]:
    """The metric keys training_curves.png draws for this run, in panel order."""
    return [key for _, key, _ in _panels(read_metrics(output_dir), CURVE_KEYS)]


@dataclass
class Alarm:
    """A silent failure worth a warning: a condition that held `steps` steps in a row.

    `update(holds)` records one step and says whether the alarm is active; the caller warns the
    first time (`first`), marks the progress line while it is active, and logs it as a 0/1 metric.

    Example:
        >>> alarm = Alarm("truncated", steps=3)
        >>> [alarm.update(h) for h in (True, True, True, False)]
        [False, False, True, False]
    """

    name: str
    steps: int = 3
    streak: int = 0
    warned: bool = False

    def update(self, holds: bool) -> bool:
        self.streak = self.streak + 1 if holds else 0
        return self.streak >= self.steps

    def first(self) -> bool:
        """True once: the first time the caller asks while the alarm is active (then warn)."""
        if self.warned:
            return False
        self.warned = True
        return True


class TrainingProgress:
    """Progress on rank 0: step/total, elapsed, remaining and the key metrics.

    On a terminal this is one rich bar redrawn in place. Anywhere else (the launcher's pipe from
    a worker, a CI log, `| tee`) a bar would only appear when it closes, so a plain line is
    printed instead: at the first step, then at most every `line_interval` seconds, and at the end.

    Example:
        >>> with TrainingProgress(total=100, is_main=True) as bar:
        ...     bar.update(1, {"loss": 2.1})
    """

    def __init__(self, total: int, is_main: bool = True, description: str = "train",
                 console: Console | None = None, show_keys: Iterable[str] | None = None,
                 line_interval: float = 10.0):
        self.is_main = is_main
        self.total = total
        self.description = description
        self.show_keys = list(show_keys) if show_keys is not None else None
        self.line_interval = line_interval
        self.console = console or Console(stderr=True)
        self._progress = None
        self._task = None
        self._start = time.perf_counter()
        self._last_line: float | None = None
        if not is_main or not self.console.is_terminal:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=BAR_WIDTH),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=self.console,
            transient=False,
        )
        self._task = self._progress.add_task(description, total=total, metrics="")

    def __enter__(self) -> Self:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, step: int, metrics: Mapping[str, Any] | None = None, marks: Iterable[str] = ()) -> None:
        """Move to `step` and show `metrics` (the show_keys ones, or all numeric ones), then a `!name`
        for each active alarm in `marks` (first, so a narrow terminal never cuts it off)."""
        if not self.is_main:
            return
        shown = "  ".join(f"!{mark}" for mark in marks)
        if metrics:
            keys = self.show_keys if self.show_keys is not None else list(metrics)
            values = "  ".join(_fmt(k, metrics[k]) for k in keys if k in metrics and _is_number(metrics[k]))
            shown = f"{shown}  {values}" if shown else values
        if self._progress is not None:
            # One line: cut the metrics to the room left, or rich squeezes the name to "g…".
            room = self.console.width - (len(self.description) + BAR_WIDTH + 2 * len(str(self.total)) + 26)
            if len(shown) > room:
                shown = shown[: max(room - 1, 0)] + "…"
            self._progress.update(self._task, completed=step, metrics=shown)
            return
        now = time.perf_counter()
        due = self._last_line is None or now - self._last_line >= self.line_interval or step >= self.total
        if step > 0 and due:
            self._last_line = now
            elapsed = now - self._start
            remaining = elapsed / step * (self.total - step)
            self.console.print(f"{self.description} {step}/{self.total} [{_hms(elapsed)}<{_hms(remaining)}]  {shown}",
                               markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _is_number(value: Any) -> bool:
    return isinstance(_to_python(value), (int, float)) and not isinstance(value, bool)


def _fmt(key: str, value: Any) -> str:
    value = _to_python(value)
    short = key.rsplit("/", 1)[-1] if key.count("/") == 1 else key
    return f"{short}={value:.4g}" if isinstance(value, float) else f"{short}={value}"
