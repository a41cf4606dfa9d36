"""The code sandbox, one behavioural test per limit, and code_correctness on top of it.

Limits under test (opensloth.rewards.sandbox): wall time (process group killed), CPU time
(RLIMIT_CPU), memory (RLIMIT_AS), processes (RLIMIT_NPROC = 0; run as `nobody` when we are root,
since root ignores RLIMIT_NPROC), open files (RLIMIT_NOFILE), writes confined to the working
directory, no inherited environment, output truncated, working directory gone afterwards.
Then how assert tests are split (the call in the sandbox, the check here) and how values cross.
Attacks on both live in test_rewards_adversarial.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from opensloth.errors import UserError
from opensloth.rewards import SandboxLimits, code_correctness, run_python
from opensloth.rewards.code import (
    CodeCorrectnessReward,
    UnsplittableTest,
    check_test_column,
    extract_code,
    normalize_tests,
    split_test,
)
from opensloth.rewards.sandbox import sandbox_isolated

FAST = SandboxLimits(wall_time_s=2.0, cpu_time_s=2, memory_mb=256)
IS_ROOT = os.geteuid() == 0


def processes_of_uid(uid: int) -> int:
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        count += int(uid_line.split()[1]) == uid
    return count


def test_runs_code_with_stdin_and_captures_output():
    result = run_python("import sys\nname = input()\nprint('hi', name)\nprint('err', file=sys.stderr)",
                        stdin="sloth\n", limits=FAST)
    assert result.ok and result.returncode == 0
    assert result.stdout == "hi sloth\n" and result.stderr == "err\n"
    failed = run_python("raise ValueError('boom')", limits=FAST)
    assert failed.status == "error" and "ValueError: boom" in failed.stderr


def test_infinite_loop_is_killed_at_the_wall_time_limit():
    start = time.monotonic()
    result = run_python("while True:\n    pass", limits=SandboxLimits(wall_time_s=1.0, cpu_time_s=30))
    assert result.status == "timeout" and result.returncode == -signal.SIGKILL
    assert time.monotonic() - start < 5


def test_cpu_time_limit_stops_a_busy_program_before_the_wall_limit():
    start = time.monotonic()
    result = run_python("while True:\n    pass", limits=SandboxLimits(wall_time_s=30, cpu_time_s=1))
    assert result.status == "timeout" and result.returncode in (-signal.SIGXCPU, -signal.SIGKILL)
    assert time.monotonic() - start < 15  # CPU seconds, on a shared machine


def test_sleeping_program_is_killed_at_the_wall_time_limit():
    start = time.monotonic()
    result = run_python("import time\ntime.sleep(60)", limits=SandboxLimits(wall_time_s=1.0))
    assert result.status == "timeout"
    assert time.monotonic() - start < 5


def test_process_limit_holds_without_the_audit_hook():
    """The OS layer alone: RLIMIT_NPROC = 0 (as `nobody` when root) makes every fork fail.

    Bounded (at most 20 forks, each child exits at once), so it is harmless even if it failed.
    """
    probe = ("import os\nforks = 0\nfor _ in range(20):\n    try:\n        pid = os.fork()\n"
             "    except OSError as exc:\n        print(type(exc).__name__)\n        break\n"
             "    if pid == 0:\n        os._exit(0)\n    os.waitpid(pid, 0)\n    forks += 1\nprint(forks)")
    result = run_python(probe, limits=FAST, audit_hook=False)
    assert result.stdout.split() == ["BlockingIOError", "0"], result
    threads = run_python("import threading\nthreading.Thread(target=print).start()", limits=FAST, audit_hook=False)
    assert threads.status == "error" and "can't start new thread" in threads.stderr


@pytest.mark.parametrize(
    "bomb",
    [
        "import os\nwhile True:\n    os.fork()",
        "import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])",
        "import multiprocessing\nwhile True:\n    multiprocessing.Process(target=print).start()",
        "import os\nos.system(':(){ :|:& };:')",
    ],
    ids=["os.fork", "shell-via-subprocess", "multiprocessing", "os.system"],
)
def test_fork_bomb_returns_quickly_and_leaves_no_process(bomb):
    test_process_limit_holds_without_the_audit_hook()  # never run a real bomb unless the OS limit holds
    before = processes_of_uid(65534) if IS_ROOT else None
    start = time.monotonic()
    result = run_python(bomb, limits=FAST)
    assert time.monotonic() - start < 3
    assert not result.ok
    assert "not allowed" in result.stderr or "Resource temporarily unavailable" in result.stderr
    if IS_ROOT:
        assert processes_of_uid(65534) == before


def test_memory_bomb_fails_with_memory_error():
    start = time.monotonic()
    one_big = run_python("x = bytearray(8 * 1024 ** 3)", limits=FAST)
    growing = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))", limits=FAST)
    for result in (one_big, growing):
        assert result.status == "error" and "MemoryError" in result.stderr
    assert time.monotonic() - start < 5


def test_open_files_limit():
    code = "files = []\nwhile True:\n    files.append(open('f%d' % len(files), 'w'))"
    result = run_python(code, limits=SandboxLimits(max_open_files=32), audit_hook=False)
    assert result.status == "error" and "Too many open files" in result.stderr, result


def test_writes_outside_the_working_directory_fail():
    target = Path(tempfile.gettempdir()) / f"opensloth-escape-{uuid.uuid4().hex}"  # world-writable /tmp
    code = f"open({str(target)!r}, 'w').write('escaped')"
    result = run_python(code, limits=FAST)
    assert result.status == "error" and "not allowed" in result.stderr
    assert not target.exists()
    tricks = [
        f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('x')",
        f"import os\nos.rename('inside.txt', {str(target)!r})",
        f"import os\nos.mkdir({str(target)!r})",
        (f"import os\nfd = os.open({str(Path(target).parent)!r}, os.O_RDONLY)\n"
         f"os.open({target.name!r}, os.O_WRONLY | os.O_CREAT, dir_fd=fd)"),
    ]
    for trick in tricks:
        result = run_python("open('inside.txt', 'w').write('ok')\n" + trick, limits=FAST)
        assert result.status == "error", (trick, result)
        assert not target.exists(), trick
    inside = run_python("open('notes.txt', 'w').write('ok')\nprint(open('notes.txt').read())", limits=FAST)
    assert inside.ok and inside.stdout == "ok\n"


@pytest.mark.skipif(not IS_ROOT, reason="the uid switch happens only when running as root")
def test_runs_as_nobody_and_os_permissions_hold_without_the_audit_hook():
    # Outside /tmp, which the namespaced child replaces with its own.
    private = Path(tempfile.mkdtemp(prefix="opensloth-private-", dir="/var/tmp"))
    try:
        private.chmod(0o700)
        (private / "secret").write_text("s3cret")
        result = run_python(f"import os\nprint(os.getuid(), os.getgid(), os.getgroups())\n"
                            f"try:\n    print(open({str(private / 'secret')!r}).read())\n"
                            f"except OSError as exc:\n    print(type(exc).__name__)\n"
                            f"open({str(private / 'x')!r}, 'w')", limits=FAST, audit_hook=False)
        assert result.stdout.split("\n")[:2] == ["65534 65534 []", "PermissionError"], result
        assert "s3cret" not in result.stdout
        assert ("PermissionError" in result.stderr or "Read-only file system" in result.stderr), result
        assert not (private / "x").exists()
    finally:
        shutil.rmtree(private)


def test_environment_secrets_are_not_visible(monkeypatch):
    secret = f"sk-{uuid.uuid4().hex}"
    monkeypatch.setenv("OPENSLOTH_TEST_SECRET", secret)
    code = ("import os\nprint(dict(os.environ))\n"
            "for path in (f'/proc/{os.getppid()}/environ', '/proc/1/environ'):\n"
            "    try:\n        print(open(path, 'rb').read())\n"
            "    except Exception as exc:\n        print(type(exc).__name__)")
    # Without the hook, only the uid switch (as root) keeps the parent's /proc/PID/environ unreadable.
    for hook in (True, False) if IS_ROOT else (True,):
        result = run_python(code, limits=FAST, audit_hook=hook)
        assert secret not in result.stdout + result.stderr
        assert "OPENSLOTH_TEST_SECRET" not in result.stdout
        assert result.stdout.count("PermissionError") == 2, result


def test_working_directory_is_fresh_and_removed_and_output_truncated():
    result = run_python("import os\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))", limits=FAST)
    cwd, listing = result.stdout.splitlines()
    assert listing == "[]"  # the program's source never lands in its working directory
    if sandbox_isolated():  # a private tmpfs, gone with the namespace
        assert cwd == "/tmp/work" and not Path(cwd).exists()
    else:
        assert "opensloth-sandbox-" in cwd and not Path(cwd).exists()
    chatty = run_python("print('x' * 100000)", limits=SandboxLimits(max_output_bytes=1000))
    assert chatty.ok and chatty.stdout.startswith("x" * 1000) and chatty.stdout.endswith("[... output truncated]")
    assert len(chatty.stdout) < 1100


# ---------------------------------------------------------------------------------------------
# code_correctness
# ---------------------------------------------------------------------------------------------

GOOD = "Here is my solution:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
WRONG = "```python\ndef add(a, b):\n    return a - b\n```"
ASSERTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]


def test_extract_code_and_normalize_tests():
    assert extract_code(GOOD) == "def add(a, b):\n    return a + b\n"
    assert extract_code("```\nprint(1)\n```\n```py\nprint(2)\n```") == "print(2)\n"
    assert extract_code("no code here") is None
    assert normalize_tests("assert f(1)\nassert f(2)\n") == (["assert f(1)", "assert f(2)"], [])
    assert normalize_tests('{"inputs": ["1"], "outputs": ["2"]}') == ([], [("1", "2")])
    assert normalize_tests([{"input": "1", "output": "2"}]) == ([], [("1", "2")])


def test_code_correctness_scores_syntax_and_tests():
    completions = [GOOD, WRONG, "```python\ndef add(a, b)\n    return a + b\n```", "no code", "",
                   "```python\ndef add(a, b):\n    return a + b if a > 0 else 99\n```"]
    out = code_correctness(["q"] * 6, completions, tests=[ASSERTS] * 6)
    # WRONG passes none (a - b); the last returns 99 for add(-1, 1): 2 of 3 pass.
    assert out == [0.2 + 0.8, 0.2, 0.0, 0.0, 0.0, pytest.approx(0.2 + 0.8 * 2 / 3)]
    assert code_correctness(["q"], [[{"role": "assistant", "content": GOOD}]], tests=[ASSERTS]) == [1.0]
    assert code_correctness(["q", "q"], [GOOD, "```python\nx = (\n```"]) == [1.0, 0.0]  # no tests: syntax only


def test_code_correctness_stdin_stdout_pairs():
    program = "```python\nn = int(input())\nprint(n * 2)\n```"
    tests = [{"input": "3\n", "output": "6"}, {"input": "5", "output": "10\n"}, {"input": "1", "output": "3"}]
    apps_style = '{"inputs": ["4\\n"], "outputs": ["8\\n"]}'
    out = code_correctness(["q", "q"], [program, program], tests=[tests, apps_style])
    assert out == [pytest.approx(0.2 + 0.8 * 2 / 3), 1.0]


def test_stdin_programs_read_their_input_every_usual_way():
    tests = [{"input": "3 4\n", "output": "7"}, {"input": "10 20\n", "output": "30"}]
    ways = ["a, b = map(int, input().split())", "import sys\na, b = map(int, sys.stdin.readline().split())",
            "import sys\na, b = map(int, sys.stdin.buffer.read().split())", "a, b = map(int, open(0).read().split())",
            "import os\na, b = map(int, os.read(0, 100).split())"]
    programs = [f"```python\n{way}\nprint(a + b)\n```" for way in ways]
    assert code_correctness(["q"] * len(ways), programs, tests=[tests] * len(ways)) == [1.0] * len(ways)


def test_code_correctness_cannot_pass_by_exiting_early_or_hanging():
    exits = "```python\nimport os\nos._exit(0)\n```"
    fakes = "```python\nprint('ALL TESTS PASSED 3')\nraise SystemExit(0)\n```"
    hangs = "```python\nwhile True:\n    pass\n```"
    reward = CodeCorrectnessReward(limits=SandboxLimits(wall_time_s=1.0, cpu_time_s=1))
    start = time.monotonic()
    assert reward(["q"] * 3, [exits, fakes, hangs], tests=[ASSERTS] * 3) == [0.2, 0.2, 0.2]
    assert time.monotonic() - start < 5


# ---------------------------------------------------------------------------------------------
# Splitting assert tests: the solution's calls run in the sandbox, the check runs here.
# ---------------------------------------------------------------------------------------------

SPLITTABLE = [
    ("assert f(2) == 4", ("f(2)",)),
    ("assert 4 == f(2)", ("f(2)",)),
    ("assert f(2)", ("f(2)",)),
    ("assert not g(), 'nothing'", ("g()",)),
    ("assert f(2) != 5", ("f(2)",)),
    ("assert 1 < f(2) <= 4", ("f(2)",)),
    ("assert 4 in f([4])", ("f([4])",)),
    ("assert g() is None", ("g()",)),
    ("assert math.isclose(h(1.0), 0.5, rel_tol=1e-6)", ("h(1.0)",)),
    ("assert abs(h(1.0) - 0.5) < 1e-9", ("h(1.0)",)),
    ("assert f([1, 2])[0] == 1", ("f([1, 2])",)),
    ("assert sorted(f([3, 1])) == [1, 3]", ("f([3, 1])",)),
    ("assert Solution().twice(2) == 4", ("Solution().twice(2)",)),
    ("assert f(float('inf')) == float('inf')", ("f(float('inf'))",)),
    ("assert f(2) == 4 and f(3) == 6", ("f(2)", "f(3)")),
    ("assert isinstance(f(2), int)", ("f(2)",)),
]


@pytest.mark.parametrize(("test", "calls"), SPLITTABLE)
def test_split_test_separates_the_calls_from_the_check(test, calls):
    assert split_test(test).calls == calls


@pytest.mark.parametrize(
    ("test", "why"),
    [
        ("assert f(1) == Node(1)", "both sides"),
        ("assert f(1) == g(1)", "both sides"),
        ("for i in range(3): assert f(i) == 2 * i", "single `assert`"),
        ("def check(candidate):\n    assert candidate(1) == 2", "single `assert`"),
        ("assert [f(i) for i in range(3)] == [0, 2, 4]", "ListComp"),
        ("assert sum([1, 2]) == 3", "does not call the solution"),
        ("assert f'{f(1)}' == '2'", "JoinedStr"),
        ("assert f(1) ==", "not valid Python"),
    ],
)
def test_unsplittable_tests_are_refused_with_the_reason(test, why):
    with pytest.raises(UnsplittableTest, match=re.escape(why)):
        split_test(test)


SOLUTION = """```python
import math
def f(x):
    if isinstance(x, list):
        return [v * 2 for v in x] if x != [4] else [4]
    return x * 2
def g():
    return None
def h(x):
    return x / 2
class Solution:
    def twice(self, x):
        return 2 * x
```"""


def test_every_splittable_form_passes_for_a_correct_solution_and_fails_for_a_wrong_one():
    tests = [t for t, _ in SPLITTABLE if "f([3, 1])" not in t and "f([1, 2])" not in t]
    assert code_correctness(["q"], [SOLUTION], tests=[tests]) == [1.0]
    wrong = SOLUTION.replace("return x * 2", "return x * 3").replace("return x / 2", "return x / 3")
    assert code_correctness(["q"], [wrong], tests=[["assert f(2) == 4", "assert abs(h(1.0) - 0.5) < 1e-9"]]) == [0.2]


@pytest.mark.parametrize(
    ("returned", "test", "passes"),
    [
        ("float('nan')", "assert f() != 0.0", True),
        ("float('nan')", "assert f() == float('nan')", False),  # nan equals nothing, as in Python
        ("float('inf')", "assert f() == float('inf')", True),
        ("{1, 2}", "assert f() == {2, 1}", True),
        ("set()", "assert f() == set()", True),
        ("frozenset({1})", "assert f() == frozenset([1])", True),
        ("[1, 2]", "assert f() == (1, 2)", False),  # a list is not a tuple, as in Python
        ("(1, [2, {'a': b'x'}])", "assert f() == (1, [2, {'a': b'x'}])", True),
        ("2 ** 300", "assert f() == 2 ** 300", True),
        ("-(10 ** 5000)", "assert f() == -(10 ** 5000)", True),  # past Python's int/str digit limit
        ("'tab\\there\\nnewline'", "assert f() == 'tab\\there\\nnewline'", True),
        ("True", "assert f() == 1", True),
        ("object()", "assert f() is not None", False),  # not plain data: fails
        ("bytearray(b'x')", "assert f() == bytearray(b'x')", False),
    ],
)
def test_returned_values_cross_as_plain_data(returned, test, passes):
    completion = f"```python\ndef f():\n    return {returned}\n```"
    assert CodeCorrectnessReward(limits=FAST)(["q"], [completion], tests=[[test]]) == [1.0 if passes else 0.2]


def test_check_test_column_names_the_row_and_counts_the_tests():
    rows = [["assert f(1) == 2"], None, "assert f(2) == 4\nassert f(3) == 6", [{"input": "1", "output": "2"}]]
    assert check_test_column(rows) == 3
    with pytest.raises(UserError, match=r"data.jsonl, row 2, column 'tests': the test 'assert f\(1\) == g\(1\)'"):
        check_test_column([["assert f(1) == 2"], ["assert f(1) == g(1)"]], "tests", "data.jsonl")


def test_unsplittable_test_reaching_the_reward_fails_that_test_only(caplog):
    good = "```python\ndef f(x):\n    return 2 * x\n```"
    out = code_correctness(["q"], [good], tests=[["assert f(1) == 2", "assert f(1) == g(1)"]])
    assert out == [pytest.approx(0.2 + 0.8 / 2)]


# ---------------------------------------------------------------------------------------------
# Correct code keeps full credit: the standard library, values that compare equal, judge-like time.
# ---------------------------------------------------------------------------------------------

STDLIB = ["re", "typing", "functools", "dataclasses", "json", "fractions", "decimal", "statistics", "enum", "string",
          "collections"]
# Each module used as a solution would: namedtuple, dataclass and Enum call sys._getframe as they are defined.
STDLIB_USE = ("import re, typing, functools, dataclasses, json, fractions, decimal, statistics, enum, string, collections\n"
              "from typing import List\nPoint = collections.namedtuple('Point', 'x y')\n"
              "@dataclasses.dataclass\nclass Box:\n    v: int\nclass Color(enum.Enum):\n    RED = 1\n"
              "@functools.lru_cache(maxsize=None)\ndef twice(v: int) -> int:\n    return Box(Point(v, v).x).v * 2\n"
              "assert re.fullmatch(r'\\d+', '12') and json.loads('[1]') == [1] and statistics.mean([1, 3]) == 2\n"
              "assert fractions.Fraction(1, 2) + decimal.Decimal(0).__int__() == 0.5 and string.digits[2] == '2'\n")


def test_the_standard_library_works_on_the_assert_and_the_stdin_path():
    solution = f"```python\n{STDLIB_USE}def double(xs: List[int]) -> List[int]:\n    return [twice(x) for x in xs]\n```"
    program = f"```python\n{STDLIB_USE}print(twice(int(input())))\n```"
    tests = [["assert double([1, 2]) == [2, 4]", "assert double([]) == []"],
             [{"input": "3\n", "output": "6"}, {"input": "5\n", "output": "10"}]]
    assert code_correctness(["q", "q"], [solution, program], tests=tests) == [1.0, 1.0]
    for module in STDLIB:  # and each alone, as a solution's only import
        assert run_python(f"import {module}\nprint('ok')", limits=FAST).stdout == "ok\n", module


NUMPY_IN_SANDBOX = run_python("import numpy").ok


@pytest.mark.parametrize(
    ("code", "test", "passes"),
    [
        ("import collections\ndef f():\n    return collections.Counter('aab')", "assert f() == {'a': 2, 'b': 1}", True),
        ("import collections\ndef f():\n    return collections.Counter('aab')", "assert f() == {'a': 2}", False),
        ("import collections\ndef f():\n    return collections.OrderedDict(b=1, a=2)", "assert f() == {'a': 2, 'b': 1}", True),
        ("import collections\ndef f():\n    d = collections.defaultdict(list)\n    d[1].append(2)\n    return d",
         "assert f() == {1: [2]}", True),
        ("def f():\n    return (i * i for i in range(3))", "assert list(f()) == [0, 1, 4]", True),
        ("def f():\n    return map(str, [2, 1])", "assert sorted(f()) == ['1', '2']", True),
        ("def f():\n    return iter([1, 1, 2])", "assert set(f()) == {1, 2}", True),
        ("def f():\n    return (i for i in range(3))", "assert f() == [0, 1, 2]", False),  # unwrapped: as in Python
        ("from fractions import Fraction\ndef f():\n    return Fraction(1, 3)", "assert f() != 0.3333333333333333", True),
        ("from decimal import Decimal\ndef f():\n    return Decimal('0.5')", "assert f() == 0.5", True),
        ("from decimal import Decimal\ndef f():\n    return Decimal('0.1')", "assert f() == 0.1", False),  # exact, as in Python
        ("import collections\nclass C(collections.Counter):\n    def __eq__(self, other):\n        return True\n"
         "def f():\n    return C()", "assert f() == {'a': 1}", False),  # a subclass is not plain data
    ],
)
def test_results_that_compare_equal_count(code, test, passes):
    completion = f"```python\n{code}\n```"
    assert CodeCorrectnessReward(limits=FAST)(["q"], [completion], tests=[[test]]) == [1.0 if passes else 0.2]


@pytest.mark.skipif(not NUMPY_IN_SANDBOX, reason="numpy is not importable by the sandbox's interpreter here")
def test_numpy_scalars_and_0d_arrays_compare_as_numbers():
    code = ("import numpy as np\ndef total(xs):\n    return np.sum(np.array(xs))\ndef mean(xs):\n    return np.mean(xs)\n"
            "def zero_d(x):\n    return np.array(x)\ndef flag(x):\n    return np.bool_(x > 0)\ndef vec(xs):\n"
            "    return np.array(xs)")
    tests = ["assert total([1, 2]) == 3", "assert abs(mean([1, 2]) - 1.5) < 1e-9", "assert zero_d(2.5) == 2.5",
             "assert flag(3) is True", "assert list(vec([1, 2])) == [1, 2]"]
    assert code_correctness(["q"], [f"```python\n{code}\n```"], tests=[tests]) == [1.0]
    # A 1-d array against a list is ambiguous in numpy (assert raises): not a pass.
    assert code_correctness(["q"], [f"```python\n{code}\n```"], tests=[["assert vec([1, 2]) == [1, 2]"]]) == [0.2]


def test_both_sides_calling_the_solution_and_literal_only_asserts():
    tests = ["assert s([2, 1]) == s([1, 2])", "assert tuple(s([2, 1])) == tuple(s([1, 2]))", "assert s([3, 1]) == [1, 3]",
             "assert True, 'debug'"]
    good = "```python\ndef s(x):\n    return sorted(x)\n```"
    none = "```python\ndef s(x):\n    return None\n```"
    # `assert True` is no test (3 tests count). As in Python, None passes `s(a) == s(b)` (None == None),
    # and tuple(None) fails.
    assert code_correctness(["q", "q"], [good, none], tests=[tests, tests]) == [1.0, pytest.approx(0.2 + 0.8 / 3)]
    assert code_correctness(["q"], [good], tests=[["assert s([1]) == [1]", "assert False"]]) == [pytest.approx(0.6)]


def test_module_code_runs_once_and_pays_its_set_up_once():
    # The module code leaves one file per run in the working directory; 16 tests see one.
    code = ("```python\nimport os, time\ntime.sleep(0.4)\nopen('ran-%d' % len(os.listdir('.')), 'w').close()\n"
            "def runs(x):\n    return len(os.listdir('.')) + x\n```")
    start = time.monotonic()
    assert code_correctness(["q"], [code], tests=[[f"assert runs({i}) == {i + 1}" for i in range(16)]]) == [1.0]
    assert time.monotonic() - start < 5
    slow_import = "```python\nimport time\ntime.sleep(2)\ndef add(a, b):\n    return a + b\n```"
    assert code_correctness(["q"], [slow_import], tests=[ASSERTS]) == [1.0]  # the module gets wall_time_s (5 s)


@pytest.mark.parametrize("hang", ["while True:\n            pass", "sum(range(10 ** 12))"],
                         ids=["python-loop", "one-long-C-call"])
def test_a_test_that_times_out_fails_alone(hang):
    """Each test has its own limit: an alarm in the child stops a Python loop; a C call that no
    alarm interrupts is killed by the parent, and a new process runs the tests after it."""
    code = f"```python\ndef add(a, b):\n    if a == 2:\n        {hang}\n    return a + b\n```"
    tests = [f"assert add({i}, 1) == {i + 1}" for i in range(6)]
    reward = CodeCorrectnessReward(limits=FAST, test_timeout_s=0.5)
    start = time.monotonic()
    assert reward(["q"], [code], tests=[tests]) == [pytest.approx(0.2 + 0.8 * 5 / 6)]
    assert time.monotonic() - start < 4


def test_total_time_is_bounded_when_every_test_hangs():
    from opensloth.rewards.sandbox import harness_budget_s

    code = "```python\nimport os\ndef add(a, b):\n    sum(range(10 ** 12))\n```"
    reward = CodeCorrectnessReward(limits=SandboxLimits(wall_time_s=1.0, cpu_time_s=2), test_timeout_s=0.3)
    start = time.monotonic()
    assert reward(["q"], [code], tests=[ASSERTS]) == [0.2]
    assert time.monotonic() - start < harness_budget_s(3, reward.limits, 0.3) + 1.0  # 1 + 3 x 0.8 s, + reaping
    crash = "```python\nimport os\ndef add(a, b):\n    if a == 1:\n        os._exit(0)\n    return a + b\n```"
    assert reward(["q"], [crash], tests=[ASSERTS]) == [pytest.approx(0.2 + 0.8 * 2 / 3)]  # it fails alone


@pytest.mark.skipif(not sandbox_isolated(), reason="without namespaces a root trainer under /root gets the system python")
def test_model_code_runs_on_the_trainers_interpreter():
    import sys

    result = run_python("import sys\nprint(sys.version)\nprint(sys.prefix)", limits=FAST)
    assert result.stdout.splitlines() == [sys.version, sys.prefix], result
