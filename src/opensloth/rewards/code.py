"""code_correctness: extract a Python block, check its syntax, grade the row's tests in the sandbox.

Grading that model-written code cannot change: the expected values never enter the sandboxed
process. Each assert test is split by parsing (`split_test`): the parts that run the solution
(calls of names that are not plain builtins, e.g. `add(1, 2)`, `Solution().f(x)`) are shipped to
the sandbox, which reports their values as plain data (None, bool, int, float, str, bytes and
lists, tuples, dicts, sets of those, checked by exact type: a subclass or an object with its own
`__eq__` is not plain data and fails; Counter/OrderedDict/defaultdict, numpy scalars, Fraction and
Decimal are projected, see opensloth/rewards/_harness.py); everything else (`==`, `<`, `in`, `abs(... - x) < tol`,
`math.isclose`, `sorted`, `len`, the expected literal) is evaluated here, by a small evaluator
that knows only literals, arithmetic and a few pure builtins (`safe_eval`). For stdin/stdout
tests the sandbox reports the program's stdout and the comparison happens here.

The sandbox writes one record per test as soon as that test has run; a test with no record, more
than one, or a malformed one fails. A test that cannot be split safely (`assert f(x) == Node(1)`,
where the expected side would run other model code; a loop; a `def check(candidate)` block) is
reported when the data is prepared (`CodeCorrectnessReward.check_dataset`) and fails if it reaches
scoring anyway.
Both sides calling the same function (`f(x) == f(y)`) are both reported and compared here; an
assert of literals only (`assert True`) is evaluated here and, when true, is not a test.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import math
import operator
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

from opensloth.errors import UserError
from opensloth.rewards.base import RewardFunction, completion_text, register_reward_function
from opensloth.rewards.sandbox import DEFAULT_LIMITS, SandboxLimits, run_harness, sandbox_interpreter

logger = logging.getLogger(__name__)

DEFAULT_TEST_TIMEOUT_S = 2.0  # --code-test-timeout

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


# ---------------------------------------------------------------------------------------------
# The parent side: splitting asserts and evaluating their expected side without model code.
# ---------------------------------------------------------------------------------------------

_SAFE_FUNCS: dict[str, Any] = {
    f.__name__: f for f in (abs, len, sorted, set, frozenset, list, tuple, dict, str, int, float, bool, round, min,
                            max, sum, all, any, isinstance, type, repr, bytes, range)
}
_SAFE_TYPES = {"int", "float", "str", "bool", "list", "tuple", "dict", "set", "frozenset", "bytes", "type"}
_SAFE_MATH = {name: getattr(math, name) for name in ("isclose", "isnan", "isinf", "isfinite", "fabs", "floor", "ceil",
                                                     "sqrt", "pi", "e", "inf", "nan", "tau")}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
           ast.BitAnd: operator.and_, ast.BitOr: operator.or_, ast.BitXor: operator.xor,
           ast.LShift: operator.lshift, ast.RShift: operator.rshift}
_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
           ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}
_MAX_SIZE = 10_000_000  # elements/digits a parent-side operation may build from untrusted values


class UnsplittableTest(ValueError):
    """An assert test whose expected side cannot be evaluated without running model code."""


class _Slot(ast.expr):
    """Placeholder for a sub-expression that runs in the sandbox: its value is `values[index]`."""

    _fields = ()

    def __init__(self, index: int):
        super().__init__()
        self.index = index


@dataclass(frozen=True)
class SplitTest:
    """An assert test split in two: `calls` (source, run in the sandbox) and `check` (the assert's
    expression with each call replaced by a slot, evaluated here by `safe_eval`).

    `consume[i]`: call i is the argument of list/tuple/set/frozenset/sorted/sum/min/max/any/all/dict,
    so the sandbox iterates a generator (or any other iterable that is not plain data) it returns.
    No calls: a test of literals only (`assert True`), evaluated here alone.
    """

    calls: tuple[str, ...]
    check: ast.expr
    consume: tuple[bool, ...] = ()

    def passed(self, values: tuple) -> bool:
        return bool(safe_eval(self.check, values))

    @property
    def constant(self) -> bool:
        return not self.calls


# The builtins that iterate their first argument: the sandbox consumes an iterator passed to them.
_CONSUMERS = {"list", "tuple", "set", "frozenset", "sorted", "sum", "min", "max", "any", "all", "dict"}


def _is_safe_callee(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in _SAFE_FUNCS
    return (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "math"
            and func.attr in _SAFE_MATH and callable(_SAFE_MATH[func.attr]))


def _carve(node: ast.expr, calls: list[str], consume: list[bool]) -> ast.expr:
    """`node` with every sub-expression that needs the solution replaced by a _Slot; fills `calls`
    (their source) and `consume` (whether a consuming builtin wraps each)."""

    def slot(expr: ast.expr, eat: bool) -> _Slot:
        calls.append(ast.unparse(expr))
        consume.append(eat)
        return _Slot(len(calls) - 1)

    def walk(n: ast.expr, eat: bool = False) -> ast.expr:
        if isinstance(n, ast.Constant):
            return n
        if isinstance(n, ast.Name):
            return n if n.id in _SAFE_TYPES or n.id in _SAFE_FUNCS else slot(n, eat)
        if isinstance(n, ast.Attribute):
            if isinstance(n.value, ast.Name) and n.value.id == "math" and n.attr in _SAFE_MATH:
                return n
            return slot(n, eat)
        if isinstance(n, ast.Call):
            if not _is_safe_callee(n.func):
                return slot(n, eat)
            if any(isinstance(a, ast.Starred) for a in n.args) or any(k.arg is None for k in n.keywords):
                raise UnsplittableTest("*args/**kwargs in a builtin call")
            eats = isinstance(n.func, ast.Name) and n.func.id in _CONSUMERS
            return ast.Call(n.func, [walk(a, eats and i == 0) for i, a in enumerate(n.args)],
                            [ast.keyword(k.arg, walk(k.value)) for k in n.keywords])
        if isinstance(n, (ast.Tuple, ast.List, ast.Set)):
            if any(isinstance(e, ast.Starred) for e in n.elts):
                raise UnsplittableTest("a starred element")
            return type(n)([walk(e) for e in n.elts], ast.Load()) if not isinstance(n, ast.Set) else ast.Set(
                [walk(e) for e in n.elts])
        if isinstance(n, ast.Dict):
            if any(k is None for k in n.keys):
                raise UnsplittableTest("a ** in a dict literal")
            return ast.Dict([walk(k) for k in n.keys], [walk(v) for v in n.values])
        if isinstance(n, ast.BinOp) and type(n.op) in _BINOPS:
            return ast.BinOp(walk(n.left), n.op, walk(n.right))
        if isinstance(n, ast.UnaryOp):
            return ast.UnaryOp(n.op, walk(n.operand))
        if isinstance(n, ast.BoolOp):
            return ast.BoolOp(n.op, [walk(v) for v in n.values])
        if isinstance(n, ast.Compare):
            first = len(calls)
            operands = [walk(n.left), *(walk(c) for c in n.comparators)]
            if all(_has_slot(o) for o in operands) and not _one_function(calls[first:]):
                raise UnsplittableTest(
                    f"both sides of `{ast.unparse(n)}` run model code; one side must be a plain value "
                    "(literals, arithmetic, sorted/len/set/..., math.*), or both sides call the same "
                    "function of the solution (`f(x) == f(y)`)")
            return ast.Compare(operands[0], n.ops, operands[1:])
        if isinstance(n, ast.Subscript):
            return ast.Subscript(walk(n.value), walk(n.slice), ast.Load())
        if isinstance(n, ast.Slice):
            return ast.Slice(*(walk(x) if x is not None else None for x in (n.lower, n.upper, n.step)))
        if isinstance(n, ast.IfExp):
            return ast.IfExp(walk(n.test), walk(n.body), walk(n.orelse))
        raise UnsplittableTest(f"`{type(n).__name__}` ({ast.unparse(n)!r}) cannot be evaluated outside the sandbox")

    return walk(node)


def _one_function(calls: list[str]) -> bool:
    """Are these sandboxed expressions all calls of one plain function name (`f(1)`, `f(2)`)?

    Such a comparison (`assert tuple(f(x)) == tuple(f(y))`, a property of f) is graded on both
    values, serialised by the sandbox and compared here, as Python would. Mixed names
    (`f(1) == Node(1)`) stay refused: the solution defines Node, so Node(1) could be made to
    return whatever f(1) returns.
    """
    names = set()
    for call in calls:
        expr = ast.parse(call, mode="eval").body
        if not (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name)):
            return False
        names.add(expr.func.id)
    return len(names) == 1


def _has_slot(node: ast.AST) -> bool:
    return any(isinstance(n, _Slot) for n in ast.walk(node))


def split_test(test: str) -> SplitTest:
    """Split one assert statement into the calls that run in the sandbox and the check done here.

    The builtins a test uses (sorted, len, abs, math.isclose, ...) are always the real ones,
    evaluated here, even when the solution defines a function of the same name: a solution cannot
    redefine how it is checked. A test of a task named like a builtin (`sum`) is therefore
    reported as not calling the solution.

    Args:
        test: `assert EXPR` or `assert EXPR, message` (one statement).

    Raises:
        UnsplittableTest: not a single assert, a construct the evaluator does not know (lambda,
            comprehension, f-string, ...), a comparison whose every side runs model code, or no
            call of the solution at all.

    Example:
        >>> split_test("assert add(1, 2) == 3").calls
        ('add(1, 2)',)
    """
    try:
        tree = ast.parse(test.strip())
    except SyntaxError as exc:
        raise UnsplittableTest(f"not valid Python: {exc.msg}") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        raise UnsplittableTest("not a single `assert` statement (setup code, loops and def check() blocks "
                               "cannot be split into the call and its expected value)")
    calls: list[str] = []
    consume: list[bool] = []
    check = _carve(tree.body[0].test, calls, consume)
    if not calls:
        if any(isinstance(n, (ast.Call, ast.Name)) for n in ast.walk(check)):
            raise UnsplittableTest("it does not call the solution (only literals and builtins)")
        return SplitTest((), check)  # `assert True`: literals only, evaluated here (see score_one)
    return SplitTest(tuple(calls), check, tuple(consume))


def _check_size(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * _MAX_SIZE:
        raise OverflowError("integer too large")
    return value


def safe_eval(node: ast.AST, values: tuple = ()) -> Any:
    """Evaluate a carved test expression (or a literal) here, with `values` in its slots.

    Only literals, arithmetic, comparisons, subscripts, a few pure builtins and math functions;
    operations that could build huge objects from untrusted values (x ** n, s * n, x << n) are
    size-checked. Raises on anything else.
    """
    ev = lambda n: safe_eval(n, values)  # noqa: E731 - local shorthand
    if isinstance(node, ast.Expression):
        return ev(node.body)
    if isinstance(node, _Slot):
        return values[node.index]
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in _SAFE_FUNCS:
            return _SAFE_FUNCS[node.id]
        raise ValueError(f"unknown name {node.id}")
    if isinstance(node, ast.Attribute):
        return _SAFE_MATH[node.attr]
    if isinstance(node, (ast.Tuple, ast.List)):
        return (tuple if isinstance(node, ast.Tuple) else list)(ev(e) for e in node.elts)
    if isinstance(node, ast.Set):
        return {ev(e) for e in node.elts}
    if isinstance(node, ast.Dict):
        return {ev(k): ev(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.BinOp):
        left, right = ev(node.left), ev(node.right)
        op = type(node.op)
        if op is ast.Pow and isinstance(right, int) and abs(right) > 10_000 and abs(left) not in (0, 1):
            raise OverflowError("exponent too large")
        if op is ast.LShift and isinstance(right, int) and right > 4 * _MAX_SIZE:
            raise OverflowError("shift too large")
        if op is ast.Mult:
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_SIZE:
                    raise OverflowError("repetition too large")
        return _check_size(_BINOPS[op](left, right))
    if isinstance(node, ast.UnaryOp):
        return {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_,
                ast.Invert: operator.invert}[type(node.op)](ev(node.operand))
    if isinstance(node, ast.BoolOp):
        result = None
        for value in node.values:
            result = ev(value)
            if isinstance(node.op, ast.And) != bool(result):
                return result
        return result
    if isinstance(node, ast.Compare):
        left = ev(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            right = ev(comparator)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Subscript):
        return ev(node.value)[ev(node.slice)]
    if isinstance(node, ast.Slice):
        return slice(*(ev(x) if x is not None else None for x in (node.lower, node.upper, node.step)))
    if isinstance(node, ast.IfExp):
        return ev(node.body) if ev(node.test) else ev(node.orelse)
    if isinstance(node, ast.Call):
        func = ev(node.func)
        args = [ev(a) for a in node.args]
        if func in (range, bytes) and any(isinstance(a, int) and abs(a) > _MAX_SIZE for a in args):
            raise OverflowError(f"{func.__name__}() too large")
        return func(*args, **{k.arg: ev(k.value) for k in node.keywords})
    raise ValueError(f"{type(node).__name__} is not allowed")


_PLAIN_CALLS = {("float", "nan"), ("float", "inf"), ("float", "-inf"), ("set",), ("frozenset",)}


def _int_literal(node: ast.AST) -> int | None:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _int_literal(node.operand)
        return None if value is None else -value
    return node.value if isinstance(node, ast.Constant) and type(node.value) is int else None


def _exact_number(node: ast.Call) -> ast.Constant | None:
    """`Fraction(n, d)` / `Decimal('text')` as the harness writes them, rebuilt here (exact, as the
    solution's value compares), or None when the call is anything else."""
    if not isinstance(node.func, ast.Name) or node.keywords:
        return None
    args = node.args
    try:
        if node.func.id == "Fraction" and len(args) == 2:
            n, d = _int_literal(args[0]), _int_literal(args[1])
            if n is None or d is None or d <= 0 or max(abs(n), d).bit_length() > 65_536:  # gcd cost on huge ints
                return None
            return ast.Constant(Fraction(n, d))
        if node.func.id == "Decimal" and len(args) == 1 and isinstance(args[0], ast.Constant) \
                and type(args[0].value) is str and len(args[0].value) <= 1000:
            return ast.Constant(Decimal(args[0].value))
    except (ArithmeticError, ValueError):
        return None
    return None


class _Exact(ast.NodeTransformer):
    def visit_Call(self, node: ast.Call) -> ast.AST:
        return _exact_number(node) or self.generic_visit(node)


def decode_value(text: str) -> Any:
    """A value the sandbox serialised (opensloth/rewards/_harness.py's encoder: Python literal
    syntax, plus float('nan'), float('inf'), set(), frozenset({...}), Fraction(n, d) and
    Decimal('text')) back to plain data. Raises ValueError when malformed."""
    try:
        tree = _Exact().visit(ast.parse(text, mode="eval"))
    except (SyntaxError, RecursionError, MemoryError) as exc:
        raise ValueError("malformed value") from exc
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            key = (node.func.id, *(a.value for a in node.args if isinstance(a, ast.Constant))) \
                if isinstance(node.func, ast.Name) else None
            if key not in _PLAIN_CALLS and not (key == ("frozenset",) and len(node.args) == 1):
                raise ValueError("malformed value")
        elif not isinstance(node, (ast.Expression, ast.Constant, ast.Tuple, ast.List, ast.Set, ast.Dict, ast.UnaryOp,
                                   ast.USub, ast.Load, ast.Name)):
            raise ValueError("malformed value")
        elif isinstance(node, ast.Name) and node.id not in ("float", "set", "frozenset"):
            raise ValueError("malformed value")
    try:
        return safe_eval(tree)
    except (TypeError, ValueError, RecursionError, MemoryError) as exc:
        raise ValueError("malformed value") from exc


_MAX_RECORD_CHARS = 1_000_100  # the harness's 1 MB value limit plus the index and status


def parse_records(records: bytes, n: int) -> list[Any | None]:
    """The sandbox's records as N slots: the decoded value of test i, or None where test i has no
    record, more than one, a failure status, or a malformed value. Never raises."""
    seen: dict[int, list[str]] = {}
    for line in records.decode("utf-8", errors="replace").split("\n"):
        if len(line) > _MAX_RECORD_CHARS:  # the harness never writes one: a forged record, too costly to parse
            continue
        parts = line.split("\t", 2)
        if len(parts) == 3 and parts[0].isascii() and parts[0].isdigit() and int(parts[0]) < n:
            seen.setdefault(int(parts[0]), []).append(parts[1] + "\t" + parts[2])
    out: list[Any | None] = [None] * n
    for i, entries in seen.items():
        if len(entries) != 1 or not entries[0].startswith("v\t"):
            continue
        try:
            out[i] = (decode_value(entries[0][2:]),)  # wrapped: a value of None is still a value
        except ValueError:
            continue
    return out


_warned_unsplittable = False


def _warn_unsplittable(test: str, why: str) -> None:
    global _warned_unsplittable
    if not _warned_unsplittable:
        _warned_unsplittable = True
        logger.warning("code_correctness: the test %r cannot be graded safely (%s); it counts as failed. "
                       "This is reported once; os-train checks tests when the data is prepared.", test[:200], why)


def row_number(index: int) -> str:
    """How a message names 0-based row `index` when nothing better is known: "row index+1"."""
    return f"row {index + 1}"


def check_test_column(rows: Any, column: str = "tests", source: str = "the dataset",
                      row_name: Callable[[int], str] = row_number) -> int:
    """Check that every row's assert tests can be split (run when the data is prepared).

    Args:
        rows: the `tests` (or `test_cases`) column's values, in dataset order.
        column: the column's name, for the message.
        source: what the rows come from, for the message (e.g. "--dataset data.jsonl").
        row_name: how the message names 0-based row i (default "row i+1").

    Returns:
        The number of assert tests checked.

    Raises:
        UserError: naming the first unsplittable test's 1-based row and why.
    """
    checked = 0
    for index, value in enumerate(rows):
        asserts, _ = normalize_tests(value)
        for test in asserts:
            try:
                split_test(test)
            except UnsplittableTest as exc:
                raise UserError(
                    f"{source}, {row_name(index)}, column {column!r}: the test {test.strip()[:120]!r} cannot be graded "
                    f"safely: {exc}. code_correctness runs the call of the solution in the sandbox and evaluates "
                    "the expected side outside it, so each test must be one `assert CALL == VALUE` (or "
                    "`assert CALL`, `assert abs(CALL - x) < tol`, `assert math.isclose(CALL, x)`, `<`, `!=`, "
                    "`in`, ...) with a plain expected value. Rewrite or drop that test."
                ) from None
            checked += 1
    return checked


class CodeCorrectnessReward(RewardFunction):
    """Scores the last ```python block of a completion, in [0, 1].

    - 0.0: no code block, or code that is not valid Python;
    - without tests for the row: 1.0 for valid syntax (all that can be checked);
    - with tests (a `tests` column: assert statements, or stdin/stdout pairs): 0.2 for valid
      syntax + 0.8 x the fraction of tests passed. All tests of one completion run in one
      sandboxed subprocess (see opensloth.rewards.sandbox): the solution's module code once, then
      each test under its own time limit (`test_timeout_s`); the sandbox reports the values the
      solution produced and they are compared with the expected values here (see the module
      docstring). A test of literals only (`assert True`) is evaluated here: true, it is not a
      test and is left out of the count; false, it fails. Completions run in parallel, `workers`
      at a time.

    Time: at most `limits.wall_time_s` for the module code plus `test_timeout_s` + 0.5 s per test
    (at most `max_tests` of each kind): 5 + 16 x 2.5 = 45 s per completion with the defaults, in
    the worst case of a solution that hangs in every test.

    Example:
        >>> code_correctness([""], ["```python\\ndef f(x):\\n    return x + 1\\n```"], tests=[["assert f(1) == 2"]])
        [1.0]
    """

    name = "code_correctness"
    description = "Last ```python block: 0 if missing/invalid; valid syntax 0.2 + 0.8 x tests passed (sandboxed)."
    self_limited = True  # the sandbox kills what overruns its time limits

    def __init__(self, limits: SandboxLimits = DEFAULT_LIMITS, max_tests: int = 16, workers: int = 4,
                 test_timeout_s: float = DEFAULT_TEST_TIMEOUT_S):
        self.limits, self.max_tests, self.workers, self.test_timeout_s = limits, max_tests, workers, test_timeout_s

    def check_dataset(self, rows, where, row_name=row_number):
        """Every assert test of the dataset's test column (`tests`, else `test_cases`, as `score` reads
        them) can be split safely (`check_test_column`), else a UserError naming the first that cannot."""
        for column in ("tests", "test_cases"):
            if column in rows.column_names:
                check_test_column(rows[column], column, where, row_name)
                return

    def score(self, prompts, completions, **columns):
        tests = columns.get("tests") or columns.get("test_cases") or [None] * len(completions)
        _report_interpreter_once()
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
        jobs: list[tuple[str, Any]] = []
        checks: list[Any] = []  # per job: a SplitTest or an expected stdout
        total = failed_here = 0
        for test in asserts:
            if total == self.max_tests:
                break
            try:
                split = split_test(test)
            except UnsplittableTest as exc:
                _warn_unsplittable(test, str(exc))
                total += 1
                failed_here += 1
                continue
            if split.constant:  # `assert True` is no test; `assert False` fails every solution
                if not _passes(split, ()):
                    total += 1
                    failed_here += 1
                continue
            total += 1
            jobs.append(("eval", [list(pair) for pair in zip(split.calls, split.consume)]))
            checks.append(split)
        for given, expected in pairs[: self.max_tests]:
            total += 1
            jobs.append(("stdin", given))
            checks.append(expected)
        if total == 0:
            return 1.0
        passed = 0
        if jobs:
            result = run_harness(_harness_source(), code, jobs, limits=self.limits, test_timeout_s=self.test_timeout_s)
            for slot, check in zip(parse_records(result.records, len(jobs)), checks):
                passed += slot is not None and _passes(check, slot[0])
        return round(0.2 + 0.8 * passed / total, 6)


@functools.lru_cache(maxsize=1)
def _harness_source() -> str:
    """The grading harness's source (opensloth/rewards/_harness.py), shipped to the sandbox: the
    sandbox user may not be able to read this checkout (e.g. under /root)."""
    return (Path(__file__).parent / "_harness.py").read_text(encoding="utf-8")


_reported_interpreter = False


def _report_interpreter_once() -> None:
    """Say once per process which interpreter runs model code, and what it lacks against ours."""
    global _reported_interpreter
    if _reported_interpreter:
        return
    _reported_interpreter = True
    info = sandbox_interpreter()
    if info["same_as_trainer"]:
        logger.info("code_correctness: model code runs on the trainer's interpreter (%s, Python %s).",
                    info["python"], info["version"])
    else:
        logger.warning("code_correctness: model code runs on %s (Python %s), not the trainer's interpreter (%s): %s.",
                       info["python"], info["version"], info["trainer_python"], info["lacks"])


def _passes(check: Any, value: Any) -> bool:
    """Does the reported value pass? The comparison runs here, on plain data only."""
    if isinstance(check, SplitTest):
        try:
            return check.passed(value)
        except Exception:  # noqa: BLE001 - TypeError, IndexError, OverflowError...: the test fails, as assert would
            return False
    # A stdin test's value is (stdout,).
    return type(value) is tuple and len(value) == 1 and isinstance(value[0], str) and value[0].split() == check.split()


code_correctness = CodeCorrectnessReward()
register_reward_function(code_correctness)


def set_code_test_timeout(seconds: float) -> None:
    """Set the built-in code_correctness's per-test time limit (`--code-test-timeout`, a run's option)."""
    code_correctness.test_timeout_s = float(seconds)
