"""Imports flow one way: cli -> launch -> recipes -> library packages -> grpo -> torch.

Read from the source (every import statement, including those inside functions), so a lazy
import of a higher layer is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "opensloth"

# Higher may import lower, and modules of one rank each other (library packages, config and
# errors, recipes and evaluate); a top-level module
# not listed here (a new helper module) is treated as a library module.
RANKS = {
    "cli": 5,
    "demo": 5,  # `os demo` drives the whole pipeline (launch, evaluate) like a CLI command
    "launch": 4,
    "recipes": 3,
    "evaluate": 3,  # composes models, data and rewards for `os eval`, like a recipe
    "grpo": 1,
    "config": 0,
    "trl_names": 0,  # TRL's config vocabulary, read by config.py
    "errors": 0,
}
LIBRARY_RANK = 2
# grpo/ is pure torch math: no model libraries, no config objects, no other opensloth package.
GRPO_FORBIDDEN_THIRD_PARTY = ("transformers", "peft", "trl", "unsloth", "vllm", "datasets", "accelerate")


def _component(module: str) -> str:
    """'opensloth.rollout.hf' -> 'rollout'; 'opensloth' -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _rank(component: str) -> int:
    return RANKS.get(component, LIBRARY_RANK)


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative imports resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # `from opensloth import recipes` imports the package `opensloth.recipes`.
            if name == "opensloth":
                found += [(node.lineno, f"opensloth.{alias.name}") for alias in node.names]
    return found


SOURCES = sorted(SRC.rglob("*.py"))


def test_sources_found():
    assert any(p.parts[-2:] == ("grpo", "core.py") for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_only_flow_downward(path):
    here = _component(_module_name(path))
    violations = []
    for line, name in _imports(path):
        if not name.startswith("opensloth.") or here == "":
            continue
        there = _component(name)
        if there == here:
            continue
        if _rank(there) > _rank(here):
            violations.append(f"line {line}: {name} ({there}, layer {_rank(there)}) imported by {here} "
                              f"(layer {_rank(here)})")
    assert not violations, f"{path.relative_to(SRC)} imports upward:\n" + "\n".join(violations)


@pytest.mark.parametrize("path", sorted((SRC / "grpo").rglob("*.py")), ids=lambda p: p.name)
def test_grpo_is_pure_torch(path):
    bad = []
    for line, name in _imports(path):
        top = name.split(".")[0]
        if top in GRPO_FORBIDDEN_THIRD_PARTY:
            bad.append(f"line {line}: {name}")
        if name.startswith("opensloth.") and _component(name) != "grpo":
            bad.append(f"line {line}: {name} (grpo/ may import only opensloth.grpo)")
    assert not bad, f"grpo/{path.name}:\n" + "\n".join(bad)


def test_importing_grpo_does_not_load_transformers_or_config():
    code = ("import sys, opensloth.grpo; "
            "bad = [m for m in ('transformers', 'peft', 'opensloth.config', 'opensloth.recipes') if m in sys.modules]; "
            "sys.exit(str(bad) if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_checker_catches_an_upward_import(tmp_path, monkeypatch):
    """The rule itself: a library module importing a recipe is flagged, a recipe importing it is not."""
    fake = tmp_path / "opensloth"
    (fake / "rollout").mkdir(parents=True)
    (fake / "recipes").mkdir()
    (fake / "rollout" / "x.py").write_text("def f():\n    from opensloth.recipes import grpo\n")
    (fake / "recipes" / "y.py").write_text("from ..rollout import x\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    with pytest.raises(AssertionError, match="opensloth.recipes"):
        test_imports_only_flow_downward(fake / "rollout" / "x.py")
    test_imports_only_flow_downward(fake / "recipes" / "y.py")
