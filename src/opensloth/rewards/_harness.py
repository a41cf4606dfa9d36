"""The grading harness: runs inside the sandbox, defined before the model's code, never imported by the trainer.

opensloth.rewards.code ships this file's source to the sandboxed process (sandbox.run_harness), which
executes it and calls `run`. It only reports: the solution's values as plain data, and a stdin
program's stdout. Nothing here is secret: the expected values never enter this process, and the
parent re-checks every record (opensloth.rewards.code.parse_records), so a solution that reaches
this code (its frames, through tracebacks or sys._getframe) can at most report values of its own
choosing, which it could as well return.

What it keeps in default arguments (bound before the model's code runs) is only there so that an
honest solution that patches builtins, io or json for its own use does not break the reporting.

Records, written to descriptor `fd` as they happen (the parent watches their timing):
    "M\\n"                            the module code has run (or failed): the tests start
    "i<TAB>status<TAB>value\\n"       test i (its index in the row's job list) ended:
                                      v (value follows), x (raised), u (not plain data), t (timed out)
"""

import builtins
import io
import os
import signal
import sys


class TestTimeout(BaseException):
    """Raised by SIGALRM when one test (or the module code) runs past its own time limit."""


def make_encoder(_type=type, _len=len, _int_repr=int.__repr__, _float_repr=float.__repr__, _str_repr=str.__repr__,
                 _bytes_repr=bytes.__repr__, _items=dict.items, _join=str.join, _append=list.append, _list=list,
                 _ValueError=ValueError, _bit_length=int.bit_length, _format=int.__format__, _modules=sys.modules,
                 _getattr=getattr, _isinstance=isinstance):
    """`dumps(value, consume)`: Python literal text of a plain projection of `value`, or ValueError.

    The projection, per exact type (a subclass, or any other type, is not plain data: its __eq__
    could be anything):
    - None, bool, int, float, str, bytes, list, tuple, dict, set, frozenset: themselves;
    - collections.Counter, OrderedDict, defaultdict: the dict of their items (what `==` against a
      dict compares);
    - numpy bool/integer/floating scalars and 0-d arrays: `.item()` (a Python bool, int or float);
    - fractions.Fraction, decimal.Decimal: `Fraction(n, d)`, `Decimal('text')`, rebuilt exactly
      by the parent;
    - with `consume` (the test wraps the call in list/tuple/set/sorted/sum/min/max/any/all/dict),
      any other top-level value is iterated here first: a generator or map becomes the list of
      its items.
    Whatever a projection returns is projected again with the same exact-type rules, so an object
    that forges a projection can only report plain data.
    """
    plain_scalars = (_type(None), bool)

    def project(x):
        """(constructor, plain value) for a non-plain `x` of a known type, or raise ValueError.
        constructor: "" (the value itself), "Fraction" ((numerator, denominator)), "Decimal" (its text)."""
        t = _type(x)
        collections = _modules.get("collections")
        if collections is not None and (t is collections.Counter or t is collections.OrderedDict
                                        or t is collections.defaultdict):
            return "", {k: v for k, v in _items(x)}
        numpy = _modules.get("numpy")
        if numpy is not None and t.__module__ == "numpy":
            if t is numpy.ndarray and x.ndim == 0 or _isinstance(x, (numpy.bool_, numpy.integer, numpy.floating)):
                return "", x.item()
        fractions = _modules.get("fractions")
        if fractions is not None and t is fractions.Fraction:
            return "Fraction", (x.numerator, x.denominator)
        decimal = _modules.get("decimal")
        if decimal is not None and t is decimal.Decimal:
            return "Decimal", x.__str__()
        raise _ValueError("not plain data")

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
            constructor, value = project(x)
            if constructor == "Fraction":
                if _type(value[0]) is not int or _type(value[1]) is not int:
                    raise _ValueError("not plain data")
                _append(out, "Fraction(")
                encode(value[0], out, depth + 1)
                _append(out, ",")
                encode(value[1], out, depth + 1)
                _append(out, ")")
            elif constructor == "Decimal":
                if _type(value) is not str:
                    raise _ValueError("not plain data")
                _append(out, "Decimal(" + _str_repr(value) + ")")
            else:
                encode(value, out, depth + 1)
        if _len(out) > 1_000_000:
            raise _ValueError("too large")

    def dumps(values, consume):
        out = ["("]
        for x, eat in zip(values, consume):
            t = _type(x)
            if eat and t not in (list, tuple, dict, set, frozenset, str, bytes):
                try:
                    project(x)
                except _ValueError:
                    x = _list(x)  # a generator, map, range, iterator object...: consumed here, as list() would
            encode(x, out, 1)
            _append(out, ",")
        _append(out, ")")
        text = _join("", out)
        if _len(text) > 1_000_000:
            raise _ValueError("too large")
        return text

    return dumps


def make_stdin_file(_memfd=getattr(os, "memfd_create", None), _write=os.write, _lseek=os.lseek, _dup2=os.dup2,
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


def _raise_timeout(signum, frame):
    raise TestTimeout()


def run(solution, jobs, fd, first=0, test_timeout_s=2.0, module_timeout_s=5.0, _dumps=make_encoder(),
        _stdin_file=make_stdin_file(), _write=os.write, _compile=compile, _exec=exec, _eval=eval, _str=str,
        _enc=str.encode, _sys=sys, _builtins=builtins, _TextIOWrapper=io.TextIOWrapper, _BytesIO=io.BytesIO,
        _getvalue=io.BytesIO.getvalue, _StringIO=io.StringIO, _BaseException=BaseException, _SystemExit=SystemExit,
        _TestTimeout=TestTimeout, _tuple=tuple, _len=len, _setitimer=signal.setitimer, _ITIMER_REAL=signal.ITIMER_REAL,
        _signal=signal.signal, _SIGALRM=signal.SIGALRM, _on_alarm=_raise_timeout, _ValueError=ValueError):
    """Run the solution's module code once, then each job under its own time limit.

    Args:
        solution: the solution's source.
        jobs: [("eval", [(call source, consume), ...]) | ("stdin", input text)], the row's tests.
        fd: the results descriptor (records as in the module docstring).
        first: the index of jobs[0] in the row (the parent restarts after a test that hung).
        test_timeout_s: each test's wall-time limit (SIGALRM; the parent kills past it anyway).
        module_timeout_s: the module code's limit (assert tests only: a stdin program is its test).
    """
    def record(i, status, text):
        _write(fd, _enc(_str(first + i) + "\t" + status + "\t" + text + "\n", "utf-8", "backslashreplace"))

    def timed(limit, work, *args):
        """work(*args) under a SIGALRM limit; an alarm that fires as it returns still counts as a timeout."""
        try:
            _setitimer(_ITIMER_REAL, limit)
            value = work(*args)
            _setitimer(_ITIMER_REAL, 0)
            return value
        finally:
            _setitimer(_ITIMER_REAL, 0)

    try:
        code = _compile(solution, "solution.py", "exec")
    except _BaseException:
        return
    _signal(_SIGALRM, _on_alarm)
    real_out, real_in = _sys.stdout, _sys.stdin
    module = {"__name__": "__main__", "__builtins__": _builtins}
    module_ok = True
    if any(kind == "eval" for kind, _ in jobs):
        _sys.stdout, _sys.stdin = _StringIO(), _StringIO()
        try:
            timed(module_timeout_s, _exec, code, module)
        except _BaseException:
            module_ok = False
        _sys.stdout, _sys.stdin = real_out, real_in
    _write(fd, b"M\n")

    def run_stdin(payload, out):
        _sys.stdin = _TextIOWrapper(_stdin_file(_enc(payload, "utf-8")), encoding="utf-8")
        _sys.stdout = _TextIOWrapper(out, encoding="utf-8", write_through=True)
        try:
            _exec(code, {"__name__": "__main__", "__builtins__": _builtins})
        except _SystemExit:
            pass

    def run_calls(payload):
        values = _tuple(_eval(_compile(call, "test", "eval"), module) for call, _ in payload)
        return _dumps(values, _tuple(eat for _, eat in payload))

    n = _len(jobs)
    i = 0
    while i < n:
        kind, payload = jobs[i]
        status, text = "v", "None"
        try:
            if kind == "stdin":
                out = _BytesIO()
                timed(test_timeout_s, run_stdin, payload, out)
                text = _dumps((_getvalue(out).decode("utf-8", "replace"),), (False,))
            elif not module_ok:
                status = "x"
            else:
                _sys.stdout, _sys.stdin = _StringIO(), _StringIO()
                text = timed(test_timeout_s, run_calls, payload)
        except _TestTimeout:
            status = "t"
        except _ValueError:  # the encoder's "not plain data", "too deep", "too large"
            status = "u"
        except _BaseException:
            status = "x"
        _sys.stdout, _sys.stdin = real_out, real_in
        record(i, status, text if status == "v" else "None")
        i += 1
