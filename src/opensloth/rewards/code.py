"""code_correctness: extract a Python block, check its syntax, grade the row's tests in the sandbox.

Grading that model-written code cannot change: the expected values never enter the sandboxed
process. Each assert test is split by parsing (`split_test`): the parts that run the solution
(calls of names that are not plain builtins, e.g. `add(1, 2)`, `Solution().f(x)`) are shipped to
the sandbox, which reports their values as plain data (None, bool, int, float, str, bytes and
lists, tuples, dicts, sets of those, checked by exact type: a subclass or an object with its own
`__eq__` is not plain data and fails); everything else (`==`, `<`, `in`, `abs(... - x) < tol`,
`math.isclose`, `sorted`, `len`, the expected literal) is evaluated here, by a small evaluator
that knows only literals, arithmetic and a few pure builtins (`safe_eval`). For stdin/stdout
tests the sandbox reports the program's stdout and the comparison happens here.

The sandbox writes one record per test as soon as that test has run; a test with no record, more
than one, or a malformed one fails. A test that cannot be split safely (`assert f(x) == Node(1)`,
where the expected side would run model code; a loop; a `def check(candidate)` block) is
reported when the data is prepared (`check_test_column`) and fails if it reaches scoring anyway.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import operator
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from opensloth.errors import UserError
from opensloth.rewards.base import RewardFunction, completion_text, register_reward_function
from opensloth.rewards.sandbox import DEFAULT_LIMITS, SandboxLimits, run_harness

logger = logging.getLogger(__name__)

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
    expression with each call replaced by a slot, evaluated here by `safe_eval`)."""

    calls: tuple[str, ...]
    check: ast.expr

    def passed(self, values: tuple) -> bool:
        return bool(safe_eval(self.check, values))


def _is_safe_callee(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in _SAFE_FUNCS
    return (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "math"
            and func.attr in _SAFE_MATH and callable(_SAFE_MATH[func.attr]))


def _carve(node: ast.expr, calls: list[str]) -> ast.expr:
    """`node` with every sub-expression that needs the solution replaced by a _Slot."""

    def slot(expr: ast.expr) -> _Slot:
        calls.append(ast.unparse(expr))
        return _Slot(len(calls) - 1)

    def walk(n: ast.expr) -> ast.expr:
        if isinstance(n, ast.Constant):
            return n
        if isinstance(n, ast.Name):
            return n if n.id in _SAFE_TYPES or n.id in _SAFE_FUNCS else slot(n)
        if isinstance(n, ast.Attribute):
            if isinstance(n.value, ast.Name) and n.value.id == "math" and n.attr in _SAFE_MATH:
                return n
            return slot(n)
        if isinstance(n, ast.Call):
            if not _is_safe_callee(n.func):
                return slot(n)
            if any(isinstance(a, ast.Starred) for a in n.args) or any(k.arg is None for k in n.keywords):
                raise UnsplittableTest("*args/**kwargs in a builtin call")
            return ast.Call(n.func, [walk(a) for a in n.args], [ast.keyword(k.arg, walk(k.value)) for k in n.keywords])
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
            operands = [walk(n.left), *(walk(c) for c in n.comparators)]
            if all(_has_slot(o) for o in operands):
                raise UnsplittableTest(
                    f"both sides of `{ast.unparse(n)}` run model code; one side must be a plain value "
                    "(literals, arithmetic, sorted/len/set/..., math.*)")
            return ast.Compare(operands[0], n.ops, operands[1:])
        if isinstance(n, ast.Subscript):
            return ast.Subscript(walk(n.value), walk(n.slice), ast.Load())
        if isinstance(n, ast.Slice):
            return ast.Slice(*(walk(x) if x is not None else None for x in (n.lower, n.upper, n.step)))
        if isinstance(n, ast.IfExp):
            return ast.IfExp(walk(n.test), walk(n.body), walk(n.orelse))
        raise UnsplittableTest(f"`{type(n).__name__}` ({ast.unparse(n)!r}) cannot be evaluated outside the sandbox")

    return walk(node)


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
    check = _carve(tree.body[0].test, calls)
    if not calls:
        raise UnsplittableTest("it does not call the solution (only literals and builtins)")
    return SplitTest(tuple(calls), check)


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


def decode_value(text: str) -> Any:
    """A value the sandbox serialised (`_HARNESS`'s encoder: Python literal syntax, plus float('nan'),
    float('inf'), set() and frozenset({...})) back to plain data. Raises ValueError when malformed."""
    try:
        tree = ast.parse(text, mode="eval")
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


# ---------------------------------------------------------------------------------------------
# The sandbox side: runs before the model's code and keeps what it needs in closures and
# defaults, so a solution that patches builtins, json or io cannot change how values are
# reported. Each record is "index<TAB>status<TAB>value\n": status v (value), x (the test raised),
# u (the value is not plain data). Records are written as each test ends.
# ---------------------------------------------------------------------------------------------

_HARNESS = r'''
import builtins, io, os, sys

def _make_encoder(_type=type, _len=len, _int_repr=int.__repr__, _float_repr=float.__repr__, _str_repr=str.__repr__,
                  _bytes_repr=bytes.__repr__, _items=dict.items, _sorted=sorted, _join=str.join,
                  _append=list.append, _ValueError=ValueError, _bit_length=int.bit_length, _format=int.__format__):
    plain_scalars = (_type(None), bool)

    def encode(x, out, depth):
        t = _type(x)
        if depth > 64:
            raise _ValueError("too deep")
        if t in plain_scalars:
            _append(out, "None" if x is None else ("True" if x else "False"))
        elif t is int:  # hex past 64 bits: no int/str digit limit on either side
            _append(out, _int_repr(x) if _bit_length(x) <= 64 else ("-" if x < 0 else "") + "0x" + _format(x if x > 0 else -x, "x"))
        elif t is float:
            r = _float_repr(x)
            _append(out, "float('" + r + "')" if r in ("nan", "inf", "-inf") else r)
        elif t is str:
            _append(out, _str_repr(x))
        elif t is bytes:
            _append(out, _bytes_repr(x))
        elif t is list or t is tuple:
            _append(out, "[" if t is list else "(")
            for item in x:
                encode(item, out, depth + 1)
                _append(out, ",")
            _append(out, "]" if t is list else ")")
        elif t is dict:
            _append(out, "{")
            for k, v in _items(x):
                encode(k, out, depth + 1)
                _append(out, ":")
                encode(v, out, depth + 1)
                _append(out, ",")
            _append(out, "}")
        elif t is set or t is frozenset:
            if not x:
                _append(out, "set()" if t is set else "frozenset()")
                return
            _append(out, "{" if t is set else "frozenset({")
            for item in x:
                encode(item, out, depth + 1)
                _append(out, ",")
            _append(out, "}" if t is set else "})")
        else:
            raise _ValueError("not plain data")
        if _len(out) > 1_000_000:
            raise _ValueError("too large")

    def dumps(x):
        out = []
        encode(x, out, 0)
        text = _join("", out)
        if _len(text) > 1_000_000:
            raise _ValueError("too large")
        return text

    return dumps


def _make_stdin_file(_memfd=getattr(os, "memfd_create", None), _write=os.write, _lseek=os.lseek, _dup2=os.dup2,
                     _close=os.close, _BufferedReader=io.BufferedReader, _FileIO=io.FileIO, _BytesIO=io.BytesIO,
                     _len=len):
    def stdin_file(data):
        """The test's input as the process's real stdin (fd 0), so open(0) and os.read(0) see it too."""
        if _memfd is None:
            return _BytesIO(data)
        f = _memfd("stdin")
        done = 0
        while done < _len(data):
            done += _write(f, data[done:])
        _lseek(f, 0, 0)
        if f != 0:  # 0 itself when a previous test's open(0) closed it
            _dup2(f, 0)
            _close(f)
        return _BufferedReader(_FileIO(0, "r", closefd=False))

    return stdin_file


def run(solution, jobs, fd, _dumps=_make_encoder(), _stdin_file=_make_stdin_file(), _write=os.write, _compile=compile, _exec=exec, _eval=eval,
        _str=str, _enc=str.encode, _sys=sys, _builtins=builtins, _TextIOWrapper=io.TextIOWrapper,
        _BytesIO=io.BytesIO, _getvalue=io.BytesIO.getvalue, _flush=io.TextIOWrapper.flush, _StringIO=io.StringIO,
        _BaseException=BaseException, _SystemExit=SystemExit, _tuple=tuple, _type=type, _range=range, _len=len):
    def record(i, status, text):
        _write(fd, _enc(_str(i) + "\t" + status + "\t" + text + "\n", "utf-8", "backslashreplace"))

    try:
        code = _compile(solution, "solution.py", "exec")
    except _BaseException:
        return
    real_out, real_in = _sys.stdout, _sys.stdin
    n = _len(jobs)
    i = 0
    while i < n:
        kind, payload = jobs[i]
        scope = {"__name__": "__main__", "__builtins__": _builtins}
        if kind == "stdin":
            out = _BytesIO()
            _sys.stdin = _TextIOWrapper(_stdin_file(_enc(payload, "utf-8")), encoding="utf-8")
            _sys.stdout = _TextIOWrapper(out, encoding="utf-8", write_through=True)
            status = "v"
            try:
                _exec(code, scope)
            except _SystemExit:
                pass
            except _BaseException:
                status = "x"
            text = "None"
            if status == "v":
                try:
                    text = _dumps(_getvalue(out).decode("utf-8", "replace"))
                except _BaseException:  # e.g. the program closed its stdout
                    status = "x"
            record(i, status, text)
        else:
            _sys.stdout, _sys.stdin = _StringIO(), _StringIO()
            try:
                _exec(code, scope)
                values = _tuple(_eval(_compile(call, "test", "eval"), scope) for call in payload)
            except _BaseException:
                record(i, "x", "None")
            else:
                try:
                    text = _dumps(values)
                except _BaseException:
                    record(i, "u", "None")
                else:
                    record(i, "v", text)
        _sys.stdout, _sys.stdin = real_out, real_in
        i += 1
'''


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


def check_dataset_tests(dataset: Any, rewards: list[str], source: str,
                        row_name: Callable[[int], str] = row_number) -> int:
    """When `code_correctness` is among the run's rewards, check the dataset's test column
    (`tests`, else `test_cases`, as the reward reads them) with `check_test_column`.

    Returns:
        The number of assert tests checked (0 when the reward or the column is absent).
    """
    if "code_correctness" not in rewards:
        return 0
    for column in ("tests", "test_cases"):
        if column in dataset.column_names:
            return check_test_column(dataset[column], column, source, row_name)
    return 0


class CodeCorrectnessReward(RewardFunction):
    """Scores the last ```python block of a completion, in [0, 1].

    - 0.0: no code block, or code that is not valid Python;
    - without tests for the row: 1.0 for valid syntax (all that can be checked);
    - with tests (a `tests` column: assert statements, or stdin/stdout pairs): 0.2 for valid
      syntax + 0.8 x the fraction of tests passed. All tests of one completion run in one
      sandboxed subprocess (see opensloth.rewards.sandbox); the sandbox reports the values the
      solution produced and they are compared with the expected values here (see the module
      docstring). Completions run in parallel, `workers` at a time.

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
        jobs: list[tuple[str, Any]] = []
        checks: list[Any] = []  # per job: a SplitTest or an expected stdout
        for test in asserts:
            try:
                split = split_test(test)
            except UnsplittableTest as exc:
                _warn_unsplittable(test, str(exc))
                continue
            jobs.append(("eval", list(split.calls)))
            checks.append(split)
        for given, expected in pairs:
            jobs.append(("stdin", given))
            checks.append(expected)
        passed = 0
        if jobs:
            result = run_harness(_HARNESS, code, jobs, limits=self.limits)
            for slot, check in zip(parse_records(result.records, len(jobs)), checks):
                passed += slot is not None and _passes(check, slot[0])
        return round(0.2 + 0.8 * passed / total, 6)


def _passes(check: Any, value: Any) -> bool:
    """Does the reported value pass? The comparison runs here, on plain data only."""
    if isinstance(check, SplitTest):
        try:
            return check.passed(value)
        except Exception:  # noqa: BLE001 - TypeError, IndexError, OverflowError...: the test fails, as assert would
            return False
    return isinstance(value, str) and value.split() == check.split()


code_correctness = CodeCorrectnessReward()
register_reward_function(code_correctness)
