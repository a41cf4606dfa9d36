"""Every shipped example config (examples/*.yaml, globbed: a new file is tested without touching this one).

For each file:
- its header names the exact command that runs it (`os-train sft|grpo --config examples/<file>`), and
  every `os` / `os-train` command in its comments parses with the real CLI;
- it resolves into a valid config for that recipe, with no command-line help, and every value it
  writes survives into the resolved config (nested by section or flat);
- `os-train <recipe> --config <file> --dry-run`, the real CLI in a fresh process, exits 0 and prints
  that file's values: the config (model, devices, format, task, ...) and the plan (devices and
  worker count, model, output dir, global batch).
And across files: each 1-GPU file and its 8-GPU twin differ only in how the batch is split, and
the CPU demo configs and the code-task schema really run on the tiny offline model.

What a dry run needs here (no GPU, no internet): nothing from the hub. It never downloads a hub
model or dataset; it loads the tokenizer only when --model is an existing local directory (then it
checks the data cache). So hub names stay as written; local paths the files name (an SFT stage's
output, `os demo`'s files, a JSONL) get tiny stand-ins in a temporary working directory. It does
check GPU ids against the visible GPUs, so a child whose file names GPUs is told by torch that
exactly that many exist: all a dry run asks of CUDA.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml

from opensloth.config import RUN_CONFIGS, field_index, resolve_config, sections
from opensloth.data.synthetic import make_arithmetic_rows, write_rows

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
IDS = [p.name for p in EXAMPLES]
RUN_LINE = re.compile(r"^#\s+os-train (sft|grpo) --config (\S+)\s*$")
COMMAND_LINE = re.compile(r"^#\s+((?:os|os-train)\s.*)$")
LOCAL_SUFFIXES = {".json", ".jsonl", ".csv", ".parquet"}
# Settings that may differ between a 1-GPU file and its 8-GPU twin: how the batch is split.
BATCH_SPLIT = {("distributed", "devices"), ("training", "per_device_train_batch_size"),
               ("training", "gradient_accumulation_steps")}


def header(path: Path) -> list[str]:
    """The comment lines before the first setting."""
    lines = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            break
        lines.append(line)
    return lines


def recipe_of(path: Path) -> str:
    """The recipe of the run command in the file's header (which must name this very file)."""
    runs = {m.group(1) for m in map(RUN_LINE.match, header(path)) if m and m.group(2) == f"examples/{path.name}"}
    assert runs, f"{path.name}: the header shows no run command `os-train sft|grpo --config examples/{path.name}`"
    assert len(runs) == 1, f"{path.name}: the header runs it as both sft and grpo"
    return runs.pop()


def file_values(path: Path, recipe: str) -> dict[tuple[str, str], object]:
    """(section, field) -> value for every setting the file writes, nested by section or flat."""
    run_cls = RUN_CONFIGS[recipe]
    index, names = field_index(run_cls), set(sections(run_cls))
    out: dict[tuple[str, str], object] = {}
    for key, value in (yaml.safe_load(path.read_text()) or {}).items():
        key = key.replace("-", "_")
        if key in names and isinstance(value, dict):
            out.update({(key, sub.replace("-", "_")): sub_value for sub, sub_value in value.items()})
        elif key != "recipe":
            out[(index[key][0], key)] = value
    return out


def resolved(path: Path) -> dict:
    """The file's resolved config, as the JSON-like dict that config.yaml and --dry-run print."""
    return json.loads(resolve_config(recipe_of(path), path).model_dump_json())


def world_size(devices: str) -> int:
    if devices in ("cpu", "auto"):
        return 1
    if devices.startswith("cpu:"):
        return int(devices[4:])
    return len(devices.split(","))


def gpu_ids(devices: str) -> list[int]:
    return [] if devices == "auto" or devices.startswith("cpu") else [int(i) for i in devices.split(",")]


def is_local(value: str | None) -> bool:
    """A path the file names relative to the repository root (not a hub name like Qwen/Qwen2.5-0.5B)."""
    return bool(value) and (value.startswith(("outputs/", "data/", "./")) or Path(value).suffix in LOCAL_SUFFIXES)


def code_task_rows(path: Path) -> list[dict]:
    """The example JSONL line(s) a file's header shows (`#   {"prompt": ...}`), parsed."""
    return [json.loads(line.lstrip("# ")) for line in header(path) if line.lstrip("# ").startswith("{")]


def write_stand_in_dataset(path: Path, cfg: dict, example: Path) -> None:
    """A few rows in the schema that the file's --format reads."""
    fmt = cfg["data"]["format"]
    if fmt == "openmath-reasoning":
        write_rows(make_arithmetic_rows(8, schema="openmath"), path)
    elif fmt == "dapo-math":
        write_rows(make_arithmetic_rows(8, schema="dapo"), path)
    elif cfg.get("grpo", {}).get("task") == "code":
        write_rows(code_task_rows(example) * 4, path)
    else:
        write_rows(make_arithmetic_rows(8, schema="prompt-answer"), path)


def os_train(*args: str, cwd: Path, gpus: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `os-train` in a fresh process, offline, output wide enough that rich wraps nothing.
    With `gpus`, torch in the child reports that many CUDA GPUs (for `--devices 0,1,...`)."""
    fake = f"import torch; torch.cuda.is_available = lambda: True; torch.cuda.device_count = lambda: {gpus}; "
    code = (fake if gpus else "") + "from opensloth.cli.train import app; app()"
    env = {**os.environ, "COLUMNS": "400", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OPENSLOTH_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def parse_dry_run(stdout: str, recipe: str) -> tuple[dict, dict[str, str]]:
    """--dry-run prints the resolved config as YAML, then the plan as a table titled `os-train <recipe>`."""
    lines = stdout.splitlines()
    title = next(i for i, line in enumerate(lines) if line.strip() == f"os-train {recipe}")
    config = yaml.safe_load("\n".join(lines[:title]))
    plan: dict[str, str] = {}
    last = None
    for line in lines[title + 1:]:
        if not line.startswith("│"):
            continue
        name, value = (cell.strip() for cell in line.strip().strip("│").split("│", 1))
        if name:
            plan[name], last = value, name
        elif last:  # a wrapped cell continues on the next line
            plan[last] += " " + value
    return config, plan


def test_examples_are_shipped():
    names = set(IDS)
    for model in ("qwen2.5-0.5b", "qwen2.5-1.5b"):
        for stage in ("sft", "grpo"):
            assert {f"{model}_{stage}_1gpu.yaml", f"{model}_{stage}_8gpu.yaml"} <= names
    assert any("code" in n for n in names) and any("cpu_demo" in n for n in names)


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_header_says_what_and_how_to_run(path: Path):
    lines = [line.lstrip("# ").strip() for line in header(path)]
    assert len([line for line in lines if line]) >= 3, f"{path.name}: say what the config is for"
    assert recipe_of(path) in ("sft", "grpo")


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_commands_in_comments_parse(path: Path):
    """Every `os` / `os-train` command a file's comments show parses (flags, types), as in test_docs.py."""
    from opensloth.cli.main import app as os_app
    from opensloth.cli.train import app as train_app

    commands = [m.group(1) for m in map(COMMAND_LINE.match, path.read_text().splitlines()) if m]
    assert commands
    for line in commands:
        argv = shlex.split(line.split("  #")[0])
        command = typer.main.get_command(train_app if argv[0] == "os-train" else os_app)
        args = argv[1:]
        ctx = command.make_context(argv[0], [], resilient_parsing=True)
        while hasattr(command, "get_command"):  # a group: os-train sft -> the leaf command
            name, args = args[0], args[1:]
            command = command.get_command(ctx, name)
            assert command is not None, f"{path.name}: unknown command {name!r} in: {line}"
        command.make_context(name, list(args), parent=ctx)  # raises on an unknown flag or a bad value


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_resolves_for_its_recipe_without_overrides(path: Path):
    recipe = recipe_of(path)
    cfg = resolved(path)
    assert cfg["recipe"] == recipe
    written = file_values(path, recipe)
    assert ("model", "model") in written and ("distributed", "devices") in written, \
        f"{path.name}: name the model and the devices explicitly"
    for (section, key), value in written.items():
        assert cfg[section][key] == value, f"{path.name}: {section}.{key}"


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_dry_run_shows_the_file(path: Path, tmp_path: Path, tiny_model_dir: Path):
    recipe, cfg = recipe_of(path), resolved(path)
    model, dataset = cfg["model"]["model"], cfg["data"]["dataset"]
    if is_local(model):  # an earlier stage's output or `os demo`'s model: the dry run loads its tokenizer
        (tmp_path / model).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / model).symlink_to(tiny_model_dir, target_is_directory=True)
    if is_local(dataset):
        write_stand_in_dataset(tmp_path / dataset, cfg, path)
    devices = cfg["distributed"]["devices"]
    ids, world = gpu_ids(devices), world_size(devices)

    proc = os_train(recipe, "--config", str(path), "--dry-run", cwd=tmp_path, gpus=max(ids, default=-1) + 1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    printed, plan = parse_dry_run(proc.stdout, recipe)

    assert printed == cfg  # the whole resolved config, so every value the file sets (file_values above)
    for (section, key), value in file_values(path, recipe).items():
        assert printed[section][key] == value, f"{section}.{key}"
    assert plan["model"] == model
    assert plan["output dir"] == cfg["training"]["output_dir"]
    workers = f"({world} worker{'s' if world > 1 else ''},"
    shown = "GPU " + ",".join(map(str, ids)) if ids else "cpu"
    assert plan["devices"].startswith(f"{shown} {workers}"), plan["devices"]
    t = cfg["training"]
    if recipe == "sft":
        per_step = t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * world
        assert plan["global batch"].startswith(f"{per_step} sequences per step"), plan["global batch"]
    else:
        g = cfg["grpo"]
        assert plan["global batch"].startswith(f"{g['rollout_batch_size']} prompts x {g['group_size']} completions")
        per_worker = g["rollout_batch_size"] // world * g["group_size"]
        minibatch = t["per_device_train_batch_size"] * t["gradient_accumulation_steps"]
        updates = -(-per_worker // minibatch) * g["epochs_per_rollout_batch"]
        assert plan["updates"].startswith(f"{updates} optimizer step"), plan["updates"]
    if is_local(model) and is_local(dataset):
        assert "cache miss" in plan["data"], plan["data"]  # the tokenizer was loaded, the cache key computed
    else:
        assert plan["data"].startswith(dataset), plan["data"]


PAIRS = [(p, p.with_name(p.name.replace("_1gpu", "_8gpu"))) for p in EXAMPLES
         if "_1gpu" in p.name and p.with_name(p.name.replace("_1gpu", "_8gpu")).is_file()]


def test_every_tutorial_config_has_both_variants():
    assert len(PAIRS) >= 4


@pytest.mark.parametrize("one, eight", PAIRS, ids=[p.name for p, _ in PAIRS])
def test_8gpu_twin_trains_like_the_1gpu_file(one: Path, eight: Path):
    """Same run, same optimizer batch (per device x accumulation x GPUs); only the split differs."""
    a, b = resolved(one), resolved(eight)
    assert world_size(a["distributed"]["devices"]) == 1 and world_size(b["distributed"]["devices"]) == 8

    def batch(cfg: dict) -> int:
        t = cfg["training"]
        return t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * world_size(
            cfg["distributed"]["devices"])

    assert batch(a) == batch(b)
    for cfg in (a, b):
        for section, key in BATCH_SPLIT:
            cfg[section].pop(key)
    assert a == b


@pytest.mark.parametrize("path", [p for p in EXAMPLES if code_task_rows(p)],
                         ids=[p.name for p in EXAMPLES if code_task_rows(p)])
def test_code_task_schema_prepares(path: Path, tmp_path: Path, tiny_model_dir: Path):
    """The task rows the header shows fit the file's format, and their tests column reaches the rewards."""
    from opensloth.data import load_prepared

    recipe, cfg = recipe_of(path), resolved(path)
    rows = code_task_rows(path)
    assert all("prompt" in row and "tests" in row for row in rows)
    write_rows(rows * 4, tmp_path / cfg["data"]["dataset"])
    proc = os_train("data", recipe, "--config", str(path), "--model", str(tiny_model_dir), "--num-workers", "1",
                    "--output-path", str(tmp_path / "prepared"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shard = load_prepared(tmp_path / "prepared").load_shard(0)
    assert len(shard) > 0 and "tests" in shard.column_names
    assert shard[0]["tests"] == rows[0]["tests"]


@pytest.mark.slow
def test_cpu_demo_configs_run(tmp_path: Path):
    """cpu_demo_sft.yaml then cpu_demo_grpo.yaml, a few steps each, on files laid out as `os demo` writes them."""
    from opensloth.demo import DemoSettings
    from opensloth.models.tiny import build_tiny_model

    s = DemoSettings()
    demo = tmp_path / "outputs" / "demo"
    build_tiny_model(demo / "base_model", hidden_size=s.hidden_size, num_layers=s.num_layers, seed=s.seed)
    write_rows(make_arithmetic_rows(64, seed=0, schema="openmath"), demo / "data" / "openmath_reasoning_mini.jsonl")
    write_rows(make_arithmetic_rows(32, seed=1, schema="dapo"), demo / "data" / "dapo_math.jsonl")

    sft = os_train("sft", "--config", str(ROOT / "examples" / "cpu_demo_sft.yaml"), "--max-steps", "2",
                   "--report-to", "none", cwd=tmp_path)
    assert sft.returncode == 0, sft.stdout[-3000:] + sft.stderr[-3000:]
    sft_dir = tmp_path / resolved(ROOT / "examples" / "cpu_demo_sft.yaml")["training"]["output_dir"]
    assert (sft_dir / "config.json").is_file()
    grpo_cfg = resolved(ROOT / "examples" / "cpu_demo_grpo.yaml")
    assert tmp_path / grpo_cfg["model"]["model"] == sft_dir  # stage 2 reads what stage 1 wrote

    grpo = os_train("grpo", "--config", str(ROOT / "examples" / "cpu_demo_grpo.yaml"), "--max-steps", "1",
                    "--report-to", "none", cwd=tmp_path)
    assert grpo.returncode == 0, grpo.stdout[-3000:] + grpo.stderr[-3000:]
    grpo_dir = tmp_path / grpo_cfg["training"]["output_dir"]
    assert (grpo_dir / "adapter_config.json").is_file()
    metrics = [json.loads(line) for line in (grpo_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("reward" in row for row in metrics)
