"""Glue between Typer and config.py: config-driven options and the one place user errors print."""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

from opensloth.config import RunConfig, config_cli_parameters, overrides_from_cli, resolve_config
from opensloth.errors import TrainingStopped, UserError

err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print one clear error line (no traceback) and exit non-zero."""
    err_console.print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True, markup=True)
    # SystemExit (not typer.Exit) so plain scripts that reuse `user_errors` exit cleanly too.
    raise SystemExit(code)


def user_errors(fn: Callable) -> Callable:
    """Turn UserError into one message and exit 2 (`--debug` keeps the traceback); a run stopped by
    Ctrl-C/SIGTERM exits 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            if "--debug" in sys.argv:
                raise
            fail(str(exc))
        except TrainingStopped as exc:
            err_console.print(f"[yellow]{escape(str(exc))}[/]", highlight=False, soft_wrap=True)
            raise SystemExit(130)
        except KeyboardInterrupt:
            err_console.print("[yellow]Interrupted.[/]")
            raise SystemExit(130)

    return wrapper


def config_command(recipe: str) -> Callable:
    """Decorate `fn(cfg, **own_options)`: adds `--config` and one option per config field.

    The wrapper resolves defaults < YAML < CLI into a validated RunConfig and calls fn(cfg, ...).
    """

    def decorator(fn: Callable) -> Callable:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for name, p in inspect.signature(fn).parameters.items() if name != "cfg"]
        config_param = inspect.Parameter(
            "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
            default=typer.Option(None, "--config", "-c", help="YAML config file; CLI options override it.",
                                 rich_help_panel="General"),
        )
        field_params = config_cli_parameters(recipe)
        field_names = {p.name for p in field_params}

        @functools.wraps(fn)
        @user_errors
        def wrapper(**kwargs: Any):
            config_path = kwargs.pop("config", None)
            field_values = {k: kwargs.pop(k) for k in list(kwargs) if k in field_names}
            cfg = resolve_config(recipe, config_path, overrides_from_cli(recipe, field_values))
            return fn(cfg, **kwargs)

        wrapper.__signature__ = inspect.Signature([config_param, *own, *field_params])
        return wrapper

    return decorator


def resolved_config_command_help(cfg: RunConfig) -> str:  # pragma: no cover - tiny helper
    return cfg.model_dump_json(indent=2)
