"""`os eval`, `os generate`, `os export`, `os plot`: use and judge what was trained.

Registered on the `os` app by `register(app)` (called from cli/main.py). Parse, validate,
dispatch to opensloth.evaluate / opensloth.tracking; nothing else happens here.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from opensloth.cli.common import user_errors
from opensloth.errors import UserError, plural

console = Console()

MODEL = typer.Option(..., "--model", "-m", help="A saved adapter dir (training --output-dir or a checkpoint's "
                     "adapter/), a merged model dir, or a hub model name.")
DEVICE = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N.")
MAX_NEW = typer.Option(256, "--max-new-tokens", help="Completion length limit (at least 1).")
SEED = typer.Option(0, "--seed", help="Seed for sampling.")


def _check_device(device: str) -> None:
    """--device is cpu, or cuda / cuda:N naming a GPU this machine has."""
    import re

    spec = device.strip().lower()
    if spec == "cpu":
        return
    if not re.fullmatch(r"cuda(:\d+)?", spec):
        raise UserError(f"--device {device!r}: expected cpu, cuda or cuda:N (e.g. cuda:1).")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(f"--device {device}: no CUDA GPU is visible here. Use --device cpu.")
    index = int(spec.split(":")[1]) if ":" in spec else 0
    if index >= count:
        raise UserError(f"--device {device}: no GPU with id {index}; this machine has {plural(count, 'GPU')} "
                        f"(cuda:0 to cuda:{count - 1}).")


def _check_max_new_tokens(value: int | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"--max-new-tokens {value}: a completion needs at least 1 new token; give a positive "
                        "number (e.g. 256).")


def _check_model_dir(model: str) -> None:
    path = Path(model).expanduser()
    if (model.startswith((".", "/", "~")) or path.exists()) and not path.exists():
        raise UserError(f"--model {model}: no such directory. Pass a training --output-dir or a model directory.")


@user_errors
def eval_command(
    model: str = MODEL,
    dataset: str = typer.Option(..., "--dataset", "-d", help="Eval prompts: a local .jsonl/.json/.csv/.parquet "
                                "file, a saved dataset dir, or a hub dataset name."),
    task: str | None = typer.Option("math", "--task", help="Reward preset (os list-rewards)."),
    rewards: str | None = typer.Option(None, "--rewards", help="Comma-separated reward names (default: the "
                                          "task's preset)."),
    reward_module: list[Path] | None = typer.Option(None, "--reward-module", help="Python file with custom "
                                                      "rewards (repeatable)."),
    accuracy_reward: str | None = typer.Option(None, "--accuracy-reward", help="Reward whose value > 0 means "
                                                  "correct (default: math_answer for --task math; without a "
                                                  "task, the first reward that checks the answer)."),
    num_samples: int = typer.Option(1, "--num-samples", "-k", min=1, help="Completions per prompt: reports "
                                    "pass@k (unbiased estimator) besides pass@1."),
    temperature: float | None = typer.Option(None, "--temperature", min=0.0, help="Sampling temperature "
                                                "(default: 0 = greedy for k=1, 1.0 for k>1)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Completion length limit, at "
                                              "least 1 (default: the training run's, else 256)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Evaluate only this many prompts."),
    dataset_split: str = typer.Option("train", "--dataset-split", help="Split of a hub or saved dataset."),
    format: str | None = typer.Option(None, "--format", help="dapo-math, gsm8k, question-answer, prompt-answer (default: the "
                                         "training run's, else detected from the columns)."),
    chat_template: str | None = typer.Option(None, "--chat-template", help="As in training (default: the "
                                                "template saved with a model OpenSloth trained, else auto)."),
    system_prompt: str | None = typer.Option(None, "--system-prompt", help="System prompt (default: the "
                                                "training run's, else the template's own)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Prompts generated at once."),
    rollout_engine: str = typer.Option("auto", "--rollout-engine", help="Generation engine, as in training: "
                                       "hf, vllm, or auto (vllm on a GPU if installed and usable, else hf)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="JSONL of every prompt, completion and "
                                          "score (default: eval_results.jsonl beside --model, or ./ for hub "
                                          "models)."),
    device: str = DEVICE,
    seed: int = SEED,
) -> None:
    """Generate over a dataset, score with every reward, report accuracy (pass@1, pass@k) and a JSONL."""
    from opensloth.config import resolve_config
    from opensloth.evaluate import describe_settings, evaluate, trained_with

    _check_model_dir(model)
    _check_device(device)
    _check_max_new_tokens(max_new_tokens)
    # Evaluate the model as it was trained: the run's system prompt, saved template, format, length.
    trained = trained_with(model)
    from_run: set[str] = set()
    if trained is not None:
        if system_prompt is None and trained.system_prompt is not None:
            system_prompt = trained.system_prompt
            from_run.add("system prompt")
        if format is None and trained.data_format is not None:
            format = trained.data_format
            from_run.add("format")
        if chat_template is None:
            chat_template = "model"  # the template training rendered with, saved with the tokenizer
            from_run.add("chat template")
        if max_new_tokens is None and trained.max_new_tokens is not None:
            max_new_tokens = trained.max_new_tokens
            from_run.add("max new tokens")
    chat_template = chat_template or "auto"
    max_new_tokens = max_new_tokens or 256
    console.print(describe_settings(trained, {"system prompt": system_prompt, "chat template": chat_template,
                                              "format": format, "max new tokens": max_new_tokens}, from_run),
                  markup=False, highlight=False)
    if output is None:
        base = Path(model) if Path(model).is_dir() else Path(".")
        output = base / f"eval_results{'_k' + str(num_samples) if num_samples > 1 else ''}.jsonl"
    overrides = dict(model=model, dataset=dataset, dataset_split=dataset_split, format=format, task=task,
                     rewards=rewards.split(",") if rewards else None, reward_modules=reward_module or None,
                     num_samples=limit, chat_template=chat_template, system_prompt=system_prompt,
                     max_new_tokens=max_new_tokens, seed=seed, backend="hf", rollout_engine=rollout_engine)
    cfg = resolve_config("grpo", None, overrides)
    result = evaluate(cfg, num_samples=num_samples, temperature=temperature, batch_size=batch_size,
                      output_file=output, accuracy_reward=accuracy_reward, device=device)
    table = Table(title=f"{escape(model)} on {escape(dataset)}: {plural(result.num_prompts, 'prompt')} x "
                  f"{plural(result.num_samples, 'sample')}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.summary.items():
        table.add_row(escape(key), f"{value:.4f}")
    console.print(table)
    console.print(f"Every completion with its scores: {escape(str(result.output_file))}")


@user_errors
def generate_command(
    prompt: str | None = typer.Argument(None, help="The user message (omit with --interactive)."),
    model: str = MODEL,
    interactive: bool = typer.Option(False, "--interactive", "-i", help="Chat turn by turn (one prompt each; "
                                     "empty line or Ctrl-D quits)."),
    system_prompt: str | None = typer.Option(None, "--system-prompt", help="System prompt (default: the "
                                                "training run's, else the template's own)."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling threshold."),
    num_samples: int = typer.Option(1, "--num-samples", "-n", min=1, help="Completions to print."),
    max_new_tokens: int = MAX_NEW,
    device: str = DEVICE,
    seed: int = SEED,
) -> None:
    """Complete one prompt (or chat with --interactive) using the model's saved chat template."""
    from opensloth.evaluate import describe_settings, generate, load_for_inference, render_chat, trained_with

    if prompt is None and not interactive:
        raise UserError('Give a prompt (os generate --model DIR "What is 2+3?") or pass --interactive.')
    _check_max_new_tokens(max_new_tokens)
    _check_device(device)
    _check_model_dir(model)
    trained = trained_with(model)
    from_run = set()
    if system_prompt is None and trained is not None and trained.system_prompt is not None and not raw:
        system_prompt = trained.system_prompt
        from_run.add("system prompt")
    if not raw:  # on stderr: stdout carries only the completions
        Console(stderr=True).print(describe_settings(trained, {"system prompt": system_prompt}, from_run),
                                   markup=False, highlight=False, style="dim")
    loaded, tokenizer = load_for_inference(model, device)

    def answer(text: str) -> None:
        rendered = text if raw else render_chat(tokenizer, text, system_prompt)
        outs = generate(loaded, tokenizer, [rendered], max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, num_samples=num_samples, seed=seed)[0]
        for i, out in enumerate(outs):
            if num_samples > 1:
                console.print(f"[bold]--- sample {i + 1}[/]")
            console.print(out, markup=False, highlight=False)

    if prompt is not None:
        answer(prompt)
    while interactive:
        try:
            text = console.input("[bold green]>>> [/]")
        except EOFError:
            break
        if not text.strip():
            break
        answer(text)


@user_errors
def export_command(
    model: Path = typer.Option(..., "--model", "-m", help="A saved LoRA adapter dir (training --output-dir)."),
    output: Path = typer.Option(..., "--output", "-o", help="Where the merged model goes."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16, float16 or float32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --output."),
    base_model: str | None = typer.Option(None, "--base-model", help="The base model to merge into, when it is "
                                          "no longer where the adapter's adapter_config.json says (a moved "
                                          "directory); default: the recorded one."),
) -> None:
    """Merge the LoRA adapter into its base weights: a plain transformers model (no PEFT needed)."""
    from opensloth.evaluate import export_merged

    if dtype not in ("bfloat16", "float16", "float32"):
        raise UserError(f"--dtype {dtype!r}: choose bfloat16, float16 or float32.")
    if not model.is_dir():
        raise UserError(f"--model {model}: no such directory. Pass a training --output-dir.")
    out = export_merged(model, output, dtype=dtype, overwrite=overwrite, base_model=base_model)
    console.print(f"Merged model ({dtype}) saved to {escape(str(out))}; load it with "
                  "AutoModelForCausalLM.from_pretrained.")


@user_errors
def plot_command(
    run_dir: Path = typer.Argument(..., help="A training --output-dir holding metrics.jsonl."),
) -> None:
    """Redraw training_curves.png from the run's metrics.jsonl."""
    from opensloth.tracking import plot_metrics

    if not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl: pass a training --output-dir.")
    out = plot_metrics(run_dir)
    if out is None:
        raise UserError(f"{run_dir / 'metrics.jsonl'} holds no numeric metrics to plot yet.")
    console.print(f"Wrote {escape(str(out))}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("generate")(generate_command)
    app.command("export")(export_command)
    app.command("plot")(plot_command)
