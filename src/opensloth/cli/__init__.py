"""Typer apps: `os-train` (sft, grpo, data) and `os` (list-rewards, info, demo, eval, ...).

The CLI only parses, validates and dispatches; the work happens in launch/ and recipes/.
"""
