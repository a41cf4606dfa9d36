"""code_correctness: extract a Python block, check its syntax, run the row's tests in the sandbox."""

from __future__ import annotations

import ast
import json
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from opensloth.rewards.base import RewardFunction, completion_text, register_reward_function
from opensloth.rewards.sandbox import DEFAULT_LIMITS, SandboxLimits, run_python

_FENCE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str | None:
    """The last ```python fenced block (else the last unlabelled ``` block), or None.

    >>> extract_code("Here:\\n```python\\nprint(1)\\n```")
    'print(1)\\n'
    """
    blocks = _FENCE.findall(text)
    labelled = [code for lang, code in blocks if lang]
    chosen = labelled or [code for _, code in blocks]
    return chosen[-1] if chosen and chosen[-1].strip() else None


def normalize_tests(tests: Any) -> tuple[list[str], list[tuple[str, str]]]:
    """A row's `tests` value as (assert statements, (stdin, expected stdout) pairs).

    Accepts a list of assert strings, one string of assert lines, a list of {"input", "output"}
    dicts, a {"inputs": [...], "outputs": [...]} dict (APPS style), or any of these as JSON text.
    """
    if tests is None:
        return [], []
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except ValueError:
            return [line for line in tests.splitlines() if line.strip()], []
    if isinstance(tests, dict) and "inputs" in tests:
        return [], [(str(i), str(o)) for i, o in zip(tests["inputs"], tests["outputs"])]
    asserts, pairs = [], []
    for test in tests if isinstance(tests, (list, tuple)) else [tests]:
        if isinstance(test, dict):
            pairs.append((str(test.get("input", "")), str(test.get("output", ""))))
        elif isinstance(test, str) and test.strip():
            asserts.append(test)
    return asserts, pairs


# The harness runs the solution once per test, counts passes, and ends with a line carrying a
# random token, so a program that exits early (os._exit(0)) cannot pass for "all tests ran".
_HARNESS = r'''
import io as _io, sys as _sys
_solution = {solution!r}
_asserts = {asserts!r}
_pairs = {pairs!r}
_passed = 0
_stdout = _sys.stdout
for _test in _asserts:
    _scope = {{"__name__": "__main__"}}
    _sys.stdout = _io.StringIO()  # the program's own prints must not push the result line out
    try:
        exec(_solution, _scope)
        exec(_test, _scope)
        _passed += 1
    except BaseException:
        pass
    _sys.stdout = _stdout
for _given, _expected in _pairs:
    _sys.stdin, _sys.stdout = _io.StringIO(_given), _io.StringIO()
    try:
        exec(_solution, {{"__name__": "__main__"}})
    except SystemExit:
        pass
    except BaseException:
        _sys.stdout = _io.StringIO()
    _got, _sys.stdout = _sys.stdout.getvalue(), _stdout
    if _got.split() == _expected.split():
        _passed += 1
print("{token}", _passed)
'''


class CodeCorrectnessReward(RewardFunction):
    """Scores the last ```python block of a completion, in [0, 1].

    - 0.0: no code block, or code that is not valid Python;
    - without tests for the row: 1.0 for valid syntax (all that can be checked);
    - with tests (a `tests` column: assert statements, or stdin/stdout pairs): 0.2 for valid
      syntax + 0.8 x the fraction of tests passed. All tests of one completion run in one
      sandboxed subprocess (see opensloth.rewards.sandbox for its limits); completions run in
      parallel, `workers` at a time.

    Example:
        >>> code_correctness([""], ["```python\\ndef f(x):\\n    return x + 1\\n```"], tests=[["assert f(1) == 2"]])
        [1.0]
    """

    name = "code_correctness"
    description = "Last ```python block: 0 if missing/invalid; valid syntax 0.2 + 0.8 x tests passed (sandboxed)."
    self_limited = True  # the sandbox kills what overruns its wall-time limit

    def __init__(self, limits: SandboxLimits = DEFAULT_LIMITS, max_tests: int = 16, workers: int = 4):
        self.limits, self.max_tests, self.workers = limits, max_tests, workers

    def score(self, prompts, completions, **columns):
        tests = columns.get("tests") or columns.get("test_cases") or [None] * len(completions)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self.score_one, [completion_text(c) for c in completions], tests))

    def score_one(self, text: str, tests: Any) -> float:
        code = extract_code(text)
        if code is None:
            return 0.0
        try:
            ast.parse(code)
        except (SyntaxError, ValueError):
            return 0.0
        asserts, pairs = normalize_tests(tests)
        asserts, pairs = asserts[: self.max_tests], pairs[: self.max_tests]
        total = len(asserts) + len(pairs)
        if total == 0:
            return 1.0
        token = secrets.token_hex(16)
        result = run_python(_HARNESS.format(solution=code, asserts=asserts, pairs=pairs, token=token),
                            limits=self.limits)
        passed = 0
        for line in result.stdout.splitlines()[::-1]:
            if line.startswith(token + " "):
                passed = min(int(line.split()[1]), total)
                break
        return round(0.2 + 0.8 * passed / total, 6)


code_correctness = CodeCorrectnessReward()
register_reward_function(code_correctness)
